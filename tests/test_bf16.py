"""bf16 mixed precision (`config.model.dtype="bfloat16"`): bfloat16 matmuls and activations, float32 parameters,
optimizer state, logits, softmax and losses. 200 quickstart SFT steps track the float32 run, and PPO in bf16 still
learns the toy task."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from conftest import load_config, restore_checkpoint_as_numpy

# Stated tolerances: every logged train loss within 3% of float32's, the final validation loss within 1.5%.
TRAIN_LOSS_RTOL, VAL_LOSS_RTOL = 0.03, 0.015


def _sft(tmp_path, dtype):
    from therapy_rl import sft

    workdir = str(tmp_path / dtype)
    config = load_config("quickstart", max_steps=200, log_every_steps=20, eval_every_steps=200,
                         checkpoint_every_steps=200, num_sample_replies=0, progress_bar=False,
                         **{"model.dtype": dtype})
    final = sft.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}, final, workdir


def test_bf16_sft_tracks_float32(tmp_path):
    f32_losses, f32_final, _ = _sft(tmp_path, "float32")
    bf16_losses, bf16_final, workdir = _sft(tmp_path, "bfloat16")
    assert sorted(f32_losses) == sorted(bf16_losses) and len(f32_losses) >= 10
    for step, loss in f32_losses.items():
        assert abs(bf16_losses[step] - loss) <= TRAIN_LOSS_RTOL * loss, (step, bf16_losses[step], loss)
    assert abs(bf16_final["val/loss"] - f32_final["val/loss"]) <= VAL_LOSS_RTOL * f32_final["val/loss"]
    assert f32_losses[200] < 0.7 * f32_losses[min(f32_losses)]  # both really trained
    # master weights stay float32 in the checkpoint
    params = restore_checkpoint_as_numpy(os.path.join(workdir, "checkpoints", "200", "state"))["params"]
    assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_bf16_forward_computes_in_bfloat16_with_float32_logits():
    from therapy_rl.models import gpt2

    config = gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, dtype="bfloat16")
    params = gpt2.init_params(config, jax.random.key(0))
    ids = jnp.ones((2, 8), jnp.int32)
    out = gpt2.GPT2LMHeadModel(config).apply({"params": params}, ids)
    assert out.logits.dtype == jnp.float32 and out.hidden_states.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_bf16_ppo_learns_the_toy_task():
    import test_ppo_trainer as toy
    from therapy_rl import parallel, sampling
    from therapy_rl.ppo import core, policy, step as ppo_step, trainer
    from therapy_rl.rewards import protocol as reward_protocol
    from therapy_rl.rewards import simple as simple_rewards

    model = toy.MODEL.replace(dtype="bfloat16")
    mesh = parallel.make_mesh(parallel.MeshShape(1, 1, 1), jax.devices()[:1])
    spec = policy.PolicySpec(model)
    hyper = ppo_step.PPOHyper(kl=core.KLControllerConfig(init_coef=0.01), num_epochs=4, num_minibatches=2,
                              eos_id=toy.EOS)
    trunk = jax.device_get(toy.gpt2.init_params(model, jax.random.key(0)))
    state, state_sh, ref, ref_sh = trainer.init_state(spec, toy._optimizer(3e-3), hyper.kl, trunk, mesh,
                                                      jax.random.key(1))
    sampling_config = sampling.SamplingConfig(max_new_tokens=toy.NEW, eos_id=toy.EOS, pad_id=toy.PAD)
    stages = trainer.build_stages(spec, hyper, sampling_config, toy._optimizer(3e-3), mesh, state_sh, ref_sh,
                                  simple_rewards.TargetTokenReward(toy.TARGET),
                                  reward_protocol.ResponseIds(eos_id=toy.EOS), toy.BATCH, toy.PROMPT)
    rewards = []
    for it in range(20):
        result = trainer.run_iteration(stages, state, ref, parallel.global_batch_from_host(toy._prompts(1000 + it),
                                                                                            mesh))
        state = result.state
        rewards.append(result.metrics["objective/scores"])
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.15, rewards


def _round_bf16(x):
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def test_mixed_matmul_against_a_numpy_reference():
    """`ops.dense_matmul` in bfloat16: bf16-rounded operands, float32 accumulation, a float32 kernel gradient from
    bf16-rounded cotangents; both kernel layouts. float32: an ordinary dot."""
    from therapy_rl import ops

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 64)).astype(np.float32)
    for transpose in (False, True):
        kernel = rng.normal(size=(48, 64) if transpose else (64, 48)).astype(np.float32)
        g = rng.normal(size=(3, 5, 48)).astype(np.float32)
        k_in_out = (lambda k: k.T) if transpose else (lambda k: k)

        def loss(x, k):
            return jnp.sum(ops.dense_matmul(x, k, jnp.bfloat16, transpose_kernel=transpose) * g)

        y = ops.dense_matmul(jnp.asarray(x), jnp.asarray(kernel), jnp.bfloat16, transpose_kernel=transpose)
        assert y.dtype == jnp.float32
        want = _round_bf16(x) @ k_in_out(_round_bf16(kernel))
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)
        grad_x, grad_k = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
        assert grad_x.dtype == jnp.float32 and grad_k.dtype == jnp.float32
        want_x = _round_bf16(g) @ k_in_out(_round_bf16(kernel)).T
        np.testing.assert_allclose(np.asarray(grad_x), want_x, rtol=1e-5, atol=1e-4)
        want_k = _round_bf16(x).reshape(-1, 64).T @ _round_bf16(g).reshape(-1, 48)
        np.testing.assert_allclose(np.asarray(grad_k), want_k.T if transpose else want_k, rtol=1e-5, atol=1e-4)
        # and it is a bf16 result: the float32 product differs by more than float32 rounding
        assert np.max(np.abs(np.asarray(y) - x @ k_in_out(kernel))) > 1e-3
        y32 = ops.dense_matmul(jnp.asarray(x), jnp.asarray(kernel), jnp.float32, transpose_kernel=transpose)
        np.testing.assert_allclose(np.asarray(y32), x.astype(np.float64) @ k_in_out(kernel), rtol=1e-5, atol=1e-4)


def test_bf16_train_step_runs_every_matmul_on_bfloat16_operands():
    """Forward and backward of the LM loss: every dot_general takes bf16 operands (the fast path on CPU AMX and the
    TPU/GPU default); the float32 model keeps float32 dots."""
    import re

    from therapy_rl.models import gpt2

    for dtype, want in (("bfloat16", "bf16"), ("float32", "f32")):
        config = gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, dtype=dtype)
        params = gpt2.init_params(config, jax.random.key(0))
        ids = jnp.ones((2, 8), jnp.int32)

        def loss(p):
            return jnp.mean(gpt2.GPT2LMHeadModel(config).apply({"params": p}, ids).logits ** 2)

        grad_fn = jax.jit(jax.grad(loss))
        jax.block_until_ready(grad_fn(params))  # runs: XLA:CPU has a bf16 x bf16 -> f32 dot for some layouts only
        text = grad_fn.lower(params).as_text()
        dots = re.findall(r"stablehlo\.dot_general.*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", text)
        assert len(dots) >= 12, len(dots)  # 2 layers x (4 dense + 2 attention) forward, more backward
        assert {t for pair in dots for t in pair} == {want}, (dtype, dots)


def test_mixed_einsum_gradients_against_a_numpy_reference():
    """The attention contractions in bfloat16 (the values one has its output axes in another order than its
    inputs', the layout YNNPACK rejected in the backward): forward and both gradients from bf16-rounded operands."""
    from therapy_rl import ops

    rng = np.random.default_rng(1)
    for spec, a_shape, b_shape in (("bhtd,bhsd->bhts", (2, 3, 5, 4), (2, 3, 6, 4)),
                                   ("bhts,bhsd->bthd", (2, 3, 5, 6), (2, 3, 6, 4))):
        a = rng.normal(size=a_shape).astype(np.float32)
        b = rng.normal(size=b_shape).astype(np.float32)
        out = np.einsum(spec, _round_bf16(a), _round_bf16(b))
        g = rng.normal(size=out.shape).astype(np.float32)
        y = ops.mixed_einsum(spec, jnp.asarray(a), jnp.asarray(b), jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(y), out, rtol=1e-5, atol=1e-5)
        grads = jax.grad(lambda a, b: jnp.sum(ops.mixed_einsum(spec, a, b, jnp.bfloat16) * g), argnums=(0, 1))(
            jnp.asarray(a), jnp.asarray(b))
        inputs, out_spec = spec.split("->")
        a_spec, b_spec = inputs.split(",")
        want_a = np.einsum(f"{out_spec},{b_spec}->{a_spec}", _round_bf16(g), _round_bf16(b))
        want_b = np.einsum(f"{a_spec},{out_spec}->{b_spec}", _round_bf16(a), _round_bf16(g))
        np.testing.assert_allclose(np.asarray(grads[0]), want_a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(grads[1]), want_b, rtol=1e-5, atol=1e-5)
