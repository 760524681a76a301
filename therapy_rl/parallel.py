"""Device mesh, regex partition rules and shardings for params, optimizer state and batches.

Axes: ``data`` (pure data parallel), ``expert`` (data parallel whose devices each hold a share of every
mixture-of-experts layer's experts), ``fsdp`` (data parallel with sharded params and optimizer state) and ``tensor``
(model parallel inside a layer). Batches are split over ``("data", "expert", "fsdp")``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "fsdp", "tensor")
BATCH_AXES = ("data", "expert", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh axes; one of them may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int, int]:
        """The sizes in MESH_AXES order (data, expert, fsdp, tensor)."""
        sizes = [self.data, self.expert, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices cannot be split into mesh {sizes}")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(f"mesh {tuple(sizes)} needs {int(np.prod(sizes))} devices, {num_devices} available")
        return tuple(sizes)

    def batch_shards(self, num_devices: int) -> int:
        """Devices a batch is split over (data x expert x fsdp)."""
        data, expert, fsdp, _ = self.resolve(num_devices)
        return data * expert * fsdp


def mesh_shape_of(mesh_config) -> MeshShape:
    """The MeshShape of a config's ``mesh`` section (a ConfigDict or dict; missing axes take their defaults)."""
    get = mesh_config.get if mesh_config else (lambda key, default: default)
    return MeshShape(get("data", -1), get("fsdp", 1), get("tensor", 1), get("expert", 1))


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, expert, fsdp, tensor)`` mesh over ``devices`` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = shape.resolve(len(devices))
    device_grid = np.asarray(devices).reshape(sizes)
    return Mesh(device_grid, MESH_AXES)


# Ordered (regex, spec) rules for the GPT-2 trunk and the PPO value head. First match wins.
GPT2_PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"wte/embedding$", P("tensor", "fsdp")),
    (r"wpe/embedding$", P(None, "fsdp")),
    (r"attn/c_attn/kernel$", P("fsdp", "tensor")),
    (r"attn/c_attn/bias$", P("tensor")),
    (r"attn/c_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/c_fc/kernel$", P("fsdp", "tensor")),
    (r"mlp/c_fc/bias$", P("tensor")),
    (r"mlp/c_proj/kernel$", P("tensor", "fsdp")),
    (r"c_proj/bias$", P()),
    (r"ln_(1|2|f)/(scale|bias)$", P()),
    (r"value_head/.*kernel$", P("fsdp", None)),
    (r"value_head/.*bias$", P()),
)


def tree_path_name(path: tuple[Any, ...]) -> str:
    """'/'-joined names of a pytree key path (dict keys, attributes, sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fit_spec_to_shape(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str) -> P:
    """Drops mesh axes that do not divide their dimension (e.g. an odd vocabulary), so the leaf stays valid."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        axis_tuple = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in axis_tuple]))
        if dim % size:
            logging.log_first_n(logging.INFO, "replicating dim %d of %s: not divisible by %s", 10, dim, name, axes)
            fitted.append(None)
        else:
            fitted.append(axes)
    return P(*fitted)


def partition_specs(tree: Any, rules: Sequence[tuple[str, P]], mesh: Mesh) -> Any:
    """PartitionSpecs for every leaf of ``tree`` (arrays or ShapeDtypeStructs).

    Scalars and size-1 leaves are replicated. A leaf with 2+ dims that matches no rule is an error, so a new
    parameter never silently ends up replicated.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def spec_for(path, leaf):
        name = tree_path_name(path)
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) == 0 or int(np.prod(shape)) == 1:
            return P()
        for pattern, spec in compiled:
            if pattern.search(name):
                return _fit_spec_to_shape(spec, shape, mesh, name)
        if len(shape) == 1:
            return P()
        raise ValueError(f"no partition rule matches parameter {name!r} with shape {shape}")

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def named_shardings(tree: Any, rules: Sequence[tuple[str, P]], mesh: Mesh) -> Any:
    """NamedShardings for every leaf of ``tree`` by ``rules``."""
    specs = partition_specs(tree, rules, mesh)
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over ``data`` × ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch_from_host(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles a global, batch-sharded array from each host's slice of the rows."""
    return {
        name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
        for name, value in local_batch.items()
    }


def batch_shardings_like(batch: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    return {name: batch_sharding(mesh, np.ndim(value) if not hasattr(value, "ndim") else value.ndim)
            for name, value in batch.items()}
