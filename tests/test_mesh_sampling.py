"""The sampler on multi-device and multi-process meshes: same tokens as one device, and the CLI runs that use it."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl import parallel
from therapy_rl.models.gpt2 import GPT2Config, init_params
from therapy_rl.sampling import SampleOutput, SamplingConfig, make_generate_fn, sample_token, split_sampling

from conftest import REPO_ROOT

# V > 512: the two-level categorical draw, top-p's candidate set and its bisection fallback all run.
CONFIG = GPT2Config.tiny(vocab_size=1031, n_positions=40, initializer_range=0.3, dropout_rate=0.0)
BATCH, PROMPT = 8, 7

SETTINGS = {
    "top_k": SamplingConfig(max_new_tokens=10, top_k=20, eos_id=3),
    "top_p": SamplingConfig(max_new_tokens=10, top_p=0.9, eos_id=3),
    "temperature": SamplingConfig(max_new_tokens=10, temperature=0.7, eos_id=3),
    "greedy": SamplingConfig(max_new_tokens=10, greedy=True, eos_id=3),
    "all_filters": SamplingConfig(max_new_tokens=10, temperature=1.3, top_k=40, top_p=0.8, eos_id=3),
}
# name -> ((data, fsdp, tensor), prompts batch-sharded?, params sharded by the GPT-2 rules?)
LAYOUTS = {
    "data4_batch": ((4, 1, 1), True, False),
    "data4_replicated": ((4, 1, 1), False, False),  # numpy prompts, as the SFT/PPO reply print-out passes them
    "data2_tensor2_rules": ((2, 1, 2), True, True),  # vocab-sharded logits
}


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


def _prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, CONFIG.vocab_size, size=(BATCH, PROMPT)).astype(np.int32)
    starts = np.array([0, 3, 5, 1, 6, 0, 2, 4])
    mask = (np.arange(PROMPT)[None, :] >= starts[:, None]).astype(np.int32)
    active = np.array([1, 1, 1, 1, 1, 1, 0, 1], np.int32)
    return ids, mask, active


@functools.lru_cache(maxsize=None)
def _one_device_fn(name):
    return make_generate_fn(CONFIG, SETTINGS[name])


def _on_one_device(params, name, seed=11):
    ids, mask, active = _prompts()
    args = jax.device_put((params, ids, mask, jax.random.PRNGKey(seed), active), jax.devices()[0])
    return jax.device_get(_one_device_fn(name)(*args))


def _on_mesh(params, name, layout):
    shape, batch_sharded, rule_params = LAYOUTS[layout]
    mesh = parallel.make_mesh(parallel.MeshShape(*shape), jax.devices()[:int(np.prod(shape))])
    ids, mask, active = _prompts()
    param_sh = (parallel.named_shardings(params, parallel.GPT2_PARTITION_RULES, mesh) if rule_params
                else jax.tree.map(lambda _: parallel.replicated(mesh), params))
    params = jax.device_put(params, param_sh)
    if not batch_sharded:
        return jax.device_get(make_generate_fn(CONFIG, SETTINGS[name])(params, ids, mask, jax.random.PRNGKey(11),
                                                                       active))
    b1, b2 = parallel.batch_sharding(mesh, 1), parallel.batch_sharding(mesh, 2)
    fn = make_generate_fn(CONFIG, SETTINGS[name], in_shardings=(param_sh, b2, b2, parallel.replicated(mesh), b1),
                          out_shardings=SampleOutput(b2, b2, b1, b2, b2))
    ids, mask, active = jax.device_put((ids, mask, active), (b2, b2, b1))
    out = fn(params, ids, mask, jax.random.PRNGKey(11), active)
    assert out.tokens.sharding.is_equivalent_to(b2, 2)
    return jax.device_get(out)


@pytest.mark.parametrize("name, layout", [
    *[(name, "data4_batch") for name in ("top_k", "top_p", "temperature", "greedy")],
    ("top_k", "data4_replicated"), ("all_filters", "data4_replicated"),
    ("all_filters", "data2_tensor2_rules"), ("greedy", "data2_tensor2_rules"),
])
def test_mesh_sampler_equals_one_device(params, name, layout):
    want, got = _on_one_device(params, name), _on_mesh(params, name, layout)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.response_mask, want.response_mask)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    np.testing.assert_allclose(got.sampling_logprobs, want.sampling_logprobs, atol=1e-5)
    assert want.lengths[6] == 0 and want.lengths.max() > 1  # the inactive row, and real decoding elsewhere
    if not SETTINGS[name].greedy:  # a different key gives different tokens: the comparison is not vacuous
        assert not np.array_equal(_on_one_device(params, name, seed=12).tokens, want.tokens)


@pytest.mark.parametrize("top_k, top_p", [(50, 1.0), (0, 0.9), (50, 0.9)])
def test_one_device_filters_keep_topk_not_a_full_sort(top_k, top_p):
    """XLA:CPU keeps a fast TopK only if nothing slices inside the top-k values; else it sorts all 50257 logits.
    Checked with the values as constants and as traced knobs (what make_generate_fn compiles)."""
    sampling = SamplingConfig(max_new_tokens=1, top_k=top_k, top_p=top_p)
    logits = jax.device_put(jnp.zeros((4, 50257), jnp.float32), jax.devices()[0])
    key = jax.random.PRNGKey(0)
    baked = jax.jit(lambda x, key: sample_token(x, key, sampling)).lower(logits, key)
    plan, knobs = split_sampling(sampling)
    traced = jax.jit(lambda x, key, knobs: sample_token(x, key, plan, knobs)).lower(logits, key, knobs)
    for lowered in (baked, traced):
        assert "sort(" not in lowered.compile().as_text()


# ----------------------------------------------------------------------------------------------- CLI runs


def _run(command, env, log_path, timeout=300):
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    with open(log_path) as log:
        return result.returncode, log.read()


def _env(devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _reply_lines(text):
    return [line for line in text.splitlines() if line.startswith("[model (")]


def test_quickstart_sft_then_ppo_on_four_devices_with_top_k(tmp_path):
    env = _env(4)
    sft_dir, ppo_dir = str(tmp_path / "sft"), str(tmp_path / "ppo")
    main = [sys.executable, "-m", "therapy_rl.main"]
    rc, log = _run(main + ["--config", "configs/quickstart.py", "--workdir", sft_dir, "--config.mesh.data=4",
                           "--config.max_steps=6", "--config.eval_every_steps=6", "--config.checkpoint_every_steps=6",
                           "--config.sampling.top_k=20", "--config.num_sample_replies=3",
                           "--config.progress_bar=False"], env, str(tmp_path / "sft.log"))
    assert rc == 0, log[-3000:]
    assert "[sft] replies of the best checkpoint" in log and len(_reply_lines(log)) == 3, log[-3000:]
    rc, log = _run(main + ["--config", "configs/quickstart_ppo.py", "--workdir", ppo_dir, "--config.mesh.data=4",
                           f"--config.init_from={sft_dir}", "--config.max_iterations=2",
                           "--config.eval_every_iterations=2", "--config.checkpoint_every_iterations=2",
                           "--config.sampling.top_k=20", "--config.num_sample_replies=3",
                           "--config.progress_bar=False"], env, str(tmp_path / "ppo.log"))
    assert rc == 0, log[-3000:]
    assert len(_reply_lines(log)) == 3, log[-3000:]


def test_local_multiprocess_header_example(tmp_path):
    """`launch/local_multiprocess.sh 2 2 configs/quickstart.py W --config.max_steps=20`, as its header says."""
    workdir = str(tmp_path / "mp")
    env = _env(1)
    env.pop("XLA_FLAGS")  # the script sets each process's device count
    env["PORT"] = str(20000 + os.getpid() % 20000)
    rc, out = _run(["bash", "launch/local_multiprocess.sh", "2", "2", "configs/quickstart.py", workdir,
                    "--config.max_steps=20"], env, str(tmp_path / "launch.log"), timeout=420)
    logs = [open(f"{workdir}.proc{i}.log").read() for i in range(2)]
    assert rc == 0, out + "\n".join(log[-3000:] for log in logs)
    assert "mesh {'data': 4" in logs[0]
    assert len(_reply_lines(logs[0])) == 3, logs[0][-3000:]
    assert "[sft] replies of the best checkpoint" in logs[0]
    assert not _reply_lines(logs[1]) and "replies of the best checkpoint" not in logs[1]  # printed once
