"""Exact resume: a run SIGKILLed mid-way and restarted with the same command ends bit-identical to an
uninterrupted run (params, optimizer state, data position, RNG), with a clean metrics.jsonl."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import flatten_tree, restore_checkpoint_as_numpy, sigkill_after_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 100


def _command(workdir):
    return [sys.executable, "-m", "therapy_rl.main", "--config", os.path.join(REPO, "configs/quickstart.py"),
            "--workdir", workdir, f"--config.max_steps={TOTAL_STEPS}", "--config.checkpoint_every_steps=10",
            "--config.eval_every_steps=40", "--config.log_every_steps=5", "--config.num_sample_replies=0",
            "--config.model.dropout_rate=0.1", "--config.progress_bar=false",
            "--config.early_stopping_patience_evals=0"]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env.pop("THERAPY_RL_DATA", None)
    return env


def _final_state(workdir):
    return restore_checkpoint_as_numpy(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS), "state"))


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(_command(straight), check=True, env=_env(), cwd=REPO, capture_output=True)

    killed_at = sigkill_after_checkpoint(_command(killed), killed, 20, env=_env(), cwd=REPO)
    assert killed_at < TOTAL_STEPS
    subprocess.run(_command(killed), check=True, env=_env(), cwd=REPO, capture_output=True)

    expected, got = flatten_tree(_final_state(straight)), flatten_tree(_final_state(killed))
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), f"{name} differs after resume"

    def records(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    straight_records, killed_records = records(straight), records(killed)
    assert [r["step"] for r in killed_records] == [r["step"] for r in straight_records]
    assert killed_records == straight_records
