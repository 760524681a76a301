"""Chat with a trained checkpoint, behind the crisis guard: a thin loop over `therapy_rl.api.Policy`.

    python -m therapy_rl.chat --workdir runs/quickstart [--checkpoint best|last|STEP] [--problem "work stress"]

Every user message goes through the guard first (`therapy_rl.guard.check` with the earlier turns, the same
function as the API and `python -m therapy_rl.guard`; its jitted scores are the reward's safety signal). A
detected crisis gets a fixed message with crisis-line guidance instead of model output, and a model reply the
guard flags as harmful is never shown. Decoding defaults to the run's decoding.json (or ``--decoding``),
else its config.sampling; the sampling flags override single fields. Reads stdin line by line when it is not a
terminal, so it also works as ``echo "..." | python -m therapy_rl.chat --workdir W`` (``--json`` prints one JSON
object a line). Decodes on one device (see `therapy_rl.api`: one reply at a time, latency first).

This is research software, not a therapist or a crisis service.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Optional

from absl import app, flags

from therapy_rl.api import CRISIS_MESSAGE, UNSAFE_REPLY_MESSAGE  # noqa: F401  (the guard's fixed replies)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained run directory (SFT or PPO) or one of its checkpoint folders.")
flags.DEFINE_string("checkpoint", "best", "Which checkpoint: best, last or a step number.")
flags.DEFINE_string("decoding", None, "A decoding.json (or an eval workdir holding one) for the decoding defaults; "
                    "default: the run's own decoding.json, else its config.sampling.")
flags.DEFINE_string("problem", "unknown", "Problem type given to the model (MESC uses 'unknown' by default).")
flags.DEFINE_string("user_emotion", "auto", "The user's emotion label, or 'auto' to infer it with the emotion head.")
flags.DEFINE_integer("max_new_tokens", None, "Longest reply in tokens (default: the run's).")
flags.DEFINE_float("temperature", None, "Sampling temperature (default: the run's decoding settings).")
flags.DEFINE_integer("top_k", None, "Top-k filter, 0 = off (default: the run's decoding settings).")
flags.DEFINE_float("top_p", None, "Top-p filter, 1.0 = off (default: the run's decoding settings).")
flags.DEFINE_bool("greedy", None, "Greedy decoding instead of sampling (default: the run's).")
flags.DEFINE_integer("seed", 0, "Sampling seed (replies are reproducible for a seed and conversation).")
flags.DEFINE_bool("json", False, "Print one JSON object per message instead of text.")


@dataclasses.dataclass(frozen=True)
class Turn:
    user: str
    user_emotion: str
    crisis: bool
    crisis_reasons: tuple[str, ...]
    reply: str
    reply_emotion: Optional[str]
    source: str  # model | crisis_guard | unsafe_reply_guard


class ChatSession:
    """One conversation over a `Policy` (or anything with its `reply`): keeps the history, the policy does the
    rest (guard, context window, sampling)."""

    def __init__(self, policy: Any, problem: str | None = None, sampling: dict | None = None):
        self.policy, self.problem, self.sampling = policy, problem, sampling
        self.history: list[tuple[str, str]] = []

    def respond(self, user_text: str, user_emotion: str = "auto") -> Turn:
        reply = self.policy.reply(user_text, user_emotion=None if user_emotion == "auto" else user_emotion,
                                  problem=self.problem, history=tuple(self.history), sampling=self.sampling)
        source = reply.source if reply.source != "guard" else ("crisis_guard" if reply.crisis else "unsafe_reply_guard")
        self.history += [("client", user_text), ("therapist", reply.text)]
        return Turn(user_text, reply.user_emotion, reply.crisis, tuple(reply.reasons) if reply.crisis else (),
                    reply.text, reply.emotion, source)


def sampling_overrides(max_new_tokens=None, temperature=None, top_k=None, top_p=None, greedy=None) -> dict:
    """The sampling fields set on the command line (the rest keep the policy's defaults)."""
    values = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return {k: v for k, v in values.items() if v is not None}


def _print_turn(turn: Turn, as_json: bool, out=sys.stdout) -> None:
    if as_json:
        print(json.dumps(dataclasses.asdict(turn)), file=out, flush=True)
        return
    label = f" [{turn.reply_emotion}]" if turn.reply_emotion else ""
    guard = " (crisis guard)" if turn.source == "crisis_guard" else ""
    print(f"therapist{label}{guard}: {turn.reply}", file=out, flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    from therapy_rl import api
    from therapy_rl.data import labels

    logging.set_verbosity(logging.WARNING)
    if FLAGS.user_emotion != "auto" and FLAGS.user_emotion not in labels.EMOTIONS:
        raise app.UsageError(f"--user_emotion must be 'auto' or one of {labels.EMOTIONS}")
    policy = api.load(FLAGS.workdir, FLAGS.checkpoint, decoding=FLAGS.decoding, seed=FLAGS.seed)
    overrides = sampling_overrides(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.greedy)
    policy.sampling_config(overrides)  # checks the flags before the first message
    session = ChatSession(policy, problem=FLAGS.problem, sampling=overrides or None)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message (Ctrl-D or /quit to leave). This is a research model, not a therapist or crisis "
              "service.\n")
    while True:
        if interactive:
            try:
                line = input("you: ")
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        _print_turn(session.respond(text, FLAGS.user_emotion), FLAGS.json)


if __name__ == "__main__":
    from therapy_rl import cli

    flags.mark_flag_as_required("workdir")
    cli.run_cli(main)  # a UserError (bad workdir, checkpoint, sampling flag) prints one line, exit status 2
