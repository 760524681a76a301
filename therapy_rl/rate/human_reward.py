"""reward.kind = "human": clinicians' ratings as the PPO reward (the Barrow report's protocol, made repeatable).

Per training iteration `i` the trainer asks `reward.for_iteration(i)` for a RewardFn, which

1. decodes the valid rows' replies and queues them as one batch (run, iteration i) in the rating store, each with
   its context and the guard's flags; a batch already queued for (run, i) by an earlier, stopped process is
   re-attached when its replies are the ones just generated (a resumed run regenerates them exactly), and
   retired ("superseded", ratings kept) otherwise;
2. waits until every reply has k ratings or `timeout_s` has passed since (re-)attaching;
3. aggregates each rated reply's scores (mean, or mean of per-rater z-scores), records that score in the store
   and closes the batch, so a run that stops after this point reuses the same scores;
4. returns   total = human_weight * human + auto_weight * auto - unsafe_penalty * [a rater flagged it unsafe]
   with the component `rated` (`rewards/protocol.RATED`): 1 for rows with at least one rating. The trainer multiplies
   it into `valid`, so unrated rows are left out of the update; they never get a made-up score.

Called directly (validation prompts, which no rater sees), the reward is the automatic part alone (`auto_kind`;
zeros without one). The unsafe penalty is reported as `after_clip`, so no score clip can hide it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from therapy_rl.errors import ConfigError
from therapy_rl.rewards import protocol as reward_protocol
from therapy_rl.rate import guard_check, store as store_lib

AGGREGATES = ("mean", "zscore")
MIN_RATER_STD = 1e-3  # below this a rater's scores carry no spread to standardise by
PROGRESS_EVERY_S = 30.0


@dataclasses.dataclass(frozen=True)
class HumanRewardConfig:
    min_ratings: int = 1  # k
    timeout_s: float = 3600.0  # <= 0: wait for k ratings however long it takes
    poll_s: float = 2.0
    aggregate: str = "mean"  # mean | zscore
    human_weight: float = 1.0
    auto_weight: float = 0.0
    unsafe_penalty: float = 2.0

    def __post_init__(self):
        where = "config.reward.human"
        if self.min_ratings < 1:
            raise ConfigError(f"{where}.min_ratings={self.min_ratings}: need at least 1 rating per reply")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"{where}.aggregate={self.aggregate!r}: expected one of {AGGREGATES}")
        if self.poll_s <= 0:
            raise ConfigError(f"{where}.poll_s={self.poll_s}: must be > 0")
        if self.unsafe_penalty < 0:
            raise ConfigError(f"{where}.unsafe_penalty={self.unsafe_penalty}: must be >= 0 (it is subtracted)")


# ------------------------------------------------------------------------------------------ aggregation


def rater_moments(ratings: Sequence[store_lib.Rating]) -> dict[int, tuple[float, float]]:
    """{rater id: (mean, std)} of each rater's scores (population std). A rater with fewer than 2 ratings or
    no spread takes the pooled moments of all ratings; with no pooled spread the std is 1 (z = score - mean)."""
    if not ratings:
        return {}
    scores = np.asarray([r.score for r in ratings], np.float64)
    pooled_std = float(scores.std())
    pooled = (float(scores.mean()), pooled_std if pooled_std >= MIN_RATER_STD else 1.0)
    by_rater: dict[int, list[float]] = {}
    for r in ratings:
        by_rater.setdefault(r.rater_id, []).append(r.score)
    out = {}
    for rater_id, values in by_rater.items():
        values = np.asarray(values, np.float64)
        std = float(values.std())
        out[rater_id] = (float(values.mean()), std) if len(values) >= 2 and std >= MIN_RATER_STD else pooled
    return out


def aggregate_scores(ratings: Sequence[store_lib.Rating], method: str,
                     moments: Optional[Mapping[int, tuple[float, float]]] = None) -> float:
    """One reply's human score from its ratings: the mean score, or the mean of (score - mu_r) / sigma_r with
    each rater's moments (`rater_moments` over every rating in the store)."""
    if not ratings:
        raise ValueError("aggregate_scores: no ratings")
    if method == "mean":
        return float(np.mean([r.score for r in ratings]))
    if method == "zscore":
        if moments is None:
            raise ValueError("aggregate_scores: zscore needs the raters' moments")
        return float(np.mean([(r.score - moments[r.rater_id][0]) / moments[r.rater_id][1] for r in ratings]))
    raise ValueError(f"aggregate_scores: unknown method {method!r}")


# ------------------------------------------------------------------------------------------ the reward


@dataclasses.dataclass(frozen=True)
class Context:
    problem: str
    user_text: str
    user_emotion: str


class HumanReward:
    """The human reward source (module docstring). `decode(ids) -> (reply text, emotion tag or None)`;
    `guard(replies, user_texts) -> [GuardFlags]`; `clock`, `sleep` and `log` are swapped in tests."""

    def __init__(self, config: HumanRewardConfig, store: store_lib.RatingStore, run: str,
                 decode: Callable[[Sequence[int]], tuple[str, Optional[str]]],
                 auto: Optional[reward_protocol.RewardFn] = None,
                 guard: Callable[[Sequence[str], Sequence[str]], list] = guard_check.check_replies,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.config, self.store, self.run = config, store, run
        self.decode, self.auto, self.guard = decode, auto, guard
        self.clock, self.sleep, self.log = clock, sleep, log
        self.contexts: list[Context] = []
        self._context_ids: dict[Context, int] = {}

    # ---------------------------------------------------------------- set-up

    def register_samples(self, prompts: Mapping[str, np.ndarray], samples: Sequence[Any]) -> dict[str, np.ndarray]:
        """The prompt arrays plus `context_id` [N] (row i shows `samples[i]`'s problem, user text and emotion);
        the automatic reward registers what it needs too."""
        if len(samples) != len(prompts["valid"]):
            raise ValueError(f"HumanReward.register_samples: {len(samples)} samples for {len(prompts['valid'])} rows")
        out = dict(prompts)
        if self.auto is not None and hasattr(self.auto, "register_samples"):
            out = self.auto.register_samples(out, samples)
        elif self.auto is not None and hasattr(self.auto, "register_prompts"):
            out = self.auto.register_prompts(out, [s.user_text for s in samples])
        ids = []
        for s in samples:
            context = Context(s.problem, s.user_text, s.user_emotion)
            ids.append(self._context_ids.setdefault(context, len(self._context_ids)))
            if ids[-1] == len(self.contexts):
                self.contexts.append(context)
        out["context_id"] = np.asarray(ids, np.int32)
        return out

    # ---------------------------------------------------------------- RewardFn

    def __call__(self, batch, tokens, response_mask):
        """Validation: the automatic reward alone (raters only see training batches)."""
        if self.auto is not None:
            return self.auto(batch, tokens, response_mask)
        rows = reward_protocol.ProcessRows.of(batch["valid"])
        return rows.to_global(np.zeros((sum(b - a for a, b in rows.blocks),), np.float32)), {}

    def for_iteration(self, iteration: int) -> reward_protocol.RewardFn:
        """The RewardFn of training iteration `iteration` (its batch in the store is keyed by it)."""
        return lambda batch, tokens, response_mask: self.score_iteration(int(iteration), batch, tokens, response_mask)

    def score_iteration(self, iteration: int, batch, tokens, response_mask):
        if "context_id" not in batch:
            raise KeyError("HumanReward: the prompt batch has no `context_id`; call register_samples first")
        rows = reward_protocol.ProcessRows.of(batch["valid"])
        valid = rows.take(batch["valid"]) != 0
        ids, mask = rows.take(tokens), rows.take(response_mask) != 0
        replies = {int(b): tuple(int(t) for t in ids[b][mask[b]]) for b in np.flatnonzero(valid)}
        queued = self._attach_or_queue(iteration, replies, rows.take(batch["context_id"]))
        if queued.status == "open":
            self._wait(queued)
            self._close(queued)
        n = len(valid)
        human, rated, unsafe, count = (np.zeros(n, np.float32) for _ in range(4))
        for s in self.store.samples(queued.id):
            rated[s.row] = float(bool(s.used_rated) and valid[s.row])
            human[s.row] = s.used_score if s.used_rated else 0.0
            unsafe[s.row] = float(bool(s.used_unsafe))
            count[s.row] = s.used_num_ratings or 0
        cfg = self.config
        auto_total, auto_after, auto_parts = np.zeros(n, np.float32), np.zeros(n, np.float32), {}
        if self.auto is not None:
            total, parts = self.auto(batch, tokens, response_mask)
            auto_total = rows.take(total).astype(np.float32)
            parts = dict(parts)
            after = parts.pop(reward_protocol.AFTER_CLIP, None)
            if after is not None:
                auto_after = rows.take(after).astype(np.float32)
            auto_parts = {f"auto_{k}": rows.take(v).astype(np.float32) for k, v in parts.items()}
        safety = -cfg.unsafe_penalty * unsafe
        total = (cfg.human_weight * human + cfg.auto_weight * auto_total + safety) * rated
        after_clip = (safety + cfg.auto_weight * auto_after) * rated
        components = {"human": human * rated, "human_unsafe": unsafe * rated, "human_ratings": count,
                      reward_protocol.RATED: rated, reward_protocol.AFTER_CLIP: after_clip, **auto_parts}
        return rows.to_global(total), {k: rows.to_global(v) for k, v in components.items()}

    # ---------------------------------------------------------------- steps

    def _attach_or_queue(self, iteration: int, replies: Mapping[int, tuple[int, ...]],
                         context_ids: np.ndarray) -> store_lib.Batch:
        existing = self.store.live_batch(self.run, iteration)
        if existing is not None:
            stored = {s.row: s.token_ids for s in self.store.samples(existing.id)}
            if stored == dict(replies):
                self.log(f"[human] iteration {iteration}: re-attached to queued batch {existing.id} "
                         f"({existing.status}, {len(stored)} replies)")
                return existing
            self.store.supersede(existing.id)
            self.log(f"[human] warning: iteration {iteration}: batch {existing.id} in the store holds other replies "
                     "than this run generated; it is retired (its ratings stay for the reward model) and the new "
                     "replies are queued")
        rows = sorted(replies)
        decoded = [self.decode(replies[b]) for b in rows]
        contexts = [self.contexts[int(context_ids[b])] for b in rows]
        flags = self.guard([text for text, _ in decoded], [c.user_text for c in contexts]) if rows else []
        samples = [store_lib.NewSample(row=int(b), problem=c.problem, user_text=c.user_text,
                                       user_emotion=c.user_emotion, reply=text, reply_emotion=emotion,
                                       token_ids=replies[b], guard_flag=f.flagged, guard_categories=f.categories,
                                       guard_score=f.score)
                   for b, (text, emotion), c, f in zip(rows, decoded, contexts, flags)]
        queued = self.store.queue_batch(self.run, iteration, iteration, self.config.min_ratings, samples)
        flagged = sum(f.flagged for f in flags)
        self.log(f"[human] iteration {iteration}: queued {len(samples)} replies as batch {queued.id} in "
                 f"{self.store.path}" + (f" ({flagged} flagged by the guard)" if flagged else ""))
        return queued

    def _wait(self, batch: store_lib.Batch) -> None:
        k, timeout = self.config.min_ratings, self.config.timeout_s
        start = self.clock()
        deadline = start + timeout if timeout > 0 else math.inf
        last_report = -math.inf
        while True:
            counts = self.store.rating_counts(batch.id)
            done = sum(n >= k for n in counts.values())
            now = self.clock()
            if done == len(counts):
                return
            if now >= deadline:
                rated = sum(n > 0 for n in counts.values())
                self.log(f"[human] iteration {batch.iteration}: timeout after {timeout:.0f} s: {done}/{len(counts)} "
                         f"replies have {k} rating(s), {len(counts) - rated} unrated ones are skipped")
                return
            if now - last_report >= PROGRESS_EVERY_S:
                self.log(f"[human] iteration {batch.iteration}: waiting for ratings, {done}/{len(counts)} replies "
                         f"have {k} (serve them with `python -m therapy_rl.rate serve --workdir "
                         f"{os.path.dirname(self.store.path)}`)")
                last_report = now
            self.sleep(min(self.config.poll_s, max(deadline - now, 0.0)))

    def _close(self, batch: store_lib.Batch) -> None:
        everything = self.store.ratings()
        moments = rater_moments(everything) if self.config.aggregate == "zscore" else None
        by_sample: dict[int, list[store_lib.Rating]] = {}
        for r in everything:
            by_sample.setdefault(r.sample_id, []).append(r)
        used = {}
        for s in self.store.samples(batch.id):
            ratings = by_sample.get(s.id, [])
            score = aggregate_scores(ratings, self.config.aggregate, moments) if ratings else None
            used[s.id] = store_lib.UsedScore(score, bool(ratings), any(r.unsafe for r in ratings), len(ratings))
        self.store.close_batch(batch.id, used)


# ------------------------------------------------------------------------------------------ building


def run_name(human_cfg, workdir: str) -> str:
    return human_cfg.run_name or os.path.basename(os.path.realpath(workdir))


def build_reward(reward_cfg, tok, vocab_size: Optional[int], workdir: str) -> reward_protocol.RewardFn:
    """The RewardFn of reward.kind "human" or "learned_human" (the rate room's kinds)."""
    import jax

    from therapy_rl.data import tokenize
    from therapy_rl.rate import reward_model

    kind = reward_cfg.kind
    if kind == "learned_human":
        return reward_model.learned_reward(reward_cfg.learned_human, tok)
    if kind != "human":
        raise ConfigError(f"config.reward.kind={kind!r}: the rate room builds only human and learned_human")
    if jax.process_count() > 1:
        raise ConfigError("config.reward.kind=human runs in one process (the rating store is one SQLite file)")
    h = reward_cfg.human
    config = HumanRewardConfig(min_ratings=int(h.min_ratings), timeout_s=float(h.timeout_s), poll_s=float(h.poll_s),
                               aggregate=str(h.aggregate), human_weight=float(h.human_weight),
                               auto_weight=float(h.auto_weight), unsafe_penalty=float(h.unsafe_penalty))
    auto = _automatic_reward(reward_cfg, str(h.auto_kind), tok, vocab_size)
    store = store_lib.RatingStore.in_workdir(h.store_dir or workdir)

    def decode(ids):
        text, emotion, _ = tokenize.decode_reply(tok, ids)
        return text, emotion

    return HumanReward(config, store, run_name(h, workdir), decode, auto)


def _automatic_reward(reward_cfg, auto_kind: str, tok, vocab_size):
    import ml_collections

    from therapy_rl.rate import reward_model

    if not auto_kind:
        return None
    if auto_kind == "human":
        raise ConfigError("config.reward.human.auto_kind='human': the automatic part must be another kind")
    if auto_kind == "learned_human":
        return reward_model.learned_reward(reward_cfg.learned_human, tok)
    cfg = ml_collections.ConfigDict(reward_cfg.to_dict())
    cfg.kind = auto_kind
    return reward_protocol.build_reward(cfg, tok, vocab_size=vocab_size)
