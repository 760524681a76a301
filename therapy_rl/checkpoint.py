"""Orbax checkpoints: the train-state pytree plus JSON extras (data position, best metric), atomic and resumable.

A run keeps two managers: ``checkpoints/`` holds the last N states for resuming, and ``best/`` holds the single
state with the best validation metric. Orbax writes each step into a temporary folder and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact. A state holding a NaN or Inf is
never saved (`Checkpointer.save` raises `NonFiniteError`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from therapy_rl import errors, nonfinite


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing ``tree``: the restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` saving ``state`` (pytree) and ``extras`` (JSON dict)."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, extras: dict[str, Any]) -> None:
        """Saves ``step`` unless it exists already (a resumed run re-reaching a saved step holds the same state).

        Raises `NonFiniteError` instead when a floating leaf of ``state`` holds a NaN or Inf (one jitted reduction).
        """
        if int(step) in self._manager.all_steps():
            return
        bad = nonfinite.first_nonfinite_leaves(state)
        if bad:
            raise errors.NonFiniteError(f"refusing to save step {step} in {self.directory}: non-finite values in "
                                        f"{', '.join(bad)}")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras))
        self._manager.save(int(step), args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores into the shapes, dtypes and shardings of ``target_state`` (arrays or ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target_state)),
                                  extras=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored.state, dict(restored.extras)

    def restore_extras(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(extras=ocp.args.JsonRestore()))
        return dict(restored.extras)

    def close(self) -> None:
        self._manager.close()


def run_checkpointers(workdir: str, keep_last: int) -> tuple[Checkpointer, Checkpointer]:
    """(last-N manager, best manager) of a run's workdir."""
    return (Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=keep_last),
            Checkpointer(os.path.join(workdir, "best"), max_to_keep=1))


def find_checkpoint_dir(path: str, prefer: str = "best") -> str:
    """A checkpoint folder (absolute) from a workdir (its ``best/`` or ``checkpoints/``) or a manager folder."""
    path = os.path.abspath(path)
    for sub in ((prefer, "checkpoints", "best") if prefer else ("checkpoints", "best")):
        candidate = os.path.join(path, sub)
        if os.path.isdir(candidate) and Checkpointer(candidate).latest_step() is not None:
            return candidate
    if os.path.isdir(path) and Checkpointer(path).latest_step() is not None:
        return path
    raise FileNotFoundError(f"no orbax checkpoint found under {path!r} (looked for best/ and checkpoints/)")


class BestTracker:
    """Best validation metric so far and evals without improvement; saved in checkpoint extras."""

    def __init__(self, mode: str = "min", patience_evals: int = 0, best: float | None = None, stale_evals: int = 0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {mode!r}")
        self.mode, self.patience_evals = mode, patience_evals
        self.best, self.stale_evals = best, stale_evals

    def update(self, value: float) -> bool:
        """Records ``value``; True when it is a new best."""
        improved = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved:
            self.best, self.stale_evals = float(value), 0
        else:
            self.stale_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience_evals > 0 and self.stale_evals >= self.patience_evals

    def to_json(self) -> dict[str, Any]:
        return {"best": self.best, "stale_evals": self.stale_evals}

    def load_json(self, data: dict[str, Any]) -> None:
        self.best, self.stale_evals = data.get("best"), int(data.get("stale_evals", 0))


@contextlib.contextmanager
def quiet_absl():
    """Raises absl's threshold to ERROR for a block (orbax's expected warnings on partial reads)."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def read_tree_as_numpy(item_dir: str) -> Any:
    """A saved pytree item (e.g. ``<manager>/<step>/state``) as host numpy arrays, without a target tree:
    works whatever mesh or number of processes wrote it."""
    import numpy as np

    item_dir = os.path.abspath(item_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    with quiet_absl():
        item_metadata = checkpointer.metadata(item_dir).item_metadata
    tree = getattr(item_metadata, "tree", item_metadata)
    is_leaf = lambda x: not isinstance(x, (dict, list, tuple))  # noqa: E731
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree, is_leaf=is_leaf)
    with quiet_absl():
        return checkpointer.restore(item_dir, restore_args=restore_args)


POLICY_TRUNK_KEY = "trunk"  # a PPO state keeps the GPT-2 params under params["trunk"]


def read_params_as_numpy(item_dir: str) -> Any:
    """Only the ``params`` subtree of a saved item, as host numpy (no optimizer state is read). A PPO state's
    policy trunk is unwrapped, so SFT and PPO checkpoints give the same GPT-2 params layout."""
    import numpy as np

    item_dir = os.path.abspath(item_dir)  # orbax reads no metadata through a relative path
    checkpointer = ocp.PyTreeCheckpointer()
    with quiet_absl():  # orbax warns that a sub-item has no _CHECKPOINT_METADATA of its own: expected here
        item_metadata = checkpointer.metadata(item_dir).item_metadata
    tree = getattr(item_metadata, "tree", item_metadata)
    if not isinstance(tree, dict) or "params" not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{item_dir}: the saved state holds no 'params' (has {keys})")
    wanted = {"params": tree["params"]}
    is_leaf = lambda x: not isinstance(x, (dict, list, tuple))  # noqa: E731
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted, is_leaf=is_leaf)
    with quiet_absl():
        restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True))
    params = restored["params"]
    return params[POLICY_TRUNK_KEY] if POLICY_TRUNK_KEY in params else params


def load_params(path: str, prefer: str = "best", step: int | None = None) -> tuple[Any, str]:
    """GPT-2 params from a run workdir (its ``best/`` by default, else ``checkpoints/``) or a manager folder.

    Returns (params as numpy, "<manager dir>/<step>").
    """
    directory = find_checkpoint_dir(path, prefer=prefer)
    step = Checkpointer(directory).latest_step() if step is None else step
    return read_params_as_numpy(os.path.join(directory, str(step), "state")), f"{directory}/{step}"
