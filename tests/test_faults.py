"""Faults a run must survive cleanly: divergence (NaN/Inf) stops at the first bad step without saving it, a second
run on a busy workdir is refused at once, a killed run's lock is taken over, and a resume with a config that
changes the model is refused before anything is written (an allowed change is applied and recorded)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import checkpoint_steps, load_config, restore_checkpoint_as_numpy
from therapy_rl import checkpoint, errors, nonfinite, optim, run_files, sft, workdir_lock
from therapy_rl.models import gpt2
from therapy_rl.ppo import policy, step as ppo_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--config.progress_bar=false", "--config.num_sample_replies=0"]


def _env(cache_dir=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("THERAPY_RL_DATA", None)
    if cache_dir:  # runs of one test compile the same programs: share them
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _main(config, workdir, *overrides):
    return [sys.executable, "-m", "therapy_rl.main", "--config", os.path.join(REPO, "configs", config),
            "--workdir", workdir, *QUIET, *overrides]


def _saved_states(workdir):
    """{"checkpoints/3": tree, "best/1": tree} of every committed step under checkpoints/ and best/."""
    out = {}
    for manager in ("checkpoints", "best"):
        folder = os.path.join(workdir, manager)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.isdigit():
                out[f"{manager}/{name}"] = restore_checkpoint_as_numpy(os.path.join(folder, name, "state"))
    return out


def _assert_all_finite(states):
    for where, tree in states.items():
        for leaf in jax.tree_util.tree_leaves(tree):
            leaf = np.asarray(leaf)
            if np.issubdtype(leaf.dtype, np.floating):
                assert np.all(np.isfinite(leaf)), f"{where} holds a non-finite value"


# ------------------------------------------------------------------------------------------ divergence


def test_step_guard_names_the_first_bad_step():
    guard = nonfinite.StepGuard(sft.GUARDED, lambda: "advice")
    guard.push(1, jnp.int32(0))
    guard.push(2, nonfinite.code(jnp.float32(1.0), jnp.float32(2.0), jnp.float32(jnp.inf)))
    with pytest.raises(errors.NonFiniteError, match=r"non-finite parameter norm after the update at step 2: .*advice"):
        guard.push(3, jnp.int32(7))  # read one step late: step 2 is the first bad one
    guard = nonfinite.StepGuard(sft.GUARDED, lambda: "")
    guard.push(5, nonfinite.code(jnp.float32(jnp.nan), jnp.float32(jnp.nan), jnp.float32(1.0)))
    with pytest.raises(errors.NonFiniteError, match="training loss and gradient norm at step 5"):
        guard.flush()


def test_ppo_update_flags_non_finite_rewards_of_valid_rows_only():
    model = gpt2.GPT2Config(vocab_size=32, n_positions=32, n_embd=32, n_layer=1, n_head=4, dropout_rate=0.0)
    spec = policy.PolicySpec(model)
    hyper = ppo_step.PPOHyper(num_epochs=1, num_minibatches=1, eos_id=1)
    optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3, total_steps=10, schedule="constant",
                                                           grad_clip_norm=0.0))
    params = policy.init_policy_params(gpt2.init_params(model, jax.random.key(0)), jax.random.key(1), spec)
    state = ppo_step.create_state(params, optimizer, hyper.kl, jax.random.key_data(jax.random.key(2)))
    update = jax.jit(ppo_step.make_update_step(spec, hyper, optimizer))
    rng = np.random.default_rng(0)
    rollout = {"prompt_ids": rng.integers(2, 32, (4, 5), dtype=np.int32), "prompt_mask": np.ones((4, 5), np.int32),
               "tokens": rng.integers(2, 32, (4, 6), dtype=np.int32), "response_mask": np.ones((4, 6), np.int32),
               "valid": np.array([1, 1, 1, 0], np.int32)}

    def flags(scores):
        _, metrics = update(state, params[policy.TRUNK_KEY], {**rollout, "scores": np.asarray(scores, np.float32)})
        return nonfinite.describe(int(metrics[nonfinite.KEY]), ppo_step.GUARDED) if int(metrics[nonfinite.KEY]) else ""

    assert flags([0.5, -1.0, 2.0, 0.0]) == ""
    assert flags([0.5, np.inf, 2.0, 0.0]).startswith("reward scores")  # the clip would have hidden it
    assert flags([np.nan, 1.0, 2.0, 0.0]).startswith("reward scores")
    assert flags([0.5, 1.0, 2.0, np.nan]) == ""  # a padding row's score is never used


def test_checkpointer_refuses_a_non_finite_state(tmp_path):
    saver = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    with pytest.raises(errors.NonFiniteError, match=r"refusing to save step 3 .*\['params'\]\['w'\]"):
        saver.save(3, {"params": {"w": np.array([1.0, np.nan], np.float32), "b": np.zeros(2, np.float32)}}, {})
    assert saver.all_steps() == []
    saver.save(4, {"params": {"w": np.ones(2, np.float32)}, "step": np.int32(4)}, {})
    assert saver.all_steps() == [4]


def _assert_stopped(process, where):
    assert process.returncode == 3, (process.returncode, process.stderr[-3000:])
    assert re.search(rf"non-finite [^\n]*(loss|gradient|parameter)[^\n]* at {where}\b", process.stderr), \
        process.stderr[-3000:]
    assert "Traceback" not in process.stderr


def test_sft_divergence_stops_at_the_first_bad_step_and_saves_nothing_non_finite(tmp_path):
    workdir = str(tmp_path / "sft")
    # warm-up of 1 step (lr 0): step 1 is saved and finite; step 2 takes lr 1e30 and blows the weights up
    process = subprocess.run(_main("quickstart.py", workdir, "--config.learning_rate=1e30", "--config.max_steps=20",
                                   "--config.checkpoint_every_steps=1", "--config.eval_every_steps=1",
                                   "--config.log_every_steps=1"),
                             env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    _assert_stopped(process, "step 2")
    states = _saved_states(workdir)
    assert sorted(states) == ["best/1", "checkpoints/1"]  # the last good step, nothing after it
    _assert_all_finite(states)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert max(json.loads(line)["step"] for line in f) == 1


def test_ppo_divergence_stops_at_the_first_bad_iteration(quickstart_sft_workdir, tmp_path):
    workdir = str(tmp_path / "ppo")
    process = subprocess.run(_main("quickstart_ppo.py", workdir, f"--config.init_from={quickstart_sft_workdir}",
                                   "--config.learning_rate=1e30", "--config.max_iterations=4",
                                   "--config.checkpoint_every_iterations=1", "--config.eval_every_iterations=1",
                                   "--config.sampling.max_new_tokens=16"),
                             env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    _assert_stopped(process, "iteration 1")
    states = _saved_states(workdir)
    assert sorted(states) == ["best/0"]  # the SFT policy's baseline evaluation; iteration 1 is never saved
    _assert_all_finite(states)


# ------------------------------------------------------------------------------------------ the workdir lock


def test_lock_is_reentrant_names_its_holder_and_is_released(tmp_path):
    workdir = str(tmp_path / "run")
    probe = [sys.executable, "-c", "import sys; from therapy_rl import workdir_lock\n"
             "with workdir_lock.hold(sys.argv[1]): pass", workdir]
    with workdir_lock.hold(workdir):
        with workdir_lock.hold(workdir):  # main and the stage it calls
            pass
        with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
            assert json.load(f)["pid"] == os.getpid()
        busy = subprocess.run(probe, env=_env(), cwd=REPO, capture_output=True, text=True)
        assert busy.returncode != 0 and "RunBusyError" in busy.stderr
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in busy.stderr
    assert subprocess.run(probe, env=_env(), cwd=REPO, capture_output=True).returncode == 0


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from therapy_rl import workdir_lock\n"
                               "with workdir_lock.hold(sys.argv[1]):\n print('held', flush=True); time.sleep(600)",
                               workdir], env=_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(errors.RunBusyError, match=f"pid {holder.pid} "):
        with workdir_lock.hold(workdir):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
        assert json.load(f)["pid"] == holder.pid  # the dead holder's record is still there ...
    with workdir_lock.hold(workdir):  # ... and never trusted: the kernel dropped its flock
        with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
            assert json.load(f)["pid"] == os.getpid()


def test_busy_workdir_killed_run_and_resume_with_changed_config(tmp_path):
    """A second run exits at once naming the first; after a SIGKILL the run resumes under the stale lock with an
    allowed change (recorded); a change of the model's shape is refused without touching the workdir."""
    workdir, env = str(tmp_path / "sft"), _env(str(tmp_path / "jax_cache"))
    first = subprocess.Popen(_main("quickstart.py", workdir, "--config.max_steps=1000",
                                   "--config.checkpoint_every_steps=2", "--config.eval_every_steps=1000"),
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not checkpoint_steps(workdir) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None and checkpoint_steps(workdir), "the first run never checkpointed"
        started = time.perf_counter()
        second = subprocess.run(_main("quickstart.py", workdir, "--config.max_steps=1000"), env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        elapsed = time.perf_counter() - started
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        assert "[sft]" not in second.stdout  # it gave up before building anything
        assert elapsed < 120, f"the second run took {elapsed:.0f} s to give up"
        assert first.poll() is None  # the first run was never disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    killed_at = checkpoint_steps(workdir)[-1]
    resumed = subprocess.run(_main("quickstart.py", workdir, f"--config.max_steps={killed_at + 2}",
                                   "--config.checkpoint_every_steps=2", "--config.eval_every_steps=1000"),
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {killed_at}" in resumed.stdout
    assert checkpoint_steps(workdir)[-1] == killed_at + 2
    with open(os.path.join(workdir, run_files.RUN_INFO)) as f:
        info = json.load(f)
    assert info["config"]["max_steps"] == killed_at + 2
    assert info["resumes"][-1]["changed"] == {"max_steps": [1000, killed_at + 2]}
    assert info["resumes"][-1]["from_step"] == killed_at

    with open(os.path.join(workdir, run_files.RUN_INFO), "rb") as f:
        run_info_bytes = f.read()
    listing = sorted(os.listdir(workdir))
    refused = subprocess.run(_main("quickstart.py", workdir, f"--config.max_steps={killed_at + 2}",
                                   "--config.model.n_layer=1", "--config.tokenizer.bpe_vocab_size=900"),
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "config.model.n_layer: 2 -> 1" in refused.stderr
    assert "config.tokenizer.bpe_vocab_size: 1200 -> 900" in refused.stderr
    assert "Traceback" not in refused.stderr
    with open(os.path.join(workdir, run_files.RUN_INFO), "rb") as f:
        assert f.read() == run_info_bytes
    assert sorted(os.listdir(workdir)) == listing


# ------------------------------------------------------------------------------------------ the resume check


def _saved_run(tmp_path, config):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    run_files.write_run_info(workdir, config, gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                                              n_head=4))
    return workdir


def test_resume_check_refuses_each_incompatible_field_with_both_values(tmp_path):
    workdir = _saved_run(tmp_path, load_config("quickstart"))
    changed = load_config("quickstart", **{"model.n_embd": 64, "data.max_length_tokens": 80, "seed": 7,
                                           "grad_clip_norm": 0.0, "learning_rate": 1e-4})
    with pytest.raises(errors.IncompatibleResumeError) as refused:
        run_files.check_resume(workdir, changed)
    message = str(refused.value)
    for expected in ("config.model.n_embd: 128 -> 64", "config.data.max_length_tokens: 96 -> 80",
                     "config.seed: 42 -> 7", "config.grad_clip_norm: 1.0 -> 0.0"):
        assert expected in message
    assert "learning_rate" not in message and "4 field(s)" in message
    ppo_config = load_config("quickstart_ppo", init_from=workdir)
    with pytest.raises(errors.IncompatibleResumeError, match="holds a sft run"):
        run_files.check_resume(workdir, ppo_config)


def test_resume_check_applies_and_records_allowed_changes(tmp_path, monkeypatch):
    saved = load_config("quickstart_ppo", init_from=str(tmp_path / "sft"))
    workdir = _saved_run(tmp_path, saved)
    assert run_files.check_resume(workdir, saved)["changed"] == {}
    monkeypatch.chdir(tmp_path)  # the same SFT folder spelled relative: no change
    allowed = load_config("quickstart_ppo", init_from="sft", max_iterations=40, learning_rate=5e-5,
                          log_every_iterations=2, keep_checkpoints=3, **{"mesh.data": 2, "ppo.grad_accum_steps": 2})
    record = run_files.check_resume(workdir, allowed)
    assert record["changed"] == {"max_iterations": [12, 40], "learning_rate": [1e-4, 5e-5],
                                 "log_every_iterations": [1, 2], "keep_checkpoints": [2, 3], "mesh.data": [-1, 2],
                                 "ppo.grad_accum_steps": [1, 2]}
    run_files.write_run_info(workdir, allowed, gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                                               n_head=4), record)
    assert run_files.read_run_info(workdir)["resumes"] == [json.loads(json.dumps(record))]
    refused = load_config("quickstart_ppo", init_from=str(tmp_path / "other"),
                          **{"ppo.separate_critic": True, "reward.kind": "therapy", "sampling.max_new_tokens": 8})
    with pytest.raises(errors.IncompatibleResumeError) as error:
        run_files.check_resume(workdir, refused)
    for field in ("config.init_from", "config.ppo.separate_critic: False -> True",
                  "config.reward.kind: 'emotion_tag' -> 'therapy'", "config.sampling.max_new_tokens: 32 -> 8"):
        assert field in str(error.value)
