"""Simple jitted rewards on policy ids, and the response statistics the PPO loop logs, read from token ids.

* `TargetTokenReward`  -- the toy task: share of a target token among the response's real tokens.
* `EmotionTagReward`   -- the emotion tag after `<therapist_emotion>` is present (a valid label), matches the
                          annotated therapist emotion, plus a length term.
* `response_stats`     -- per-row length, EOS, repeated n-grams and emotion tags (`rollout/...`, `eval/...`).

Both rewards follow `rewards/protocol.RewardFn`.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from therapy_rl.rewards.protocol import ResponseIds


# ------------------------------------------------------------------------------------------ token-id helpers


def _lengths(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask != 0, axis=-1).astype(jnp.float32)


def emotion_tag(tokens: jax.Array, mask: jax.Array, marker_id: int, emotion_ids: Sequence[int]) -> jax.Array:
    """int32 [B]: index into labels.EMOTIONS of the token right after the first `<therapist_emotion>` marker
    among the real response tokens; -2 when there is no marker (or nothing real after it), -1 when the token
    after it is not an emotion label."""
    real = mask != 0
    length = tokens.shape[1]
    is_marker = real & (tokens == marker_id)
    has_marker = jnp.any(is_marker, axis=-1)
    after = jnp.argmax(is_marker, axis=-1) + 1  # [B]
    in_range = after < length
    nxt = jnp.take_along_axis(tokens, jnp.minimum(after, length - 1)[:, None], axis=-1)[:, 0]
    nxt_real = jnp.take_along_axis(real, jnp.minimum(after, length - 1)[:, None], axis=-1)[:, 0] & in_range
    ids = jnp.asarray(emotion_ids, jnp.int32)
    hits = nxt[:, None] == ids[None, :]  # [B, 7]
    index = jnp.where(jnp.any(hits, axis=-1), jnp.argmax(hits, axis=-1), -1)
    return jnp.where(has_marker & nxt_real, index, -2).astype(jnp.int32)


def repeated_ngram_rate(tokens: jax.Array, mask: jax.Array, n: int = 3) -> jax.Array:
    """float32 [B]: share of a response's token n-grams that already occurred earlier in the same response
    (0 for responses shorter than n + 1 tokens)."""
    batch, length = tokens.shape
    if length < n:
        return jnp.zeros((batch,), jnp.float32)
    starts = length - n + 1
    grams = jnp.stack([tokens[:, k:k + starts] for k in range(n)], axis=-1)  # [B, S, n]
    lengths = jnp.sum(mask != 0, axis=-1)
    valid = jnp.arange(starts)[None, :] + n <= lengths[:, None]  # [B, S]
    same = jnp.all(grams[:, :, None, :] == grams[:, None, :, :], axis=-1)  # [B, S(i), S(j)]
    earlier = jnp.tril(jnp.ones((starts, starts), bool), k=-1)  # j < i
    repeated = jnp.any(same & earlier[None] & valid[:, None, :], axis=-1) & valid
    count = jnp.sum(valid, axis=-1)
    return jnp.where(count > 0, jnp.sum(repeated, axis=-1) / jnp.maximum(count, 1), 0.0).astype(jnp.float32)


def response_stats(tokens: jax.Array, mask: jax.Array, therapist_emotion: jax.Array, ids: ResponseIds,
                   ngram: int = 3) -> dict[str, jax.Array]:
    """Per-row [B] float32 statistics: length, has_eos, repeated_ngram, and (with tag ids) emotion_tag (a valid
    label follows the marker) and emotion_correct (it equals the annotated therapist emotion)."""
    out = {
        "length": _lengths(mask),
        "has_eos": jnp.any((tokens == ids.eos_id) & (mask != 0), axis=-1).astype(jnp.float32),
        "repeated_ngram": repeated_ngram_rate(tokens, mask, ngram),
    }
    if ids.therapist_emotion_id >= 0 and ids.emotion_ids:
        tag = emotion_tag(tokens, mask, ids.therapist_emotion_id, ids.emotion_ids)
        out["emotion_tag"] = (tag >= 0).astype(jnp.float32)
        out["emotion_correct"] = (tag == therapist_emotion).astype(jnp.float32)
    return out


def masked_row_means(per_row: Mapping[str, jax.Array], valid: jax.Array) -> dict[str, jax.Array]:
    """{name: mean over rows with valid != 0} (0 when there are none)."""
    v = (jnp.asarray(valid) != 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v), 1.0)
    return {k: jnp.sum(jnp.where(v != 0, jnp.asarray(x, jnp.float32), 0.0)) / n for k, x in per_row.items()}


# ------------------------------------------------------------------------------------------ simple rewards


@dataclasses.dataclass(frozen=True)
class TargetTokenReward:
    """The toy task: total = scale * (# target tokens / # real tokens) of each response."""

    target_id: int
    scale: float = 1.0

    def __call__(self, batch, tokens, response_mask):
        return _target_token_jit(self, tokens, response_mask)


def _target_token(cfg: TargetTokenReward, tokens, mask):
    real = mask != 0
    share = jnp.sum(real & (tokens == cfg.target_id), axis=-1) / jnp.maximum(jnp.sum(real, axis=-1), 1)
    share = share.astype(jnp.float32)
    return cfg.scale * share, {"target_share": share}


_target_token_jit = jax.jit(_target_token, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class EmotionTagReward:
    """total = present_weight * [valid tag] + correct_weight * [tag == annotated therapist emotion]
               + length_weight * length_term,
    length_term = -min(1, |L - target_length| / target_length) over the L real response tokens (0 at target)."""

    ids: ResponseIds
    present_weight: float = 1.0
    correct_weight: float = 2.0
    length_weight: float = 1.0
    target_length: int = 32

    def __call__(self, batch, tokens, response_mask):
        return _emotion_tag_jit(self, tokens, response_mask, batch["therapist_emotion"])


def _emotion_tag_reward(cfg: EmotionTagReward, tokens, mask, therapist_emotion):
    tag = emotion_tag(tokens, mask, cfg.ids.therapist_emotion_id, cfg.ids.emotion_ids)
    present = (tag >= 0).astype(jnp.float32)
    correct = (tag == therapist_emotion).astype(jnp.float32)
    length = _lengths(mask)
    length_term = -jnp.minimum(1.0, jnp.abs(length - cfg.target_length) / cfg.target_length)
    total = cfg.present_weight * present + cfg.correct_weight * correct + cfg.length_weight * length_term
    return total.astype(jnp.float32), {"tag_present": present, "tag_correct": correct, "length_term": length_term}


_emotion_tag_jit = jax.jit(_emotion_tag_reward, static_argnums=0)
