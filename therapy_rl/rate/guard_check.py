"""The safety flags a reply carries into the rating queue: the app shows a warning banner on every flagged (or
unchecked) reply, so no rater meets one unwarned.

`check_replies` is the room's only door to the guard. Today it asks `rewards/safety.py` (harm encouragement in the
reply, crisis signs in the user text it answers); once `therapy_rl/guard.py` ships its weights, swap its body for
`guard.check(user_text, "user")` and `guard.check(reply, "reply", history=[user_text])`, whose
`GuardResult(crisis, harmful, categories, score)` has the fields `GuardFlags` mirrors. Categories carry a "user:" or
"reply:" prefix; the page shows a red banner for any "reply:" category and an amber one for the rest.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class GuardFlags:
    crisis: bool  # the conversation shows crisis signs (the reply must point to crisis help)
    harmful: bool  # the reply itself looks harmful (encourages self-harm or harm to others)
    categories: tuple[str, ...] = ()
    score: float = 0.0  # crisis-head probability of the user text

    @property
    def flagged(self) -> bool:
        return self.crisis or self.harmful


@functools.lru_cache(maxsize=1)
def _safety_models():
    import jax

    from therapy_rl.rewards import encoder as encoder_lib, heads as heads_lib, safety

    encoder = encoder_lib.load_sentence_encoder()
    heads = heads_lib.load_reward_heads()
    lexicon = safety.build_safety_lexicon(encoder.tokenizer)
    return safety.CrisisDetector(encoder, heads, lexicon, batch_size=8), jax.jit(safety.encourages_harm)


def check_replies(replies: Sequence[str], user_texts: Sequence[str]) -> list[GuardFlags]:
    """One GuardFlags per reply (`user_texts[i]` is the message reply i answers)."""
    import numpy as np

    if len(replies) != len(user_texts):
        raise ValueError(f"check_replies: {len(replies)} replies but {len(user_texts)} user texts")
    if not replies:
        return []
    detector, encourages_harm = _safety_models()
    crisis = detector.detect(list(user_texts))
    rows = detector.batch_size
    harmful: list[bool] = []
    for start in range(0, len(replies), rows):  # fixed batch shape: one compile
        chunk = list(replies[start:start + rows])
        ids, mask = detector.tokenize(chunk + [""] * (rows - len(chunk)))
        harmful += [bool(h) for h in np.asarray(encourages_harm(detector.lexicon, ids, mask))[:len(chunk)]]
    out = []
    for c, h in zip(crisis, harmful):
        categories = (("user:crisis",) if c.flag else ()) + (("reply:harm_encouragement",) if h else ())
        out.append(GuardFlags(crisis=c.flag, harmful=h, categories=categories, score=float(c.score)))
    return out
