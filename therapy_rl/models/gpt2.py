"""GPT-2 in Flax linen, with parameter names that mirror the Hugging Face checkpoint.

Parameter tree (a contract: `parallel.py` sharding rules match these names):
    wte/embedding [V, D]                  token embedding, also the tied LM head
    wpe/embedding [P, D]                  learned positions
    h_{i}/ln_1/{scale, bias} [D]
    h_{i}/attn/c_attn/{kernel [D, 3D], bias [3D]}    q | k | v, each split into heads
    h_{i}/attn/c_proj/{kernel [D, D], bias [D]}
    h_{i}/ln_2/{scale, bias} [D]
    h_{i}/mlp/c_fc/{kernel [D, 4D], bias [4D]}
    h_{i}/mlp/c_proj/{kernel [4D, D], bias [D]}
    ln_f/{scale, bias} [D]

Attention is causal AND masked by `attention_mask` on the keys, so a left-padded row gives the same
logits on its real tokens as the unpadded row (positions come from the mask, see `position_ids_from_mask`).

KV cache: an explicit pytree (`KVCache`) passed in and returned, never a mutable flax collection.
With a cache, the T new keys/values are written at `cache.index`, the queries attend over the whole
cache under the causal rule "key slot <= query slot" and the key mask `attention_mask [B, S]`, and the
returned cache has `index + T`. Prefill (T = P) and decode (T = 1) both take this path.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from therapy_rl import defaults, ops

_MODEL_DEFAULTS = defaults.model_defaults()  # config.model: the defaults of GPT2Config's run-time fields

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Named sizes. "tiny" is for tests and the quickstart; the rest are the public GPT-2 family.
_NAMED_SIZES = {
    "tiny": dict(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(vocab_size=50257, n_positions=1024, n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Model hyper-parameters; hashable, so it can be a static argument of `jax.jit`."""

    vocab_size: int
    n_positions: int  # longest sequence (prompt + response) the position table covers
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    dropout_rate: float = _MODEL_DEFAULTS.dropout_rate  # embedding, residual and attention-probability dropout
    dtype: str = _MODEL_DEFAULTS.dtype  # compute dtype: "float32" | "bfloat16"
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat: bool = _MODEL_DEFAULTS.remat  # rematerialise each block in the backward pass
    initializer_range: float = 0.02

    def __post_init__(self):
        for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config.{field} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"GPT2Config.{field} must be one of {sorted(_DTYPES)}, got {getattr(self, field)!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"GPT2Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def named(cls, name: str, **overrides) -> "GPT2Config":
        """A named size ("tiny", "gpt2" = 124M small, "gpt2-medium", "gpt2-large", "gpt2-xl") with overrides."""
        if name not in _NAMED_SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}; known: {sorted(_NAMED_SIZES)}")
        return cls(**{**_NAMED_SIZES[name], **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "GPT2Config":
        return cls.named("tiny", **overrides)

    @classmethod
    def gpt2_small(cls, **overrides) -> "GPT2Config":
        return cls.named("gpt2", **overrides)

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json", **overrides) -> "GPT2Config":
        """From a Hugging Face GPT-2 `config.json` dict; refuses variants this model does not implement."""
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"{source}: field 'model_type' is {model_type!r}, expected 'gpt2'")
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: field 'activation_function' is {activation!r}; only the tanh GELU "
                             "('gelu_new') is implemented")
        n_embd = hf.get("n_embd", hf.get("hidden_size"))
        n_inner = hf.get("n_inner")
        if n_inner not in (None, 4 * n_embd):
            raise ValueError(f"{source}: field 'n_inner' is {n_inner}; only 4 * n_embd = {4 * n_embd} is implemented")
        for flag, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                             ("add_cross_attention", False), ("tie_word_embeddings", True)):
            if hf.get(flag, wanted) != wanted:
                raise ValueError(f"{source}: field {flag!r} is {hf[flag]!r}; only {wanted!r} is implemented")
        missing = [k for k in ("vocab_size", "n_positions", "n_layer", "n_head") if k not in hf]
        if n_embd is None or missing:
            raise ValueError(f"{source}: missing field(s) {missing + (['n_embd'] if n_embd is None else [])}")
        kwargs = dict(
            vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf["n_positions"]),
            n_embd=int(n_embd),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            # One rate for all three dropouts; HF's resid_pdrop is taken (the released models use 0.1 for all).
            dropout_rate=float(hf.get("resid_pdrop", 0.1)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self, **extra) -> dict:
        """A `config.json` dict that transformers' `GPT2LMHeadModel` loads; `extra` adds e.g. token ids."""
        hf = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout_rate,
            "embd_pdrop": self.dropout_rate,
            "attn_pdrop": self.dropout_rate,
            "initializer_range": self.initializer_range,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "use_cache": True,
            "torch_dtype": "float32",
        }
        hf.update(extra)
        return hf


# ----------------------------------------------------------------------------------------------- cache


@flax.struct.dataclass
class KVCache:
    """Explicit KV cache. keys[i], values[i]: [B, H, S, Dh] for layer i; index: int32 scalar, the next slot.

    keys[i] may also be a tuple of blocks [B, H, S_j, Dh] holding consecutive slots: attention then reads each
    block in place (no concatenated copy) and writes land in the last block. The sampler passes only the blocks
    generated so far, so a decode step reads the filled part of the cache, not all of it.
    Head-major layout: measured on CPU, decode attention over a [B, S, H, Dh] cache was ~10x slower.
    """

    keys: tuple
    values: tuple
    index: jax.Array

    @property
    def max_length(self) -> int:
        first = self.keys[0]
        return sum(b.shape[2] for b in first) if isinstance(first, tuple) else first.shape[2]


def write_layer_cache(layer_cache, k, v, cache_index):
    """Writes k, v [B, H, T, Dh] at slot `cache_index` of one layer's cache (an array, or a tuple of blocks whose
    last block takes the write). Returns (key blocks, value blocks, new layer cache) in the cache's dtype."""
    cache_k, cache_v = layer_cache
    if not isinstance(cache_k, tuple):
        k = lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, 0, cache_index, 0))
        v = lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, 0, cache_index, 0))
        return (k,), (v,), (k, v)
    start = sum(b.shape[2] for b in cache_k[:-1])  # the first slot of the last block
    last_k = lax.dynamic_update_slice(cache_k[-1], k.astype(cache_k[-1].dtype), (0, 0, cache_index - start, 0))
    last_v = lax.dynamic_update_slice(cache_v[-1], v.astype(cache_v[-1].dtype), (0, 0, cache_index - start, 0))
    keys, values = cache_k[:-1] + (last_k,), cache_v[:-1] + (last_v,)
    return keys, values, (keys, values)


def blockwise_scores(spec: str, q, key_blocks) -> jax.Array:
    """float32 attention scores over the key blocks' slots, in order (one einsum per block, then concatenated)."""
    parts = [ops.mixed_einsum(spec, q, kb, q.dtype) for kb in key_blocks]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def blockwise_values(spec: str, probs, value_blocks) -> jax.Array:
    """sum_j probs[..., slots of block j] . value block j (one einsum over all slots when there is one block),
    accumulated in float32 and returned in the probabilities' dtype."""
    einsum = lambda p, v: ops.mixed_einsum(spec, p, v, probs.dtype)  # noqa: E731  (float32 accumulation)
    if len(value_blocks) == 1:
        return einsum(probs, value_blocks[0]).astype(probs.dtype)
    out, start = None, 0
    for vb in value_blocks:
        part = einsum(lax.slice_in_dim(probs, start, start + vb.shape[2], axis=probs.ndim - 1), vb)
        out, start = part if out is None else out + part, start + vb.shape[2]
    return out.astype(probs.dtype)


def init_cache(config: GPT2Config, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache of `max_length` slots; dtype defaults to the compute dtype."""
    if max_length > config.n_positions:
        raise ValueError(f"init_cache: max_length={max_length} exceeds n_positions={config.n_positions}")
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch_size, config.n_head, max_length, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
    return KVCache(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
                   index=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------- masks


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions counted over real tokens only: cumsum(mask) - 1, clipped at 0 (left padding gets 0)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def attention_bias(attention_mask: jax.Array, query_length: int, query_offset) -> jax.Array:
    """Additive bias [B, 1, T, S]: 0 where key s is real and s <= query slot (offset + t), else a large negative.

    A finite minimum (not -inf) keeps fully masked query rows (padding) finite: their softmax is uniform.
    """
    key_length = attention_mask.shape[-1]
    query_slots = query_offset + jnp.arange(query_length, dtype=jnp.int32)  # [T]
    causal = jnp.arange(key_length, dtype=jnp.int32)[None, :] <= query_slots[:, None]  # [T, S]
    allowed = causal[None, :, :] & (attention_mask[:, None, :] > 0)  # [B, T, S]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    return bias[:, None, :, :]


# ----------------------------------------------------------------------------------------------- modules


class GPT2Output(NamedTuple):
    logits: Optional[jax.Array]  # [B, T, V] float32 (None when compute_logits=False)
    hidden_states: jax.Array  # [B, T, D] after ln_f
    cache: Optional[KVCache]


class Dense(nn.Module):
    """`nn.Dense`'s parameters (kernel [in, out], bias [out], same names and init) through `ops.dense_matmul`:
    float32, or bfloat16 operands with float32 accumulation and a float32 bias add, rounded to the compute dtype."""

    features: int
    compute_dtype: Any
    param_dtype: Any
    kernel_std: float

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(self.kernel_std), (x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = ops.dense_matmul(x, kernel, self.compute_dtype) + bias.astype(jnp.float32)
        return y.astype(self.compute_dtype)


def _dense(features: int, config: GPT2Config, name: str, std: float) -> Dense:
    return Dense(features, config.compute_dtype, config.params_dtype, std, name=name)


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype,
                        param_dtype=config.params_dtype, name=name)


def _residual_std(config: GPT2Config) -> float:
    """GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * n_layer)."""
    return config.initializer_range / math.sqrt(2 * config.n_layer)


class GPT2Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, bias, layer_cache, cache_index, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape
        qkv = _dense(3 * cfg.n_embd, cfg, "c_attn", cfg.initializer_range)(x)  # [B, T, 3D]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        heads = lambda t: t.reshape(batch, length, cfg.n_head, cfg.head_dim).transpose(0, 2, 1, 3)  # noqa: E731
        # Head-major [B, H, T, Dh]: on CPU the score/value contractions are ~10x faster in this layout
        # than with heads after the sequence axis (measured, GPT-2 small decode).
        q, k, v = heads(q), heads(k), heads(v)  # [B, H, T, Dh]

        new_layer_cache, key_blocks, value_blocks = None, (k,), (v,)
        if layer_cache is not None:  # [B, H, S, Dh] (or blocks of it) with this call's keys written in
            key_blocks, value_blocks, new_layer_cache = write_layer_cache(layer_cache, k, v, cache_index)
            key_blocks = tuple(b.astype(cfg.compute_dtype) for b in key_blocks)
            value_blocks = tuple(b.astype(cfg.compute_dtype) for b in value_blocks)

        q = q * jnp.asarray(1.0 / math.sqrt(cfg.head_dim), q.dtype)
        scores = blockwise_scores("bhtd,bhsd->bhts", q, key_blocks)  # [B, H, T, S]
        probs = jax.nn.softmax(scores + bias, axis=-1)
        probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=deterministic).astype(cfg.compute_dtype)
        out = blockwise_values("bhts,bhsd->bthd", probs, value_blocks).reshape(batch, length, cfg.n_embd)
        out = _dense(cfg.n_embd, cfg, "c_proj", _residual_std(cfg))(out)
        return out, new_layer_cache


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = _dense(4 * cfg.n_embd, cfg, "c_fc", cfg.initializer_range)(x)
        h = jax.nn.gelu(h, approximate=True)  # "gelu_new": the tanh approximation
        return _dense(cfg.n_embd, cfg, "c_proj", _residual_std(cfg))(h)


class GPT2Block(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, bias, layer_cache, cache_index, deterministic: bool):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate)
        attn_out, new_layer_cache = GPT2Attention(cfg, name="attn")(
            _layer_norm(cfg, "ln_1")(x), bias, layer_cache, cache_index, deterministic)
        x = x + drop(attn_out, deterministic=deterministic)
        x = x + drop(GPT2MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x)), deterministic=deterministic)
        return x, new_layer_cache


def mask_positions_offset(model_name: str, input_ids, attention_mask, position_ids, cache: Optional[KVCache],
                          max_length: Optional[int] = None):
    """(attention mask, position ids of the tokens fed now, cache write offset) of a decoder call: the mask defaults
    to all ones without a cache and must be [B, max_length] with one (`max_length` = the cache's unless given, as
    for a rolling cache shorter than the sequence); positions count the mask's ones."""
    batch, length = input_ids.shape
    if attention_mask is None:
        if cache is not None:
            raise ValueError(f"{model_name}: attention_mask [B, max_length] is required with a cache")
        attention_mask = jnp.ones((batch, length), jnp.int32)
    offset = jnp.zeros((), jnp.int32) if cache is None else cache.index
    expected = length if cache is None else (max_length or cache.max_length)
    if attention_mask.shape != (batch, expected):
        raise ValueError(f"{model_name}: attention_mask has shape {attention_mask.shape}, expected "
                         f"{(batch, expected)} ([B, T] without a cache, [B, max_length] with one)")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
        if cache is not None:  # the positions of the slots being written now
            position_ids = lax.dynamic_slice_in_dim(position_ids, offset, length, axis=1)
    return attention_mask, position_ids, offset


class GPT2LMHeadModel(nn.Module):
    """GPT-2 trunk + tied LM head. See the module docstring for names, masks and the cache."""

    config: GPT2Config

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                 deterministic: bool = True, compute_logits: bool = True) -> GPT2Output:
        cfg = self.config
        length = input_ids.shape[1]
        attention_mask, position_ids, offset = mask_positions_offset("GPT2LMHeadModel", input_ids, attention_mask,
                                                                     position_ids, cache)

        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                       embedding_init=nn.initializers.normal(cfg.initializer_range), name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                       embedding_init=nn.initializers.normal(cfg.initializer_range), name="wpe")
        x = wte(input_ids) + wpe(position_ids)  # [B, T, D]
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)

        bias = attention_bias(attention_mask, length, offset)  # [B, 1, T, S]
        # self counts as argument 0 for nn.remat; `deterministic` (argument 5) is a Python bool.
        block_cls = nn.remat(GPT2Block, static_argnums=(5,)) if cfg.remat else GPT2Block
        new_keys, new_values = [], []
        for i in range(cfg.n_layer):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, new_layer_cache = block_cls(cfg, name=f"h_{i}")(x, bias, layer_cache, offset, deterministic)
            if new_layer_cache is not None:
                new_keys.append(new_layer_cache[0])
                new_values.append(new_layer_cache[1])
        hidden = _layer_norm(cfg, "ln_f")(x)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=tuple(new_keys), values=tuple(new_values), index=cache.index + length)
        logits = lm_logits(wte.embedding, hidden, cfg) if compute_logits else None
        return GPT2Output(logits=logits, hidden_states=hidden, cache=new_cache)


def lm_logits(embedding: jax.Array, hidden: jax.Array, config: GPT2Config) -> jax.Array:
    """The tied LM head: hidden [..., D] @ wte^T -> float32 logits [..., V] (accumulated in float32)."""
    if config.compute_dtype == jnp.float32:
        return jnp.einsum("...d,vd->...v", hidden.astype(jnp.float32), embedding.astype(jnp.float32),
                          preferred_element_type=jnp.float32)
    return ops.dense_matmul(hidden, embedding, config.compute_dtype, transpose_kernel=True)


def init_params(config: GPT2Config, rng: jax.Array, seq_len: int = 8) -> Any:
    """Fresh parameters (GPT-2 init) from an explicit key."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return GPT2LMHeadModel(config).init({"params": rng}, ids)["params"]


# ----------------------------------------------------------------------------------------------- accounting


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def flops_per_token(config: GPT2Config, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 N + 12 * n_layer * n_embd * seq_len.

    N counts the weights that do matmul work: every block weight plus the tied LM head (V * D once);
    the position table is a lookup and is left out. The second term is the attention scores and the
    weighted sum over `seq_len` keys (the usual PaLM / nanoGPT estimate, no causal halving).
    Forward-only (sampling) cost is a third of this.
    """
    d, layers = config.n_embd, config.n_layer
    per_block = 12 * d * d + 13 * d  # c_attn 3d^2+3d, c_proj d^2+d, c_fc 4d^2+4d, c_proj 4d^2+d, 2 LN 4d
    n_matmul = layers * per_block + config.vocab_size * d + 2 * d  # + tied head + ln_f
    return 6.0 * n_matmul + 12.0 * layers * d * seq_len
