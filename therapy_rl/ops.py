"""Array kernels SFT, PPO and the reward share: masked statistics and whitening, the fused softmax/token-NLL
kernel, the models' mixed-precision matmul, and gradient accumulation over micro-batches (jax only).

Masks may be int, bool or float (float masks act as weights); masked-out positions may hold any value, even
inf/nan: they are selected away with `where`, never multiplied.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def float_dtype(*arrays: Any) -> jnp.dtype:
    """The dtype to compute in: the inputs' float type, at least float32 (float64 stays float64 under x64)."""
    return jnp.result_type(*[jnp.asarray(a).dtype for a in arrays], jnp.float32)


def mask_as(mask: Array, dtype: jnp.dtype) -> Array:
    return jnp.asarray(mask).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Masked statistics and whitening
# ----------------------------------------------------------------------------------------------------------------


def safe_divide(numerator: Array, denominator: Array) -> Array:
    """numerator / denominator, and 0 where denominator == 0 (so empty masks give 0, never nan)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def masked_sum(x: Array, mask: Array, axis: Optional[int] = None) -> Array:
    """sum_i m_i x_i (positions with m_i == 0 are dropped even if x_i is inf/nan)."""
    x = jnp.asarray(x)
    m = mask_as(mask, float_dtype(x))
    return jnp.sum(jnp.where(m != 0, x * m, 0), axis=axis)


def masked_mean(x: Array, mask: Array, axis: Optional[int] = None) -> Array:
    """sum_i m_i x_i / sum_i m_i; 0 where the mask is empty."""
    m = mask_as(mask, float_dtype(x))
    return safe_divide(masked_sum(x, m, axis), jnp.sum(m, axis=axis))


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance over all masked entries (scalar): mean_m (x - mean_m(x))^2, times n / (n - 1) when `unbiased`.

    n = sum(mask). TRL uses the unbiased form. With n <= 1 (n == 0 for the biased form) the result is 0.
    """
    x = jnp.asarray(x)
    m = mask_as(mask, float_dtype(x))
    mean = masked_mean(x, m)
    var = masked_mean(jnp.square(x - mean), m)
    if unbiased:
        n = jnp.sum(m)
        var = jnp.where(n > 1, var * n / jnp.where(n > 1, n - 1, 1), 0)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8,
                  masked_value: Optional[float] = None) -> Array:
    """Whitening of an array over its masked entries (TRL `masked_whiten`):

        mu = masked_mean(x), var = masked_var(x, unbiased)
        y  = (x - mu) / sqrt(var + eps)        (shift_mean=True)
        y  = (x - mu) / sqrt(var + eps) + mu   (shift_mean=False: rescale only, keep the mean)

    Entries where mask == 0 are returned unchanged, or as `masked_value` when given.
    """
    x = jnp.asarray(x)
    x = x.astype(float_dtype(x))
    m = mask_as(mask, x.dtype)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=unbiased)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return jnp.where(m != 0, y, x if masked_value is None else masked_value)


# ----------------------------------------------------------------------------------------------------------------
# The fused softmax / token-NLL kernel
# ----------------------------------------------------------------------------------------------------------------


class TokenStats(NamedTuple):
    nll: Array  # -log softmax(logits)[target], rounded as lse - target (the SFT loss)
    logp: Array  # log softmax(logits)[target], rounded as (target - max) - log_sum (PPO's log-probs)
    correct: Array  # 1.0 where logit[target] is the row's maximum (argmax == target; ties count as correct)
    entropy: Array  # entropy of softmax(logits)


@jax.custom_vjp
def softmax_token_stats(logits: Array, targets: Array) -> TokenStats:
    """`TokenStats` per position of float32 ``logits [..., V]`` against ``targets [...]``.

    Equals ``log_softmax`` + ``take_along_axis`` with fewer passes over the [..., V] logits, which dominate the
    SFT loss and the PPO update on CPU: the forward reads them for the max and once for ``exp(logits - max)``
    (kept for the backward, so log-probs are never materialised and exp is not recomputed); the backward scales
    the kept exps and subtracts at the targets (no scatter into a zero [..., V] array). ``nll`` and ``logp`` are
    one number of opposite sign, each rounded the way its caller always computed it (so runs stay
    bit-identical). Only they are differentiated: the cotangents of ``correct`` and ``entropy`` must be zero (use
    `ppo.core.token_entropy` where an entropy bonus needs its gradient). Outputs nobody reads are dropped by XLA.
    """
    return _softmax_token_stats_fwd(logits, targets)[0]


def _softmax_token_stats_fwd(logits, targets):
    z = logits.astype(jnp.float32)
    targets = targets.astype(jnp.int32)
    max_logit = jnp.max(z, axis=-1)
    exps = jnp.exp(z - max_logit[..., None])
    sum_exps = jnp.sum(exps, axis=-1)
    log_sum = jnp.log(sum_exps)
    target_logit = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    stats = TokenStats(nll=max_logit + log_sum - target_logit, logp=target_logit - max_logit - log_sum,
                       correct=(target_logit >= max_logit).astype(jnp.float32),
                       entropy=max_logit + log_sum - jnp.sum(exps * z, axis=-1) / sum_exps)
    return stats, (exps, sum_exps, targets)


def _softmax_token_stats_bwd(residuals, cotangents):
    exps, sum_exps, targets = residuals
    grad_nll = cotangents.nll - cotangents.logp
    grad_logits = exps * (grad_nll / sum_exps)[..., None]  # softmax * grad
    index = jnp.indices(targets.shape, sparse=True)  # minus grad at each target: one value per token
    grad_logits = grad_logits.at[(*index, targets)].add(-grad_nll, unique_indices=True)
    return grad_logits, None


softmax_token_stats.defvjp(_softmax_token_stats_fwd, _softmax_token_stats_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Dense matmul with float32 accumulation
# ----------------------------------------------------------------------------------------------------------------


def dense_matmul(x: Array, kernel: Array, compute_dtype: Any, transpose_kernel: bool = False) -> Array:
    """``x [..., in] @ kernel [in, out]`` (``kernel [out, in]`` with ``transpose_kernel``), the leading axes of x
    flattened into one (a 2-D dot: no transposed copies of activations for the weight gradient on XLA:CPU).

    float32: an ordinary float32 dot; the result is float32. bfloat16 (mixed precision): x and the float32 master
    kernel are rounded to bfloat16 and the dot accumulates in float32 (XLA:CPU runs only bf16 x bf16 -> f32 dots
    on AMX); the result is float32, for the caller to add its bias and round. Its backward (`_mixed_matmul`) feeds
    bfloat16 cotangents to two more bf16 x bf16 -> f32 dots; the kernel's gradient stays float32.
    """
    leading, features_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, features_in)
    if jnp.dtype(compute_dtype) == jnp.float32:
        dims = (((1,), (1 if transpose_kernel else 0,)), ((), ()))
        y = jax.lax.dot_general(x2.astype(jnp.float32), kernel.astype(jnp.float32), dims)
    else:
        y = _mixed_matmul(x2, kernel, jnp.dtype(compute_dtype), transpose_kernel)
    return y.reshape(*leading, y.shape[-1])


def _mixed_matmul(x2: Array, kernel: Array, compute_dtype, transpose_kernel: bool) -> Array:
    return _mixed_matmul_fn(jnp.dtype(compute_dtype), bool(transpose_kernel), jnp.dtype(x2.dtype),
                            jnp.dtype(kernel.dtype))(x2, kernel)


@functools.lru_cache(maxsize=None)
def _mixed_matmul_fn(compute_dtype, transpose_kernel: bool, x_dtype, kernel_dtype):
    """The custom-VJP 2-D matmul for one (compute dtype, kernel layout, input dtypes)."""
    f32 = jnp.float32
    kernel_in_axis = 1 if transpose_kernel else 0  # the kernel axis contracted with x's features

    @jax.custom_vjp
    def matmul(x2, kernel):
        return forward(x2, kernel)[0]

    def forward(x2, kernel):
        xc, kc = x2.astype(compute_dtype), kernel.astype(compute_dtype)
        y = jax.lax.dot_general(xc, kc, (((1,), (kernel_in_axis,)), ((), ())), preferred_element_type=f32)
        return y, (xc, kc)

    def backward(residuals, grad_y):
        xc, kc = residuals
        g = grad_y.astype(compute_dtype)  # [N, out]
        grad_x = jax.lax.dot_general(g, kc, (((1,), (1 - kernel_in_axis,)), ((), ())), preferred_element_type=f32)
        if transpose_kernel:  # kernel [out, in] <- g^T @ x
            grad_k = jax.lax.dot_general(g, xc, (((0,), (0,)), ((), ())), preferred_element_type=f32)
        else:  # kernel [in, out] <- x^T @ g
            grad_k = jax.lax.dot_general(xc, g, (((0,), (0,)), ((), ())), preferred_element_type=f32)
        return grad_x.astype(x_dtype), grad_k.astype(kernel_dtype)

    matmul.defvjp(forward, backward)
    return matmul


def vocab_major_logits(hidden: Array, embedding: Array, compute_dtype: Any) -> Array:
    """float32 logits ``hidden [..., D] @ embedding [V, D]^T`` for a few rows (a decode step), computed vocab-major
    as ``embedding @ hidden^T`` [V, rows] and transposed after an optimization barrier (without it XLA folds the
    transpose back into the row-major dot). At 16 rows XLA:CPU's GEMM reads the [V, D] weight this way at 1.6x
    the speed in float32 (8.8 against 14.1 ms for GPT-2's head on the AMD EPYC box, BENCHMARKS.md). Operands in
    compute_dtype (bfloat16: float32 accumulation); no gradient is meant to flow through it (sampling only)."""
    leading, features = hidden.shape[:-1], hidden.shape[-1]
    rows = hidden.reshape(-1, features).astype(compute_dtype)
    by_vocab = jax.lax.dot_general(embedding.astype(compute_dtype), rows, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)  # [V, rows]
    return jax.lax.optimization_barrier(by_vocab).T.reshape(*leading, embedding.shape[0])


def mixed_einsum(spec: str, a: Array, b: Array, compute_dtype: Any) -> Array:
    """A two-operand ``einsum(spec, a, b)`` accumulated in float32 (float32 result). Under bfloat16 the operands are
    rounded to it and the backward's two einsums also take bfloat16 operands (as `dense_matmul`), where plain
    autodiff of a float32-accumulated einsum would run float32 dots on the float32 cotangent."""
    if jnp.dtype(compute_dtype) == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _mixed_einsum_fn(spec.replace(" ", ""), jnp.dtype(compute_dtype), jnp.dtype(a.dtype),
                            jnp.dtype(b.dtype))(a, b)


@functools.lru_cache(maxsize=None)
def _mixed_einsum_fn(spec: str, compute_dtype, a_dtype, b_dtype):
    inputs, out = spec.split("->")
    a_spec, b_spec = inputs.split(",")
    if set(a_spec) - set(b_spec + out) or set(b_spec) - set(a_spec + out):
        raise ValueError(f"mixed_einsum: {spec!r} sums an index of one operand alone (not supported)")
    f32 = jnp.float32

    @jax.custom_vjp
    def einsum(a, b):
        return forward(a, b)[0]

    def forward(a, b):
        ac, bc = a.astype(compute_dtype), b.astype(compute_dtype)
        return jnp.einsum(spec, ac, bc, preferred_element_type=f32), (ac, bc)

    # The cotangent with the batch indices first (XLA:CPU's only bf16 x bf16 -> f32 dot, YNNPACK, rejects some
    # layouts, e.g. "bhts,bthd->bhsd", and its fallback has no such dot at all).
    batch = [c for c in a_spec if c in b_spec and c in out]
    g_spec = "".join(batch + [c for c in out if c not in batch])
    g_perm = tuple(out.index(c) for c in g_spec)

    def backward(residuals, grad_out):
        ac, bc = residuals
        g = jnp.transpose(grad_out.astype(compute_dtype), g_perm)
        grad_a = jnp.einsum(f"{g_spec},{b_spec}->{a_spec}", g, bc, preferred_element_type=f32)
        grad_b = jnp.einsum(f"{a_spec},{g_spec}->{b_spec}", ac, g, preferred_element_type=f32)
        return grad_a.astype(a_dtype), grad_b.astype(b_dtype)

    einsum.defvjp(forward, backward)
    return einsum


# ----------------------------------------------------------------------------------------------------------------
# Gradient accumulation
# ----------------------------------------------------------------------------------------------------------------


def split_microbatches(tree: Any, num_microbatches: int) -> Any:
    """Reshape every leaf [N, ...] -> [num_microbatches, N // num_microbatches, ...] (rows kept in order)."""
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"therapy_rl/ops.py:split_microbatches: leading size {x.shape[0]} is not "
                             f"divisible by num_microbatches={num_microbatches}")
        return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
    return jax.tree_util.tree_map(split, tree)


def accumulate_gradients(loss_fn: Callable[[Any, Any, Optional[Array]], tuple[Array, Any]], params: Any,
                         batch: Any, num_microbatches: int, keys: Optional[Array] = None,
                         trainable: Optional[Any] = None) -> tuple[Array, Any, Any]:
    """Sum `value_and_grad(loss_fn)` over micro-batches (rows in order) with `lax.scan`.

    `loss_fn(params, microbatch, key) -> (loss, aux)` must divide by the *whole batch's* denominator (sums, or
    `ppo.core.loss_denominator` of the whole mini-batch); then the summed loss, gradients and aux equal those of
    one call on the full batch. `keys` (optional) holds one key per micro-batch, [num_microbatches]; loss_fn gets
    None without them. Returns (loss, grads, aux), each summed over micro-batches.

    `trainable` (optional, a pytree of Python bools like `params`, e.g. `families.trainable_mask`) limits the
    differentiation to its True leaves: frozen leaves (LoRA's base) get zero gradients, so the backward pass skips
    their weight gradients and the accumulator holds only the trained leaves.
    """
    if trainable is not None:
        return _accumulate_trainable(loss_fn, params, batch, num_microbatches, keys, trainable)
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"therapy_rl/ops.py:accumulate_gradients: num_microbatches must be a positive int, "
                         f"got {num_microbatches!r}")
    if keys is not None and keys.shape[:1] != (num_microbatches,):
        raise ValueError(f"therapy_rl/ops.py:accumulate_gradients: expected {num_microbatches} keys, got an array "
                         f"of shape {keys.shape}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        (loss, aux), grads = grad_fn(params, batch, None if keys is None else keys[0])
        return loss, grads, aux
    micro = split_microbatches(batch, num_microbatches)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    out_shape = jax.eval_shape(grad_fn, params, first, None if keys is None else keys[0])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

    def body(total, xs):
        mb, key = xs
        out = grad_fn(params, mb, key)
        return jax.tree_util.tree_map(jnp.add, total, out), None

    ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (micro, keys))
    return loss, grads, aux


def _accumulate_trainable(loss_fn, params, batch, num_microbatches, keys, trainable):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    flags = [bool(f) for f in jax.tree_util.tree_leaves(trainable)]
    if len(flags) != len(leaves):
        raise ValueError(f"therapy_rl/ops.py:accumulate_gradients: `trainable` has {len(flags)} leaves, params "
                         f"{len(leaves)}")

    def with_frozen(trained):
        it = iter(trained)
        return treedef.unflatten([next(it) if f else leaf for leaf, f in zip(leaves, flags)])

    trained = [leaf for leaf, f in zip(leaves, flags) if f]
    loss, grads, aux = accumulate_gradients(lambda t, mb, key: loss_fn(with_frozen(t), mb, key), trained, batch,
                                            num_microbatches, keys)
    it = iter(grads)
    return loss, treedef.unflatten([next(it) if f else jnp.zeros_like(leaf) for leaf, f in zip(leaves, flags)]), aux
