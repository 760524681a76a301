"""HF `config.json` and tensor names <-> `MistralConfig` and our params, for mistral, llama, qwen2 and mixtral.

HF names (torch Linear weights are [out, in]; our kernels [in, out], hence the transposes):
    model.embed_tokens.weight [V, D]                      -> embed_tokens/embedding
    model.layers.{i}.input_layernorm.weight               -> layers_{i}/input_layernorm/scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias} -> layers_{i}/self_attn/{q,k,v,o}_proj/{kernel,bias}
    model.layers.{i}.post_attention_layernorm.weight      -> layers_{i}/post_attention_layernorm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight       -> layers_{i}/mlp/{gate,up,down}_proj/kernel
    model.layers.{i}.block_sparse_moe.gate.weight [E, D]  -> layers_{i}/block_sparse_moe/gate/kernel [D, E]
    model.layers.{i}.block_sparse_moe.experts.{e}.w{1,2,3}.weight -> layers_{i}/block_sparse_moe/w{1,2,3} [E, ...]
    model.norm.weight                                     -> norm/scale
    lm_head.weight [V, D]                                 -> lm_head/kernel [D, V]   (absent when tied)
"""
from __future__ import annotations

import json
import os
from typing import Dict

from therapy_rl import errors
from therapy_rl.models.mistral import MODEL_TYPES, MistralConfig
from therapy_rl.models.sharded_load import TensorSource

_ARCHITECTURES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mixtral": "MixtralForCausalLM"}


def _rope_theta(hf: dict, source: str) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise errors.InputError(f"{source}: field 'rope_parameters' has rope_type {rope_type!r}; only the default "
                                "RoPE is implemented")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf_dict(hf: dict, source: str = "config.json", **overrides) -> MistralConfig:
    """A MistralConfig from an HF config.json dict; refuses variants the module does not implement."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise errors.InputError(f"{source}: field 'model_type' is {model_type!r}, expected one of {MODEL_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise errors.InputError(f"{source}: field 'hidden_act' is {hf['hidden_act']!r}; only 'silu' is implemented")
    if hf.get("mlp_bias"):
        raise errors.InputError(f"{source}: field 'mlp_bias' is true; MLP biases are not implemented")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "max_position_embeddings") if k not in hf]
    if missing:
        raise errors.InputError(f"{source}: missing field(s) {missing}")
    window = hf.get("sliding_window") or 0
    if model_type == "qwen2":
        if hf.get("use_sliding_window"):
            raise errors.InputError(f"{source}: field 'use_sliding_window' is true; Qwen2's per-layer windows are "
                                    "not implemented")
        window = 0
    if model_type == "llama":
        window = 0
    attention_bias = bool(hf.get("attention_bias", False))
    kwargs = dict(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=int(hf["num_attention_heads"]),
        num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        head_dim=int(hf.get("head_dim") or 0),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=_rope_theta(hf, source),
        sliding_window=int(window),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type == "llama" and attention_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        num_local_experts=int(hf.get("num_local_experts", 0)) if model_type == "mixtral" else 0,
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.02)),
        dropout_rate=float(hf.get("attention_dropout", 0.0)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    if kwargs["head_dim"] == kwargs["hidden_size"] // kwargs["num_attention_heads"]:
        kwargs["head_dim"] = 0
    kwargs.update(overrides)
    try:
        return MistralConfig(**kwargs)
    except ValueError as err:
        raise errors.InputError(f"{source}: {err}") from None


def config_to_hf_dict(config: MistralConfig, **extra) -> dict:
    """A config.json dict that transformers' `<Family>ForCausalLM` loads."""
    hf = {
        "model_type": config.model_type,
        "architectures": [_ARCHITECTURES[config.model_type]],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim_,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if config.model_type in ("mistral", "mixtral"):
        hf["sliding_window"] = config.sliding_window or None
    if config.model_type == "llama":
        hf["attention_bias"] = config.qkv_bias
        hf["mlp_bias"] = False
    if config.model_type == "qwen2":
        hf["use_sliding_window"] = False
    if config.is_moe:
        hf.update(num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok,
                  router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=False)
    hf.update(extra)
    return hf


def read_config(model_dir: str, **overrides) -> MistralConfig:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise errors.MissingFileError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise errors.InputError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    return config_from_hf_dict(hf, source=path, **overrides)


def tensor_sources(config: MistralConfig) -> Dict[str, TensorSource]:
    """Our '/'-joined param name -> where it lives in the HF checkpoint (the full name map of a config)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out = config.num_attention_heads * config.head_dim_
    kv_out = config.num_key_value_heads * config.head_dim_
    src = {"embed_tokens/embedding": TensorSource(("model.embed_tokens.weight",), (v, d), grow_axis=0),
           "norm/scale": TensorSource(("model.norm.weight",), (d,))}
    if not config.tie_word_embeddings:
        src["lm_head/kernel"] = TensorSource(("lm_head.weight",), (d, v), transpose=True, grow_axis=1)
    for i in range(config.num_hidden_layers):
        ours, hf = f"layers_{i}", f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            src[f"{ours}/{norm}/scale"] = TensorSource((f"{hf}.{norm}.weight",), (d,))
        for proj, d_in, d_out, bias in (("q_proj", d, q_out, config.qkv_bias), ("k_proj", d, kv_out, config.qkv_bias),
                                        ("v_proj", d, kv_out, config.qkv_bias), ("o_proj", q_out, d, config.o_bias)):
            src[f"{ours}/self_attn/{proj}/kernel"] = TensorSource((f"{hf}.self_attn.{proj}.weight",), (d_in, d_out),
                                                                  transpose=True)
            if bias:
                src[f"{ours}/self_attn/{proj}/bias"] = TensorSource((f"{hf}.self_attn.{proj}.bias",), (d_out,))
        if config.is_moe:
            e = config.num_local_experts
            moe = f"{hf}.block_sparse_moe"
            src[f"{ours}/block_sparse_moe/gate/kernel"] = TensorSource((f"{moe}.gate.weight",), (d, e), transpose=True)
            for w, shape in (("w1", (e, d, f)), ("w3", (e, d, f)), ("w2", (e, f, d))):
                src[f"{ours}/block_sparse_moe/{w}"] = TensorSource(
                    tuple(f"{moe}.experts.{j}.{w}.weight" for j in range(e)), shape, transpose=True)
        else:
            for proj, d_in, d_out in (("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)):
                src[f"{ours}/mlp/{proj}/kernel"] = TensorSource((f"{hf}.mlp.{proj}.weight",), (d_in, d_out),
                                                                transpose=True)
    return src


def hf_module_name(layer_path: str) -> str:
    """Our layer path ("layers_0/self_attn/q_proj") -> the HF module name ("model.layers.0.self_attn.q_proj")."""
    parts = layer_path.split("/")
    if parts[0].startswith("layers_"):
        parts = ["model", "layers", parts[0][len("layers_"):]] + parts[1:]
    return ".".join(parts)
