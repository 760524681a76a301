"""Supervised fine-tuning: masked LM loss, the jitted train/eval steps, and the SFT loop."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``rng`` is raw key data so orbax can save it; per-step keys are
    ``fold_in(rng, step)``, so a resumed run draws the same keys."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "linear"  # linear | cosine | constant, after linear warm-up
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # <= 0 disables clipping


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.learning_rate)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; expected linear, cosine or constant")
    if cfg.warmup_steps <= 0:
        return decay
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW with warm-up + decay and global-norm clipping; no weight decay on biases and LayerNorm."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def masked_lm_sums(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> dict[str, jax.Array]:
    """Summed next-token NLL, target count and correct count over supervised targets.

    ``loss_mask[b, t] = 1`` marks token ``t`` as a target, predicted from position ``t - 1``. Sums (not means)
    are returned so micro-batches and devices can be aggregated before dividing.
    """
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    targets = input_ids[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "nll_sum": -jnp.sum(target_log_probs * weights),
        "target_count": jnp.sum(weights),
        "correct_count": jnp.sum(correct * weights),
    }


def _logits(model, params, batch, deterministic: bool, dropout_key):
    rngs = None if deterministic else {"dropout": dropout_key}
    out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      deterministic=deterministic, rngs=rngs)
    return out.logits


def make_train_step(model, optimizer: optax.GradientTransformation, grad_accum_steps: int = 1,
                    dropout: bool = True) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``.

    With ``grad_accum_steps = k`` the batch is split into k micro-batches scanned in order; summed gradients
    are divided by the total target count, so the update equals the one of the whole batch.
    """

    def sums_and_grads(params, micro_batch, key):
        def loss_fn(p):
            sums = masked_lm_sums(_logits(model, p, micro_batch, not dropout, key),
                                  micro_batch["input_ids"], micro_batch["loss_mask"])
            return sums["nll_sum"], sums

        grads, sums = jax.grad(loss_fn, has_aux=True)(params)
        return grads, sums

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if grad_accum_steps == 1:
            grads, sums = sums_and_grads(state.params, batch, step_key)
        else:
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]), batch)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                grads, sums = sums_and_grads(state.params, micro_batch, jax.random.fold_in(step_key, index))
                return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None

            zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params),
                     {k: jnp.zeros((), jnp.float32) for k in ("nll_sum", "target_count", "correct_count")})
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
        denominator = jnp.maximum(sums["target_count"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "train/loss": sums["nll_sum"] / denominator,
            "train/token_accuracy": sums["correct_count"] / denominator,
            "train/target_tokens": sums["target_count"],
            "train/grad_norm": optax.global_norm(grads),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model) -> Callable:
    """``eval_step(params, batch) -> sums`` (deterministic, no dropout)."""

    def eval_step(params, batch):
        return masked_lm_sums(_logits(model, params, batch, True, None), batch["input_ids"], batch["loss_mask"])

    return eval_step


def create_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def evaluate_loss(eval_step_fn: Callable, params: Any, batches) -> dict[str, float]:
    """Mean validation loss and token accuracy over every supervised token of the split."""
    totals = {"nll_sum": 0.0, "target_count": 0.0, "correct_count": 0.0}
    for batch in batches:
        sums = jax.device_get(eval_step_fn(params, batch))
        for key in totals:
            totals[key] += float(sums[key])
    count = max(totals["target_count"], 1.0)
    return {"val/loss": totals["nll_sum"] / count, "val/token_accuracy": totals["correct_count"] / count,
            "val/perplexity": float(np.exp(min(totals["nll_sum"] / count, 50.0)))}
