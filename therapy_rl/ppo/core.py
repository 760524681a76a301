"""PPO maths for RLHF on token sequences: pure functions on [B, T] arrays (jax only).

Conventions (TRL 0.11 `PPOTrainer`, the version the paper used):

* Every per-token array is `[B, T]` over the *response* positions only. `mask` (also called `response_mask`)
  is 1 on real response tokens -- including the first EOS -- and 0 after it, on padding and on padding rows.
  Token `t`'s log-prob, value and reward all belong to the action "emit response token t".
* Per-token KL penalty: `-kl_coef * KL_t` on every real token; the sequence score is added at the last real token.
* GAE with the value after the last real token taken as 0 (the episode ends there), then advantages whitened
  over all real tokens of the rollout batch.
* Losses are `token_mean` (TRL: masked mean over every real token of the mini-batch) unless asked otherwise.

Two different whitenings are used here; do not mix them up:

* `whiten_scores`  -- over the batch of *sequence* scores `[B]` (the project's default: the total reward clipped
  to [-10, 10], then z-scored across the batch) before they become token rewards. The paper's code instead used
  TRL's `whiten_rewards=True`: the token-reward whitening below (`whiten_scores=False, whiten_token_rewards=True`).
* `masked_whiten`  -- (`therapy_rl/ops.py`) over the *tokens* of a `[B, T]` array (TRL: advantages after GAE,
  shift_mean=True; and, when `whiten_token_rewards` is on, the token rewards with shift_mean=False).

Gradient accumulation (`ops.accumulate_gradients`): each loss divides masked sums by a `denominator`. Pass the
denominator of the whole mini-batch (`loss_denominator(minibatch_mask, mode)`) when you evaluate a micro-batch, and
the micro-batch losses, gradients and metrics simply add up to the full mini-batch's values.

Masks may be int, bool or float (float masks act as weights); padding positions may hold any value, even inf/nan:
they are selected away with `where`, never multiplied.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from therapy_rl import defaults, settings
from therapy_rl.ops import float_dtype as _float_dtype
from therapy_rl.ops import mask_as as _mask_as
from therapy_rl.ops import masked_mean, masked_sum, masked_var, masked_whiten, safe_divide

Array = jax.Array
_PPO_DEFAULTS = defaults.ppo_defaults().ppo  # config.ppo: the defaults of the settings classes below

AGGREGATIONS = ("token_mean", "sequence_mean")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


# ----------------------------------------------------------------------------------------------------------------
# Input checks (run at trace time: shapes are static)
# ----------------------------------------------------------------------------------------------------------------


def _check_shapes(fn: str, **arrays: Any) -> None:
    """Raise ValueError naming the function and arguments when [B, T] arrays disagree in shape."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{k}={v}" for k, v in shapes.items())
        raise ValueError(f"therapy_rl/ppo/core.py:{fn}: shapes must match, got {listing}")


def _check_choice(fn: str, field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"therapy_rl/ppo/core.py:{fn}: {field}={value!r} is not one of {choices}")


# ----------------------------------------------------------------------------------------------------------------
# Sequence scores (masked statistics and whitening: therapy_rl/ops.py)
# ----------------------------------------------------------------------------------------------------------------


def whiten_scores(scores: Array, valid: Optional[Array] = None, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> Array:
    """Sequence-level reward whitening over the batch: scores [B] -> (s - mean) / sqrt(var + eps).

    The project's reading of the paper's "total reward clipped to [-10, 10], then whitened", applied to one score
    per response before `token_rewards` (the paper's code whitened the token rewards instead, mean kept:
    `whiten_token_rewards`; on paper-like batches the two give advantages with correlation 0.71, issue 14).
    `valid` [B] (1 = real row) keeps padding rows out of the statistics; those rows come back unchanged. Unbiased variance (torch `.std()`) by default.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"therapy_rl/ppo/core.py:whiten_scores: scores must be [B], got shape {scores.shape}")
    if valid is None:
        valid = jnp.ones_like(scores)
    _check_shapes("whiten_scores", scores=scores, valid=valid)
    return masked_whiten(scores, valid, shift_mean=shift_mean, unbiased=unbiased, eps=eps)


def clip_scores(scores: Array, limit: float, after_clip: Optional[Array] = None) -> Array:
    """Sequence scores [B] clipped to [-limit, limit], except the part `after_clip` [B] that the reward added
    after its own clip (the safety penalty):

        clip(scores - after_clip, -limit, limit) + after_clip

    so a penalty still lowers a score whose other parts saturate the clip. `after_clip=None` is a plain clip.
    """
    scores = jnp.asarray(scores)
    if after_clip is None:
        return jnp.clip(scores, -limit, limit)
    after_clip = jnp.asarray(after_clip, scores.dtype)
    _check_shapes("clip_scores", scores=scores, after_clip=after_clip)
    return jnp.clip(scores - after_clip, -limit, limit) + after_clip


def sequence_sum(x: Array, mask: Array) -> Array:
    """Per-row sum over real tokens: [B, T] -> [B]."""
    return masked_sum(x, mask, axis=-1)


def response_lengths(mask: Array) -> Array:
    """Number of real response tokens per row: [B, T] -> [B] int32."""
    return jnp.sum(jnp.asarray(mask) != 0, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# Loss aggregation (sums / denominators for exact gradient accumulation)
# ----------------------------------------------------------------------------------------------------------------


def loss_denominator(mask: Array, mode: str = "token_mean") -> Array:
    """The denominator `aggregate` divides by.

        token_mean:    sum_{b,t} m_bt                     (number of real tokens)
        sequence_mean: #{b : sum_t m_bt > 0}              (number of non-empty rows)

    Compute it once on the whole mini-batch and pass it to every micro-batch's loss.
    """
    _check_choice("loss_denominator", "mode", mode, AGGREGATIONS)
    m = jnp.asarray(mask)
    if not jnp.issubdtype(m.dtype, jnp.floating):
        m = m.astype(jnp.float32)
    if mode == "token_mean":
        return jnp.sum(m)
    return jnp.sum(jnp.sum(m, axis=-1) > 0).astype(m.dtype)


def aggregate(per_token: Array, mask: Array, mode: str = "token_mean", denominator: Optional[Array] = None) -> Array:
    """Reduce a [B, T] per-token quantity to a scalar.

        token_mean:    sum_{b,t} m_bt x_bt / D
        sequence_mean: sum_b [ sum_t m_bt x_bt / sum_t m_bt ] / D     (empty rows contribute 0)

    D = `denominator` if given (the whole mini-batch's, for micro-batches), else `loss_denominator(mask, mode)`.
    With a shared D the result is additive over any split of the rows.
    """
    _check_choice("aggregate", "mode", mode, AGGREGATIONS)
    _check_shapes("aggregate", per_token=per_token, mask=mask)
    if mode == "token_mean":
        numerator = masked_sum(per_token, mask)
    else:
        m = _mask_as(mask, _float_dtype(per_token))
        numerator = jnp.sum(safe_divide(masked_sum(per_token, m, axis=-1), jnp.sum(m, axis=-1)))
    if denominator is None:
        denominator = loss_denominator(mask, mode)
    return safe_divide(numerator, jnp.asarray(denominator, dtype=numerator.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Log-probs, entropy and KL estimators
# ----------------------------------------------------------------------------------------------------------------


def slice_response(x_full: Array, prompt_length: int) -> Array:
    """Model outputs over [prompt (P, left-padded) + response (R)] -> the R positions that predict response tokens.

    Position i's logits/value predict token i+1, so response token t (at i = P + t) is scored at i = P + t - 1:
    returns x_full[:, P-1 : P+R-1] (works for [B, P+R] values and [B, P+R, V] logits).
    """
    if prompt_length < 1:
        raise ValueError(f"therapy_rl/ppo/core.py:slice_response: prompt_length must be >= 1, got {prompt_length}")
    return x_full[:, prompt_length - 1: -1]


def token_logprobs(logits: Array, tokens: Array, temperature: float = 1.0) -> Array:
    """log softmax(logits / temperature)[tokens]: [B, T, V], [B, T] -> [B, T] in float32 or wider."""
    logits = jnp.asarray(logits)
    logits = logits.astype(_float_dtype(logits)) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp_all, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_entropy(logits: Array) -> Array:
    """Entropy of softmax(logits) per position: H = logsumexp(z) - sum_v p_v z_v. [B, T, V] -> [B, T]."""
    z = jnp.asarray(logits)
    z = z.astype(_float_dtype(z))
    p = jax.nn.softmax(z, axis=-1)
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z, axis=-1)


def masked_entropy(logits: Array, mask: Array, mode: str = "token_mean",
                   denominator: Optional[Array] = None) -> Array:
    """Aggregated entropy of the policy over real tokens (TRL `policy/entropy` with token_mean)."""
    return aggregate(token_entropy(logits), mask, mode, denominator)


def _masked_log_ratio(fn: str, logp: Array, ref_logp: Array, mask: Array) -> tuple[Array, Array]:
    _check_shapes(fn, logp=logp, ref_logp=ref_logp, mask=mask)
    dtype = _float_dtype(logp, ref_logp)
    m = _mask_as(mask, dtype)
    diff = jnp.where(m != 0, jnp.asarray(logp, dtype) - jnp.asarray(ref_logp, dtype), 0)
    return diff, m


def kl_k1(logp: Array, ref_logp: Array, mask: Array) -> Array:
    """k1 estimate of KL(pi || ref) per sampled token (token ~ pi): log pi - log ref. Masked to 0 on padding.

    Unbiased, can be negative per token. TRL's `kl_penalty="kl"`, the paper's setting.
    """
    diff, m = _masked_log_ratio("kl_k1", logp, ref_logp, mask)
    return diff * m


def kl_k2(logp: Array, ref_logp: Array, mask: Array) -> Array:
    """k2 estimate: 0.5 (log pi - log ref)^2 (TRL `kl_penalty="mse"`). Biased, >= 0. Masked."""
    diff, m = _masked_log_ratio("kl_k2", logp, ref_logp, mask)
    return 0.5 * jnp.square(diff) * m


def kl_k3(logp: Array, ref_logp: Array, mask: Array) -> Array:
    """k3 estimate (Schulman): with r = ref / pi, (r - 1) - log r = expm1(ref - logp) - (ref - logp). Masked.

    Unbiased and >= 0 per token. May overflow when log ref >> log pi (r huge).
    """
    diff, m = _masked_log_ratio("kl_k3", logp, ref_logp, mask)
    log_r = -diff
    return (jnp.expm1(log_r) - log_r) * m


def kl_abs(logp: Array, ref_logp: Array, mask: Array) -> Array:
    """|log pi - log ref| (TRL `kl_penalty="abs"`). Masked."""
    diff, m = _masked_log_ratio("kl_abs", logp, ref_logp, mask)
    return jnp.abs(diff) * m


def kl_per_token(logp: Array, ref_logp: Array, mask: Array, estimator: str = "k1") -> Array:
    """Dispatch on `estimator` in KL_ESTIMATORS ("k1" | "k2" | "k3" | "abs"); a static Python string."""
    _check_choice("kl_per_token", "estimator", estimator, KL_ESTIMATORS)
    fn = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "abs": kl_abs}[estimator]
    return fn(logp, ref_logp, mask)


def kl_full(logits: Array, ref_logits: Array, mask: Array) -> Array:
    """Exact KL(pi || ref) per position from full distributions: sum_v pi_v (log pi_v - log ref_v). [B,T,V] -> [B,T]."""
    logits, ref_logits = jnp.asarray(logits), jnp.asarray(ref_logits)
    dtype = _float_dtype(logits, ref_logits)
    logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
    ref = jax.nn.log_softmax(ref_logits.astype(dtype), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - ref), axis=-1)
    _check_shapes("kl_full", kl=kl, mask=mask)
    m = _mask_as(mask, dtype)
    return jnp.where(m != 0, kl * m, 0)


# ----------------------------------------------------------------------------------------------------------------
# KL controllers (the coefficient is an array in the train state; these functions never hold state)
# ----------------------------------------------------------------------------------------------------------------


class KLControllerConfig(NamedTuple):
    """Frozen controller settings (hashable: fine as a jit static argument). Defaults: config.ppo's (TRL 0.11)."""

    adaptive: bool = _PPO_DEFAULTS.adaptive_kl  # False: fixed coefficient
    init_coef: float = _PPO_DEFAULTS.init_kl_coef  # starting beta
    target: float = _PPO_DEFAULTS.kl_target  # target KL per sequence (nats, summed over the response)
    horizon: float = _PPO_DEFAULTS.kl_horizon  # in samples (TRL passes the global batch size as n_steps)


class KLControllerState(NamedTuple):
    """What lives in the train state (and the checkpoint): the current coefficient, a float32 scalar."""

    coef: Array


def kl_controller_init(config: KLControllerConfig) -> KLControllerState:
    if config.init_coef < 0 or config.target <= 0 or config.horizon <= 0:
        raise ValueError("therapy_rl/ppo/core.py:kl_controller_init: need init_coef >= 0, target > 0, horizon > 0, "
                         f"got {config}")
    return KLControllerState(coef=jnp.asarray(config.init_coef, jnp.float32))


def adaptive_kl_update(coef: Array, current_kl: Array, n_steps: Array, target: Array, horizon: Array) -> Array:
    """Ziegler et al. (2019) proportional controller, as TRL's `AdaptiveKLController.update`:

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        coef' = coef * (1 + e * n_steps / horizon)

    `current_kl` is TRL's `objective/kl`: the batch mean of the per-sequence summed KL (k1); `n_steps` is the
    number of samples in the batch (global batch size).
    """
    coef = jnp.asarray(coef)
    error = jnp.clip(jnp.asarray(current_kl, coef.dtype) / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def fixed_kl_update(coef: Array, current_kl: Array, n_steps: Array) -> Array:
    """The fixed controller: coef' = coef (arguments kept so both controllers share a signature)."""
    del current_kl, n_steps
    return jnp.asarray(coef)


def kl_controller_update(state: KLControllerState, current_kl: Array, n_steps: Array,
                         config: KLControllerConfig) -> KLControllerState:
    """One controller step after a PPO batch: adaptive or fixed according to `config.adaptive` (static)."""
    if config.adaptive:
        return KLControllerState(adaptive_kl_update(state.coef, current_kl, n_steps, config.target, config.horizon))
    return KLControllerState(fixed_kl_update(state.coef, current_kl, n_steps))


# ----------------------------------------------------------------------------------------------------------------
# Response truncation at EOS
# ----------------------------------------------------------------------------------------------------------------


def mask_after_eos(tokens: Array, eos_id: int) -> Array:
    """Response mask from sampled tokens [B, T]: 1 up to and including the first EOS, 0 after. int32.

    A row with no EOS is all ones (it ran to the length limit).
    """
    is_eos = (jnp.asarray(tokens) == eos_id).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).astype(jnp.int32)


def pad_after_eos(tokens: Array, eos_id: int, pad_id: int) -> Array:
    """Replace everything after the first EOS with `pad_id` (the EOS itself is kept)."""
    tokens = jnp.asarray(tokens)
    return jnp.where(mask_after_eos(tokens, eos_id) != 0, tokens, jnp.asarray(pad_id, tokens.dtype))


def has_eos(tokens: Array, eos_id: int, mask: Optional[Array] = None) -> Array:
    """[B] bool: the row emitted EOS (at a position where `mask` != 0, if a mask is given)."""
    hit = jnp.asarray(tokens) == eos_id
    if mask is not None:
        hit = hit & (jnp.asarray(mask) != 0)
    return jnp.any(hit, axis=-1)


def missing_eos_penalty(scores: Array, tokens: Array, eos_id: int, penalty: float,
                        mask: Optional[Array] = None) -> Array:
    """scores - penalty on rows that never emitted EOS (TRL `missing_eos_penalty`); other rows unchanged."""
    scores = jnp.asarray(scores)
    penalty = jnp.asarray(penalty, _float_dtype(scores))
    return jnp.where(has_eos(tokens, eos_id, mask), scores, scores - penalty)


# ----------------------------------------------------------------------------------------------------------------
# Rewards and GAE
# ----------------------------------------------------------------------------------------------------------------


def last_token_one_hot(mask: Array) -> Array:
    """[B, T] float: 1 at each row's last position with mask != 0; an all-zero row stays all zero."""
    m = jnp.asarray(mask) != 0
    t = m.shape[-1]
    last = t - 1 - jnp.argmax(m[..., ::-1], axis=-1)  # index of the last True (garbage if none)
    one_hot = jax.nn.one_hot(last, t, dtype=jnp.float32)
    return one_hot * jnp.any(m, axis=-1, keepdims=True)


def token_rewards(scores: Array, kl: Array, kl_coef: Array, mask: Array) -> tuple[Array, Array]:
    """Per-token rewards (TRL `compute_rewards`):

        non_score_t = -kl_coef * KL_t          on real tokens (0 elsewhere)
        r_t         = non_score_t + score * [t == last real token]

    Returns (rewards, non_score_rewards), both [B, T] float. A row with no real token (all-zero mask) gets all
    zeros: its score is dropped, so such rows must be kept out of the loss (they are, through the mask).
    """
    kl = jnp.asarray(kl)
    scores = jnp.asarray(scores)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"therapy_rl/ppo/core.py:token_rewards: scores must be [B]={kl.shape[:1]}, "
                         f"got {scores.shape}")
    _check_shapes("token_rewards", kl=kl, mask=mask)
    dtype = _float_dtype(kl, scores)
    m = _mask_as(mask, dtype)
    non_score = jnp.where(m != 0, -jnp.asarray(kl_coef, dtype) * kl.astype(dtype), 0)
    rewards = non_score + scores.astype(dtype)[:, None] * last_token_one_hot(mask).astype(dtype)
    return rewards, non_score


def gae(rewards: Array, values: Array, mask: Array, gamma: Array, lam: Array) -> tuple[Array, Array]:
    """Generalised advantage estimation over real tokens, by a reverse `lax.scan` over time.

    Over the real positions t_1 < t_2 < ... < t_n of a row (mask != 0), with V(after t_n) = 0:

        delta_k = r_{t_k} + gamma * V_{t_{k+1}} - V_{t_k}
        A_{t_k} = delta_k + gamma * lam * A_{t_{k+1}},     A_{t_{n+1}} = 0
        R_{t_k} = A_{t_k} + V_{t_k}                         (the value target)

    Positions with mask == 0 are skipped (they neither read nor change the running A and next-V), so holes and
    trailing padding contribute nothing; their outputs are 0. There is no bootstrapping past the last real token:
    the response ended (EOS) or was cut at the length limit, and either way the episode is over (as in TRL).
    Returns (advantages, returns), [B, T], not whitened.
    """
    _check_shapes("gae", rewards=rewards, values=values, mask=mask)
    dtype = _float_dtype(rewards, values)
    real = jnp.asarray(mask) != 0
    rewards = jnp.where(real, jnp.asarray(rewards, dtype), 0)
    values = jnp.where(real, jnp.asarray(values, dtype), 0)
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)

    def step(carry, xs):
        next_adv, next_value = carry
        r_t, v_t, real_t = xs
        adv_t = r_t + gamma * next_value - v_t + gamma * lam * next_adv
        carry = (jnp.where(real_t, adv_t, next_adv), jnp.where(real_t, v_t, next_value))
        return carry, jnp.where(real_t, adv_t, 0)

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), dtype), jnp.zeros((batch,), dtype))
    _, adv_time_major = jax.lax.scan(step, init, (rewards.T, values.T, real.T), reverse=True)
    advantages = adv_time_major.T
    returns = jnp.where(real, advantages + values, 0)
    return advantages, returns


class RolloutTargets(NamedTuple):
    """What a rollout batch needs for the PPO update, all [B, T] (0 on padding except whitened advantages there)."""

    kl: Array                 # per-token KL estimate used in the penalty
    non_score_rewards: Array  # -kl_coef * kl
    rewards: Array            # non_score + score at the last real token (whitened if whiten_token_rewards)
    advantages: Array         # GAE, whitened over real tokens if whiten_advantages
    returns: Array            # GAE returns (value targets), from the un-whitened advantages


def rollout_targets(scores: Array, logp: Array, ref_logp: Array, values: Array, mask: Array, kl_coef: Array, *,
                    gamma: float = 1.0, lam: float = 0.95, kl_estimator: str = "k1",
                    whiten_token_rewards: bool = False, whiten_advantages: bool = True) -> RolloutTargets:
    """TRL 0.11's `compute_rewards` + `compute_advantages`, in its order:

        kl        = kl_per_token(logp, ref_logp, mask, kl_estimator)
        r, ns     = token_rewards(scores, kl, kl_coef, mask)
        r         = masked_whiten(r, mask, shift_mean=False)     if whiten_token_rewards (TRL default: off)
        A, R      = gae(r, values, mask, gamma, lam)
        A         = masked_whiten(A, mask)                        if whiten_advantages (TRL: always)

    `scores` [B] are the final sequence scores (already clipped / whitened / EOS-penalised as the run decides).
    Fold padding rows into `mask` (mask * valid[:, None]) before calling.
    """
    kl = kl_per_token(logp, ref_logp, mask, kl_estimator)
    rewards, non_score = token_rewards(scores, kl, kl_coef, mask)
    if whiten_token_rewards:
        rewards = jnp.where(jnp.asarray(mask) != 0, masked_whiten(rewards, mask, shift_mean=False), 0)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return RolloutTargets(kl=kl, non_score_rewards=non_score, rewards=rewards, advantages=advantages,
                          returns=returns)


def rollout_stats(scores: Array, logp: Array, targets: RolloutTargets, values: Array, mask: Array,
                  kl_coef: Array, valid: Optional[Array] = None) -> dict[str, Array]:
    """Per-batch statistics with TRL 0.11's names (means over valid rows [B] / real tokens).

    objective/kl       mean_b sum_t kl_bt       -- also the `current_kl` for `kl_controller_update`
    objective/entropy  mean_b sum_t -logp_bt    (sampled-token estimate)
    objective/kl_coef, ppo/mean_non_score_reward (token mean), ppo/mean_scores, ppo/std_scores (unbiased),
    objective/rlhf_reward (mean_b [score_b + sum_t non_score_bt]), tokens/responses_len_mean,
    returns/mean, returns/var, value/mean, value/var (token-level, unbiased var; TRL's val/mean, val/var).
    """
    scores = jnp.asarray(scores)
    dtype = _float_dtype(scores, logp)
    if valid is None:
        valid = jnp.ones(scores.shape, dtype)
    valid = _mask_as(valid, dtype)
    mask = _mask_as(mask, dtype) * valid[:, None]
    seq_kl = sequence_sum(targets.kl, mask)
    seq_non_score = sequence_sum(targets.non_score_rewards, mask)
    return {
        "objective/kl": masked_mean(seq_kl, valid),
        "objective/kl_coef": jnp.asarray(kl_coef, dtype),
        "objective/entropy": masked_mean(sequence_sum(-jnp.asarray(logp, dtype), mask), valid),
        "objective/rlhf_reward": masked_mean(scores + seq_non_score, valid),
        "ppo/mean_non_score_reward": masked_mean(targets.non_score_rewards, mask),
        "ppo/mean_scores": masked_mean(scores, valid),
        "ppo/std_scores": jnp.sqrt(masked_var(scores, valid, unbiased=True)),
        "tokens/responses_len_mean": masked_mean(jnp.sum(mask, axis=-1), valid),
        "returns/mean": masked_mean(targets.returns, mask),
        "returns/var": masked_var(targets.returns, mask),
        "value/mean": masked_mean(values, mask),
        "value/var": masked_var(values, mask),
    }


# ----------------------------------------------------------------------------------------------------------------
# Clipped losses
# ----------------------------------------------------------------------------------------------------------------


def clipped_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, clip_eps: float,
                        mode: str = "token_mean", denominator: Optional[Array] = None) -> tuple[Array, dict]:
    """PPO clipped surrogate (to minimise). With rho_t = exp(logp_t - old_logp_t):

        l_t  = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
        loss = aggregate(l, mask, mode, denominator)

    aux (each aggregated the same way, so additive over micro-batches):
        clipfrac     fraction of tokens where the clipped term is the larger  (TRL policy/clipfrac)
        approxkl     0.5 (logp - old)^2                                        (TRL policy/approxkl)
        approxkl_k3  expm1(logp - old) - (logp - old)   (k3 of KL(old || new), samples from old)
        policykl     old - logp                         (k1 of KL(old || new); TRL policy/policykl)
        ratio_mean   rho                                (TRL's ratio-threshold check uses this)
    """
    _check_shapes("clipped_policy_loss", logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    dtype = _float_dtype(logp, old_logp, advantages)
    real = jnp.asarray(mask) != 0
    log_ratio = jnp.where(real, jnp.asarray(logp, dtype) - jnp.asarray(old_logp, dtype), 0)
    adv = jnp.where(real, jnp.asarray(advantages, dtype), 0)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)

    def agg(x):
        return aggregate(x, mask, mode, denominator)

    loss = agg(jnp.maximum(unclipped, clipped))
    aux = {
        "clipfrac": agg((clipped > unclipped).astype(dtype)),
        "approxkl": agg(0.5 * jnp.square(log_ratio)),
        "approxkl_k3": agg(jnp.expm1(log_ratio) - log_ratio),
        "policykl": agg(-log_ratio),
        "ratio_mean": agg(ratio),
    }
    return loss, aux


def clipped_value_loss(values: Array, old_values: Array, returns: Array, mask: Array, clip_eps: Optional[float],
                       mode: str = "token_mean", denominator: Optional[Array] = None) -> tuple[Array, dict]:
    """PPO clipped value loss. With v_clip = clip(v, v_old - eps, v_old + eps):

        l_t  = 0.5 * max((v_t - R_t)^2, (v_clip_t - R_t)^2)       (clip_eps=None: 0.5 (v_t - R_t)^2)
        loss = aggregate(l, mask, mode, denominator)              (multiply by vf_coef outside)

    aux: vf_clipfrac (value/clipfrac), vpred_mean (value/vpred), error = (v - R)^2 (value/error), return_mean.
    """
    _check_shapes("clipped_value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    dtype = _float_dtype(values, old_values, returns)
    real = jnp.asarray(mask) != 0
    v = jnp.where(real, jnp.asarray(values, dtype), 0)
    v_old = jnp.where(real, jnp.asarray(old_values, dtype), 0)
    ret = jnp.where(real, jnp.asarray(returns, dtype), 0)
    loss_unclipped = jnp.square(v - ret)
    if clip_eps is None:
        loss_clipped = loss_unclipped
    else:
        loss_clipped = jnp.square(jnp.clip(v, v_old - clip_eps, v_old + clip_eps) - ret)

    def agg(x):
        return aggregate(x, mask, mode, denominator)

    loss = agg(0.5 * jnp.maximum(loss_unclipped, loss_clipped))
    aux = {
        "vf_clipfrac": agg((loss_clipped > loss_unclipped).astype(dtype)),
        "vpred_mean": agg(v),
        "error": agg(loss_unclipped),
        "return_mean": agg(ret),
    }
    return loss, aux


class PPOLossConfig(NamedTuple):
    """Frozen loss settings (hashable). Defaults: config.ppo's (TRL 0.11 / the paper)."""

    clip_eps: float = _PPO_DEFAULTS.clip_eps  # policy ratio clip
    # value clip around the rollout values; None: no clipping
    value_clip_eps: Optional[float] = settings.positive_or_none(_PPO_DEFAULTS.value_clip_eps)
    vf_coef: float = _PPO_DEFAULTS.vf_coef  # value-loss weight
    entropy_coef: float = _PPO_DEFAULTS.entropy_coef  # entropy bonus (TRL 0.11 has none)
    aggregation: str = _PPO_DEFAULTS.loss_aggregation  # "token_mean" | "sequence_mean"


MINIBATCH_KEYS = ("old_logp", "old_values", "advantages", "returns", "response_mask")


def ppo_loss(logp: Array, values: Array, minibatch: Mapping[str, Array], config: PPOLossConfig,
             denominator: Optional[Array] = None, entropy: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """Total PPO loss for one (micro-)batch given the current policy's outputs on it.

        total = pg_loss + vf_coef * vf_loss - entropy_coef * entropy

    logp, values: [B, T] from the model being trained (slice_response of its outputs).
    minibatch: the rollout arrays named in MINIBATCH_KEYS, each [B, T].
    entropy: optional per-token entropy [B, T] (token_entropy(logits)); needed when entropy_coef != 0.
    Metrics carry TRL 0.11's names; every one is aggregated with `denominator`, so all are additive over
    micro-batches (sum them). `loss/value` is the un-weighted value loss, as TRL logs it.
    """
    missing = [k for k in MINIBATCH_KEYS if k not in minibatch]
    if missing:
        raise ValueError(f"therapy_rl/ppo/core.py:ppo_loss: minibatch lacks {missing} (needs {MINIBATCH_KEYS})")
    _check_choice("ppo_loss", "config.aggregation", config.aggregation, AGGREGATIONS)
    mask = minibatch["response_mask"]
    mode = config.aggregation
    if denominator is None:
        denominator = loss_denominator(mask, mode)
    pg_loss, pg_aux = clipped_policy_loss(logp, minibatch["old_logp"], minibatch["advantages"], mask,
                                          config.clip_eps, mode, denominator)
    vf_loss, vf_aux = clipped_value_loss(values, minibatch["old_values"], minibatch["returns"], mask,
                                         config.value_clip_eps, mode, denominator)
    total = pg_loss + config.vf_coef * vf_loss
    metrics = {
        "loss/policy": pg_loss,
        "loss/value": vf_loss,
        "policy/clipfrac": pg_aux["clipfrac"],
        "policy/approxkl": pg_aux["approxkl"],
        "policy/approxkl_k3": pg_aux["approxkl_k3"],
        "policy/policykl": pg_aux["policykl"],
        "policy/ratio_mean": pg_aux["ratio_mean"],
        "policy/advantages_mean": aggregate(minibatch["advantages"], mask, mode, denominator),
        "value/clipfrac": vf_aux["vf_clipfrac"],
        "value/vpred": vf_aux["vpred_mean"],
        "value/error": vf_aux["error"],
        "returns/mean": vf_aux["return_mean"],
    }
    if entropy is not None:
        mean_entropy = aggregate(entropy, mask, mode, denominator)
        metrics["policy/entropy"] = mean_entropy
        total = total - config.entropy_coef * mean_entropy
    elif config.entropy_coef != 0:
        raise ValueError("therapy_rl/ppo/core.py:ppo_loss: config.entropy_coef != 0 needs the `entropy` argument")
    metrics["loss/total"] = total
    return total, metrics


def gate_on_ratio(grads: Any, ratio_mean: Array, threshold: Optional[float]) -> tuple[Any, Array]:
    """TRL 0.11's `ratio_threshold` guard: zero the update when the mini-batch mean ratio exceeds `threshold`.

    Returns (grads or zeros, skipped: bool scalar). threshold=None disables the guard. As in TRL the optimizer
    still steps on the zero gradient.
    """
    if threshold is None:
        return grads, jnp.asarray(False)
    skipped = jnp.asarray(ratio_mean) > threshold
    return jax.tree_util.tree_map(lambda g: jnp.where(skipped, jnp.zeros_like(g), g), grads), skipped


# ----------------------------------------------------------------------------------------------------------------
# Epochs x mini-batches as lax.scan
# ----------------------------------------------------------------------------------------------------------------


def ppo_minibatch_schedule(rng: Array, batch_size: int, num_minibatches: int, num_epochs: int) -> Array:
    """Row indices for every PPO update: int32 [num_epochs, num_minibatches, batch_size // num_minibatches].

    Each epoch is a fresh permutation of range(batch_size) (key: fold_in(rng, epoch)), cut into equal
    mini-batches, so every row is used exactly once per epoch. Deterministic given `rng`.
    """
    for name, value in (("batch_size", batch_size), ("num_minibatches", num_minibatches),
                        ("num_epochs", num_epochs)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"therapy_rl/ppo/core.py:ppo_minibatch_schedule: {name} must be a positive int, "
                             f"got {value!r}")
    if batch_size % num_minibatches:
        raise ValueError(f"therapy_rl/ppo/core.py:ppo_minibatch_schedule: batch_size={batch_size} is not "
                         f"divisible by num_minibatches={num_minibatches}")
    keys = jax.vmap(lambda e: jax.random.fold_in(rng, e))(jnp.arange(num_epochs))
    perms = jax.vmap(lambda k: jax.random.permutation(k, batch_size))(keys)
    return perms.reshape(num_epochs, num_minibatches, batch_size // num_minibatches).astype(jnp.int32)


def take_rows(tree: Any, indices: Array) -> Any:
    """Gather rows `indices` from every leaf's leading axis."""
    return jax.tree_util.tree_map(lambda x: jnp.take(x, indices, axis=0), tree)


def run_minibatch_epochs(update_fn: Callable[[Any, Any], tuple[Any, Any]], state: Any, batch: Any,
                         schedule: Array) -> tuple[Any, Any]:
    """Run `update_fn(state, minibatch) -> (state, metrics)` over a schedule [E, M, mb] with one `lax.scan`.

    `batch` is a pytree whose leaves all have the rollout batch as leading axis. Returns the final state and the
    metrics stacked to [E, M, ...].
    """
    num_epochs, num_minibatches, mb_size = schedule.shape
    flat = schedule.reshape(num_epochs * num_minibatches, mb_size)

    def body(carry, indices):
        return update_fn(carry, take_rows(batch, indices))

    state, metrics = jax.lax.scan(body, state, flat)
    metrics = jax.tree_util.tree_map(lambda m: m.reshape((num_epochs, num_minibatches) + m.shape[1:]), metrics)
    return state, metrics
