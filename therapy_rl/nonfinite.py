"""The non-finite guard: a NaN or Inf in a loss, gradient, reward or parameter stops the run at that step.

Inside a jitted step, `code(...)` folds a few scalars into one int32 bitmask (bit i set = quantity i is NaN or
Inf), returned in the step's metrics under `KEY`: one fused reduction, one scalar for the host to read. The loop
hands it to a `StepGuard`, which reads it one step late (the device always has the next step queued) and at
once before a log, an eval or a save, and raises `NonFiniteError` naming the first bad step and the quantities.
`Checkpointer.save` also refuses a tree holding a non-finite value (`first_nonfinite_leaves`), a last barrier.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from therapy_rl import errors

KEY = "nonfinite"  # metrics key of the bitmask; the loop pops it before logging


def code(*quantities: jax.Array) -> jax.Array:
    """int32 bitmask: bit i set when ``quantities[i]`` (any shape) holds a NaN or Inf. Use inside jit."""
    bits = [jnp.where(jnp.all(jnp.isfinite(q)), 0, 1 << i) for i, q in enumerate(quantities)]
    return sum(bits[1:], bits[0]).astype(jnp.int32)


def describe(bitmask: int, names: Sequence[str]) -> str:
    """The ``names`` whose bits are set in ``bitmask``, joined with "and"."""
    found = [name for i, name in enumerate(names) if int(bitmask) >> i & 1]
    return " and ".join(found) or f"value (code {int(bitmask)})"


def error(what: str, where: str, advice: str) -> errors.NonFiniteError:
    """The error a loop raises: 'non-finite <what> at <where>: the run stopped without saving it. <advice>'."""
    return errors.NonFiniteError(f"non-finite {what} at {where}: the run stopped without saving it. {advice}")


def advice(last_ckpt, learning_rate: float) -> str:
    """Where the run can restart from, and what to change (a changed learning rate is allowed on resume)."""
    step = last_ckpt.latest_step()
    where = (f"The last checkpoint is step {step} in {last_ckpt.directory}" if step is not None
             else "No checkpoint was saved yet")
    return (f"{where}; lower config.learning_rate (now {learning_rate:g}) or lengthen the warm-up, and run the "
            f"same command to {'resume from it' if step is not None else 'start again'}")


class StepGuard:
    """Checks each step's bitmask: `push` reads the previous step's (done by the time the next one is queued),
    `flush` the pending one. Raises `NonFiniteError` for the first step with a bit set."""

    def __init__(self, names: Sequence[str], advice_fn: Callable[[], str], unit: str = "step"):
        self.names, self.advice_fn, self.unit = tuple(names), advice_fn, unit
        self._pending: tuple[int, jax.Array] | None = None

    def push(self, step: int, bitmask: jax.Array) -> None:
        previous, self._pending = self._pending, (step, bitmask)
        if previous is not None:
            self._check(*previous)

    def flush(self) -> None:
        """Reads the pending bitmask: call before using the state (log, eval, save)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._check(*pending)

    def _check(self, step: int, bitmask: jax.Array) -> None:
        bad = int(bitmask)  # one scalar transfer
        if bad:
            raise error(describe(bad, self.names), f"{self.unit} {step}", self.advice_fn())


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
