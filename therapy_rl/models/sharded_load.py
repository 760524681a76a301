"""Safetensors checkpoints (one file, or `model.safetensors.index.json` + shards) read tensor by tensor.

A family describes each of its params as a `TensorSource`: the HF tensor name(s), whether the HF layout is the
transpose of ours (torch Linear [out, in] vs a flax kernel [in, out]), and several names stacked on a new leading
axis (Mixtral's per-expert weights). `load_params` reads either

- to host numpy (no mesh), or
- straight into mesh-sharded arrays: `jax.make_array_from_callback` asks, for each device, only the slice of the
  param that device holds, and only that slice is read from the file (safetensors slices lazily). No host ever
  holds a whole tensor it does not own a slice of, let alone the whole model.

A param may be larger than its file tensor along one axis (the vocabulary, grown to the run's tokenizer): the new
rows are drawn from N(0, init_std^2) with a numpy generator seeded by (seed, param name), so every device draws
the same rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from therapy_rl import errors

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorSource:
    hf_names: Tuple[str, ...]  # one name, or several stacked on a new axis 0
    shape: Tuple[int, ...]  # our param's shape
    transpose: bool = False  # the file holds the 2-D transpose of each (unstacked) slice
    grow_axis: Optional[int] = None  # our axis that may be longer than the file's (vocabulary growth)


def weight_files(model_dir: str) -> Dict[str, str]:
    """HF tensor name -> file, from the index (sharded) or the single file's header."""
    from safetensors import safe_open

    index_path = os.path.join(model_dir, WEIGHTS_INDEX)
    single = os.path.join(model_dir, WEIGHTS)
    if os.path.isfile(single):
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    if not os.path.isfile(index_path):
        raise errors.MissingFileError(f"{single}: no such file (nor {WEIGHTS_INDEX}); save the weights with "
                                      "save_pretrained(dir, safe_serialization=True)")
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise errors.InputError(f"{index_path}: not a safetensors index with a 'weight_map' ({err})") from None
    files = {}
    for name, shard in weight_map.items():
        path = os.path.join(model_dir, shard)
        if not os.path.isfile(path):
            raise errors.MissingFileError(f"{path}: no such file (named by {index_path} for {name!r})")
        files[name] = path
    return files


class _Reader:
    """Open safetensors handles, one per file, kept for the whole load."""

    def __init__(self, files: Dict[str, str]):
        from safetensors import safe_open

        self.files = files
        self._handles = {}
        for path in sorted(set(files.values())):
            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
                raise errors.InputError(f"{path}: not a readable safetensors file ({err})") from None

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

    def read(self, name: str, index: Tuple[slice, ...]) -> np.ndarray:
        return self._handles[self.files[name]].get_slice(name)[index]


def _normalise(index: Tuple[slice, ...], shape: Tuple[int, ...]) -> Tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(dim)) for s, dim in zip(index, shape))


def _grown_rows(seed: int, name: str, shape: Tuple[int, ...], init_std: float) -> np.ndarray:
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return (init_std * np.random.default_rng(digest).standard_normal(shape)).astype(np.float32)


def _read_slice(reader: _Reader, param_name: str, source: TensorSource, index: Tuple[slice, ...], seed: int,
                init_std: float) -> np.ndarray:
    """Our param's `index` slice (normalised), read from the file(s)."""
    if len(source.hf_names) > 1:
        experts = range(*index[0].indices(len(source.hf_names)))
        single = dataclasses.replace(source, hf_names=(None,), shape=source.shape[1:])
        return np.stack([_read_slice(reader, param_name, dataclasses.replace(single, hf_names=(source.hf_names[e],)),
                                     index[1:], seed, init_std) for e in experts])
    name = source.hf_names[0]
    file_shape = reader.shape(name)
    ours_in_file = file_shape[::-1] if source.transpose else file_shape
    if source.grow_axis is not None and ours_in_file[source.grow_axis] < source.shape[source.grow_axis]:
        axis, have = source.grow_axis, ours_in_file[source.grow_axis]
        wanted = index[axis]
        lo, hi = wanted.start, wanted.stop
        parts = []
        if lo < have:
            parts.append(_read_slice(reader, param_name, dataclasses.replace(source, grow_axis=None),
                                     index[:axis] + (slice(lo, min(hi, have)),) + index[axis + 1:], seed, init_std))
        if hi > have:
            extra_shape = list(source.shape)
            extra_shape[axis] = source.shape[axis] - have
            extra = _grown_rows(seed, param_name, tuple(extra_shape), init_std)
            sub = list(index)
            sub[axis] = slice(max(lo, have) - have, hi - have)
            parts.append(extra[tuple(sub)])
        return np.concatenate(parts, axis=axis)
    if source.transpose:
        return np.asarray(reader.read(name, index[::-1])).T
    return np.asarray(reader.read(name, index))


def check_shapes(model_dir: str, sources: Dict[str, TensorSource], files: Dict[str, str],
                 describe: str) -> None:
    """Every source tensor is present with the shape the config implies (headers only); names the file."""
    reader = _Reader(files)
    wanted = set()
    for param_name, source in sources.items():
        for i, name in enumerate(source.hf_names):
            wanted.add(name)
            if name not in files:
                raise errors.InputError(f"{model_dir}: no tensor {name!r}, which config.json ({describe}) implies; "
                                        "the config.json does not match these weights")
            shape = source.shape[1:] if len(source.hf_names) > 1 else source.shape
            expected = tuple(shape[::-1]) if source.transpose else tuple(shape)
            found = reader.shape(name)
            grow = source.grow_axis
            if grow is not None:
                file_axis = len(shape) - 1 - grow if source.transpose else grow
                ok = len(found) == len(expected) and all(
                    f == e or (a == file_axis and f <= e) for a, (f, e) in enumerate(zip(found, expected)))
            else:
                ok = found == expected
            if not ok:
                raise errors.InputError(f"{files[name]}: tensor {name!r} has shape {found}, but config.json "
                                        f"({describe}) implies {expected}; the config.json does not match these weights")
    extra = sorted(set(files) - wanted)
    if extra:
        raise errors.InputError(f"{files[extra[0]]}: tensor {extra[0]!r} is not part of the model config.json "
                                f"({describe}) describes ({len(extra)} such tensors)")


def load_params(files: Dict[str, str], sources: Dict[str, TensorSource], dtype, shardings: Optional[dict] = None,
                seed: int = 0, init_std: float = 0.02) -> dict:
    """A nested params dict ('/'-joined names in `sources`), as numpy (no `shardings`) or sharded jax arrays.

    `shardings` maps the same '/'-joined names to `jax.sharding.Sharding`s; each device's slice is read alone.
    """
    reader = _Reader(files)
    params: dict = {}
    for param_name, source in sources.items():
        def callback(index, param_name=param_name, source=source):
            index = _normalise(index, source.shape)
            return _read_slice(reader, param_name, source, index, seed, init_std).astype(dtype)

        if shardings is None:
            value = callback(tuple(slice(None) for _ in source.shape))
        else:
            value = jax.make_array_from_callback(source.shape, shardings[param_name], callback)
        node = params
        keys = param_name.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return params


def flatten_names(tree: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten_names(value, name))
        else:
            out[name] = value
    return out


def save_safetensors(tensors: Dict[str, np.ndarray], out_dir: str, max_shard_bytes: int = 0) -> None:
    """One model.safetensors, or (when `max_shard_bytes` > 0 and the tensors exceed it) shards + index.json."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes <= 0 or total <= max_shard_bytes:
        save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
        return
    shards: list = [{}]
    size = 0
    for name in sorted(tensors):
        if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    with open(os.path.join(out_dir, WEIGHTS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

