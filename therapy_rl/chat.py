"""Chat with a trained checkpoint, behind a crisis guard.

    python -m therapy_rl.chat --workdir runs/quickstart [--problem "work stress"] [--user_emotion auto]

Every user message goes through the crisis detector first (lexicon + trained head, the same jitted code the
reward uses). A detected crisis gets a fixed message with crisis-line guidance instead of model output, and a
model reply that encourages harm is never shown. Reads stdin line by line when it is not a terminal, so it
also works as ``echo "..." | python -m therapy_rl.chat --workdir W`` (``--json`` prints one JSON object a line).

This is research software, not a therapist or a crisis service.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Callable, Optional

from absl import app, flags

CRISIS_MESSAGE = (
    "I'm really sorry you're feeling this way, and I'm glad you said it. I'm an automated research program and "
    "can't keep you safe, but people can help right now. If you might act on these thoughts or are in danger, call "
    "your local emergency number (911 in the US and Canada, 999 in the UK, 112 in the EU). In the US you can call "
    "or text 988 (Suicide & Crisis Lifeline); in the UK and Ireland, call Samaritans on 116 123; elsewhere, "
    "findahelpline.com lists free, confidential lines. If you can, stay with or contact someone you trust, and "
    "move away from anything you could use to hurt yourself."
)
UNSAFE_REPLY_MESSAGE = (
    "I don't want to give you a reply that could be harmful. Could you tell me more about what is going on for "
    "you right now? If you are thinking about harming yourself or someone else, please contact your local "
    "emergency number or a crisis line such as 988 (US) or Samaritans 116 123 (UK and Ireland)."
)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained run directory (SFT or PPO): tokenizer, run_info.json, checkpoints.")
flags.DEFINE_string("checkpoint", None, "A checkpoint folder to load instead of the workdir's best/ (optional).")
flags.DEFINE_string("problem", "unknown", "Problem type given to the model (MESC uses 'unknown' by default).")
flags.DEFINE_string("user_emotion", "auto", "The user's emotion label, or 'auto' to infer it with the emotion head.")
flags.DEFINE_integer("max_new_tokens", 64, "Longest reply in tokens.")
flags.DEFINE_float("temperature", 0.9, "Sampling temperature.")
flags.DEFINE_integer("top_k", 20, "Top-k filter (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Top-p filter (1.0 = off).")
flags.DEFINE_bool("greedy", False, "Greedy decoding instead of sampling.")
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
    """One conversation: crisis guard → prompt (with the run's context window) → sampler → reply guard."""

    def __init__(self, reply_fn: Callable[[str, str, tuple], tuple[str, Optional[str]]], detector: Any,
                 emotion_fn: Callable[[str], str], harm_fn: Callable[[str], bool], context_turns: int):
        self.reply_fn, self.detector, self.emotion_fn, self.harm_fn = reply_fn, detector, emotion_fn, harm_fn
        self.context_turns = context_turns
        self.history: list[tuple[str, str]] = []

    def respond(self, user_text: str, user_emotion: str = "auto") -> Turn:
        verdict = self.detector.detect([user_text])[0]
        emotion = self.emotion_fn(user_text) if user_emotion == "auto" else user_emotion
        if verdict.flag:
            turn = Turn(user_text, emotion, True, tuple(verdict.reasons), CRISIS_MESSAGE, None, "crisis_guard")
        else:
            context = tuple(self.history[-self.context_turns:]) if self.context_turns else ()
            reply, reply_emotion = self.reply_fn(user_text, emotion, context)
            if self.harm_fn(reply):
                turn = Turn(user_text, emotion, False, (), UNSAFE_REPLY_MESSAGE, None, "unsafe_reply_guard")
            else:
                turn = Turn(user_text, emotion, False, (), reply, reply_emotion, "model")
        self.history += [("client", user_text), ("therapist", turn.reply)]
        return turn


def build_session(workdir: str, checkpoint: Optional[str], problem: str, sampling_overrides: dict, seed: int):
    """Loads the run's model, tokenizer and the safety models; returns a ChatSession."""
    import jax
    import numpy as np

    from therapy_rl import checkpoint as checkpoint_lib, replies, run_files, sampling
    from therapy_rl.data import batches, labels, samples as samples_lib, tokenize
    from therapy_rl.rewards import encoder as encoder_lib, heads as heads_lib, safety

    info = run_files.read_run_info(workdir)
    data = info["data"]
    tok = tokenize.load_tokenizer(run_files.tokenizer_dir(workdir))
    model_config = run_files.model_config_of(workdir, dropout_rate=0.0)
    params, _ = checkpoint_lib.load_params(checkpoint or workdir)
    opts = samples_lib.SampleOptions(include_therapist_emotion=data["include_therapist_emotion"],
                                     include_strategy=data["include_strategy"], context_turns=data["context_turns"],
                                     user_emotion_from=data["user_emotion_from"])
    sampling_config = sampling.SamplingConfig(eos_id=tok.eos_id, pad_id=tok.pad_id, **sampling_overrides)
    generate_fn = sampling.make_generate_fn(model_config, sampling_config)
    prompt_length = data["max_prompt_tokens"]
    base_key = jax.random.key(seed)
    counter = {"turn": 0}

    def reply_fn(user_text: str, user_emotion: str, context: tuple) -> tuple[str, Optional[str]]:
        sample = samples_lib.Sample(problem=problem, user_text=user_text, user_emotion=user_emotion,
                                    therapist_text="", therapist_emotion="neutral", strategy=None, context=context,
                                    dialogue_id="chat", turn_index=counter["turn"])
        prompt = tokenize.encode_prompt(tok, sample, opts)
        arrays, _ = batches.make_prompt_arrays([prompt], [sample], prompt_length, pad_id=tok.pad_id, drop_long=False)
        key = jax.random.fold_in(base_key, counter["turn"])
        counter["turn"] += 1
        reply = replies.generate_replies(generate_fn, params, tok, arrays, 1, key)[0]
        return reply.text.strip(), reply.emotion

    encoder = encoder_lib.load_sentence_encoder()
    heads = heads_lib.load_reward_heads()
    lexicon = safety.build_safety_lexicon(encoder.tokenizer)
    detector = safety.CrisisDetector(encoder, heads, lexicon, batch_size=1)
    emotion_head = jax.jit(heads_lib.emotion_probabilities)

    def emotion_fn(text: str) -> str:
        probs = np.asarray(emotion_head(heads, encoder.embed([text], batch_size=1)))
        return labels.EMOTIONS[int(np.argmax(probs[0]))]

    harm_jit = jax.jit(safety.encourages_harm)

    def harm_fn(text: str) -> bool:
        ids, mask = detector.tokenize([text])
        return bool(np.asarray(harm_jit(lexicon, ids, mask))[0])

    return ChatSession(reply_fn, detector, emotion_fn, harm_fn, opts.context_turns)


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

    from therapy_rl.data import labels

    logging.set_verbosity(logging.WARNING)
    if FLAGS.user_emotion != "auto" and FLAGS.user_emotion not in labels.EMOTIONS:
        raise app.UsageError(f"--user_emotion must be 'auto' or one of {labels.EMOTIONS}")
    sampling_overrides = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                              top_k=FLAGS.top_k, top_p=FLAGS.top_p, greedy=FLAGS.greedy)
    session = build_session(FLAGS.workdir, FLAGS.checkpoint, FLAGS.problem, sampling_overrides, FLAGS.seed)
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
    flags.mark_flag_as_required("workdir")
    app.run(main)
