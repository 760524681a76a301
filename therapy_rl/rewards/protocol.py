"""The reward protocol PPO trains against, its adapters and how prompts are registered with a reward.

    RewardFn: (batch, tokens [B, N], response_mask [B, N]) -> (total [B] float32, {component: [B] float32})

`batch` is the rollout's prompt batch as global device arrays (prompt_ids, prompt_mask, user_emotion,
therapist_emotion, sample_index, valid, and any per-prompt features the reward asked for, e.g. user_text_id).
`total` is the RAW sequence score (not whitened: the PPO step clips and whitens it, and validation reports it as
is); padding rows (valid = 0) may hold anything. Components are logged as `reward/<name>`, except the optional
`AFTER_CLIP` one: the part of `total` the reward added after its own clip (the safety penalty), which the PPO
step keeps out of its score clip (`ppo/core.clip_scores`) so that no clip can hide it. An optional `RATED`
component (1/0 per row) marks the rows that have a score at all (human ratings, `rate/human_reward.py`): the
trainer multiplies it into `valid`, so an unrated row is left out of the update instead of given a made-up score.

Outputs are global arrays sharded like the batch. With several processes every reward works on this process's
rows only: the jitted ones as SPMD programs, the therapy reward's host step on `ProcessRows.take(...)`.

Kinds (`build_reward`):
* `therapy`      -- `TherapyReward`, the adapter of the project's reward (`rewards/combine.RewardModel`); it
                    registers each prompt's user text (`register_prompts`), and its only host step is decoding
                    the reply text and re-tokenising it for MiniLM.
* `emotion_tag`, `target_token` -- simple jitted rewards on policy ids (`rewards/simple.py`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from therapy_rl.data import labels

AFTER_CLIP = "after_clip"  # component name of the part of `total` that score clipping must leave alone
RATED = "rated"  # component name of the per-row 1/0 mask of rows that have a score (the rest are skipped)


class RewardFn(Protocol):
    def __call__(self, batch: Mapping[str, jax.Array], tokens: jax.Array,
                 response_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]: ...


# ------------------------------------------------------------------------------------------ this process's rows


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """The rows of a global [B, ...] batch that this process holds, as (start, stop) blocks in global order.

    `take` reads them from any global array whose rows are whole on this process's devices (no transfer between
    hosts); `to_global` puts per-row results back as a global [B, ...] array with the batch's sharding. With one
    process (or plain arrays) the block is every row.
    """

    sharding: Optional[jax.sharding.Sharding]  # of a [B] batch array; None for plain host arrays
    num_rows: int
    blocks: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, row_array) -> "ProcessRows":
        """The rows of the [B] array `row_array` (e.g. batch["valid"]) on this process."""
        n = int(np.shape(row_array)[0])
        sharding = getattr(row_array, "sharding", None) if isinstance(row_array, jax.Array) else None
        if sharding is None:
            return cls(None, n, ((0, n),))
        slices = {index[0].indices(n)[:2] for index in sharding.addressable_devices_indices_map((n,)).values()}
        return cls(sharding, n, tuple(sorted(slices)))

    def take(self, x) -> np.ndarray:
        """This process's rows of the global array `x` [B, ...], as one numpy array."""
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            host = np.asarray(jax.device_get(x))
            return np.concatenate([host[a:b] for a, b in self.blocks])
        parts = []
        for a, b in self.blocks:
            for shard in x.addressable_shards:
                lo, hi = shard.index[0].indices(x.shape[0])[:2]
                if lo <= a and b <= hi and shard.data.shape[1:] == x.shape[1:]:
                    parts.append(np.asarray(shard.data)[a - lo:b - lo])
                    break
            else:
                raise ValueError(f"ProcessRows.take: rows {a}:{b} of an array of shape {x.shape} are not whole on "
                                 "this process's devices (shard the batch dimension only)")
        return np.concatenate(parts)

    def to_global(self, local) -> jax.Array:
        """The global [B, ...] array whose rows in `blocks` are `local` (each process passes its own rows)."""
        local = np.asarray(local)
        if self.sharding is None:
            return jnp.asarray(local)
        if local.ndim != 1:
            raise ValueError(f"ProcessRows.to_global: expected per-row values [rows], got shape {local.shape}")
        return jax.make_array_from_process_local_data(self.sharding, local, (self.num_rows,))


# ------------------------------------------------------------------------------------------ token ids


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


# ------------------------------------------------------------------------------------------ the therapy reward


@dataclasses.dataclass
class TherapyReward:
    """Adapter from `rewards.combine.RewardModel` to `RewardFn`.

    The reward needs each prompt's user-text features (MiniLM embedding, crisis flag). `register_prompts` gives
    every prompt row a `user_text_id` into this object's text table; features are computed on first use, a batch
    at a time, and cached (so start-up costs nothing and later epochs reuse them). Host work per batch, on this
    process's rows only: embedding the not-yet-seen user texts and decoding + re-tokenising the replies for MiniLM
    (the reward model's own step); everything else runs in its jitted `reward_fn`, on those rows.
    """

    model: Any  # rewards.combine.RewardModel
    decode_fn: Callable[[list], str]
    user_texts: list = dataclasses.field(default_factory=list)
    chunk_size: int = 8  # user texts embedded per call (fixed groups: see user_features)
    _embedding: Optional[np.ndarray] = None  # [num_texts, E] cache
    _crisis: Optional[np.ndarray] = None  # [num_texts]
    _known: Optional[np.ndarray] = None  # [num_texts] bool
    last_timing: dict = dataclasses.field(default_factory=dict)  # seconds per host/device step of the last call

    def register_prompts(self, prompts: Mapping[str, np.ndarray], user_texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The prompt arrays plus `user_text_id` [N] int32 (row i -> user_texts[i])."""
        if len(user_texts) != len(prompts["valid"]):
            raise ValueError(f"TherapyReward.register_prompts: {len(user_texts)} texts for "
                             f"{len(prompts['valid'])} prompt rows")
        offset = len(self.user_texts)
        self.user_texts.extend(user_texts)
        out = dict(prompts)
        out["user_text_id"] = np.arange(offset, offset + len(user_texts), dtype=np.int32)
        return out

    def user_features(self, text_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embedding [B, E] float32, crisis [B] int32) of user texts `text_ids`.

        Texts are embedded in fixed chunks of the table (ids [c * CHUNK, (c + 1) * CHUNK)), the first time any of
        them is needed; the encoder pads a call to its longest text, so fixed chunks make every text's features
        independent of which batch asked first (a resumed run gets the same bits).
        """
        n, chunk = len(self.user_texts), self.chunk_size
        if self._known is None or len(self._known) != n:
            old = 0 if self._known is None else len(self._known)
            known, crisis = np.zeros(n, bool), np.zeros(n, np.int32)
            if old:
                known[:old], crisis[:old] = self._known, self._crisis
            self._known, self._crisis = known, crisis
        for c in np.unique(text_ids[~self._known[text_ids]] // chunk):
            rows = np.arange(c * chunk, min((c + 1) * chunk, n))
            feats = self.model.user_features([self.user_texts[i] for i in rows], batch_size=chunk)
            emb = np.asarray(feats["user_embedding"], np.float32)
            if self._embedding is None or len(self._embedding) != n:
                table = np.zeros((n, emb.shape[1]), np.float32)
                if self._embedding is not None:
                    table[:len(self._embedding)] = self._embedding
                self._embedding = table
            self._embedding[rows] = emb
            self._crisis[rows] = np.asarray(feats["user_crisis"], np.int32)
            self._known[rows] = True
        return self._embedding[text_ids], self._crisis[text_ids]

    def __call__(self, batch, tokens, response_mask):
        """Scores this process's rows on the host (decode, MiniLM ids, the jitted reward on those rows) and
        returns global [B] arrays: no process ever reads another's rows."""
        if "user_text_id" not in batch:
            raise KeyError("TherapyReward: the prompt batch has no `user_text_id`; call register_prompts first")
        rows = ProcessRows.of(batch["valid"])
        start = time.perf_counter()
        embedding, crisis = self.user_features(rows.take(batch["user_text_id"]))
        user_s = time.perf_counter() - start
        fields = {"user_embedding": embedding, "user_crisis": crisis, "user_emotion": rows.take(batch["user_emotion"]),
                  "therapist_emotion": rows.take(batch["therapist_emotion"]), "valid": rows.take(batch["valid"])}
        total, comps = self.model.score(fields, rows.take(tokens), rows.take(response_mask), self.decode_fn)
        self.last_timing = {"user_features": user_s, **getattr(self.model, "last_timing", {})}
        return rows.to_global(total), {k: rows.to_global(v) for k, v in comps.items() if k != "total_raw"}


def therapy_reward(reward_cfg: Mapping[str, Any], tok, vocab_size: Optional[int] = None) -> TherapyReward:
    """The project's reward from a config dict of `rewards.combine.RewardConfig` fields.

    The PPO step clips and whitens scores itself, so the reward's own whitening must stay off (ppo_defaults): it
    would whiten each process's rows alone, and the step's clip would then cut a whitened total.
    """
    from therapy_rl.errors import ConfigError
    from therapy_rl.rewards import combine

    config = combine.reward_config_from_dict(reward_cfg, where="config.reward.therapy")
    if config.whiten:
        raise ConfigError("config.reward.therapy.whiten=True: PPO whitens the scores itself "
                          "(config.ppo.whiten_scores); set config.reward.therapy.whiten=False")
    model = combine.RewardModel.create(config, tok, vocab_size=vocab_size)
    return TherapyReward(model=model, decode_fn=lambda ids: tok.decode(ids, skip_special_tokens=True))


def build_reward(reward_cfg, tok, vocab_size: Optional[int] = None) -> RewardFn:
    """The RewardFn named by `reward_cfg.kind`: therapy | emotion_tag | target_token."""
    from therapy_rl.errors import ConfigError
    from therapy_rl.rewards import simple

    kind = reward_cfg.kind
    if kind == "therapy":
        return therapy_reward(reward_cfg.therapy.to_dict(), tok, vocab_size)
    if kind == "emotion_tag":
        c = reward_cfg.emotion_tag
        return simple.EmotionTagReward(ResponseIds.from_tokenizer(tok), present_weight=c.present_weight,
                                       correct_weight=c.correct_weight, length_weight=c.length_weight,
                                       target_length=c.target_length)
    if kind == "target_token":
        c = reward_cfg.target_token
        target = c.token_id if c.token_id >= 0 else tok.hf.convert_tokens_to_ids(c.token)
        if target is None or target < 0:
            raise ConfigError(f"config.reward.target_token: token {c.token!r} is not in the tokenizer; set "
                              "config.reward.target_token.token to one of its tokens or token_id to an id")
        return simple.TargetTokenReward(int(target), c.scale)
    raise ConfigError(f"config.reward.kind={kind!r}: expected therapy, emotion_tag or target_token")
