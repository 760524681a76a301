"""Test set-up: 8 virtual CPU devices for sharding tests; optional strict no-skip mode for CI."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

_SKIPPED = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """With THERAPY_RL_FORBID_SKIPS=1 (set by .ci/run) any skipped test fails the run."""
    if os.environ.get("THERAPY_RL_FORBID_SKIPS") == "1" and _SKIPPED:
        print(f"\nTHERAPY_RL_FORBID_SKIPS=1 but {len(_SKIPPED)} test(s) were skipped:")
        for nodeid in _SKIPPED:
            print("  ", nodeid)
        session.exitstatus = 1


def shared_data_dir():
    """The real datasets (never in the repo), from $THERAPY_RL_DATA; None when unset or absent."""
    path = os.environ.get("THERAPY_RL_DATA")
    return path if path and os.path.isdir(path) else None


@pytest.fixture
def data_dir():
    path = shared_data_dir()
    if path is None:
        pytest.skip("THERAPY_RL_DATA is not set to the shared datasets folder")
    return path


def restore_checkpoint_as_numpy(path):
    """A saved pytree read back as host numpy arrays, whatever devices or processes wrote it."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    item_metadata = checkpointer.metadata(path).item_metadata
    tree = getattr(item_metadata, "tree", item_metadata)
    is_leaf = lambda x: not isinstance(x, (dict, list, tuple))  # noqa: E731
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree, is_leaf=is_leaf)
    return checkpointer.restore(path, restore_args=restore_args)
