"""Mistral-style decoder in Flax linen: RoPE, grouped-query attention, SwiGLU, RMSNorm, sliding-window attention.

One module serves four HF families (`model_type`):
    mistral  sliding window (optional)
    llama    no window; `attention_bias` puts biases on q/k/v/o
    qwen2    no window; biases on q/k/v only
    mixtral  mistral attention + a top-k mixture-of-experts MLP (`models/mixtral.py`), with the router's
             load-balancing loss returned as `aux_loss`

Parameter tree (names mirror the HF checkpoint; `partition_rules` shards by them):
    embed_tokens/embedding [V, D]
    layers_{i}/input_layernorm/scale [D]
    layers_{i}/self_attn/{q_proj [D, H*Dh], k_proj [D, K*Dh], v_proj [D, K*Dh], o_proj [H*Dh, D]}/kernel (+ bias)
    layers_{i}/post_attention_layernorm/scale [D]
    layers_{i}/mlp/{gate_proj [D, F], up_proj [D, F], down_proj [F, D]}/kernel               (dense MLP)
    layers_{i}/block_sparse_moe/gate/kernel [D, E], experts/{w1 [E, D, F], w3 [E, D, F], w2 [E, F, D]}  (MoE)
    norm/scale [D]
    lm_head/kernel [D, V]                 (absent when tie_word_embeddings)

Masks, positions and the KV cache follow `gpt2.py`: attention is causal and masked on keys by `attention_mask`,
positions come from the mask (left padding), and the explicit `gpt2.KVCache` ([B, K, S, Dh] per layer, K = kv heads)
is written at `cache.index`. The sliding window is a mask on slots (key slot > query slot - window), which on a
left-padded row equals the window on positions. With a window shorter than prompt + new tokens, `init_cache` makes
a rolling cache of `sliding_window` slots: slot s lives in buffer entry s % window, each query attends to the buffer
plus the keys fed with it, so memory and per-step attention stay at the window however many tokens are generated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from therapy_rl import ops
from therapy_rl.models import gpt2, lora as lora_lib
from therapy_rl.models.gpt2 import KVCache

MODEL_TYPES = ("mistral", "llama", "qwen2", "mixtral")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """Hyper-parameters of the Mistral / Llama / Qwen2 / Mixtral decoder; hashable (a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    model_type: str = "mistral"
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int = 0  # 0 = full causal attention
    qkv_bias: bool = False  # Qwen2, Llama attention_bias
    o_bias: bool = False  # Llama attention_bias
    tie_word_embeddings: bool = False
    num_local_experts: int = 0  # > 0: the MoE MLP of Mixtral
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02  # weight of the load-balancing loss in the training loss
    dropout_rate: float = 0.0  # attention-probability and residual dropout (HF: attention_dropout only)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    initializer_range: float = 0.02
    lora: Optional[lora_lib.LoraConfig] = None

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MistralConfig.{field} must be a positive int, got {value!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"MistralConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"MistralConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if not self.head_dim and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"MistralConfig: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}; set head_dim")
        if self.head_dim_ % 2:
            raise ValueError(f"MistralConfig: head_dim={self.head_dim_} must be even for RoPE")
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"MistralConfig.num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"[1, num_local_experts={self.num_local_experts}]")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"MistralConfig.{field} must be one of {sorted(_DTYPES)}, got {getattr(self, field)!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"MistralConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if isinstance(self.lora, dict):  # from a run_info.json
            object.__setattr__(self, "lora", lora_lib.LoraConfig(**self.lora))

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    # The names the pipeline reads on every family.
    @property
    def n_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> "MistralConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------- pieces


class DecoderOutput(NamedTuple):
    logits: Optional[jax.Array]  # [B, T, V] float32 (None when compute_logits=False)
    hidden_states: jax.Array  # [B, T, D] after the final norm
    cache: Optional[KVCache]
    aux_loss: Optional[jax.Array]  # scalar load-balancing loss (MoE), else None


def init_cache(config: MistralConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    if max_length > config.max_position_embeddings:
        raise ValueError(f"init_cache: max_length={max_length} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")
    dtype = config.compute_dtype if dtype is None else dtype
    slots = min(max_length, config.sliding_window) if config.sliding_window else max_length  # rolling when shorter
    shape = (batch_size, config.num_key_value_heads, slots, config.head_dim_)
    return KVCache(keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
                   values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
                   index=jnp.zeros((), jnp.int32))


def attention_bias(attention_mask, query_length: int, query_offset, sliding_window: int) -> jax.Array:
    """Additive bias [B, 1, T, S]: GPT-2's causal + key mask, and key slot > query slot - window when windowed."""
    bias = gpt2.attention_bias(attention_mask, query_length, query_offset)
    if not sliding_window:
        return bias
    key_slots = jnp.arange(attention_mask.shape[-1], dtype=jnp.int32)
    query_slots = query_offset + jnp.arange(query_length, dtype=jnp.int32)
    inside = key_slots[None, :] > query_slots[:, None] - sliding_window  # [T, S]
    return jnp.where(inside[None, None], bias, jnp.finfo(jnp.float32).min)


def rolling_attention_bias(attention_mask, query_length: int, query_offset, window: int) -> jax.Array:
    """Additive bias [B, 1, T, window + T] of queries at slots offset..offset+T-1 over a rolling cache's `window`
    buffer entries (entry j holds the latest slot < offset that is j mod window) followed by the T keys fed now."""
    entries = jnp.arange(window, dtype=jnp.int32)
    buffer_slots = query_offset - 1 - jnp.mod(query_offset - 1 - entries, window)  # < 0: never written
    query_slots = query_offset + jnp.arange(query_length, dtype=jnp.int32)
    key_slots = jnp.concatenate([buffer_slots, query_slots])  # [window + T]
    real = (jnp.take(attention_mask, jnp.maximum(key_slots, 0), axis=1) > 0) & (key_slots >= 0)[None]  # [B, S']
    visible = ((key_slots[None, :] <= query_slots[:, None])
               & (key_slots[None, :] > query_slots[:, None] - window))  # [T, S']
    return jnp.where(real[:, None, None, :] & visible[None, None], 0.0,
                     jnp.finfo(jnp.float32).min).astype(jnp.float32)


def write_rolling(buffer, new, offset):
    """buffer [B, K, W, Dh] with new [B, K, T, Dh] (slots offset..offset+T-1) written at slot % W; only the last W
    of them when T > W."""
    window, length = buffer.shape[2], new.shape[2]
    if length == 1:
        return lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, 0, jnp.mod(offset, window), 0))
    kept = min(length, window)
    entries = jnp.mod(offset + length - kept + jnp.arange(kept, dtype=jnp.int32), window)
    return buffer.at[:, :, entries].set(new[:, :, length - kept:].astype(buffer.dtype), unique_indices=True)


def rope_tables(position_ids, head_dim: int, theta: float):
    """(cos, sin) [B, T, Dh] in float32 for HF's half-split rotation."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [Dh/2]
    angles = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [B, H, T, Dh]: x * cos + rotate_half(x) * sin, in float32, back to x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


def _linear(cfg: MistralConfig, features: int, name: str, use_bias: bool = False) -> lora_lib.Linear:
    return lora_lib.Linear(features, use_bias, cfg.compute_dtype, cfg.params_dtype, cfg.initializer_range,
                           cfg.lora, name=name)


def _norm(cfg: MistralConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)


class Attention(nn.Module):
    config: MistralConfig

    @nn.compact
    def __call__(self, x, bias, cos, sin, layer_cache, cache_index, deterministic: bool, rolling: bool = False):
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
        q = _linear(cfg, heads * dh, "q_proj", cfg.qkv_bias)(x, deterministic)
        k = _linear(cfg, kv_heads * dh, "k_proj", cfg.qkv_bias)(x, deterministic)
        v = _linear(cfg, kv_heads * dh, "v_proj", cfg.qkv_bias)(x, deterministic)
        split = lambda t, n: t.reshape(batch, length, n, dh).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q, heads), split(k, kv_heads), split(v, kv_heads)  # [B, H|K, T, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        new_layer_cache, key_blocks, value_blocks = None, (k,), (v,)
        if layer_cache is not None and rolling:  # attend to the buffer, then the keys fed now; then write them
            cache_k, cache_v = layer_cache
            new_layer_cache = (write_rolling(cache_k, k, cache_index), write_rolling(cache_v, v, cache_index))
            key_blocks = (cache_k.astype(cfg.compute_dtype), k)
            value_blocks = (cache_v.astype(cfg.compute_dtype), v)
        elif layer_cache is not None:  # [B, K, S, Dh] (or blocks of it) with this call's keys written in
            key_blocks, value_blocks, new_layer_cache = gpt2.write_layer_cache(layer_cache, k, v, cache_index)
            key_blocks = tuple(b.astype(cfg.compute_dtype) for b in key_blocks)
            value_blocks = tuple(b.astype(cfg.compute_dtype) for b in value_blocks)

        group = heads // kv_heads
        q = q.reshape(batch, kv_heads, group, length, dh) * jnp.asarray(1.0 / math.sqrt(dh), q.dtype)
        scores = gpt2.blockwise_scores("bkgtd,bksd->bkgts", q, key_blocks)  # [B, K, G, T, S]
        probs = jax.nn.softmax(scores + bias[:, :, None], axis=-1)
        probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=deterministic).astype(cfg.compute_dtype)
        out = gpt2.blockwise_values("bkgts,bksd->btkgd", probs, value_blocks).reshape(batch, length, heads * dh)
        return _linear(cfg, cfg.hidden_size, "o_proj", cfg.o_bias)(out, deterministic), new_layer_cache


class MLP(nn.Module):
    config: MistralConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        gate = _linear(cfg, cfg.intermediate_size, "gate_proj")(x, deterministic)
        up = _linear(cfg, cfg.intermediate_size, "up_proj")(x, deterministic)
        return _linear(cfg, cfg.hidden_size, "down_proj")(jax.nn.silu(gate) * up, deterministic)


class Block(nn.Module):
    config: MistralConfig

    @nn.compact
    def __call__(self, x, bias, cos, sin, layer_cache, cache_index, token_mask, deterministic: bool,
                 rolling: bool = False):
        from therapy_rl.models import mixtral

        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate)
        attn_out, new_layer_cache = Attention(cfg, name="self_attn")(
            _norm(cfg, "input_layernorm")(x), bias, cos, sin, layer_cache, cache_index, deterministic, rolling)
        x = x + drop(attn_out, deterministic=deterministic)
        h = _norm(cfg, "post_attention_layernorm")(x)
        if cfg.is_moe:
            mlp_out, router_stats = mixtral.SparseMoe(cfg, name="block_sparse_moe")(h, token_mask)
        else:
            mlp_out, router_stats = MLP(cfg, name="mlp")(h, deterministic), None
        return x + drop(mlp_out, deterministic=deterministic), new_layer_cache, router_stats


class MistralForCausalLM(nn.Module):
    """The decoder + LM head. Same call and output as `gpt2.GPT2LMHeadModel`, plus `aux_loss`."""

    config: MistralConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                 deterministic: bool = True, compute_logits: bool = True) -> DecoderOutput:
        from therapy_rl.models import mixtral

        cfg = self.config
        length = input_ids.shape[1]
        rolling = bool(cache is not None and cfg.sliding_window and attention_mask is not None
                       and cache.max_length == cfg.sliding_window < attention_mask.shape[-1])
        attention_mask, position_ids, offset = gpt2.mask_positions_offset(
            "MistralForCausalLM", input_ids, attention_mask, position_ids, cache,
            max_length=attention_mask.shape[-1] if rolling else None)
        token_mask = attention_mask if cache is None else lax.dynamic_slice_in_dim(attention_mask, offset, length, 1)

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                         embedding_init=nn.initializers.normal(cfg.initializer_range), name="embed_tokens")
        x = nn.Dropout(cfg.dropout_rate)(embed(input_ids), deterministic=deterministic)
        if rolling:
            bias = rolling_attention_bias(attention_mask, length, offset, cfg.sliding_window)
        else:
            bias = attention_bias(attention_mask, length, offset, cfg.sliding_window)
        cos, sin = rope_tables(position_ids, cfg.head_dim_, cfg.rope_theta)
        block_cls = nn.remat(Block, static_argnums=(8, 9)) if cfg.remat else Block
        new_keys, new_values, stats = [], [], []
        for i in range(cfg.num_hidden_layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, new_layer_cache, router_stats = block_cls(cfg, name=f"layers_{i}")(
                x, bias, cos, sin, layer_cache, offset, token_mask, deterministic, rolling)
            if new_layer_cache is not None:
                new_keys.append(new_layer_cache[0])
                new_values.append(new_layer_cache[1])
            stats.append(router_stats)
        hidden = _norm(cfg, "norm")(x)
        head = None if cfg.tie_word_embeddings else _HeadKernel(cfg.vocab_size, cfg.initializer_range,
                                                                 cfg.params_dtype, name="lm_head")(cfg.hidden_size)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=tuple(new_keys), values=tuple(new_values), index=cache.index + length)
        aux = mixtral.load_balancing_loss(stats, cfg) if cfg.is_moe else None
        logits = None
        if compute_logits:
            logits = _head_logits(embed.embedding if head is None else head, hidden, cfg)
        return DecoderOutput(logits=logits, hidden_states=hidden, cache=new_cache, aux_loss=aux)


class _HeadKernel(nn.Module):
    """Declares lm_head/kernel [D, V] without computing logits (the caller decides which positions need them)."""

    vocab_size: int
    init_std: float
    param_dtype: Any

    @nn.compact
    def __call__(self, hidden_size: int):
        return self.param("kernel", nn.initializers.normal(self.init_std), (hidden_size, self.vocab_size),
                          self.param_dtype)


def _head_logits(weight, hidden, config: MistralConfig):
    """The tied embedding [V, D] or lm_head kernel [D, V] applied to hidden [..., D]: float32 logits [..., V]."""
    return ops.dense_matmul(hidden, weight, config.compute_dtype, transpose_kernel=config.tie_word_embeddings)


def lm_logits(params, hidden: jax.Array, config: MistralConfig) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., V] through lm_head (or the tied embedding)."""
    weight = params["embed_tokens"]["embedding"] if config.tie_word_embeddings else params["lm_head"]["kernel"]
    return _head_logits(weight, hidden, config)


def init_params(config: MistralConfig, rng: jax.Array, seq_len: int = 8) -> Any:
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return MistralForCausalLM(config).init({"params": rng}, ids, compute_logits=False)["params"]
