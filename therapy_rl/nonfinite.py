"""The non-finite guard: a NaN or Inf in a loss, gradient, reward or parameter stops the run at that step.

Inside a jitted step, `code(...)` folds a few scalars into one int32 bitmask (bit i set = quantity i is NaN or
Inf), returned in the step's metrics under `KEY`: one fused reduction, one scalar for the host to read. The loop
reads it each step and raises `NonFiniteError` naming the step and the quantities, before anything is saved.
`Checkpointer.save` also refuses a tree holding a non-finite value (`first_nonfinite_leaves`), a last barrier.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from therapy_rl import errors

KEY = "nonfinite"  # metrics key of the bitmask; the loop pops it before logging


def code(*quantities: jax.Array) -> jax.Array:
    """int32 bitmask: bit i set when ``quantities[i]`` (any shape) holds a NaN or Inf. Use inside jit."""
    bits = [jnp.where(jnp.all(jnp.isfinite(q)), 0, 1 << i) for i, q in enumerate(quantities)]
    return sum(bits[1:], bits[0]).astype(jnp.int32)


def names_of(bitmask: int, names: Sequence[str]) -> list[str]:
    return [name for i, name in enumerate(names) if int(bitmask) >> i & 1]


def stop(bitmask: int, names: Sequence[str], where: str, last_good: str, hint: str) -> None:
    """Raises `NonFiniteError` when ``bitmask`` is non-zero: "non-finite <quantities> at <where>; <last_good>. <hint>"."""
    if not bitmask:
        return
    found = " and ".join(names_of(bitmask, names)) or f"quantity (code {int(bitmask)})"
    raise errors.NonFiniteError(f"non-finite {found} at {where}: the run stopped without saving it; "
                                f"{last_good}. {hint}")


def check_value(value: float, name: str, where: str, last_good: str, hint: str) -> None:
    """Raises `NonFiniteError` when the host float ``value`` is NaN or Inf."""
    if not np.isfinite(value):
        raise errors.NonFiniteError(f"non-finite {name} ({value}) at {where}: the run stopped without saving it; "
                                    f"{last_good}. {hint}")


@jax.jit
def _leaf_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def first_nonfinite_leaves(tree: Any, limit: int = 3) -> list[str]:
    """Paths of up to ``limit`` floating leaves of ``tree`` holding a NaN or Inf: one jitted reduction, one
    transfer of a [num_leaves] bool vector (never a sync per leaf)."""
    flat = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    if not flat:
        return []
    finite = np.asarray(jax.device_get(_leaf_finite([leaf for _, leaf in flat])))
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not ok][:limit]
