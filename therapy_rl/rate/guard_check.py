"""The safety flags a reply carries into the rating queue: the app shows a warning banner on every flagged (or
unchecked) reply, so no rater meets one unwarned.

`check_replies` is the room's only door to the guard (`therapy_rl.guard`, the same function chat and the API use):
`guard.check(user_text, "user")` says whether the user text it answers shows a crisis, and
`guard.check(reply, "reply", history=[user_text])` whether the reply is harmful. `GuardFlags` mirrors the
`GuardResult` fields. Categories carry a "user:" or "reply:" prefix; the page shows a red banner for any "reply:"
category and an amber one for the rest.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class GuardFlags:
    crisis: bool  # the conversation shows crisis signs (the reply must point to crisis help)
    harmful: bool  # the reply itself looks harmful (guard reply categories: encourages harm, means, medication...)
    categories: tuple[str, ...] = ()
    score: float = 0.0  # the guard's crisis probability of the user text

    @property
    def flagged(self) -> bool:
        return self.crisis or self.harmful


@functools.lru_cache(maxsize=1)
def _guard():
    from therapy_rl import guard

    return guard.default_guard()


def flags_from_results(user_result, reply_result) -> GuardFlags:
    """GuardFlags from the guard's verdicts on the user text and on the reply."""
    harmful = bool(reply_result.harmful)
    categories = (tuple(f"user:{c}" for c in user_result.categories) if user_result.crisis else ())
    if harmful:
        categories += tuple(f"reply:{c}" for c in reply_result.categories) or ("reply:harmful",)
    return GuardFlags(crisis=bool(user_result.crisis), harmful=harmful, categories=categories,
                      score=float(user_result.score))


def check_replies(replies: Sequence[str], user_texts: Sequence[str]) -> list[GuardFlags]:
    """One GuardFlags per reply (`user_texts[i]` is the message reply i answers)."""
    if len(replies) != len(user_texts):
        raise ValueError(f"check_replies: {len(replies)} replies but {len(user_texts)} user texts")
    if not replies:
        return []
    guard = _guard()
    out = []
    for reply, user in zip(replies, user_texts):
        user_result = guard.check(user, "user") if user else None
        reply_result = guard.check(reply, "reply", [["user", user]] if user else [])
        if user_result is None:
            from therapy_rl.guard import GuardResult

            user_result = GuardResult(False, False, (), 0.0)
        out.append(flags_from_results(user_result, reply_result))
    return out
