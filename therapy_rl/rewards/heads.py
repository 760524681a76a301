"""Small trained heads on frozen MiniLM sentence embeddings: empathy, sentiment, emotion, crisis.

Every head is a 1-hidden-layer MLP (or a linear layer when it has no hidden weights) applied to an
L2-normalised all-MiniLM-L6-v2 embedding [B, 384]. Apply functions are pure and jittable; the shipped
weights live in `weights/heads.npz` (plain arrays, loaded with allow_pickle=False) and are produced by
`python tools/train_reward_heads.py` (see REWARDS.md).

Head outputs:
- empathy:   9 logits = 3 EPITOME mechanisms x 3 levels (0 none, 1 weak, 2 strong), one softmax per mechanism.
- sentiment: 1 logit, sigmoid = P(positive)  (SST-2).
- emotion:   7 logits over `therapy_rl.data.labels.EMOTIONS` (GoEmotions-Ekman + MESC client labels).
- crisis:    1 logit, sigmoid = P(crisis)  (r/SuicideWatch vs ordinary Reddit text, see REWARDS.md).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from therapy_rl.data.labels import EMOTIONS

EMBED_DIM = 384
EMPATHY_MECHANISMS = ("emotional_reactions", "interpretations", "explorations")
EMPATHY_LEVELS = ("none", "weak", "strong")
SENTIMENT_LABELS = ("negative", "positive")
CRISIS_LABELS = ("no_crisis", "crisis")
HEAD_NAMES = ("empathy", "sentiment", "emotion", "crisis")
HEAD_OUTPUT_DIMS = {
    "empathy": len(EMPATHY_MECHANISMS) * len(EMPATHY_LEVELS),
    "sentiment": 1,
    "emotion": len(EMOTIONS),
    "crisis": 1,
}
# P(empathetic) := P(ER + IP + EX >= EMPATHETIC_MIN_TOTAL), the EPITOME levels summed (0..6).
EMPATHETIC_MIN_TOTAL = 2
# Defaults used by init_reward_heads (the shipped file carries the thresholds tuned on validation data).
DEFAULT_CRISIS_THRESHOLDS = {"alone": 0.95, "support": 0.5}
WEIGHT_KEYS = ("w_hidden", "b_hidden", "w_out", "b_out")
WEIGHTS_FILE = "heads.npz"
FORMAT_VERSION = 1


def default_weights_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


@struct.dataclass
class RewardHeads:
    """Frozen pytree of the four heads' parameter dicts plus the crisis decision thresholds.

    Each head dict holds `w_out [H,K]`, `b_out [K]` and, for an MLP head, `w_hidden [384,H]`, `b_hidden [H]`.
    `crisis_thresholds` = {"alone": P(crisis) that flags on its own,
                           "support": P(crisis) that confirms a weak lexicon hit} (scalars).
    """

    empathy: Mapping[str, jax.Array]
    sentiment: Mapping[str, jax.Array]
    emotion: Mapping[str, jax.Array]
    crisis: Mapping[str, jax.Array]
    crisis_thresholds: Mapping[str, jax.Array]


# ----------------------------------------------------------------------------- apply


def head_logits(params: Mapping[str, jax.Array], emb: jax.Array) -> jax.Array:
    """[B, D] embeddings -> [B, K] logits: relu MLP if `w_hidden` is present, else linear."""
    x = emb.astype(jnp.float32)
    if "w_hidden" in params:
        x = jax.nn.relu(x @ params["w_hidden"].astype(jnp.float32) + params["b_hidden"].astype(jnp.float32))
    return x @ params["w_out"].astype(jnp.float32) + params["b_out"].astype(jnp.float32)


def empathy_level_probabilities(heads: RewardHeads, emb: jax.Array) -> jax.Array:
    """[B, 3 mechanisms (ER, IP, EX), 3 levels] softmax probabilities."""
    logits = head_logits(heads.empathy, emb)
    logits = logits.reshape(logits.shape[0], len(EMPATHY_MECHANISMS), len(EMPATHY_LEVELS))
    return jax.nn.softmax(logits, axis=-1)


def empathetic_from_levels(level_probs: jax.Array) -> jax.Array:
    """P(ER + IP + EX >= 2) from per-mechanism level probabilities [B, 3, 3].

    The three mechanism softmaxes are treated as independent given the reply:
    P(total >= 2) = 1 - P(total = 0) - P(total = 1)
                  = 1 - prod_d p_d0 - sum_d p_d1 * prod_{e != d} p_e0.
    """
    p0 = level_probs[..., 0]  # [B, 3]
    p1 = level_probs[..., 1]
    all_none = jnp.prod(p0, axis=-1)
    n = p0.shape[-1]
    exactly_one_weak = sum(
        p1[..., d] * jnp.prod(p0[..., [e for e in range(n) if e != d]], axis=-1) for d in range(n)
    )
    return jnp.clip(1.0 - all_none - exactly_one_weak, 0.0, 1.0)


def empathy_probability(heads: RewardHeads, emb: jax.Array) -> jax.Array:
    """[B] P(empathetic) of a reply embedding := P(EPITOME ER + IP + EX >= 2) (see empathetic_from_levels)."""
    return empathetic_from_levels(empathy_level_probabilities(heads, emb))


def sentiment_positive_probability(heads: RewardHeads, emb: jax.Array) -> jax.Array:
    """[B] P(positive sentiment) (SST-2 head)."""
    return jax.nn.sigmoid(head_logits(heads.sentiment, emb)[:, 0])


def emotion_probabilities(heads: RewardHeads, emb: jax.Array) -> jax.Array:
    """[B, 7] probabilities in `therapy_rl.data.labels.EMOTIONS` order."""
    return jax.nn.softmax(head_logits(heads.emotion, emb), axis=-1)


def crisis_probability(heads: RewardHeads, emb: jax.Array) -> jax.Array:
    """[B] P(crisis) of the crisis head alone (no lexicon; see safety.crisis_flags for the detector)."""
    return jax.nn.sigmoid(head_logits(heads.crisis, emb)[:, 0])


# ----------------------------------------------------------------------------- init


def init_head(rng: jax.Array, out_dim: int, hidden_dim: int = 128, in_dim: int = EMBED_DIM) -> dict:
    """Random head params (He-normal hidden layer, small output layer); hidden_dim=0 gives a linear head."""
    k_hidden, k_out = jax.random.split(rng)
    if hidden_dim <= 0:
        return {
            "w_out": jax.random.normal(k_out, (in_dim, out_dim), jnp.float32) / np.sqrt(in_dim),
            "b_out": jnp.zeros((out_dim,), jnp.float32),
        }
    return {
        "w_hidden": jax.random.normal(k_hidden, (in_dim, hidden_dim), jnp.float32) * np.sqrt(2.0 / in_dim),
        "b_hidden": jnp.zeros((hidden_dim,), jnp.float32),
        "w_out": jax.random.normal(k_out, (hidden_dim, out_dim), jnp.float32) / np.sqrt(hidden_dim),
        "b_out": jnp.zeros((out_dim,), jnp.float32),
    }


def init_reward_heads(rng: jax.Array, hidden_dim: int = 128) -> RewardHeads:
    """Random heads with the shipped output shapes (for tests and as the trainer's starting point)."""
    keys = jax.random.split(rng, len(HEAD_NAMES))
    params = {name: init_head(k, HEAD_OUTPUT_DIMS[name], hidden_dim) for name, k in zip(HEAD_NAMES, keys)}
    thresholds = {k: jnp.asarray(v, jnp.float32) for k, v in DEFAULT_CRISIS_THRESHOLDS.items()}
    return RewardHeads(**params, crisis_thresholds=thresholds)


# ----------------------------------------------------------------------------- npz I/O


class HeadsFileError(ValueError):
    """A heads .npz file is missing a field or has a wrong shape."""


def label_names() -> dict[str, tuple[str, ...]]:
    """Label names stored beside the weights (checked on load)."""
    return {
        "empathy": tuple(f"{m}:{lvl}" for m in EMPATHY_MECHANISMS for lvl in EMPATHY_LEVELS),
        "sentiment": (SENTIMENT_LABELS[1],),
        "emotion": tuple(EMOTIONS),
        "crisis": (CRISIS_LABELS[1],),
    }


def save_reward_heads(heads: RewardHeads, path: str, dtype: Any = np.float32) -> None:
    """Write `heads` to one .npz of plain arrays: '<head>/<param>', '<head>/labels', 'crisis_thresholds/<k>'."""
    arrays: dict[str, np.ndarray] = {"format_version": np.asarray(FORMAT_VERSION, np.int32)}
    names = label_names()
    for name in HEAD_NAMES:
        for key, value in getattr(heads, name).items():
            arrays[f"{name}/{key}"] = np.asarray(value, dtype)
        arrays[f"{name}/labels"] = np.asarray(names[name], dtype=np.str_)
    for key, value in heads.crisis_thresholds.items():
        arrays[f"crisis_thresholds/{key}"] = np.asarray(value, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def _read_head(npz: Mapping[str, np.ndarray], path: str, name: str) -> dict:
    def field(key):
        full = f"{name}/{key}"
        if full not in npz:
            raise HeadsFileError(f"{path}: missing field '{full}'")
        return npz[full]

    labels = tuple(str(x) for x in field("labels"))
    if labels != label_names()[name]:
        raise HeadsFileError(f"{path}: field '{name}/labels' is {labels}, expected {label_names()[name]}")
    keys = ("w_hidden", "b_hidden", "w_out", "b_out") if f"{name}/w_hidden" in npz else ("w_out", "b_out")
    params = {k: np.asarray(field(k), np.float32) for k in keys}
    in_dim = EMBED_DIM
    if "w_hidden" in params:
        hidden = params["w_hidden"].shape[-1]
        _check_shape(path, f"{name}/w_hidden", params["w_hidden"], (EMBED_DIM, hidden))
        _check_shape(path, f"{name}/b_hidden", params["b_hidden"], (hidden,))
        in_dim = hidden
    out_dim = HEAD_OUTPUT_DIMS[name]
    _check_shape(path, f"{name}/w_out", params["w_out"], (in_dim, out_dim))
    _check_shape(path, f"{name}/b_out", params["b_out"], (out_dim,))
    for k, v in params.items():
        if not np.all(np.isfinite(v)):
            raise HeadsFileError(f"{path}: field '{name}/{k}' has non-finite values")
    return {k: jnp.asarray(v) for k, v in params.items()}


def _check_shape(path: str, field: str, value: np.ndarray, shape: tuple) -> None:
    if value.shape != shape:
        raise HeadsFileError(f"{path}: field '{field}' has shape {value.shape}, expected {shape}")


def load_reward_heads(weights_dir: str | None = None) -> RewardHeads:
    """Load `<weights_dir>/heads.npz` (default: the weights shipped in the package); no pickle."""
    path = os.path.join(weights_dir or default_weights_dir(), WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no reward-head weights; build them with `python tools/train_reward_heads.py` (REWARDS.md)"
        )
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    version = int(data.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise HeadsFileError(f"{path}: field 'format_version' is {version}, expected {FORMAT_VERSION}")
    params = {name: _read_head(data, path, name) for name in HEAD_NAMES}
    thresholds = {}
    for key in DEFAULT_CRISIS_THRESHOLDS:
        full = f"crisis_thresholds/{key}"
        if full not in data:
            raise HeadsFileError(f"{path}: missing field '{full}'")
        thresholds[key] = jnp.asarray(data[full], jnp.float32).reshape(())
    return RewardHeads(**params, crisis_thresholds=thresholds)
