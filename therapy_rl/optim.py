"""The optimizer SFT and PPO share: AdamW after linear warm-up, a decay schedule, global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax


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


def optimizer_config_from(config, total_steps: int) -> OptimizerConfig:
    """The run config's optimizer fields for ``total_steps`` optimizer updates; ``warmup_fraction`` is of those.
    A config without ``adam_b1``/``adam_b2``/``adam_eps`` (SFT's) gets OptimizerConfig's defaults."""
    defaults = OptimizerConfig()
    return OptimizerConfig(learning_rate=config.learning_rate,
                           warmup_steps=int(round(config.warmup_fraction * total_steps)),
                           total_steps=total_steps, schedule=config.lr_schedule, weight_decay=config.weight_decay,
                           b1=getattr(config, "adam_b1", defaults.b1), b2=getattr(config, "adam_b2", defaults.b2),
                           eps=getattr(config, "adam_eps", defaults.eps), grad_clip_norm=config.grad_clip_norm)


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
