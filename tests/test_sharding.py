"""Multi-device SFT steps on 8 virtual CPU devices equal the single-device run."""

import jax
import numpy as np
import pytest

from therapy_rl import optim, parallel, sft
from therapy_rl.models import gpt2

VOCAB, SEQ, BATCH = 256, 16, 8


def _batches(num_steps):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(num_steps):
        ids = rng.integers(0, VOCAB, size=(BATCH, SEQ), dtype=np.int32)
        lengths = rng.integers(SEQ // 2, SEQ + 1, size=BATCH)
        attention = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
        loss_mask = attention * (np.arange(SEQ)[None] >= 4)
        out.append({"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask.astype(np.float32)})
    return out


def _run(mesh_shape, devices, grad_accum_steps=1, num_steps=3, dropout_rate=0.1):
    config = gpt2.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                             dropout_rate=dropout_rate)
    model = gpt2.GPT2LMHeadModel(config)
    optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10))
    mesh = parallel.make_mesh(parallel.MeshShape(*mesh_shape), devices)
    state, shardings = sft.init_train_state(lambda k: gpt2.init_params(config, k), optimizer, 0, mesh,
                                            parallel.GPT2_PARTITION_RULES)
    batches = _batches(num_steps)
    step = sft.jit_train_step(sft.make_train_step(model, optimizer, grad_accum_steps), mesh, shardings, batches[0])
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.global_batch_from_host(batch, mesh))
        losses.append(float(metrics["train/loss"]))
    return jax.device_get(state.params), losses, state


@pytest.fixture(scope="module")
def single_device_run():
    return _run((1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_steps_match_single_device(single_device_run, mesh_shape):
    assert jax.device_count() >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
    ref_params, ref_losses, _ = single_device_run
    params, losses, state = _run(mesh_shape, jax.devices()[:8])
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5, diffs
    # The parameters really are sharded as the rules say on the (2, 2, 2) and (2, 4, 1) meshes.
    kernel = state.params["h_0"]["mlp"]["c_fc"]["kernel"]
    if mesh_shape[1] > 1:
        assert kernel.sharding.spec == parallel.P("fsdp", "tensor") or kernel.sharding.spec[0] == "fsdp"
        assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape[0] < 64


def test_grad_accumulation_matches_full_batch():
    # Without dropout, 2 micro-batches give the same update as the whole batch (sums / total target count).
    ref_params, ref_losses, _ = _run((1, 1, 1), jax.devices()[:1], dropout_rate=0.0)
    params, losses, _ = _run((1, 1, 1), jax.devices()[:1], grad_accum_steps=2, dropout_rate=0.0)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5


def test_unmatched_parameter_is_an_error():
    mesh = parallel.make_mesh(parallel.MeshShape(1, 1, 1), jax.devices()[:1])
    with pytest.raises(ValueError, match="no partition rule"):
        parallel.partition_specs({"mystery": {"kernel": np.zeros((4, 4))}}, parallel.GPT2_PARTITION_RULES, mesh)
