"""Autoregressive sampling: prefill the prompt into a KV cache, then a `lax.while_loop` decode.

Everything here is traceable; `make_generate_fn` jits `generate` once for a (model config, sampling
plan) pair, with temperature, top-k and top-p as traced values (one compile for a decoding grid), and
callers may pass mesh shardings through it.

Logprobs (decision): `SampleOutput.logprobs[b, n]` is log softmax of the RAW model logits (temperature 1,
no top-k/top-p) at the chosen token, i.e. exactly what a teacher-forced forward pass of the same params
gives. That is the policy probability PPO needs for old-vs-new ratios and for the KL to a reference model.
`SampleOutput.sampling_logprobs` is the log-probability under the distribution actually sampled from
(temperature, then top-k, then top-p), 0 for greedy; use it for diagnostics or importance corrections.
PPO that samples at temperature T != 1 with no top-k/top-p and treats softmax(logits / T) as its policy
should use `sampling_logprobs`, which is then exactly log_softmax(logits / T) at the chosen token.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from therapy_rl import defaults
from therapy_rl.models.gpt2 import GPT2Config, KVCache
from therapy_rl.ppo.core import token_entropy

_SAMPLING_DEFAULTS = defaults.sampling_defaults()  # config.sampling: the defaults of SamplingConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static decoding settings (hashable: a jit static argument). Defaults: config.sampling's."""

    max_new_tokens: int
    temperature: float = _SAMPLING_DEFAULTS.temperature
    top_k: int = _SAMPLING_DEFAULTS.top_k  # 0 = off; ties with the k-th logit are kept
    top_p: float = _SAMPLING_DEFAULTS.top_p  # 1.0 = off; smallest set with mass >= top_p, ties at the cut kept
    greedy: bool = _SAMPLING_DEFAULTS.greedy  # argmax of the raw logits; temperature/top-k/top-p ignored
    eos_id: Optional[int] = None  # None = never stop early
    pad_id: int = 0  # emitted after a row's EOS and for rows that never started

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"SamplingConfig.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0 (use greedy=True for argmax), "
                             f"got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an int >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B, N] int32; pad_id after a row's EOS
    response_mask: jax.Array  # [B, N] int32; 1 up to and including the first EOS
    lengths: jax.Array  # [B] int32; response_mask.sum(-1)
    logprobs: jax.Array  # [B, N] float32; raw model log p (T=1, unfiltered) of the chosen token; 0 where masked
    sampling_logprobs: jax.Array  # [B, N] float32; log p under the filtered, tempered distribution; 0 for greedy
    hidden: Optional[jax.Array] = None  # [B, N, D] final hidden state that predicted each token (with_hidden only)
    entropy: Optional[jax.Array] = None  # [B, N] entropy of softmax(raw logits) at each token (with_entropy only)


# ----------------------------------------------------------------------------------------------- plan and knobs
#
# A SamplingConfig splits into a static plan (what changes the compiled program: length, EOS/pad, greedy, which
# filters run, the size of the top-k candidate set) and traced knobs (temperature, k, p). One compiled sampler
# thus serves every temperature, every top_p < 1 and every top_k in one candidate bucket: a decoding grid.


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """The static part of a SamplingConfig (a jit static argument)."""

    max_new_tokens: int
    greedy: bool
    top_k_candidates: int  # 0 = top-k off; else the static size of the set the traced k is taken from
    top_p: bool  # nucleus filter on
    eos_id: Optional[int]
    pad_id: int


class SamplingKnobs(NamedTuple):
    """The traced part: any values run in the plan's compiled program."""

    temperature: jax.Array  # float32 []
    top_k: jax.Array  # int32 []; used only when plan.top_k_candidates > 0
    top_p: jax.Array  # float32 []; used only when plan.top_p


# Smallest top-k candidate set: top_k 1..64 share one compiled sampler (XLA's TopK costs about the same).
MIN_TOP_K_CANDIDATES = 64


def split_sampling(sampling: SamplingConfig) -> Tuple[SamplingPlan, SamplingKnobs]:
    filtering = not sampling.greedy
    k = sampling.top_k if filtering else 0
    candidates = 0 if k == 0 else max(MIN_TOP_K_CANDIDATES, 1 << (k - 1).bit_length())
    plan = SamplingPlan(max_new_tokens=sampling.max_new_tokens, greedy=sampling.greedy, top_k_candidates=candidates,
                        top_p=filtering and sampling.top_p < 1.0, eos_id=sampling.eos_id, pad_id=sampling.pad_id)
    knobs = SamplingKnobs(temperature=np.float32(sampling.temperature if filtering else 1.0),
                          top_k=np.int32(k), top_p=np.float32(sampling.top_p))
    return plan, knobs


# ----------------------------------------------------------------------------------------------- filters
#
# Semantics (shared by the pure filters, the sampler and the NumPy reference in the tests):
#   top-k keeps every logit >= the k-th largest (ties with it are kept, so possibly more than k);
#   top-p sorts descending and keeps each logit whose probability mass strictly before it is < p
#   (the token that crosses p is kept), then also every logit tied with the smallest kept one.
# Filtered logits are set to -inf.

_NEG_INF = -jnp.inf
# Top-p first looks at this many best candidates; only when they hold less than p does it search the
# whole vocabulary (a bisection, since XLA's CPU sort of 16 x 50257 logits takes ~130 ms).
NUCLEUS_CANDIDATES = 256


def _top_values(logits: jax.Array, k: int) -> jax.Array:
    """The k largest logits per row, descending.

    XLA:CPU turns every TopK into sort + slice and back into a TopK kernel only while the slice is the
    whole [0, k) prefix; a consumer that slices further (`values[..., -1]`) gets merged into it and
    leaves a full sort (~100x slower at V=50257). So callers reduce over all k values (`_kth_largest`).
    No optimisation barrier: on a multi-device mesh it crashes XLA's TopK decomposer.
    """
    return lax.top_k(logits, k)[0]


def _kth_largest(top_values: jax.Array) -> jax.Array:
    """[..., 1] the smallest of the descending top values: a full reduction, which keeps XLA's TopK."""
    return jnp.min(top_values, axis=-1, keepdims=True)


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    return logits if temperature == 1.0 else logits / jnp.asarray(temperature, logits.dtype)


def apply_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keep logits >= the k-th largest (ties kept); others -> -inf. k=0 or k >= V: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = _kth_largest(_top_values(logits, k))
    return jnp.where(logits < threshold, _NEG_INF, logits)


def _nucleus_threshold(sorted_desc: jax.Array, log_normalizer: jax.Array, p: float) -> jax.Array:
    """Smallest kept logit [..., 1]: candidate i is kept iff the mass strictly before it is < p."""
    probs = jnp.exp(sorted_desc - log_normalizer)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < p, sorted_desc, jnp.inf)  # the first candidate is always kept
    return jnp.min(kept, axis=-1, keepdims=True)


def _ordered_key(x: jax.Array) -> jax.Array:
    """uint32 keys whose order is the float order of x (IEEE bits, sign-folded)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _nucleus_threshold_by_bisection(logits: jax.Array, log_normalizer: jax.Array, p: float) -> jax.Array:
    """The same threshold as `_nucleus_threshold` over the full sorted row, without sorting.

    mass(t) = P(logit >= t) falls as t rises; the kept threshold is the largest logit t with
    mass(t) >= p. Bisection over the 2^32 ordered float keys finds it exactly in 32 masked sums.
    """
    probs = jnp.exp(logits - log_normalizer)
    keys = _ordered_key(logits)
    lo = jnp.min(keys, axis=-1, keepdims=True)  # mass(lo) = 1 >= p
    hi = jnp.max(keys, axis=-1, keepdims=True)  # invariant below: answer in [lo, hi]

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2  # upper middle, so lo = mid always moves up
        enough = jnp.sum(jnp.where(keys >= mid, probs, 0.0), axis=-1, keepdims=True) >= p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo, _ = lax.fori_loop(0, 32, body, (lo, hi))
    return jnp.min(jnp.where(keys >= lo, logits, jnp.inf), axis=-1, keepdims=True)


def apply_top_p(logits: jax.Array, p: float, sorted_candidates: Optional[jax.Array] = None) -> jax.Array:
    """Nucleus filter (see the semantics above). p >= 1: unchanged.

    `sorted_candidates` [..., C]: the C largest logits, descending, when the caller already has them
    (top-k); the normaliser still runs over all of `logits`, so the result is exact. Without them the
    best NUCLEUS_CANDIDATES are tried first, and a bisection over the whole row runs only if they hold
    less than p.
    """
    if p >= 1.0:
        return logits
    return _nucleus(logits, p, sorted_candidates)


def _nucleus(logits: jax.Array, p, sorted_candidates: Optional[jax.Array] = None) -> jax.Array:
    """`apply_top_p` for a p that may be traced (p >= 1 keeps every logit here too)."""
    log_normalizer = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    vocab = logits.shape[-1]

    def threshold_from(candidates):
        return _nucleus_threshold(candidates, log_normalizer, p)

    if sorted_candidates is not None:
        # The candidates must cover the nucleus: true for top-k survivors (everything else is -inf).
        threshold = threshold_from(sorted_candidates)
    elif vocab <= NUCLEUS_CANDIDATES:
        threshold = threshold_from(-jnp.sort(-logits, axis=-1))
    else:
        candidates = _top_values(logits, NUCLEUS_CANDIDATES)
        covered = jnp.all(jnp.sum(jnp.exp(candidates - log_normalizer), axis=-1) >= p)
        threshold = lax.cond(covered, lambda: threshold_from(candidates),
                             lambda: _nucleus_threshold_by_bisection(logits, log_normalizer, p))
    return jnp.where(logits < threshold, _NEG_INF, logits)


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (the Hugging Face order), as float32 logits [..., V]."""
    return _filter(logits, *split_sampling(sampling))


def _filter(logits: jax.Array, plan: SamplingPlan, knobs: SamplingKnobs) -> jax.Array:
    logits = logits.astype(jnp.float32) / jnp.asarray(knobs.temperature, jnp.float32)  # x / 1 == x exactly
    vocab = logits.shape[-1]
    top_values = None
    if plan.top_k_candidates:
        top_values = _top_values(logits, min(plan.top_k_candidates, vocab))  # [..., C] descending
        # The k best of the C candidates (k >= V keeps all: its k-th is the row's minimum); past k, -inf.
        in_top_k = jnp.arange(top_values.shape[-1]) < knobs.top_k
        top_values = jnp.where(in_top_k, top_values, _NEG_INF)
        kth = jnp.min(jnp.where(in_top_k, top_values, jnp.inf), axis=-1, keepdims=True)  # a full reduction
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if plan.top_p:
        # Top-k candidates past k are -inf: they carry no mass, and the kept set is the same as with exactly k.
        logits = _nucleus(logits, knobs.top_p, sorted_candidates=top_values)
    return logits


# Two-level categorical draw: pick a block of the vocabulary by inverse CDF over block masses, then a
# token inside it by Gumbel-max. Exact, and it draws B*(1 + block) random numbers instead of B*V
# (threefry Gumbel noise over the whole GPT-2 vocabulary costs ~10 ms a step on CPU).
_BLOCK = 256


def categorical(rng: jax.Array, logits: jax.Array) -> jax.Array:
    """Sample ids [B] from softmax(logits [B, V]); -inf logits are never drawn."""
    batch, vocab = logits.shape
    if vocab <= 2 * _BLOCK:
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
    n_blocks = -(-vocab // _BLOCK)
    padded = jnp.pad(logits, ((0, 0), (0, n_blocks * _BLOCK - vocab)), constant_values=_NEG_INF)
    blocks = padded.reshape(batch, n_blocks, _BLOCK)
    weights = jnp.exp(blocks - jnp.max(logits, axis=-1)[:, None, None])
    cum_mass = jnp.cumsum(weights.sum(-1), axis=-1)  # [B, n_blocks]
    block_key, token_key = jax.random.split(rng)
    target = jax.random.uniform(block_key, (batch, 1)) * cum_mass[:, -1:]
    block = jnp.sum(cum_mass <= target, axis=-1)  # first block whose cumulative mass exceeds target
    # Rounding can put target at the very top: fall back to the last block with any mass.
    last_nonempty = n_blocks - 1 - jnp.argmax((weights.sum(-1) > 0)[:, ::-1], axis=-1)
    block = jnp.minimum(block, last_nonempty)
    in_block = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [B, block]
    offset = jax.random.categorical(token_key, in_block, axis=-1)
    return (block * _BLOCK + offset).astype(jnp.int32)


def _chosen_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sample_token(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig | SamplingPlan,
                 knobs: Optional[SamplingKnobs] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row from logits [B, V] -> (tokens [B] int32, raw logprob [B], sampling logprob [B]).
    `sampling` is a SamplingConfig, or a SamplingPlan with (traced) `knobs`."""
    return _sample_token(logits, rng, *_plan_and_knobs(sampling, knobs))


def _sample_token(logits, rng, plan: SamplingPlan, knobs: SamplingKnobs):
    logits = logits.astype(jnp.float32)
    if plan.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampling_lp = jnp.zeros(tokens.shape, jnp.float32)
    else:
        filtered = _filter(logits, plan, knobs)
        tokens = categorical(rng, filtered)
        sampling_lp = _chosen_logprob(filtered, tokens)
    return tokens, _chosen_logprob(logits, tokens), sampling_lp


def _plan_and_knobs(sampling, knobs: Optional[SamplingKnobs]) -> Tuple[SamplingPlan, SamplingKnobs]:
    """A SamplingConfig (knobs None: its values become constants), or a SamplingPlan with (traced) knobs."""
    if isinstance(sampling, SamplingPlan):
        if knobs is None:
            raise ValueError("a SamplingPlan needs its SamplingKnobs")
        return sampling, knobs
    if knobs is not None:
        raise ValueError("knobs go with a SamplingPlan; a SamplingConfig carries its own values")
    return split_sampling(sampling)


# ----------------------------------------------------------------------------------------------- loop

# step_fn(previous_tokens [B] int32, step n (int32 scalar, the index of the token to produce), state)
#   -> (logits [B, V] for token n, new state)
StepFn = Callable[[jax.Array, jax.Array, object], Tuple[jax.Array, object]]


class _LoopState(NamedTuple):
    step: jax.Array  # index of the next token to produce
    last_tokens: jax.Array  # [B]
    finished: jax.Array  # [B] bool
    tokens: jax.Array  # [B, N]
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    entropy: Optional[jax.Array]  # [B, N] or None (not tracked)
    rng: jax.Array
    model_state: object


def sample_loop(first_logits: jax.Array, step_fn: StepFn, model_state, rng: jax.Array,
                sampling: SamplingConfig | SamplingPlan, active: Optional[jax.Array] = None,
                knobs: Optional[SamplingKnobs] = None, with_entropy: bool = False) -> SampleOutput:
    return sample_loop_with_state(first_logits, step_fn, model_state, rng, sampling, active, knobs, with_entropy)[0]


def sample_loop_with_state(first_logits: jax.Array, step_fn, model_state, rng: jax.Array,
                           sampling: SamplingConfig | SamplingPlan, active: Optional[jax.Array] = None,
                           knobs: Optional[SamplingKnobs] = None,
                           with_entropy: bool = False) -> Tuple[SampleOutput, object]:
    """Decode `sampling.max_new_tokens` tokens; the model is reached only through `step_fn`.

    first_logits [B, V] are the logits for token 0 (from the prefill). Each step splits the carried key,
    samples, marks rows finished on EOS (finished rows then emit pad_id), and stops early once every row
    is finished. `active` [B] bool (default all) marks rows to decode; inactive rows are finished from
    the start and return only padding. `sampling` is a SamplingConfig, or a SamplingPlan with `knobs`.
    `step_fn` may also be a sequence of (end step, StepFn): one while loop each, in order, the i-th running the
    steps before its end (a decode whose static shapes grow by segment). `with_entropy` also records the entropy
    of each step's raw logits (PPO logs the policy's entropy from it). Returns (the output, the final state).
    """
    sampling, knobs = _plan_and_knobs(sampling, knobs)
    batch = first_logits.shape[0]
    n_new = sampling.max_new_tokens
    eos = -1 if sampling.eos_id is None else sampling.eos_id
    pad = jnp.int32(sampling.pad_id)
    finished0 = jnp.zeros((batch,), bool) if active is None else ~active.astype(bool)

    def emit(state: _LoopState, logits: jax.Array, key: jax.Array) -> _LoopState:
        tokens, lp, slp = _sample_token(logits, key, sampling, knobs)
        live = ~state.finished
        tokens = jnp.where(live, tokens, pad)
        lp, slp = jnp.where(live, lp, 0.0), jnp.where(live, slp, 0.0)
        at = (0, state.step)
        entropy = state.entropy
        if entropy is not None:
            entropy = lax.dynamic_update_slice(entropy, jnp.where(live, token_entropy(logits.astype(jnp.float32)), 0.0)[:, None], at)
        return state._replace(
            entropy=entropy,
            last_tokens=tokens,
            finished=state.finished | (live & (tokens == eos)),
            tokens=lax.dynamic_update_slice(state.tokens, tokens[:, None], at),
            logprobs=lax.dynamic_update_slice(state.logprobs, lp[:, None], at),
            sampling_logprobs=lax.dynamic_update_slice(state.sampling_logprobs, slp[:, None], at),
            step=state.step + 1,
        )

    rng, key0 = jax.random.split(rng)
    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        last_tokens=jnp.full((batch,), pad),
        finished=finished0,
        tokens=jnp.full((batch, n_new), pad, jnp.int32),
        logprobs=jnp.zeros((batch, n_new), jnp.float32),
        sampling_logprobs=jnp.zeros((batch, n_new), jnp.float32),
        entropy=jnp.zeros((batch, n_new), jnp.float32) if with_entropy else None,
        rng=rng,
        model_state=model_state,
    )
    state = emit(state, first_logits, key0)

    segments = [(n_new, step_fn)] if callable(step_fn) else list(step_fn)
    for end, segment_fn in segments:
        def cond(s: _LoopState, end=end):
            return (s.step < end) & ~jnp.all(s.finished)

        def body(s: _LoopState, segment_fn=segment_fn):
            rng, key = jax.random.split(s.rng)
            logits, model_state = segment_fn(s.last_tokens, s.step, s.model_state)
            return emit(s._replace(rng=rng, model_state=model_state), logits, key)

        state = lax.while_loop(cond, body, state)
    output = _finish(state.tokens, state.logprobs, state.sampling_logprobs, eos, finished0, state.entropy)
    return output, state.model_state


def _finish(tokens, logprobs, sampling_logprobs, eos: int, inactive, entropy=None) -> SampleOutput:
    """response_mask = 1 up to and including the first EOS (all ones without one); 0 for inactive rows."""
    is_eos = (tokens == eos).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS strictly before each position
    mask = ((eos_before == 0) & ~inactive[:, None]).astype(jnp.int32)
    return SampleOutput(tokens=tokens, response_mask=mask, lengths=mask.sum(-1).astype(jnp.int32),
                        logprobs=logprobs * mask, sampling_logprobs=sampling_logprobs * mask,
                        entropy=None if entropy is None else entropy * mask)


# ----------------------------------------------------------------------------------------------- GPT-2


def weights_in_compute_dtype(params, config):
    """Under a bfloat16 compute dtype, the float weights rounded to it once per sampler call (the layers round them
    anyway): every decode step then reads half the bytes instead of re-rounding float32 weights."""
    dtype = jnp.dtype(config.compute_dtype)
    if dtype == jnp.float32:
        return params
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def generate(params, config: GPT2Config, prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
             sampling: SamplingConfig | SamplingPlan, active: Optional[jax.Array] = None,
             knobs: Optional[SamplingKnobs] = None, with_hidden: bool = False,
             decode_block: Optional[int] = None, with_entropy: bool = False) -> SampleOutput:
    """Sample `sampling.max_new_tokens` tokens after left-padded prompts [B, P] (mask 1 on real tokens).

    The prompt is prefilled into a cache block of P slots; generated tokens go into blocks of `decode_block`
    (default `decode_block_size(N)`) slots, and the steps that write block j attend to the prompt and blocks 0..j only (each in place), so a step
    reads the filled part of the cache. (Mistral with a sliding window shorter than P + N keeps one rolling
    cache of `sliding_window` slots.) Positions continue from each row's real prompt length. `active` [B] (e.g.
    the prompt batch's `valid`) marks rows to decode; inactive rows return pad_id with an all-zero response_mask and do not keep the loop
    running. Rows whose prompt is all padding but are active decode from position 0. `sampling` is a
    SamplingConfig, or a SamplingPlan with (traced) `knobs`. `with_hidden` also returns the final hidden state
    behind each token's logits (PPO's value head reads them instead of running the trunk again); `with_entropy`
    the entropy of each token's raw logits.
    """
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + sampling.max_new_tokens
    if total > config.n_positions:
        raise ValueError(f"generate: prompt length {prompt_len} + max_new_tokens {sampling.max_new_tokens} = "
                         f"{total} exceeds the model's n_positions={config.n_positions}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"generate: prompt_mask shape {prompt_mask.shape} != prompt_ids shape {prompt_ids.shape}")
    from therapy_rl.models import families

    model = families.module(config)
    params = weights_in_compute_dtype(params, config)
    n_new = sampling.max_new_tokens
    # Key mask over all cache slots: the prompt's, then every generated slot is real.
    key_mask = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((batch, n_new), jnp.int32)], axis=1)
    prompt_lengths = prompt_mask.astype(jnp.int32).sum(-1)
    window = getattr(config, "sliding_window", 0)
    if window and total > window:  # one rolling cache (models/mistral.py)
        blocks, cache = None, families.init_cache(config, batch, total)
        prefill = model.apply({"params": params}, prompt_ids, key_mask, cache=cache, compute_logits=False)
        cache = prefill.cache
    else:  # blocks: the prompt's, then the generated tokens'
        size = decode_block or decode_block_size(n_new)
        sizes = [min(size, n_new - start) for start in range(0, n_new, size)]
        blocks = [families.init_cache(config, batch, n) for n in sizes]
        prompt = families.init_cache(config, batch, prompt_len)
        prompt = KVCache(keys=tuple((k,) for k in prompt.keys), values=tuple((v,) for v in prompt.values),
                         index=prompt.index)
        prefill = model.apply({"params": params}, prompt_ids, key_mask[:, :prompt_len], cache=prompt,
                              compute_logits=False)
        cache = KVCache(keys=tuple(k + tuple(b.keys[i] for b in blocks) for i, k in enumerate(prefill.cache.keys)),
                        values=tuple(v + tuple(b.values[i] for b in blocks)
                                     for i, v in enumerate(prefill.cache.values)),
                        index=prefill.cache.index)
    first_logits = families.decode_logits(params, prefill.hidden_states[:, -1], config)  # [B, V]

    def decode_step(visible_blocks):
        """The step function of the steps that write block visible_blocks - 2 (None: the rolling cache)."""
        slots = None if visible_blocks is None else prompt_len + sum(sizes[:visible_blocks - 1])

        def step_fn(last_tokens, step, model_state):
            cache, hidden = model_state
            # The token produced at step n-1 sits at position prompt_length + n - 1.
            positions = (prompt_lengths + step - 1)[:, None]
            if slots is None:
                view, mask = cache, key_mask
            else:
                view = KVCache(keys=tuple(k[:visible_blocks] for k in cache.keys),
                               values=tuple(v[:visible_blocks] for v in cache.values), index=cache.index)
                mask = key_mask[:, :slots]
            out = model.apply({"params": params}, last_tokens[:, None], mask, position_ids=positions, cache=view,
                              compute_logits=False)
            if slots is not None:  # the written block back into the full cache
                out_cache = KVCache(keys=tuple(n + k[visible_blocks:] for n, k in zip(out.cache.keys, cache.keys)),
                                    values=tuple(n + v[visible_blocks:] for n, v in zip(out.cache.values,
                                                                                         cache.values)),
                                    index=out.cache.index)
            else:
                out_cache = out.cache
            if hidden is not None:
                hidden = lax.dynamic_update_slice(hidden, out.hidden_states.astype(hidden.dtype), (0, step, 0))
            return families.decode_logits(params, out.hidden_states[:, 0], config), (out_cache, hidden)

        return step_fn

    if blocks is None:
        step_fns = [(n_new, decode_step(None))]
    else:  # step n feeds token n - 1 into slot P + n - 1: block (n - 1) // size
        step_fns = [(min(start + size + 1, n_new), decode_step(j + 2))
                    for j, start in enumerate(range(0, n_new, size))]
    hidden = None
    if with_hidden:
        last = prefill.hidden_states[:, -1:]
        hidden = jnp.zeros((batch, n_new, last.shape[-1]), last.dtype)
        hidden = lax.dynamic_update_slice(hidden, last, (0, 0, 0))
    output, (_, hidden) = sample_loop_with_state(first_logits, step_fns, (cache, hidden), rng, sampling,
                                                 active=active, knobs=knobs, with_entropy=with_entropy)
    return output if hidden is None else output._replace(hidden=hidden)


# At most this many decode segments (each traces the model once more); blocks of at least 32 new tokens.
MAX_DECODE_SEGMENTS, MIN_DECODE_BLOCK = 8, 32


def decode_block_size(max_new_tokens: int) -> int:
    """Generated-token slots per cache block: steps attend to the blocks filled so far."""
    return max(MIN_DECODE_BLOCK, -(-max_new_tokens // MAX_DECODE_SEGMENTS))


def make_generate_fn(model_config: GPT2Config, sampling: SamplingConfig, with_hidden: bool = False,
                     with_entropy: bool = False, **jit_kwargs) -> "Sampler":
    """`fn(params, prompt_ids, prompt_mask, rng, active=None) -> SampleOutput`, jitted for these static configs
    (`with_hidden`, `with_entropy`: see `generate`).

    Temperature, top_k and top_p are traced: without `jit_kwargs`, every SamplingConfig with the same plan
    (`split_sampling`) shares one compiled program. `jit_kwargs` go to `jax.jit` (e.g. in_shardings /
    out_shardings for a mesh; with in_shardings, pass the arguments positionally, one sharding each).
    """
    plan, knobs = split_sampling(sampling)
    if not jit_kwargs:
        return Sampler(_shared_generate(model_config, plan, with_hidden, with_entropy), knobs)
    in_shardings = jit_kwargs.get("in_shardings")
    if isinstance(in_shardings, (tuple, list)):  # the knobs come first, replicated
        jit_kwargs = dict(jit_kwargs, in_shardings=(_replicated_like(in_shardings), *in_shardings))
    return Sampler(_jit_generate(model_config, plan, jit_kwargs, with_hidden, with_entropy), knobs)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A jitted generate with its sampling values bound; `lower` for ahead-of-time compilation."""

    jitted: Callable
    knobs: SamplingKnobs

    def __call__(self, *args) -> SampleOutput:
        return self.jitted(self.knobs, *args)

    def lower(self, *args) -> "_BoundStage":
        return _BoundStage(self.jitted.lower(self.knobs, *args), self.knobs)

    def _cache_size(self) -> int:
        """Programs compiled so far (as for a jitted function); shared by every Sampler of the same plan."""
        return self.jitted._cache_size()


@dataclasses.dataclass(frozen=True)
class _BoundStage:
    """A lowered or compiled Sampler that, like it, takes only the caller's arguments."""

    stage: object  # jax.stages.Lowered or Compiled
    knobs: SamplingKnobs

    def compile(self) -> "_BoundStage":
        return _BoundStage(self.stage.compile(), self.knobs)

    def as_text(self) -> str:
        return self.stage.as_text()

    def __call__(self, *args) -> SampleOutput:
        return self.stage(self.knobs, *args)


def _jit_generate(model_config: GPT2Config, plan: SamplingPlan, jit_kwargs, with_hidden: bool = False,
                  with_entropy: bool = False):
    def knobbed(knobs, params, prompt_ids, prompt_mask, rng, active=None):
        return generate(params, model_config, prompt_ids, prompt_mask, rng, plan, active=active, knobs=knobs,
                        with_hidden=with_hidden, with_entropy=with_entropy)

    return jax.jit(knobbed, **jit_kwargs)


@functools.lru_cache(maxsize=64)
def _shared_generate(model_config: GPT2Config, plan: SamplingPlan, with_hidden: bool = False,
                     with_entropy: bool = False):
    return _jit_generate(model_config, plan, {}, with_hidden, with_entropy)


def _replicated_like(in_shardings):
    """A replicated sharding on the mesh of the first NamedSharding in `in_shardings` (None if there is none)."""
    for leaf in jax.tree.leaves(in_shardings):
        if isinstance(leaf, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec())
    return None
