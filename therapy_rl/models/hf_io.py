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

from therapy_rl import errors
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


def _weight_files(model_dir: str) -> list[str]:
    """model.safetensors, or the shards its index names (each must exist)."""
    single = os.path.join(model_dir, _WEIGHTS)
    if os.path.isfile(single):
        return [single]
    index_path = os.path.join(model_dir, _WEIGHTS_INDEX)
    try:
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as err:
        raise errors.InputError(f"{index_path}: not a safetensors index ({err})") from None
    if not isinstance(weight_map, dict):
        raise errors.InputError(f"{index_path}: field 'weight_map' is missing or not an object")
    shards = [os.path.join(model_dir, shard) for shard in sorted(set(weight_map.values()))]
    for shard in shards:
        if not os.path.isfile(shard):
            raise errors.MissingFileError(f"{shard}: no such file (named by {index_path})")
    return shards


def _unreadable(path: str, err: Exception) -> errors.InputError:
    return errors.InputError(f"{path}: not a readable safetensors file ({err}); it may be truncated: download or "
                             "save it again")


def _tensor_shapes(files: list[str]) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """HF name (prefix stripped) -> (shape, file), from the files' headers only (a truncated file is refused)."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    shapes[_strip(name)] = (tuple(f.get_slice(name).get_shape()), path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type from Rust
            raise _unreadable(path, err) from None
    return shapes


def _read_safetensors(files: list[str]) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors: Dict[str, np.ndarray] = {}
    for path in files:
        try:
            tensors.update({_strip(k): v for k, v in load_file(path).items()})
        except Exception as err:  # noqa: BLE001
            raise _unreadable(path, err) from None
    return tensors


def _check_shapes(config: GPT2Config, shapes: Dict[str, Tuple[Tuple[int, ...], str]], config_path: str) -> None:
    """Every tensor the config implies is present with its shape; names the weights file and config.json."""
    fields = (f"n_layer={config.n_layer}, n_embd={config.n_embd}, n_positions={config.n_positions}, "
              f"vocab_size={config.vocab_size}")
    files = sorted({path for _, path in shapes.values()}) or ["<no tensors>"]
    for hf_name, (_, shape) in _name_map(config).items():
        if hf_name not in shapes:
            raise errors.InputError(f"{files[0]}: no tensor {hf_name!r}, which {config_path} ({fields}) implies; "
                                    "the config.json does not match these weights")
        found, path = shapes[hf_name]
        if found != shape:
            raise errors.InputError(f"{path}: tensor {hf_name!r} has shape {found}, but {config_path} ({fields}) "
                                    f"implies {shape}; the config.json does not match these weights")
    names = _name_map(config)
    for hf_name, (found, path) in shapes.items():
        if hf_name not in names and hf_name != "lm_head.weight" and not hf_name.endswith(_IGNORED_SUFFIXES):
            raise errors.InputError(f"{path}: tensor {hf_name!r} {found} is not part of the model {config_path} "
                                    f"describes ({fields}); the config.json does not match these weights")


def _read_config(model_dir: str, **config_overrides) -> Tuple[GPT2Config, str]:
    config_path = os.path.join(model_dir, _CONFIG)
    if not os.path.isfile(config_path):
        raise errors.MissingFileError(f"{config_path}: no such file; an HF GPT-2 folder holds {_CONFIG} and "
                                      f"{_WEIGHTS}")
    with open(config_path) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as err:
            raise errors.InputError(f"{config_path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(hf_config, dict):
        raise errors.InputError(f"{config_path}: expected a JSON object")
    try:
        return GPT2Config.from_hf_dict(hf_config, source=config_path, **config_overrides), config_path
    except errors.UserError:
        raise
    except (ValueError, TypeError) as err:
        raise errors.InputError(f"{config_path}: {err}" if config_path not in str(err) else str(err)) from None


def read_hf_config(model_dir: str) -> GPT2Config:
    """The GPT2Config of a local HF folder's config.json (errors name the file)."""
    return _read_config(model_dir)[0]


def _require_safetensors(model_dir: str) -> None:
    has_safetensors = os.path.isfile(os.path.join(model_dir, _WEIGHTS)) or os.path.isfile(
        os.path.join(model_dir, _WEIGHTS_INDEX))
    if has_safetensors:
        return
    pickles = [n for n in _PICKLES if os.path.exists(os.path.join(model_dir, n))]
    if pickles:
        raise errors.InputError(
            f"load_hf_gpt2: {model_dir} holds only {pickles}, not {_WEIGHTS}. Pickle weights are refused "
            "because unpickling can execute arbitrary code. Convert once in a trusted environment: "
            "`GPT2LMHeadModel.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)` "
            "(transformers), then pass out_dir.")
    raise errors.MissingFileError(f"{os.path.join(model_dir, _WEIGHTS)}: no such file; save the weights there "
                                  "(save_pretrained(dir, safe_serialization=True))")


def check_hf_dir(model_dir: str, where: str = "model folder") -> GPT2Config:
    """The GPT2Config of a local HF folder after checking, from headers only, that config.json parses and that
    the safetensors weights are complete and have the shapes it implies; raises a ``UserError`` naming the file."""
    if not os.path.isdir(model_dir):
        raise errors.MissingFileError(f"{where}={model_dir}: no such folder; pass a local HF GPT-2 folder "
                                      f"({_CONFIG} + {_WEIGHTS})")
    config, config_path = _read_config(model_dir)
    _require_safetensors(model_dir)
    _check_shapes(config, _tensor_shapes(_weight_files(model_dir)), config_path)
    return config


def _resolve_dir(model_dir_or_id: str) -> str:
    if os.path.isdir(model_dir_or_id):
        return model_dir_or_id
    if os.path.exists(model_dir_or_id) or model_dir_or_id.startswith((".", "/", "~")):
        raise errors.MissingFileError(f"load_hf_gpt2: {model_dir_or_id!r} is not a directory with {_CONFIG} and "
                                      f"{_WEIGHTS}")
    # Not a local path: treat as a hub id, fetching only the config and safetensors files.
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_dir_or_id, allow_patterns=[_CONFIG, "*.safetensors", _WEIGHTS_INDEX])
    except Exception as err:  # offline, unknown repo, no network
        raise errors.ConfigError(f"load_hf_gpt2: {model_dir_or_id!r} is not a local directory and could not be "
                         f"downloaded from the Hugging Face hub ({type(err).__name__}: {err}). Download "
                         f"{_CONFIG} + {_WEIGHTS} into a directory and pass its path.") from err


def load_hf_gpt2(model_dir: str, **config_overrides) -> Tuple[GPT2Config, dict]:
    """(GPT2Config, params) from a local HF directory (config.json + model.safetensors) or a hub id.

    Params are float32 numpy-backed jax arrays (the config's param_dtype is applied on the way in).
    A directory holding only pickle weights (pytorch_model.bin) is refused: pickle can run code.
    """
    model_dir = _resolve_dir(model_dir)
    config, config_path = _read_config(model_dir, **config_overrides)
    _require_safetensors(model_dir)
    files = _weight_files(model_dir)
    _check_shapes(config, _tensor_shapes(files), config_path)  # headers first: a truncated file is named
    tensors = _read_safetensors(files)
    return config, params_from_hf_tensors(config, tensors, source=files[0] if len(files) == 1 else model_dir)


def params_from_hf_tensors(config: GPT2Config, tensors: Dict[str, np.ndarray], source: str = "<tensors>") -> dict:
    """Map HF-named arrays (prefix already stripped) to our param tree, asserting every shape."""
    names = _name_map(config)
    params: dict = {}
    missing = [n for n in names if n not in tensors]
    if missing:
        raise errors.InputError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for hf_name, array in tensors.items():
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        if hf_name == "lm_head.weight":
            if not np.array_equal(np.asarray(array), np.asarray(tensors["wte.weight"])):
                raise errors.InputError(f"{source}: lm_head.weight differs from wte.weight; only a tied head is supported")
            continue
        if hf_name not in names:
            raise errors.InputError(f"{source}: unexpected tensor {hf_name!r} (shape {tuple(array.shape)})")
        path, shape = names[hf_name]
        if tuple(array.shape) != shape:
            raise errors.InputError(f"{source}: tensor {hf_name!r} has shape {tuple(array.shape)}, expected {shape}")
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
