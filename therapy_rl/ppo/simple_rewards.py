"""Rewards for PPO behind one small protocol, plus response statistics read from token ids.

    RewardFn: (batch, tokens [B, N], response_mask [B, N]) -> (total [B] float32, {component: [B] float32})

`batch` is the rollout's prompt batch as global device arrays (prompt_ids, prompt_mask, user_emotion,
therapist_emotion, sample_index, valid, and any per-prompt features the reward asked for, e.g. user_embedding).
`total` is the RAW sequence score (not whitened: the PPO step clips and whitens it, and validation reports it as
is); padding rows (valid = 0) may hold anything. Components are logged as `reward/<name>`.

Three kinds:
* `TargetTokenReward`  -- the toy task: share of a target token among the response's real tokens.
* `EmotionTagReward`   -- a simple jitted reward on policy ids: the emotion tag after `<therapist_emotion>` is
                          present (a valid label), matches the annotated therapist emotion, plus a length term.
* `TherapyReward`      -- the project's reward (`rewards/combine.RewardModel`); its only host step is decoding
                          the reply text and re-tokenising it for MiniLM.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from therapy_rl.data import labels


class RewardFn(Protocol):
    def __call__(self, batch: Mapping[str, jax.Array], tokens: jax.Array,
                 response_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]: ...


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


@dataclasses.dataclass(frozen=True)
class ResponseIds:
    """Token ids the response statistics look for (static)."""

    eos_id: int
    therapist_emotion_id: int = -1  # -1: no emotion tags in this format
    emotion_ids: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tok) -> "ResponseIds":
        return cls(eos_id=tok.eos_id, therapist_emotion_id=tok.marker_ids[labels.THERAPIST_EMOTION],
                   emotion_ids=tuple(tok.emotion_token_ids))


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


# ------------------------------------------------------------------------------------------ the therapy reward


@dataclasses.dataclass
class TherapyReward:
    """Adapter from `rewards.combine.RewardModel` to `RewardFn`.

    Needs `user_embedding` [B, 384] (and optionally `user_crisis` [B]) in the batch: add them to the prompt arrays
    once with `add_user_features`. Host work per batch: decode each reply's text region and re-tokenise it for
    MiniLM (the reward model's own step); everything else runs in its jitted `reward_fn`.
    """

    model: Any  # rewards.combine.RewardModel
    decode_fn: Callable[[list], str]

    def __call__(self, batch, tokens, response_mask):
        fields = {k: batch[k] for k in ("user_embedding", "user_emotion", "therapist_emotion", "user_crisis", "valid")
                  if k in batch}
        fields = jax.device_get(fields)
        tokens, response_mask = jax.device_get((tokens, response_mask))
        total, comps = self.model.score(fields, np.asarray(tokens), np.asarray(response_mask), self.decode_fn)
        comps = {k: v for k, v in comps.items() if k != "total_raw"}
        return total, comps

    def add_user_features(self, prompts: dict[str, np.ndarray], user_texts: Sequence[str],
                          batch_size: int = 64) -> dict[str, np.ndarray]:
        """The prompt arrays plus `user_embedding` [N, 384] float32 and `user_crisis` [N] int32."""
        feats = self.model.user_features(list(user_texts), batch_size=batch_size)
        out = dict(prompts)
        out["user_embedding"] = np.asarray(feats["user_embedding"], np.float32)
        out["user_crisis"] = np.asarray(feats["user_crisis"], np.int32)
        return out


def therapy_reward(reward_cfg: Mapping[str, Any], tok, vocab_size: Optional[int] = None) -> TherapyReward:
    """The project's reward from a config dict of `rewards.combine.RewardConfig` fields.

    The PPO step clips and whitens scores itself, so the reward's own whitening should stay off (ppo_defaults).
    """
    from therapy_rl.rewards import combine

    config = combine.reward_config_from_dict(reward_cfg, where="config.reward.therapy")
    model = combine.RewardModel.create(config, tok, vocab_size=vocab_size)
    return TherapyReward(model=model, decode_fn=lambda ids: tok.decode(ids, skip_special_tokens=True))


def build_reward(reward_cfg, tok, vocab_size: Optional[int] = None) -> RewardFn:
    """The RewardFn named by `reward_cfg.kind`: therapy | emotion_tag | target_token."""
    kind = reward_cfg.kind
    if kind == "therapy":
        return therapy_reward(reward_cfg.therapy.to_dict(), tok, vocab_size)
    if kind == "emotion_tag":
        c = reward_cfg.emotion_tag
        return EmotionTagReward(ResponseIds.from_tokenizer(tok), present_weight=c.present_weight,
                                correct_weight=c.correct_weight, length_weight=c.length_weight,
                                target_length=c.target_length)
    if kind == "target_token":
        c = reward_cfg.target_token
        target = c.token_id if c.token_id >= 0 else tok.hf.convert_tokens_to_ids(c.token)
        if target is None or target < 0:
            raise ValueError(f"config.reward.target_token: token {c.token!r} is not in the tokenizer")
        return TargetTokenReward(int(target), c.scale)
    raise ValueError(f"config.reward.kind={kind!r}: expected therapy, emotion_tag or target_token")
