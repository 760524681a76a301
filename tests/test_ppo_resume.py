"""Exact PPO resume: a run SIGKILLed after a checkpoint and restarted with the same command ends bit-identical to
an uninterrupted run (policy, value head, optimizer state, KL coefficient, RNG, data position), with the same
metrics.jsonl (wall-clock timings aside) and the same best/ checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import flatten_tree, sigkill_after_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 8  # PPO iterations
KILL_AFTER = 2  # iterations checkpointed before the kill


def _env(cache_dir):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env.pop("THERAPY_RL_DATA", None)
    # the three PPO runs compile the same programs: share them through JAX's persistent cache
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _main(config, workdir, *overrides):
    return [sys.executable, "-m", "therapy_rl.main", "--config", os.path.join(REPO, "configs", config),
            "--workdir", workdir, "--config.progress_bar=false", "--config.num_sample_replies=0", *overrides]


def _ppo(workdir, sft):
    return _main("quickstart_ppo.py", workdir, f"--config.init_from={sft}", f"--config.max_iterations={TOTAL}",
                 "--config.checkpoint_every_iterations=1", "--config.eval_every_iterations=4",
                 "--config.eval_batch_size=16", "--config.sampling.max_new_tokens=16", "--config.ppo.dropout=true",
                 "--config.ppo.init_kl_coef=0.3", "--config.ppo.kl_horizon=50")


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not (k.startswith("time/") or k == "eps")} for r in records]


def test_ppo_sigkill_then_resume_is_bit_exact(quickstart_sft_workdir, tmp_path):
    sft, cache = quickstart_sft_workdir, str(tmp_path / "jax_cache")  # the shared SFT run (tests/conftest.py)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(_ppo(straight, sft), check=True, env=_env(cache), cwd=REPO, capture_output=True)

    killed_at = sigkill_after_checkpoint(_ppo(killed, sft), killed, KILL_AFTER, env=_env(cache), cwd=REPO)
    assert KILL_AFTER <= killed_at < TOTAL
    resumed = subprocess.run(_ppo(killed, sft), check=True, env=_env(cache), cwd=REPO, capture_output=True,
                             text=True)
    assert f"resumed from iteration {killed_at}" in resumed.stdout  # it continued, not started over

    def final(workdir):
        return flatten_tree(ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(TOTAL), "state")))

    expected, got = final(straight), final(killed)
    assert expected.keys() == got.keys()
    assert any(k.startswith("/params/value_head") for k in expected) and "/kl_coef" in expected
    assert any(k.startswith("/opt_state") for k in expected) and "/rng" in expected
    for name in expected:
        assert np.array_equal(expected[name], got[name]), f"{name} differs after resume"
    assert float(expected["/kl_coef"]) != pytest.approx(0.3)  # the adaptive controller really moved it
    assert int(expected["/step"]) == TOTAL

    assert _records(killed) == _records(straight)
    steps = [r["step"] for r in _records(straight)]
    assert steps.count(0) == 1 and max(steps) == TOTAL
    best = lambda w: sorted(os.listdir(os.path.join(w, "best")))  # noqa: E731
    assert best(killed) == best(straight)
    # a PPO workdir reads like an SFT one
    for name in ("run_info.json", "tokenizer"):
        assert os.path.exists(os.path.join(killed, name))
    with open(os.path.join(killed, "run_info.json")) as f:
        assert json.load(f)["mode"] == "ppo"
