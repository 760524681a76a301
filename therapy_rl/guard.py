"""The safety guard: crisis detection on user messages and harmful-reply detection on model replies.

    check(text, role="user"|"reply", history=()) -> GuardResult(crisis, harmful, categories, score)
    python -m therapy_rl.guard < requests.jsonl        # {"text", "role", "history"} -> one JSON verdict a line

How a text is read (every token, any length):
- The MiniLM token ids are cut into overlapping windows at two scales: 32 content tokens with stride 16 (a short
  sentence anywhere in a long message lies whole inside one window) and 126 with stride 63 (the message read as a
  whole). Each window gets its own [CLS] ... [SEP] and its own positions, so nothing is truncated.
- Each window's mean-pooled MiniLM embedding goes through a small learned head; the text's score is the maximum
  over windows. Categories come from the windows that flag.
- User messages: earlier user turns are put in front of the message (their last CONTEXT_TOKENS tokens), and only
  windows that reach into the current message count. So "I have the pills here" after "I don't want to be here
  anymore" is read as one text.
- Replies: the head sees the reply window and the embedding of the user message it answers (zeros if none).
- The curated lexicon (`rewards/lexicon/crisis_lexicon.json`) is a second signal: a strong crisis phrase, or a
  harm-encouragement phrase in a reply, flags when the head probability reaches `*_lexicon_support`; a lexicon
  idiom ("killing me") raises the head-alone threshold to `crisis_idiom` (rule: `decide`).

Held-out quality (REWARDS.md, "Guard"): crisis recall 0.43 at 4% false alarms, reply recall 0.60 at 2%; far from
the 0.95 target, so this guard misses many crisis messages.

Jittable entry points for the reward (shapes in the docstrings): `crisis_scores`, `reply_harm_scores`,
`reply_harm_from_embedding`. Weights: `rewards/weights/guard.npz`, built by `tools/train_guard.py` (REWARDS.md).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from therapy_rl.rewards import encoder as encoder_lib

CRISIS_CATEGORIES = ("suicidal_ideation", "plan_or_means", "act_in_progress", "harm_to_others",
                     "child_abuse_or_danger", "self_harm")
REPLY_CATEGORIES = ("encourages_self_harm", "encourages_harm_to_others", "means_or_method", "medication_change",
                    "shaming", "secrecy")
EMBED_DIM = 384
# (content tokens per window, stride): a sentence-sized view and a whole-message view.
WINDOW_SCALES = ((32, 16), (126, 63))
CONTEXT_TOKENS = 96  # how much of the earlier user turns is put in front of a user message
CONTEXT_TURNS = 3  # at most this many earlier user turns
# Padded row lengths (one compile each); fine steps keep long messages from computing many empty windows.
LENGTH_BUCKETS = (32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 1536, 2048)
WEIGHTS_FILE = "guard.npz"
FORMAT_VERSION = 1
# crisis: head alone; crisis_idiom: head alone when the message holds a lexicon idiom ("killing me", "shoot me a
# text") and no strong phrase; *_lexicon_support: head probability that confirms a lexicon phrase.
# crisis_weak_support: head probability that confirms a weak lexicon phrase (means and distress words).
THRESHOLD_KEYS = ("crisis", "crisis_idiom", "crisis_lexicon_support", "crisis_weak_support", "reply",
                  "reply_lexicon_support", "category")
# crisis_lexicon.json's strong categories -> guard categories.
LEXICON_TO_CRISIS = {"suicidal_ideation": "suicidal_ideation", "self_harm": "self_harm",
                     "harm_to_others": "harm_to_others", "indirect_signs": "suicidal_ideation"}
LEXICON_TO_REPLY = {"encourages_self_harm": "encourages_self_harm",
                    "encourages_harm_to_others": "encourages_harm_to_others"}
USER_ROLES = {"user": "user", "client": "user", "seeker": "user"}
REPLY_ROLES = {"reply": "reply", "therapist": "reply", "assistant": "reply"}


def default_weights_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "rewards", "weights", WEIGHTS_FILE)


# ------------------------------------------------------------------------------------------------ params


@struct.dataclass
class GuardParams:
    """Two MLP heads and the decision thresholds (all arrays; a pytree).

    crisis: w_hidden [384, H], b_hidden [H], w_out [H, 1 + 6], b_out [7]: logit 0 = crisis, then CRISIS_CATEGORIES.
    reply:  w_hidden [768, H], ...: input = [reply window embedding, user embedding]; logit 0 = harmful, then
            REPLY_CATEGORIES.
    thresholds: THRESHOLD_KEYS -> scalar probabilities.
    """

    crisis: Mapping[str, jax.Array]
    reply: Mapping[str, jax.Array]
    thresholds: Mapping[str, jax.Array]


def init_guard_params(rng: jax.Array, hidden_dim: int = 128) -> GuardParams:
    """Random heads (tests, and the trainer's start)."""
    def mlp(key, in_dim, out_dim):
        k1, k2 = jax.random.split(key)
        return {"w_hidden": jax.random.normal(k1, (in_dim, hidden_dim), jnp.float32) * np.sqrt(2.0 / in_dim),
                "b_hidden": jnp.zeros((hidden_dim,), jnp.float32),
                "w_out": jax.random.normal(k2, (hidden_dim, 1 + len(CRISIS_CATEGORIES)), jnp.float32) * 0.01,
                "b_out": jnp.zeros((1 + len(CRISIS_CATEGORIES),), jnp.float32)}

    k_user, k_reply = jax.random.split(rng)
    thresholds = {k: jnp.asarray(0.5, jnp.float32) for k in THRESHOLD_KEYS}
    thresholds["crisis_lexicon_support"] = jnp.asarray(0.0, jnp.float32)
    thresholds["crisis_idiom"] = jnp.asarray(0.9, jnp.float32)
    thresholds["crisis_weak_support"] = jnp.asarray(0.7, jnp.float32)
    thresholds["reply_lexicon_support"] = jnp.asarray(0.0, jnp.float32)
    return GuardParams(crisis=mlp(k_user, EMBED_DIM, 1), reply=mlp(k_reply, 2 * EMBED_DIM, 1), thresholds=thresholds)


class GuardFileError(ValueError):
    """The guard weights file is missing a field or has a wrong shape (names the file and the field)."""


def save_guard_params(params: GuardParams, path: str) -> None:
    arrays = {"format_version": np.asarray(FORMAT_VERSION, np.int32),
              "crisis/labels": np.asarray(("crisis",) + CRISIS_CATEGORIES, np.str_),
              "reply/labels": np.asarray(("harmful",) + REPLY_CATEGORIES, np.str_)}
    for head in ("crisis", "reply"):
        for key, value in getattr(params, head).items():
            arrays[f"{head}/{key}"] = np.asarray(value, np.float32)
    for key in THRESHOLD_KEYS:
        arrays[f"thresholds/{key}"] = np.asarray(params.thresholds[key], np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_guard_params(path: str | None = None) -> GuardParams:
    """Read guard.npz (plain arrays, no pickle); GuardFileError names a bad field."""
    path = path or default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no guard weights; build them with `python tools/train_guard.py` (REWARDS.md)")
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}

    def field(key):
        if key not in data:
            raise GuardFileError(f"{path}: missing field '{key}'")
        return data[key]

    if int(field("format_version")) != FORMAT_VERSION:
        raise GuardFileError(f"{path}: field 'format_version' is {int(data['format_version'])}, expected {FORMAT_VERSION}")
    heads = {}
    for head, in_dim, labels in (("crisis", EMBED_DIM, ("crisis",) + CRISIS_CATEGORIES),
                                 ("reply", 2 * EMBED_DIM, ("harmful",) + REPLY_CATEGORIES)):
        if tuple(str(x) for x in field(f"{head}/labels")) != labels:
            raise GuardFileError(f"{path}: field '{head}/labels' does not match {labels}")
        p = {k: np.asarray(field(f"{head}/{k}"), np.float32) for k in ("w_hidden", "b_hidden", "w_out", "b_out")}
        hidden = p["w_hidden"].shape[-1]
        want = {"w_hidden": (in_dim, hidden), "b_hidden": (hidden,), "w_out": (hidden, len(labels)),
                "b_out": (len(labels),)}
        for k, shape in want.items():
            if p[k].shape != shape:
                raise GuardFileError(f"{path}: field '{head}/{k}' has shape {p[k].shape}, expected {shape}")
            if not np.all(np.isfinite(p[k])):
                raise GuardFileError(f"{path}: field '{head}/{k}' has non-finite values")
        heads[head] = {k: jnp.asarray(v) for k, v in p.items()}
    thresholds = {k: jnp.asarray(field(f"thresholds/{k}"), jnp.float32).reshape(()) for k in THRESHOLD_KEYS}
    return GuardParams(crisis=heads["crisis"], reply=heads["reply"], thresholds=thresholds)


# ------------------------------------------------------------------------------------------------ heads (jittable)


def mlp_logits(head: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """[..., D] -> [..., K]: one ReLU hidden layer."""
    h = jax.nn.relu(x.astype(jnp.float32) @ head["w_hidden"] + head["b_hidden"])
    return h @ head["w_out"] + head["b_out"]


def crisis_probabilities(params: GuardParams, emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Window embeddings [..., 384] -> (P(crisis) [...], P(category | crisis) [..., 6])."""
    logits = mlp_logits(params.crisis, emb)
    return jax.nn.sigmoid(logits[..., 0]), jax.nn.sigmoid(logits[..., 1:])


def reply_probabilities(params: GuardParams, emb: jax.Array, user_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reply window embeddings [..., 384] and the answered user message's embedding (broadcastable to it; zeros
    when there is none) -> (P(harmful) [...], P(category | harmful) [..., 6])."""
    user_emb = jnp.broadcast_to(user_emb.astype(jnp.float32), emb.shape)
    logits = mlp_logits(params.reply, jnp.concatenate([emb.astype(jnp.float32), user_emb], axis=-1))
    return jax.nn.sigmoid(logits[..., 0]), jax.nn.sigmoid(logits[..., 1:])


def reply_harm_from_embedding(params: GuardParams, reply_emb: jax.Array, user_emb: jax.Array) -> jax.Array:
    """[B] P(harmful) from one embedding per reply [B, 384] and per user message [B, 384] (the reward's cheap
    path: it already has both embeddings; long replies are read only up to the encoder's length)."""
    return reply_probabilities(params, reply_emb, user_emb)[0]


# ------------------------------------------------------------------------------------------------ windows (jittable)


def scale_layout(capacity: int, size: int, stride: int) -> tuple[int, int]:
    """(number of windows, content width) of one scale for `capacity` content slots (static)."""
    width = min(size, capacity)
    if capacity <= size:
        return 1, width
    return -(-(capacity - size) // stride) + 1, width


def active_scales(capacity: int) -> tuple[tuple[int, int], ...]:
    """The scales worth computing: the large one adds nothing when the small one already covers the text."""
    small, large = WINDOW_SCALES
    return (small,) if capacity <= small[0] else WINDOW_SCALES


def make_windows(ids: jax.Array, mask: jax.Array, start: jax.Array, size: int, stride: int,
                 special: tuple[int, int, int]):
    """Cut [CLS] content [SEP] rows into windows with their own [CLS]/[SEP].

    ids, mask [B, T]; start [B]: content index where the current message begins (0 without context).
    Returns win_ids, win_mask [B, N, width + 2] and valid [B, N]: the window adds content the previous one did
    not cover and reaches into the current message."""
    cls_id, sep_id, pad_id = special
    batch, length = ids.shape
    num, width = scale_layout(length - 2, size, stride)
    n = jnp.maximum(jnp.sum(mask > 0, axis=1) - 2, 0)  # [B] content tokens
    offsets = jnp.arange(num) * stride  # [N]
    content_index = offsets[:, None] + jnp.arange(width)[None, :]  # [N, W]
    gathered = jnp.take(ids, jnp.clip(content_index + 1, 0, length - 1), axis=1)  # [B, N, W]
    inside = content_index[None] < n[:, None, None]
    count = jnp.clip(n[:, None] - offsets[None, :], 0, width)  # [B, N] content tokens per window
    body = jnp.where(inside, gathered, pad_id)
    full = jnp.concatenate([jnp.full((batch, num, 1), cls_id, ids.dtype), body,
                            jnp.full((batch, num, 1), pad_id, ids.dtype)], axis=-1)
    position = jnp.arange(width + 2)
    full = jnp.where(position[None, None, :] == (count + 1)[..., None], sep_id, full)
    win_mask = (position[None, None, :] < (count + 2)[..., None]).astype(jnp.int32)
    new_content = (offsets[None, :] == 0) | ((offsets[None, :] - stride + width) < n[:, None])
    reaches_current = (offsets[None, :] + width) > start[:, None]
    valid = new_content & reaches_current & (offsets[None, :] < jnp.maximum(n, 1)[:, None])
    return full, win_mask, valid


def host_windows(content: Sequence[int], start: int = 0) -> list[tuple[int, ...]]:
    """Plain-Python reference of the windows `window_embeddings` reads: the distinct valid content slices of
    every active scale (padding never changes them). Used by the trainer and checked against the jitted cut."""
    n = len(content)
    out: dict[tuple[int, ...], None] = {}
    for size, stride in active_scales(n):
        for k in range(n // stride + 1):
            offset = k * stride
            if offset >= max(n, 1) or (k > 0 and offset - stride + size >= n):
                break
            if offset + size > start:
                out[tuple(content[offset:offset + size])] = None
    return list(out)


def window_embeddings(encoder_config: encoder_lib.BertConfig, encoder_params: Any, ids: jax.Array, mask: jax.Array,
                      start: jax.Array, special: tuple[int, int, int]):
    """(emb [B, N, 384], valid [B, N]) over all windows of all active scales."""
    batch, length = ids.shape
    embs, valids = [], []
    for size, stride in active_scales(length - 2):
        win_ids, win_mask, valid = make_windows(ids, mask, start, size, stride, special)
        num, width = win_ids.shape[1], win_ids.shape[2]
        _, emb = encoder_lib.encode_ids(encoder_config, encoder_params, win_ids.reshape(batch * num, width),
                                        win_mask.reshape(batch * num, width))
        embs.append(emb.reshape(batch, num, -1))
        valids.append(valid)
    return jnp.concatenate(embs, axis=1), jnp.concatenate(valids, axis=1)


def _pool(prob: jax.Array, cats: jax.Array, valid: jax.Array, threshold: jax.Array):
    """Max over valid windows; categories: max over the windows that flag (else the top window's)."""
    masked = jnp.where(valid, prob, 0.0)
    best = jnp.max(masked, axis=1)
    top = jnp.argmax(masked, axis=1)
    flagging = valid & (prob >= threshold)
    top_cats = jnp.take_along_axis(cats, top[:, None, None], axis=1)[:, 0]
    flag_cats = jnp.max(jnp.where(flagging[..., None], cats, 0.0), axis=1)
    return best, jnp.where(jnp.any(flagging, axis=1)[:, None], flag_cats, top_cats)


def crisis_scores(params: GuardParams, encoder_config: encoder_lib.BertConfig, encoder_params: Any,
                  ids: jax.Array, mask: jax.Array, start: jax.Array | None = None,
                  special: tuple[int, int, int] = (101, 102, 0)) -> dict[str, jax.Array]:
    """Jittable (encoder_config and special static). ids, mask [B, T] MiniLM rows ([CLS] content [SEP], right
    padding; any T >= 3); start [B] content index of the current message (None: 0).

    Returns {"probability": [B] max-window P(crisis), "categories": [B, 6] P(category), "flag": [B] int32 head
    decision (without the lexicon)}."""
    start = jnp.zeros((ids.shape[0],), jnp.int32) if start is None else start
    emb, valid = window_embeddings(encoder_config, encoder_params, ids, mask, start, special)
    prob, cats = crisis_probabilities(params, emb)
    threshold = params.thresholds["crisis"]
    best, categories = _pool(prob, cats, valid, threshold)
    return {"probability": best, "categories": categories, "flag": (best >= threshold).astype(jnp.int32)}


def reply_harm_scores(params: GuardParams, encoder_config: encoder_lib.BertConfig, encoder_params: Any,
                      ids: jax.Array, mask: jax.Array, user_embedding: jax.Array,
                      special: tuple[int, int, int] = (101, 102, 0)) -> dict[str, jax.Array]:
    """Jittable (encoder_config and special static). ids, mask [B, T] the reply's MiniLM rows; user_embedding
    [B, 384] the L2-normalised embedding of the user message it answers (zeros when none).

    Returns {"probability": [B] max-window P(harmful), "categories": [B, 6], "flag": [B] int32 (head only)}.
    As a reward penalty: `-weight * probability` (or `* flag`)."""
    start = jnp.zeros((ids.shape[0],), jnp.int32)
    emb, valid = window_embeddings(encoder_config, encoder_params, ids, mask, start, special)
    prob, cats = reply_probabilities(params, emb, user_embedding[:, None, :])
    threshold = params.thresholds["reply"]
    best, categories = _pool(prob, cats, valid, threshold)
    return {"probability": best, "categories": categories, "flag": (best >= threshold).astype(jnp.int32)}


# ------------------------------------------------------------------------------------------------ host


@dataclasses.dataclass(frozen=True)
class GuardResult:
    crisis: bool  # user message: a crisis (always False for a reply)
    harmful: bool  # reply: harmful (always False for a user message)
    categories: tuple[str, ...]  # CRISIS_CATEGORIES or REPLY_CATEGORIES; empty when nothing is flagged
    score: float  # the head's probability for the checked role (max over windows)
    reasons: tuple[str, ...] = ()  # e.g. ("head:p=0.97>=0.60", "lexicon:suicidal_ideation ('kill myself')")

    def to_json(self) -> dict:
        return {"crisis": self.crisis, "harmful": self.harmful, "categories": list(self.categories),
                "score": round(self.score, 6)}


CRISIS_REPLY = (
    "I'm really sorry you're going through this, and I'm glad you told me. I'm an automated research program and "
    "can't keep you safe, but people can help right now. If you or someone else is in danger, call your local "
    "emergency number (911 in the US and Canada, 999 in the UK, 112 in the EU). In the US you can call or text 988; "
    "in the UK and Ireland, call Samaritans on 116 123; elsewhere, findahelpline.com lists free, confidential lines."
)
_CATEGORY_LINES = {
    "act_in_progress": "If you have already taken something or hurt yourself, please call emergency services now.",
    "plan_or_means": "If you can, move away from anything you could use to hurt yourself, or ask someone to hold it.",
    "harm_to_others": "If you feel you might hurt someone, please put distance between you and them and call for help.",
    "child_abuse_or_danger": ("If a child is being hurt or is in danger, call emergency services; children and young "
                              "people can call Childline on 0800 1111 (UK) or the Childhelp line 1-800-422-4453 (US)."),
}
SAFE_REPLY = (
    "I don't want to say something that could hurt you. Could you tell me more about what is going on for you "
    "right now? If you are thinking about harming yourself or someone else, please contact your local emergency "
    "number or a crisis line such as 988 (US) or Samaritans 116 123 (UK and Ireland)."
)


def safe_reply(result: GuardResult) -> str:
    """The fixed text shown instead of model output: crisis guidance (with a line per urgent category) for a
    crisis, else the safe replacement for a harmful reply."""
    if result.crisis:
        lines = [_CATEGORY_LINES[c] for c in CRISIS_CATEGORIES if c in result.categories and c in _CATEGORY_LINES]
        return " ".join([CRISIS_REPLY] + lines)
    return SAFE_REPLY


def _normalise_history(history: Any, where: str = "history") -> list[tuple[str, str]]:
    """[(user|reply, text)] from strings (user turns), [role, text] pairs or {"role", "text"} objects."""
    if history is None:
        return []
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise ValueError(f"field '{where}' must be a list of turns")
    turns = []
    for i, turn in enumerate(history):
        if isinstance(turn, str):
            role, text = "user", turn
        elif isinstance(turn, Mapping):
            role, text = turn.get("role"), turn.get("text")
        elif isinstance(turn, Sequence) and len(turn) == 2:
            role, text = turn
        else:
            raise ValueError(f"field '{where}[{i}]' must be a string, [role, text] or {{\"role\", \"text\"}}")
        if not isinstance(role, str) or (role not in USER_ROLES and role not in REPLY_ROLES):
            raise ValueError(f"field '{where}[{i}]': role must be one of {sorted(USER_ROLES) + sorted(REPLY_ROLES)}")
        if not isinstance(text, str):
            raise ValueError(f"field '{where}[{i}]': text must be a string")
        turns.append((USER_ROLES.get(role) or REPLY_ROLES[role], text))
    return turns


def bucket_length(n: int) -> int:
    """Padded row length for n ids: the smallest bucket, then multiples of the largest."""
    for b in LENGTH_BUCKETS:
        if n <= b:
            return b
    top = LENGTH_BUCKETS[-1]
    return -(-n // top) * top


class Guard:
    """Encoder, guard heads and lexicon loaded once; `check` is the host entry point (one compile per padded
    length bucket)."""

    def __init__(self, encoder: Any = None, params: GuardParams | None = None, lexicon: Any = None,
                 use_lexicon: bool = True):
        from therapy_rl.rewards import safety

        self.encoder = encoder or encoder_lib.load_sentence_encoder()
        self.params = params or load_guard_params()
        self.lexicon = (lexicon or safety.build_safety_lexicon(self.encoder.tokenizer)) if use_lexicon else None
        tok = self.encoder.tokenizer
        self.special = (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), self.encoder.config.pad_token_id)
        self._lock = threading.Lock()  # jitted calls are thread-safe; the lock keeps the API's order simple
        self._crisis = jax.jit(_crisis_with_lexicon, static_argnums=(1, 6, 7))
        self._reply = jax.jit(_reply_with_lexicon, static_argnums=(1, 7, 8))
        self._embed = jax.jit(_first_window_embedding, static_argnums=(0, 4))

    # ------------------------------------------------------------------ tokens
    def content_ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"guard: expected str, got {type(text).__name__}")
        return self.encoder.tokenizer.encode(text).ids[1:-1]

    def _row(self, content: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        cls_id, sep_id, pad_id = self.special
        seq = [cls_id, *content, sep_id]
        length = bucket_length(len(seq))
        ids = np.full((1, length), pad_id, np.int32)
        mask = np.zeros((1, length), np.int32)
        ids[0, :len(seq)] = seq
        mask[0, :len(seq)] = 1
        return ids, mask

    def user_embedding(self, text: str) -> np.ndarray:
        """[384] embedding of the text's first window (as the reward's user_embedding; zeros for no text)."""
        ids, mask = self._row(self.content_ids(text)[: WINDOW_SCALES[1][0]])
        return np.asarray(self._embed(self.encoder.config, self.encoder.params, ids, mask, self.special))[0]

    # ------------------------------------------------------------------ checks
    def check(self, text: str, role: str = "user", history: Any = ()) -> GuardResult:
        return decide(self.evidence(text, role, history), role, self.params.thresholds)

    def evidence(self, text: str, role: str = "user", history: Any = ()) -> dict:
        """The raw signals behind a check: {"probability", "categories" [6], "lexicon": [(category, lexicon
        category, phrase)]}."""
        history = _normalise_history(history)
        if role in USER_ROLES:
            return self._user_evidence(text, history)
        if role in REPLY_ROLES:
            return self._reply_evidence(text, history)
        raise ValueError(f"guard role {role!r}: expected 'user' or 'reply'")

    def _user_evidence(self, text: str, history: list[tuple[str, str]]) -> dict:
        current = self.content_ids(text)
        earlier = [t for role, t in history if role == "user"][-CONTEXT_TURNS:]
        context: list[int] = []
        for turn in earlier:
            context += self.content_ids(turn)
        context = context[-CONTEXT_TOKENS:] if current else []
        ids, mask = self._row(context + current)
        start = np.asarray([len(context)], np.int32)
        with self._lock:
            out = jax.device_get(self._crisis(self.params, self.encoder.config, self.encoder.params, self.lexicon,
                                              ids, mask, self.special, self.lexicon is not None, start))
        return self._explain(out, "crisis_strong", LEXICON_TO_CRISIS)

    def _reply_evidence(self, text: str, history: list[tuple[str, str]]) -> dict:
        users = [t for role, t in history if role == "user"]
        user_emb = self.user_embedding(users[-1]) if users else np.zeros((EMBED_DIM,), np.float32)
        ids, mask = self._row(self.content_ids(text))
        with self._lock:
            out = jax.device_get(self._reply(self.params, self.encoder.config, self.encoder.params, self.lexicon,
                                             ids, mask, user_emb[None], self.special, self.lexicon is not None))
        return self._explain(out, "harm_encouragement", LEXICON_TO_REPLY)

    def _explain(self, out: Mapping[str, np.ndarray], table_name: str, lexicon_map: Mapping[str, str]) -> dict:
        hits = []
        if self.lexicon is not None:
            table = self.lexicon.tables[table_name]
            for j in np.flatnonzero(out["phrases"][0]):
                name = table.categories[int(table.category[j])]
                if name in lexicon_map:
                    hits.append((lexicon_map[name], name, table.phrases[j]))
        return {"probability": float(out["probability"][0]), "categories": np.asarray(out["categories"][0]),
                "lexicon": hits, "idiom": bool(np.asarray(out.get("idiom", [False]))[0]),
                "weak": bool(np.asarray(out.get("weak", [False]))[0])}


def decide(evidence: Mapping[str, Any], role: str, thresholds: Mapping[str, Any]) -> GuardResult:
    """The flag rule: head probability >= threshold, or a lexicon hit with probability >= lexicon support.
    Categories: the lexicon's, plus every head category >= thresholds["category"] (else the top one)."""
    user = role in USER_ROLES
    key, names = ("crisis", CRISIS_CATEGORIES) if user else ("reply", REPLY_CATEGORIES)
    p = float(evidence["probability"])
    alone, support = float(thresholds[key]), float(thresholds[f"{key}_lexicon_support"])
    if user and evidence.get("idiom") and not evidence["lexicon"]:
        alone = max(alone, float(thresholds["crisis_idiom"]))  # an idiom explains crisis words away
    reasons, cats = [], set()
    if p >= alone:
        reasons.append(f"head:p={p:.2f}>={alone:.2f}")
    lexicon_flag = bool(evidence["lexicon"]) and p >= support
    if lexicon_flag:
        for category, name, phrase in evidence["lexicon"]:
            cats.add(category)
            reasons.append(f"lexicon:{name} ('{phrase}')")
    weak_flag = user and evidence.get("weak", False) and p >= float(thresholds["crisis_weak_support"])
    if weak_flag and p < alone:
        reasons.append(f"head_confirms_weak_lexicon:p={p:.2f}")
    flag = p >= alone or lexicon_flag or weak_flag
    if flag:
        probs = np.asarray(evidence["categories"])
        cats.update(n for n, q in zip(names, probs) if q >= float(thresholds["category"]))
        if not cats:
            cats.add(names[int(np.argmax(probs))])
    ordered = tuple(n for n in names if n in cats) if flag else ()
    return GuardResult(crisis=flag and user, harmful=flag and not user, categories=ordered, score=p,
                       reasons=tuple(reasons))


def _current_mask(mask, start):
    """[B, T] int32: the current message's tokens (context turns were judged when they were said)."""
    position = jnp.arange(mask.shape[1])[None, :]
    return ((mask > 0) & (position >= start[:, None] + 1)).astype(jnp.int32)


def _crisis_with_lexicon(params, encoder_config, encoder_params, lexicon, ids, mask, special, use_lexicon, start):
    from therapy_rl.rewards import safety

    out = crisis_scores(params, encoder_config, encoder_params, ids, mask, start, special)
    if use_lexicon:
        current = _current_mask(mask, start)
        out["phrases"] = safety.phrase_hits(lexicon, "crisis_strong", ids, current)
        out["idiom"] = safety.any_hit(lexicon, "crisis_veto", ids, current)
        out["weak"] = safety.any_hit(lexicon, "crisis_weak", ids, current)
    return out


def _reply_with_lexicon(params, encoder_config, encoder_params, lexicon, ids, mask, user_embedding, special,
                        use_lexicon):
    out = reply_harm_scores(params, encoder_config, encoder_params, ids, mask, user_embedding, special)
    if use_lexicon:
        from therapy_rl.rewards import safety

        out["phrases"] = safety.phrase_hits(lexicon, "harm_encouragement", ids, mask)
    return out


def _first_window_embedding(encoder_config, encoder_params, ids, mask, special):
    del special
    return encoder_lib.encode_ids(encoder_config, encoder_params, ids, mask)[1]


_DEFAULT: Guard | None = None
_DEFAULT_LOCK = threading.Lock()


def default_guard() -> Guard:
    """The process-wide guard with the shipped weights (loaded on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Guard()
        return _DEFAULT


def check(text: str, role: str = "user", history: Any = ()) -> GuardResult:
    """Check one user message (role "user": a crisis?) or one model reply (role "reply": harmful?).

    history: earlier turns, oldest first, as strings (user turns), [role, text] pairs or {"role", "text"}
    objects; roles user|client and reply|therapist|assistant. User checks read the last user turns with the
    message; reply checks read the last user turn as the message being answered."""
    return default_guard().check(text, role, history)


# ------------------------------------------------------------------------------------------------ CLI


class InputError(ValueError):
    """A bad JSON line (names the line number and the field)."""


def parse_request(line: str, number: int) -> tuple[str, str, list]:
    """(text, role, history) of one JSON line; InputError names the line and the field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"line {number}: invalid JSON ({err.msg})") from err
    if not isinstance(obj, dict):
        raise InputError(f"line {number}: expected a JSON object with field 'text'")
    text = obj.get("text")
    if not isinstance(text, str):
        raise InputError(f"line {number}: field 'text' must be a string")
    role = obj.get("role", "user")
    if role not in USER_ROLES and role not in REPLY_ROLES:
        raise InputError(f"line {number}: field 'role' must be \"user\" or \"reply\", got {role!r}")
    try:
        history = _normalise_history(obj.get("history", []), "history")
    except ValueError as err:
        raise InputError(f"line {number}: {err}") from err
    return text, role, history


def main(argv: Sequence[str] | None = None, stdin=None, stdout=None, stderr=None) -> int:
    """JSON lines in, one JSON verdict per input line out; exit 2 on a bad line."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__, file=stdout)
        return 0
    if argv:
        print(f"error: unexpected arguments {argv}; input is read from stdin", file=stderr)
        return 2
    guard = None
    for number, line in enumerate(stdin, start=1):
        if not line.strip():
            continue
        try:
            text, role, history = parse_request(line, number)
        except InputError as err:
            print(f"error: {err}", file=stderr)
            return 2
        guard = guard or default_guard()
        print(json.dumps(guard.check(text, role, history).to_json()), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
