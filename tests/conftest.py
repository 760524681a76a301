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
    from therapy_rl.checkpoint import read_tree_as_numpy

    return read_tree_as_numpy(path)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, **overrides):
    """``configs/<name>.py``'s get_config() with dotted-key overrides, e.g. ``{"model.n_layer": 1}``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(REPO_ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


@pytest.fixture(scope="session")
def quickstart_sft_workdir(tmp_path_factory):
    """A small SFT run on the bundled sample (shared by the chat, eval and PPO tests)."""
    from therapy_rl import sft

    workdir = str(tmp_path_factory.mktemp("quickstart_sft"))
    config = load_config("quickstart", max_steps=60, eval_every_steps=30, checkpoint_every_steps=30,
                         num_sample_replies=0, progress_bar=False, export_hf=True)
    sft.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def quickstart_ppo_workdir(quickstart_sft_workdir, tmp_path_factory):
    """A 2-iteration quickstart PPO run from the shared SFT run (API and export tests): best/ holds the step-0
    or step-1 policy, checkpoints/ steps 1 and 2."""
    from therapy_rl.ppo import trainer

    workdir = str(tmp_path_factory.mktemp("quickstart_ppo"))
    config = load_config("quickstart_ppo", init_from=quickstart_sft_workdir, max_iterations=2,
                         eval_every_iterations=1, checkpoint_every_iterations=1, num_sample_replies=0,
                         progress_bar=False)
    trainer.train_and_evaluate(config, workdir)
    return workdir


def flatten_tree(tree, prefix=""):
    """{'/a/b/0': np.ndarray} for a nested dict/list pytree (for exact comparisons of saved states)."""
    import numpy as np

    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: np.asarray(tree)}
    out = {}
    for key, value in items:
        out.update(flatten_tree(value, f"{prefix}/{key}"))
    return out


def checkpoint_steps(workdir):
    """Steps saved so far under ``workdir/checkpoints`` (committed ones only: orbax renames when complete)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []


def sigkill_after_checkpoint(command, workdir, min_step, timeout_s=300, **popen_kwargs):
    """Starts ``command``, SIGKILLs it once ``workdir/checkpoints`` holds a step >= ``min_step`` and returns the
    last committed step. Fails if the run ends before it could be killed."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen_kwargs)
    deadline = time.time() + timeout_s
    while time.time() < deadline and process.poll() is None:
        steps = checkpoint_steps(workdir)
        if steps and steps[-1] >= min_step:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return checkpoint_steps(workdir)[-1]


def assert_matches_frozen_hashes(folder, files):
    """A frozen evalsets/ folder: SHA256SUMS lists PROTOCOL.md and `files` (.jsonl), and each still has its hash."""
    import hashlib

    with open(os.path.join(folder, "SHA256SUMS"), encoding="utf-8") as f:
        entries = [line.split() for line in f if line.strip()]
    assert sorted(name for _, name in entries) == sorted(["PROTOCOL.md", *(f"{n}.jsonl" for n in files)])
    for digest, name in entries:
        with open(os.path.join(folder, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"{name} changed after it was frozen"


def training_files_copying(held_texts, min_chars=25):
    """{tools/guard_examples_*.json path: held-out texts (lower-cased, whitespace-collapsed, longer than
    `min_chars`) found in it}, for the files that copy any."""
    import glob

    held = [h for h in held_texts if len(h) > min_chars]
    found = {}
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "tools", "guard_examples_*.json"))):
        with open(path, encoding="utf-8") as f:
            text = " ".join(f.read().lower().split())
        copied = [h for h in held if h in text]
        if copied:
            found[path] = copied
    return found
