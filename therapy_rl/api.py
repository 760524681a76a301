"""The Python API: ``therapy_rl.load(workdir) -> Policy``; ``Policy.reply`` and ``Policy.generate`` -> ``Reply``.

    import therapy_rl
    policy = therapy_rl.load("runs/qs_ppo")
    reply = policy.reply("I had a long week at work and I feel drained.", user_emotion="sadness")
    print(reply.text, reply.emotion, reply.source)

The guard is on by default: `therapy_rl.guard` (a fine-tuned MiniLM with the crisis lexicon as a second signal;
REWARDS.md, "Guard"). Each user message is checked with its earlier turns first: a detected crisis gets
`CRISIS_MESSAGE` (crisis-line guidance, plus a line per urgent category), never model output. Each model reply is
checked with the message it answers; a harmful one (encouraging harm, means or methods, medication changes,
shaming, secrecy) is replaced by `UNSAFE_REPLY_MESSAGE`. Both come back with ``source="guard"``.

Decoding defaults to the run's ``decoding.json`` (the settings an eval's decoding search chose; pass
``decoding=`` to `load` to use another, e.g. an eval workdir), else to the run's own ``config.sampling``.
``sampling=`` overrides fields per call. Sampling keys are ``fold_in(key(seed), call number)``, so replies are
reproducible for a seed and the order of calls (``rng=`` gives a call its own key or integer seed).

Prompts use fixed shapes: one row for a single message, ``batch_size`` rows (padded) for more, and the run's
prompt length, so each decoding setting compiles at most twice.

Devices: a Policy decodes on one device (the default one), whatever the host has. A reply is one row (a few at
most), so a data-parallel mesh has no rows to split, and sharding the params of these small models would add
collectives to every decode step and lengthen the reply. To score many prompts on a mesh or several processes,
use the eval mode (``evaluation/runner.py``, ``config.mesh``), which uses the same sampler and gives the same
tokens for the same key.

This is research software, not a therapist or a crisis service.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from therapy_rl import errors, run as run_lib

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
MODEL, GUARD = "model", "guard"  # Reply.source
DEFAULT_PROBLEM = "unknown"  # what MESC runs saw (data.problem_type="unknown")
SPEAKERS = {"client": "client", "user": "client", "therapist": "therapist", "assistant": "therapist"}


@dataclasses.dataclass(frozen=True)
class Message:
    """One input of `Policy.generate` (a dict with these keys works too)."""

    text: str
    user_emotion: str | None = None  # one of data.labels.EMOTIONS; None (or "auto") = inferred by the emotion head
    problem: str | None = None  # the problem type the model is conditioned on; None = "unknown"
    history: Sequence[tuple[str, str]] = ()  # earlier turns, oldest first: (client|therapist, text)


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    emotion: str | None  # the reply's <therapist_emotion> label; None when missing or from the guard
    crisis: bool  # the user message was flagged as a crisis
    source: str  # "model" | "guard"
    user_emotion: str | None = None  # the user emotion the prompt used (given or inferred)
    reasons: tuple[str, ...] = ()  # why the guard answered
    strategy: str | None = None  # the reply's strategy tag, for runs trained with strategies


# ------------------------------------------------------------------------------------------ the guard


@dataclasses.dataclass(frozen=True)
class Verdict:
    flag: bool
    reasons: tuple[str, ...] = ()


class SafetyModels:
    """The MiniLM encoder, the guard (`therapy_rl.guard.Guard`: crisis and harmful-reply checks, sharing the
    encoder) and the user-emotion head, loaded once."""

    def __init__(self, batch_size: int = 8):
        from therapy_rl import guard as guard_lib
        from therapy_rl.rewards import encoder as encoder_lib, heads as heads_lib

        self.batch_size = batch_size
        self.encoder = encoder_lib.load_sentence_encoder()
        self.heads = heads_lib.load_reward_heads()
        self.guard = guard_lib.Guard(encoder=self.encoder)
        self.lexicon = self.guard.lexicon
        self._emotion = jax.jit(heads_lib.emotion_probabilities)

    def _rows(self, n: int) -> int:
        return 1 if n == 1 else self.batch_size

    def check(self, text: str, role: str, history: Sequence[tuple[str, str]] = ()):
        """guard.check on one text; history: (client|therapist, text) turns, oldest first."""
        return self.guard.check(text, role, [list(turn) for turn in history])

    def crisis(self, texts: Sequence[str], histories: Sequence[Sequence[tuple[str, str]]] = ()) -> list[Verdict]:
        histories = list(histories) or [()] * len(texts)
        return [_verdict(self.check(t, "user", h)) for t, h in zip(texts, histories)]

    def harmful(self, texts: Sequence[str], histories: Sequence[Sequence[tuple[str, str]]] = ()) -> list[bool]:
        """Each reply checked with its history (the last client turn is the message it answers)."""
        histories = list(histories) or [()] * len(texts)
        return [self.check(t, "reply", h).harmful for t, h in zip(texts, histories)]

    def emotions(self, texts: Sequence[str]) -> list[str]:
        from therapy_rl.data import labels

        if not texts:
            return []
        embeddings = self.encoder.embed(list(texts), batch_size=self._rows(len(texts)))
        probs = np.asarray(self._emotion(self.heads, embeddings))
        return [labels.EMOTIONS[int(i)] for i in probs.argmax(axis=-1)]


def _verdict(result) -> Verdict:
    """A guard.GuardResult as a Verdict: the flag, then "crisis:<category>" / "reply:<category>" and the rule."""
    flag = bool(result.crisis or result.harmful)
    prefix = "crisis" if result.crisis else "reply"
    reasons = tuple(f"{prefix}:{c}" for c in result.categories) + tuple(result.reasons) if flag else ()
    return Verdict(flag, reasons)


def check(safety: SafetyModels, texts: Sequence[str], role: str,
          histories: Sequence[Sequence[tuple[str, str]]]) -> list[Verdict]:
    """The guard's verdict on each text: role "user" (a crisis? `histories` are its earlier turns) or "reply"
    (harmful? `histories` end with the client message it answers). The API asks the guard only here."""
    if len(histories) != len(texts):
        raise ValueError(f"guard: {len(texts)} texts but {len(histories)} histories")
    if role == "user":
        return safety.crisis(texts, histories)
    if role == "reply":
        return [_verdict(safety.check(t, "reply", h)) for t, h in zip(texts, histories)]
    raise ValueError(f"guard role {role!r}: expected user or reply")


# ------------------------------------------------------------------------------------------ the policy


class Policy:
    """A run's model with its tokenizer, format, decoding defaults and the guard. Build it with `load`."""

    def __init__(self, run: run_lib.Run, params: Any = None, *, decoding: Any = None, guard: bool = True,
                 seed: int = 0, batch_size: int = 8, safety: SafetyModels | None = None):
        if batch_size < 1:
            raise errors.ConfigError(f"batch_size={batch_size}: expected >= 1")
        self.run, self.guard, self.seed, self.batch_size = run, bool(guard), int(seed), int(batch_size)
        self.tokenizer = run.tokenizer
        self.params = jax.device_put(run.read_params() if params is None else params)
        self.sampling, self.decoding_source = _default_sampling(run, decoding, self.tokenizer)
        self._check_length(self.sampling)
        self._safety = safety
        self._samplers: dict = {}
        self._key, self._calls = jax.random.key(self.seed), 0

    def __repr__(self) -> str:
        return (f"Policy({self.run.mode} run {self.run.workdir}, checkpoint {self.run.which} step {self.run.step}, "
                f"guard={'on' if self.guard else 'off'}, sampling from {self.decoding_source})")

    def reply(self, text: str, *, user_emotion: str | None = None, problem: str | None = None,
              history: Sequence[tuple[str, str]] = (), sampling: Any = None, rng: Any = None) -> Reply:
        """The therapist's reply to one user message (see `Message` for the fields)."""
        message = Message(text=text, user_emotion=user_emotion, problem=problem, history=history)
        return self.generate([message], sampling=sampling, rng=rng)[0]

    def generate(self, inputs: Iterable[Message | Mapping[str, Any] | str], *, sampling: Any = None,
                 rng: Any = None) -> list[Reply]:
        """Replies to many messages (Message, dict with its fields, or plain text), in order, batched."""
        messages = [_as_message(item, i) for i, item in enumerate(inputs)]
        if not messages:
            return []
        config = self.sampling_config(sampling)
        key = self._next_key(rng)
        texts, histories = [m.text for m in messages], [m.history for m in messages]
        verdicts = check(self.safety, texts, "user", histories) if self.guard else [Verdict(False)] * len(messages)
        unknown = [i for i, m in enumerate(messages) if m.user_emotion is None]
        emotions = [m.user_emotion for m in messages]
        for i, label in zip(unknown, self.safety.emotions([texts[i] for i in unknown]) if unknown else []):
            emotions[i] = label
        messages = [dataclasses.replace(m, user_emotion=e) for m, e in zip(messages, emotions)]

        answered = [i for i, v in enumerate(verdicts) if not v.flag]  # crisis messages never reach the model
        model_replies = self._model_replies([messages[i] for i in answered], config, key)
        reply_verdicts = (check(self.safety, [r.text for r in model_replies], "reply",
                                [tuple(histories[i]) + (("client", texts[i]),) for i in answered])
                          if self.guard and answered
                          else [Verdict(False)] * len(answered))
        out: list[Reply | None] = [None] * len(messages)
        for i, verdict in enumerate(verdicts):
            if verdict.flag:
                out[i] = Reply(CRISIS_MESSAGE, None, True, GUARD, emotions[i], verdict.reasons)
        for i, reply, verdict in zip(answered, model_replies, reply_verdicts):
            out[i] = (Reply(UNSAFE_REPLY_MESSAGE, None, False, GUARD, emotions[i], verdict.reasons) if verdict.flag
                      else Reply(reply.text, reply.emotion, False, MODEL, emotions[i], (), reply.strategy))
        return out

    def sampling_config(self, overrides: Any = None):
        """The default SamplingConfig with `overrides` (a dict, a sampling ConfigDict or a SamplingConfig)."""
        if overrides is None:
            return self.sampling
        try:
            config = dataclasses.replace(self.sampling, **_sampling_values(overrides))
        except ValueError as err:  # SamplingConfig's own checks
            raise errors.ConfigError(f"sampling {overrides}: {err}") from None
        self._check_length(config)
        return config

    @property
    def safety(self) -> SafetyModels:
        """The guard's and emotion head's models (loaded on first use)."""
        if self._safety is None:
            self._safety = SafetyModels(self.batch_size)
        return self._safety

    # ---------------------------------------------------------------------------- internals

    def _model_replies(self, messages: Sequence[Message], config, key: jax.Array) -> list:
        """The model's decoded replies (`replies.Reply`) to messages whose user emotion is set."""
        from therapy_rl import replies
        from therapy_rl.data import batches, samples as samples_lib, tokenize

        if not messages:
            return []
        opts = self.run.sample_options
        samples = [samples_lib.Sample(
            problem=m.problem or DEFAULT_PROBLEM, user_text=m.text, user_emotion=m.user_emotion, therapist_text="",
            therapist_emotion="neutral", strategy=None, context=_context(m.history, opts.context_turns),
            dialogue_id="api", turn_index=i) for i, m in enumerate(messages)]
        encoded = tokenize.encode_samples(self.tokenizer, samples, opts, with_target=False)
        prompts, _ = batches.make_prompt_arrays(encoded, samples, self.run.max_prompt_tokens,
                                                pad_id=self.tokenizer.pad_id, drop_long=False)
        rows = 1 if len(messages) == 1 else self.batch_size
        return replies.generate_replies(self._sampler(config), self.params, self.tokenizer, prompts, rows, key)

    def _sampler(self, config):
        from therapy_rl import sampling

        if config not in self._samplers:
            self._samplers[config] = sampling.make_generate_fn(self.run.model_config, config)
        return self._samplers[config]

    def _next_key(self, rng: Any) -> jax.Array:
        if rng is None:
            self._calls += 1
            return jax.random.fold_in(self._key, self._calls - 1)
        return jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng

    def _check_length(self, config) -> None:
        total = self.run.max_prompt_tokens + config.max_new_tokens
        if total > self.run.model_config.n_positions:
            raise errors.ConfigError(
                f"sampling max_new_tokens={config.max_new_tokens}: with the run's {self.run.max_prompt_tokens}-token "
                f"prompts that is {total} positions, over the model's n_positions {self.run.model_config.n_positions}")


def load(workdir: str, checkpoint: str | int = "best", *, decoding: Any = None, guard: bool = True, seed: int = 0,
         batch_size: int = 8) -> Policy:
    """A trained run (SFT or PPO workdir) as a `Policy`.

    checkpoint: "best" (default), "last" or a step number. decoding: None = the run's decoding.json if any; a
    decoding.json path, a folder holding one (an eval workdir) or a dict of top_p/top_k/temperature; False =
    ignore saved decoding and use the run's config.sampling. guard: the crisis and harmful-reply guard (keep it on
    wherever a person reads the replies). seed: root of the sampling keys. batch_size: rows per batch in generate.
    """
    return Policy(run_lib.open_run(workdir, checkpoint), decoding=decoding, guard=guard, seed=seed,
                  batch_size=batch_size)


# ------------------------------------------------------------------------------------------ helpers


def _default_sampling(run: run_lib.Run, decoding: Any, tok) -> tuple[Any, str]:
    """(SamplingConfig, where it comes from): `Run.default_sampling` with the tokenizer's eos/pad ids."""
    from therapy_rl import sampling

    values, source = run.default_sampling(decoding)
    try:
        return sampling.SamplingConfig(eos_id=tok.eos_id, pad_id=tok.pad_id, **_sampling_values(values)), source
    except ValueError as err:
        raise errors.ConfigError(f"decoding defaults from {source}: {err}") from None


def _sampling_values(overrides: Any) -> dict:
    """Checked sampling fields from a dict, a ConfigDict or a SamplingConfig (its eos/pad ids are not taken)."""
    if dataclasses.is_dataclass(overrides):
        values = {f: getattr(overrides, f) for f in run_lib.SAMPLING_FIELDS}
    elif hasattr(overrides, "to_dict"):
        values = overrides.to_dict()
    elif isinstance(overrides, Mapping):
        values = dict(overrides)
    else:
        raise errors.ConfigError(f"sampling={overrides!r}: expected a dict of {run_lib.SAMPLING_FIELDS}")
    unknown = sorted(set(values) - set(run_lib.SAMPLING_FIELDS))
    if unknown:
        raise errors.ConfigError(f"sampling: unknown fields {unknown}; expected some of {run_lib.SAMPLING_FIELDS}")
    casts = {"max_new_tokens": int, "top_k": int, "temperature": float, "top_p": float, "greedy": bool}
    try:
        return {k: casts[k](v) for k, v in values.items()}
    except (TypeError, ValueError) as err:
        raise errors.ConfigError(f"sampling {values}: {err}") from None


def _as_message(item: Any, index: int) -> Message:
    from therapy_rl.data import labels

    if isinstance(item, str):
        item = Message(item)
    elif isinstance(item, Mapping):
        unknown = sorted(set(item) - {f.name for f in dataclasses.fields(Message)})
        if unknown or "text" not in item:
            raise ValueError(f"input {index}: expected keys text[, user_emotion, problem, history], got {sorted(item)}")
        item = Message(**item)
    elif not isinstance(item, Message):
        raise TypeError(f"input {index}: expected a Message, a dict or a str, got {type(item).__name__}")
    if not isinstance(item.text, str) or not item.text.strip():
        raise ValueError(f"input {index}: the message text is empty")
    emotion = None if item.user_emotion in (None, "auto") else item.user_emotion
    if emotion is not None and emotion not in labels.EMOTIONS:
        raise ValueError(f"input {index}: user_emotion {emotion!r} is not one of {labels.EMOTIONS} (or None)")
    history = tuple(_turn(turn, index) for turn in item.history)
    return dataclasses.replace(item, text=item.text.strip(), user_emotion=emotion, history=history)


def _turn(turn: Any, index: int) -> tuple[str, str]:
    try:
        speaker, text = turn
    except (TypeError, ValueError):
        raise ValueError(f"input {index}: a history turn must be (speaker, text), got {turn!r}") from None
    if speaker not in SPEAKERS:
        raise ValueError(f"input {index}: history speaker {speaker!r}: expected client or therapist")
    return SPEAKERS[speaker], str(text)


def _context(history: Sequence[tuple[str, str]], turns: int) -> tuple[tuple[str, str], ...]:
    """The last `turns` turns: the context window the run was trained with (none when 0)."""
    return tuple(history[-turns:]) if turns else ()
