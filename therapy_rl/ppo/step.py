"""One PPO iteration as jitted stages: rollout (generate) -> reward (pluggable) -> update (scores, GAE, epochs).

The update is ONE jitted function `update_step(state, ref_params, rollout) -> (state, metrics)`:

    scores   = whiten(clip(raw_scores - after_clip) + after_clip) [- missing-EOS penalty]   (over valid rows;
               after_clip = rollout["scores_after_clip"], the reward's safety penalty: no clip can hide it)
    logp, V  = policy + value head on the rollout (deterministic)          old log-probs and values
               (or the sampler's: rollout["rollout_logp"], and value head on rollout["rollout_hidden"])
    ref_logp = frozen reference on the rollout
    targets  = core.rollout_targets(scores, logp, ref_logp, V, mask, state.kl_coef, ...)   KL penalty, GAE, whitening
    epochs x mini-batches (lax.scan over core.ppo_minibatch_schedule), each: ops.accumulate_gradients over
             micro-batches of core.ppo_loss, gate_on_ratio, one optimizer step
    kl_coef' = core.kl_controller_update(kl_coef, objective/kl of the rollout, n_steps = rollout batch size)

The KL coefficient lives in the state and enters as an argument, so changing it never recompiles. Keys:
`iteration_key(rng, step)` = fold_in(rng, step); the rollout uses fold_in(., 0), the update fold_in(., 1).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from therapy_rl import defaults, nonfinite, ops, settings
from therapy_rl.models import families, value_head
from therapy_rl.ppo import core, policy

ROLLOUT_STREAM, UPDATE_STREAM = 0, 1
# What the update's `nonfinite.KEY` bitmask watches, bit by bit (raw scores: before any clip could hide an Inf).
GUARDED = ("reward scores", "loss", "gradient norm", "parameter norm after the update", "KL coefficient")


@flax.struct.dataclass
class PPOState:
    """Everything an iteration changes; saved whole in checkpoints (exact resume)."""

    step: jax.Array  # PPO iterations done (int32)
    params: Any  # policy.py layout: {"trunk", "value_head"[, "critic_trunk"]}
    opt_state: Any
    kl_coef: jax.Array  # float32 scalar: the KL controller's state
    rng: jax.Array  # raw key data; per-iteration keys are fold_in(rng, step)


# PPOHyper field (its own, or of its loss / kl) -> the config.ppo field it is read from, where the names differ.
CONFIG_NAMES = {"num_epochs": "num_ppo_epochs", "aggregation": "loss_aggregation", "adaptive": "adaptive_kl",
                "init_coef": "init_kl_coef", "target": "kl_target", "horizon": "kl_horizon"}
_PPO_DEFAULTS = defaults.ppo_defaults().ppo  # config.ppo: the defaults below


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    """Static PPO settings (hashable). Defaults: config.ppo's (the paper / TRL 0.11)."""

    loss: core.PPOLossConfig = core.PPOLossConfig()
    kl: core.KLControllerConfig = core.KLControllerConfig()
    num_epochs: int = _PPO_DEFAULTS.num_ppo_epochs  # PPO epochs over each rollout batch
    num_minibatches: int = 1  # rollout batch / mini-batch size
    grad_accum_steps: int = _PPO_DEFAULTS.grad_accum_steps  # micro-batches per mini-batch
    gamma: float = _PPO_DEFAULTS.gamma
    lam: float = _PPO_DEFAULTS.lam
    kl_estimator: str = _PPO_DEFAULTS.kl_estimator
    score_clip: float = _PPO_DEFAULTS.score_clip  # clip raw scores to [-c, c] before whitening; <= 0 = off
    whiten_scores: bool = _PPO_DEFAULTS.whiten_scores  # z-score sequence scores over the batch (the project's)
    whiten_advantages: bool = _PPO_DEFAULTS.whiten_advantages
    whiten_token_rewards: bool = _PPO_DEFAULTS.whiten_token_rewards
    # subtracted from the (processed) score of rows without EOS; 0 = off
    missing_eos_penalty: float = _PPO_DEFAULTS.missing_eos_penalty
    eos_id: int = -1
    # TRL's guard: skip a mini-batch whose mean ratio exceeds it; None = off
    ratio_threshold: Optional[float] = settings.positive_or_none(_PPO_DEFAULTS.ratio_threshold)


def iteration_key(rng_data: jax.Array, step: jax.Array) -> jax.Array:
    """The typed key of iteration `step` from the state's raw key data."""
    return jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)


def rollout_key(state: PPOState) -> jax.Array:
    return jax.random.fold_in(iteration_key(state.rng, state.step), ROLLOUT_STREAM)


def create_state(params: Any, optimizer: optax.GradientTransformation, kl: core.KLControllerConfig,
                 rng_data: jax.Array) -> PPOState:
    return PPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    kl_coef=core.kl_controller_init(kl).coef, rng=rng_data)


def process_scores(raw_scores: jax.Array, tokens: jax.Array, mask: jax.Array, valid: jax.Array,
                   hyper: PPOHyper, after_clip: Optional[jax.Array] = None) -> jax.Array:
    """Raw scores [B] -> the scores PPO uses: clip (all but `after_clip`, the part of the raw score the reward
    added after its own clip: `core.clip_scores`), whiten over valid rows, missing-EOS penalty."""
    scores = jnp.asarray(raw_scores, jnp.float32)
    if hyper.score_clip > 0:
        scores = core.clip_scores(scores, hyper.score_clip, after_clip)
    if hyper.whiten_scores:
        scores = core.whiten_scores(scores, valid)
    if hyper.missing_eos_penalty:
        scores = core.missing_eos_penalty(scores, tokens, hyper.eos_id, hyper.missing_eos_penalty, mask)
    return jnp.where(valid != 0, scores, 0.0)


def rollout_logp_and_values(spec: policy.PolicySpec, params: Any, batch: Mapping[str, jax.Array],
                            rollout: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Old log-probs and values [B, N]: the sampler's log-probs when the rollout carries them (the same numbers as
    a teacher-forced pass up to float rounding), the value head on the sampler's hidden states when it carries
    those (shared trunk) or on the critic trunk; otherwise one deterministic pass of the policy."""
    if "rollout_logp" not in rollout:
        logp, values, _ = policy.policy_outputs(spec, params, batch)
        return logp, values
    mask = batch["response_mask"]
    logp = jnp.where(mask != 0, rollout["rollout_logp"], 0.0)
    if "rollout_hidden" in rollout:
        hidden = rollout["rollout_hidden"]
    else:
        hidden = policy.response_hidden(spec.model_config, params[policy.CRITIC_KEY], batch)
    values = value_head.values_from_hidden(params[policy.VALUE_HEAD_KEY], hidden, rng=None)
    return logp, jnp.where(mask != 0, values, 0.0)


def make_update_step(spec: policy.PolicySpec, hyper: PPOHyper,
                     optimizer: optax.GradientTransformation) -> Callable:
    """`update_step(state, ref_params, rollout) -> (state, metrics)`.

    rollout: prompt_ids [B, P], prompt_mask [B, P], tokens [B, N], response_mask [B, N] (1 through the first EOS),
    valid [B], scores [B] (raw, from the reward), scores_after_clip [B] (optional: the part of `scores` the reward
    added after its own clip, kept out of `score_clip`); from the sampler (`trainer.build_stages(reuse_rollout)`):
    rollout_logp [B, N], rollout_entropy [B, N] and, with the shared trunk, rollout_hidden [B, N, D]. Metrics use
    TRL's names (but `value/...` for TRL's `val/...`);
    per-mini-batch losses are averaged over epochs x mini-batches and carry an `_avg` suffix (TRL 1.x).
    """
    loss_cfg = hyper.loss
    aux_coef = families.aux_loss_coef(spec.model_config)  # MoE load balancing; 0 for dense models

    def loss_fn(params, micro, rng, denominator, need_entropy):
        # need_entropy: policy/entropy_avg in every mini-batch (when the rollout brings no entropy, or a bonus
        # differentiates it)
        if aux_coef:
            logp, values, entropy, aux = policy.policy_outputs(spec, params, micro, rng, with_entropy=need_entropy,
                                                               entropy_grad=loss_cfg.entropy_coef != 0,
                                                               with_aux=True)
            loss, metrics = core.ppo_loss(logp, values, micro, loss_cfg, denominator, entropy)
            aux = aux / hyper.grad_accum_steps  # metrics are summed over micro-batches
            return loss + aux_coef * aux, {**metrics, "policy/aux_loss": aux}
        logp, values, entropy = policy.policy_outputs(spec, params, micro, rng, with_entropy=need_entropy,
                                                      entropy_grad=loss_cfg.entropy_coef != 0)
        return core.ppo_loss(logp, values, micro, loss_cfg, denominator, entropy)

    def minibatch_update(carry, minibatch, need_entropy):
        params, opt_state, index, base_key = carry
        denominator = core.loss_denominator(minibatch["response_mask"], loss_cfg.aggregation)
        keys = (jax.random.split(jax.random.fold_in(base_key, index), hyper.grad_accum_steps) if spec.dropout
                else None)
        _, grads, metrics = ops.accumulate_gradients(
            lambda p, micro, rng: loss_fn(p, micro, rng, denominator, need_entropy), params, minibatch,
            hyper.grad_accum_steps, keys, policy.trainable_mask(spec, params))
        grads, skipped = core.gate_on_ratio(grads, metrics["policy/ratio_mean"], hyper.ratio_threshold)
        metrics["policy/grad_norm"] = optax.tree.norm(grads)
        metrics["policy/skipped"] = skipped.astype(jnp.float32)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, index + 1, base_key), metrics

    def update_step(state: PPOState, ref_params: Any, rollout: Mapping[str, jax.Array]):
        key = jax.random.fold_in(iteration_key(state.rng, state.step), UPDATE_STREAM)
        valid = rollout["valid"]
        mask = rollout["response_mask"].astype(jnp.int32) * (valid[:, None] != 0).astype(jnp.int32)
        batch = {"prompt_ids": rollout["prompt_ids"], "prompt_mask": rollout["prompt_mask"],
                 "tokens": rollout["tokens"], "response_mask": mask}
        old_logp, old_values = rollout_logp_and_values(spec, state.params, batch, rollout)
        ref_logp = policy.reference_logprobs(spec, state.params[policy.TRUNK_KEY], ref_params, batch)
        scores = process_scores(rollout["scores"], rollout["tokens"], mask, valid, hyper,
                                after_clip=rollout.get("scores_after_clip"))
        targets = core.rollout_targets(scores, old_logp, ref_logp, old_values, mask, state.kl_coef,
                                       gamma=hyper.gamma, lam=hyper.lam, kl_estimator=hyper.kl_estimator,
                                       whiten_token_rewards=hyper.whiten_token_rewards,
                                       whiten_advantages=hyper.whiten_advantages)
        stats = core.rollout_stats(scores, old_logp, targets, old_values, mask, state.kl_coef, valid)

        batch_size = rollout["tokens"].shape[0]
        train_batch = dict(batch, old_logp=old_logp, old_values=old_values, advantages=targets.advantages,
                           returns=targets.returns)
        schedule = core.ppo_minibatch_schedule(jax.random.fold_in(key, 0), batch_size, hyper.num_minibatches,
                                               hyper.num_epochs)
        carry = (state.params, state.opt_state, jnp.zeros((), jnp.int32), jax.random.fold_in(key, 1))
        # The sampler's entropy of the rollout stands in for the per-mini-batch entropy metric (a vocab-wide pass
        # in every epoch's loss) unless an entropy bonus needs it differentiated.
        rollout_entropy = rollout.get("rollout_entropy") if loss_cfg.entropy_coef == 0 else None
        update_fn = functools.partial(minibatch_update, need_entropy=rollout_entropy is None)
        (params, opt_state, _, _), mb_metrics = core.run_minibatch_epochs(update_fn, carry, train_batch,
                                                                          schedule)
        kl = core.kl_controller_update(core.KLControllerState(state.kl_coef), stats["objective/kl"],
                                       jnp.asarray(batch_size, jnp.float32), hyper.kl)

        metrics = dict(stats)
        for name, value in mb_metrics.items():
            metrics[f"{name}_avg"] = jnp.mean(value)
        if rollout_entropy is not None:  # the policy before this update, on its own samples
            metrics["policy/entropy"] = core.aggregate(rollout_entropy, mask, loss_cfg.aggregation)
        metrics["policy/ratio"] = jnp.mean(mb_metrics["policy/ratio_mean"])  # TRL: val/ratio
        metrics["policy/ratio_var"] = jnp.var(mb_metrics["policy/ratio_mean"])
        metrics["objective/non_score_reward"] = core.masked_mean(
            core.sequence_sum(targets.non_score_rewards, mask), valid)
        metrics["objective/kl_coef_next"] = kl.coef
        raw_scores = jnp.stack([rollout["scores"], rollout.get("scores_after_clip", rollout["scores"])])
        metrics[nonfinite.KEY] = nonfinite.code(jnp.where(valid != 0, raw_scores, 0.0), mb_metrics["loss/total"],
                                                mb_metrics["policy/grad_norm"], optax.tree.norm(params), kl.coef)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, kl_coef=kl.coef)
        return new_state, metrics

    return update_step


def jit_update_step(update_step: Callable, mesh, state_shardings: PPOState, ref_shardings: Any,
                    rollout_example: Mapping[str, Any]) -> Callable:
    """The update jitted with the mesh shardings; the state is donated, the reference never is."""
    from therapy_rl import parallel

    rollout_sh = parallel.batch_shardings_like(dict(rollout_example), mesh)
    return jax.jit(update_step, in_shardings=(state_shardings, ref_shardings, rollout_sh),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)
