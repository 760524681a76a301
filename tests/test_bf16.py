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
