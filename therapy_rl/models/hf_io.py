"""Hugging Face GPT-2 checkpoints <-> our parameter tree, through safetensors only (no pickle).

HF names (`transformer.` prefix optional, as in older checkpoints):
    wte.weight [V, D]                       -> wte/embedding
    wpe.weight [P, D]                       -> wpe/embedding
    h.{i}.ln_1.{weight, bias}               -> h_{i}/ln_1/{scale, bias}
    h.{i}.attn.c_attn.{weight [D,3D], bias} -> h_{i}/attn/c_attn/{kernel, bias}
    h.{i}.attn.c_proj.{weight [D,D], bias}  -> h_{i}/attn/c_proj/{kernel, bias}
    h.{i}.ln_2.{weight, bias}               -> h_{i}/ln_2/{scale, bias}
    h.{i}.mlp.c_fc.{weight [D,4D], bias}    -> h_{i}/mlp/c_fc/{kernel, bias}
    h.{i}.mlp.c_proj.{weight [4D,D], bias}  -> h_{i}/mlp/c_proj/{kernel, bias}
    ln_f.{weight, bias}                     -> ln_f/{scale, bias}
HF's Conv1D stores weights as [in, out], the same layout as a flax Dense kernel: no transposes.
`lm_head.weight` is tied to `wte.weight` and is not stored (if present it must equal wte).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from therapy_rl.models.gpt2 import GPT2Config

_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
# Buffers some checkpoints carry that are not parameters (the causal mask of old GPT-2 files).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _name_map(config: GPT2Config) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
    """HF name (without the `transformer.` prefix) -> (our param path, expected shape)."""
    d, v, p = config.n_embd, config.vocab_size, config.n_positions
    names = {
        "wte.weight": (("wte", "embedding"), (v, d)),
        "wpe.weight": (("wpe", "embedding"), (p, d)),
        "ln_f.weight": (("ln_f", "scale"), (d,)),
        "ln_f.bias": (("ln_f", "bias"), (d,)),
    }
    for i in range(config.n_layer):
        block = f"h_{i}"
        for ln in ("ln_1", "ln_2"):
            names[f"h.{i}.{ln}.weight"] = ((block, ln, "scale"), (d,))
            names[f"h.{i}.{ln}.bias"] = ((block, ln, "bias"), (d,))
        for sub, layer, d_in, d_out in (("attn", "c_attn", d, 3 * d), ("attn", "c_proj", d, d),
                                        ("mlp", "c_fc", d, 4 * d), ("mlp", "c_proj", 4 * d, d)):
            names[f"h.{i}.{sub}.{layer}.weight"] = ((block, sub, layer, "kernel"), (d_in, d_out))
            names[f"h.{i}.{sub}.{layer}.bias"] = ((block, sub, layer, "bias"), (d_out,))
    return names


def _strip(name: str) -> str:
    return name[len("transformer."):] if name.startswith("transformer.") else name


def _read_safetensors(model_dir: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    single = os.path.join(model_dir, _WEIGHTS)
    if os.path.isfile(single):
        return dict(load_file(single))
    index_path = os.path.join(model_dir, _WEIGHTS_INDEX)
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: field 'weight_map' is missing or not an object")
    tensors: Dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(os.path.join(model_dir, shard)))
    return tensors


def _resolve_dir(model_dir_or_id: str) -> str:
    if os.path.isdir(model_dir_or_id):
        return model_dir_or_id
    if os.path.exists(model_dir_or_id) or model_dir_or_id.startswith((".", "/", "~")):
        raise ValueError(f"load_hf_gpt2: {model_dir_or_id!r} is not a directory with {_CONFIG} and {_WEIGHTS}")
    # Not a local path: treat as a hub id, fetching only the config and safetensors files.
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_dir_or_id, allow_patterns=[_CONFIG, "*.safetensors", _WEIGHTS_INDEX])
    except Exception as err:  # offline, unknown repo, no network
        raise ValueError(f"load_hf_gpt2: {model_dir_or_id!r} is not a local directory and could not be "
                         f"downloaded from the Hugging Face hub ({type(err).__name__}: {err}). Download "
                         f"{_CONFIG} + {_WEIGHTS} into a directory and pass its path.") from err


def load_hf_gpt2(model_dir: str, **config_overrides) -> Tuple[GPT2Config, dict]:
    """(GPT2Config, params) from a local HF directory (config.json + model.safetensors) or a hub id.

    Params are float32 numpy-backed jax arrays (the config's param_dtype is applied on the way in).
    A directory holding only pickle weights (pytorch_model.bin) is refused: pickle can run code.
    """
    model_dir = _resolve_dir(model_dir)
    config_path = os.path.join(model_dir, _CONFIG)
    if not os.path.isfile(config_path):
        raise ValueError(f"load_hf_gpt2: {config_path} not found")
    has_safetensors = os.path.isfile(os.path.join(model_dir, _WEIGHTS)) or os.path.isfile(
        os.path.join(model_dir, _WEIGHTS_INDEX))
    if not has_safetensors:
        pickles = [n for n in _PICKLES if os.path.exists(os.path.join(model_dir, n))]
        if pickles:
            raise ValueError(
                f"load_hf_gpt2: {model_dir} holds only {pickles}, not {_WEIGHTS}. Pickle weights are refused "
                "because unpickling can execute arbitrary code. Convert once in a trusted environment: "
                "`GPT2LMHeadModel.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)` "
                "(transformers), then pass out_dir.")
        raise ValueError(f"load_hf_gpt2: {model_dir} has no {_WEIGHTS}")
    with open(config_path) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path}: line {err.lineno}: invalid JSON ({err.msg})") from err
    config = GPT2Config.from_hf_dict(hf_config, source=config_path, **config_overrides)
    tensors = {_strip(k): v for k, v in _read_safetensors(model_dir).items()}
    return config, params_from_hf_tensors(config, tensors, source=model_dir)


def params_from_hf_tensors(config: GPT2Config, tensors: Dict[str, np.ndarray], source: str = "<tensors>") -> dict:
    """Map HF-named arrays (prefix already stripped) to our param tree, asserting every shape."""
    names = _name_map(config)
    params: dict = {}
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for hf_name, array in tensors.items():
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        if hf_name == "lm_head.weight":
            if not np.array_equal(np.asarray(array), np.asarray(tensors["wte.weight"])):
                raise ValueError(f"{source}: lm_head.weight differs from wte.weight; only a tied head is supported")
            continue
        if hf_name not in names:
            raise ValueError(f"{source}: unexpected tensor {hf_name!r} (shape {tuple(array.shape)})")
        path, shape = names[hf_name]
        if tuple(array.shape) != shape:
            raise ValueError(f"{source}: tensor {hf_name!r} has shape {tuple(array.shape)}, expected {shape}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(np.asarray(array, dtype=np.float32), dtype=config.params_dtype)
    return params


def params_to_hf_tensors(config: GPT2Config, params: dict) -> Dict[str, np.ndarray]:
    """Our param tree -> HF-named float32 numpy arrays (with the `transformer.` prefix)."""
    tensors = {}
    for hf_name, (path, shape) in _name_map(config).items():
        node = params
        for key in path:
            node = node[key]
        array = np.asarray(jax.device_get(node), dtype=np.float32)
        if array.shape != shape:
            raise ValueError(f"params/{'/'.join(path)} has shape {array.shape}, expected {shape}")
        tensors[f"transformer.{hf_name}"] = np.ascontiguousarray(array)
    return tensors


def save_hf_gpt2(config: GPT2Config, params: dict, out_dir: str, **extra_config) -> None:
    """Write config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads.

    `extra_config` goes into config.json (e.g. bos_token_id, eos_token_id, pad_token_id).
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(params_to_hf_tensors(config, params), os.path.join(out_dir, _WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, _CONFIG), "w") as f:
        json.dump(config.to_hf_dict(**extra_config), f, indent=2)


def resize_token_embeddings(params: dict, new_vocab_size: int, rng: jax.Array, method: str = "normal",
                            stddev: float = 0.02) -> dict:
    """Grow (or truncate) `wte/embedding` to `new_vocab_size` rows; other params are shared, not copied.

    New rows: method="normal" draws N(0, stddev^2) from `rng`; method="mean" copies the mean of the
    existing rows (rng unused). The caller updates the config with `config.replace(vocab_size=...)`.
    """
    if method not in ("normal", "mean"):
        raise ValueError(f"resize_token_embeddings: method must be 'normal' or 'mean', got {method!r}")
    if new_vocab_size <= 0:
        raise ValueError(f"resize_token_embeddings: new_vocab_size must be positive, got {new_vocab_size}")
    old = params["wte"]["embedding"]
    old_vocab, dim = old.shape
    if new_vocab_size <= old_vocab:
        new = old[:new_vocab_size]
    else:
        extra = new_vocab_size - old_vocab
        if method == "normal":
            rows = stddev * jax.random.normal(rng, (extra, dim), jnp.float32)
        else:
            rows = jnp.broadcast_to(jnp.mean(old.astype(jnp.float32), axis=0), (extra, dim))
        new = jnp.concatenate([old, rows.astype(old.dtype)], axis=0)
    return {**params, "wte": {**params["wte"], "embedding": new}}
