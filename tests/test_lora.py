"""LoRA: adapters by regex, frozen base, adapter-only optimizer state, merge, PEFT export, SFT lowers the loss;
and the SFT step's MoE load-balancing term (weighted by the config, logged)."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from therapy_rl import optim, sft
from therapy_rl.models import families, lora, mistral

CFG = mistral.MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            sliding_window=6, initializer_range=0.1)
LORA = lora.LoraConfig(rank=4, alpha=8.0, target_regex=r"(q_proj|v_proj|down_proj)$")


def _params_with_random_adapters(config, seed=0):
    params = mistral.init_params(config, jax.random.key(seed))

    def bump(path, leaf):  # lora_b starts at zero; make it non-zero so the adapter matters
        return leaf + 0.3 * jax.random.normal(jax.random.key(7), leaf.shape) if path[-1].key == "lora_b" else leaf
    return jax.tree_util.tree_map_with_path(bump, params)


@functools.partial(jax.jit, static_argnames=("config",))
def _logits(params, ids, mask, config):
    return mistral.MistralForCausalLM(config).apply({"params": params}, ids, mask).logits


def _batch(seed=0, batch=4, length=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 61, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def test_adapters_only_on_targets_and_fresh_adapter_is_identity():
    config = CFG.replace(lora=LORA)
    params = mistral.init_params(config, jax.random.key(0))
    attn = params["layers_0"]["self_attn"]
    assert set(attn["q_proj"]) == {"kernel", "lora_a", "lora_b"} and set(attn["k_proj"]) == {"kernel"}
    assert attn["q_proj"]["lora_a"].shape == (32, 4) and attn["v_proj"]["lora_b"].shape == (4, 16)
    assert set(params["layers_1"]["mlp"]["down_proj"]) == {"kernel", "lora_a", "lora_b"}
    assert lora.count_adapter_params(params) == 2 * (32 * 4 + 4 * 32 + 32 * 4 + 4 * 16 + 48 * 4 + 4 * 32)
    ids, mask = _batch()
    base, _ = lora.split_adapters(params)
    np.testing.assert_array_equal(np.asarray(_logits(params, ids, mask, config)),
                                  np.asarray(_logits(base, ids, mask, CFG)))


def test_merged_logits_equal_base_plus_adapter_logits():
    config = CFG.replace(lora=LORA)
    params = _params_with_random_adapters(config)
    ids, mask = _batch()
    with_adapters = np.asarray(_logits(params, ids, mask, config))
    merged = lora.merge(params, LORA)
    assert lora.count_adapter_params(merged) == 0
    np.testing.assert_allclose(np.asarray(_logits(merged, ids, mask, CFG)), with_adapters, atol=2e-5)
    # adapters off on the same tree = the base model (the PPO reference)
    base_logits = np.asarray(_logits(params, ids, mask, families.without_adapters(config)))
    assert np.abs(base_logits - with_adapters).max() > 1e-2


def test_only_adapters_get_gradients_and_optimizer_state():
    config = CFG.replace(lora=LORA)
    params = _params_with_random_adapters(config)
    ids, mask = _batch()
    model = mistral.MistralForCausalLM(config)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.astype(np.float32)}
    optimizer = families.trainable_optimizer(config, optax.adamw(1e-2))
    state = sft.create_train_state(params, optimizer, 0)
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert sum(x.size for x in moments) == 2 * lora.count_adapter_params(params)  # adam mu + nu, adapters only
    step = jax.jit(sft.make_train_step(model, optimizer, dropout=False))
    new_state, metrics = step(state, batch)
    changed = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (path[-1].key, bool(np.any(np.asarray(a) != np.asarray(b)))), params, new_state.params)
    flags = jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple))
    assert all(changed_ for name, changed_ in flags if name in lora.ADAPTER_LEAVES)
    assert not any(changed_ for name, changed_ in flags if name not in lora.ADAPTER_LEAVES)
    assert np.isfinite(float(metrics["train/loss"]))


def test_lora_sft_lowers_the_loss():
    config = CFG.replace(lora=LORA)
    params = mistral.init_params(config, jax.random.key(1))
    model = mistral.MistralForCausalLM(config)
    ids = np.tile(np.arange(3, 13, dtype=np.int32), (8, 1))  # a pattern the adapters can learn
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32)}
    optimizer = families.trainable_optimizer(config, optim.make_optimizer(
        optim.OptimizerConfig(learning_rate=3e-2, total_steps=30, schedule="constant")))
    state = sft.create_train_state(params, optimizer, 0)
    step = jax.jit(sft.make_train_step(model, optimizer, dropout=False))
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_frozen_weights_get_no_gradient_computation():
    """With LoRA the step differentiates only the trained leaves: the update and the adapters' gradients equal a
    full-tree differentiation's, the reported grad norm covers the trained leaves only, and the compiled step does
    fewer FLOPs (the frozen kernels' weight gradients are never computed)."""
    from therapy_rl import ops

    config = CFG.replace(lora=LORA)
    params = _params_with_random_adapters(config)
    model = mistral.MistralForCausalLM(config)
    ids, mask = _batch(batch=8)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.astype(np.float32)}
    mask_tree = families.trainable_mask(config, params)
    assert families.trainable_mask(CFG, params) is None
    trained = [p for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(mask_tree)) if f]
    assert 0 < len(trained) < len(jax.tree.leaves(params))

    def loss_fn(p, micro, key):
        sums = sft._lm_sums(model, p, micro, True, key)
        return sums["nll_sum"], sums

    full = jax.jit(lambda p: ops.accumulate_gradients(loss_fn, p, batch, 2)[1])(params)
    pruned = jax.jit(lambda p: ops.accumulate_gradients(loss_fn, p, batch, 2, trainable=mask_tree)[1])(params)
    frozen_with_gradient = 0  # frozen leaves outside the adapted layers (k_proj, norms, ...) have a gradient
    for g_full, g_pruned, flag in zip(jax.tree.leaves(full), jax.tree.leaves(pruned), jax.tree.leaves(mask_tree)):
        if flag:
            np.testing.assert_allclose(np.asarray(g_pruned), np.asarray(g_full), rtol=1e-5, atol=1e-5)
        else:
            assert not np.any(np.asarray(g_pruned))
            frozen_with_gradient += bool(np.any(np.asarray(g_full)))
    assert frozen_with_gradient >= 5

    optimizer = families.trainable_optimizer(config, optax.adamw(1e-2))
    state = sft.create_train_state(params, optimizer, 0)
    step = jax.jit(sft.make_train_step(model, optimizer, dropout=False))
    new_state, metrics = step(state, batch)
    adapter_norm = float(optax.tree.norm([g / mask[:, 1:].sum() for g, f in zip(jax.tree.leaves(full),
                                                                          jax.tree.leaves(mask_tree)) if f]))
    np.testing.assert_allclose(float(metrics["train/grad_norm"]), adapter_norm, rtol=1e-4)
    flops = lambda fn: jax.jit(fn).lower(params).compile().cost_analysis()["flops"]  # noqa: E731
    full_flops = flops(lambda p: ops.accumulate_gradients(loss_fn, p, batch, 1)[1])
    pruned_flops = flops(lambda p: ops.accumulate_gradients(loss_fn, p, batch, 1, trainable=mask_tree)[1])
    assert pruned_flops < 0.9 * full_flops, (pruned_flops, full_flops)
    for before, after, flag in zip(jax.tree.leaves(params), jax.tree.leaves(new_state.params),
                                   jax.tree.leaves(mask_tree)):
        assert np.array_equal(np.asarray(before), np.asarray(after)) != flag


def test_peft_loads_the_exported_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = CFG.replace(lora=LORA)
    params = _params_with_random_adapters(config)
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    base, _ = lora.split_adapters(params)
    families.save_hf(CFG, base, base_dir)
    families.save_peft_adapter(config, params, adapter_dir, base_model=base_dir)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        assert json.load(f)["r"] == 4
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                           adapter_dir).eval()
    ids, mask = _batch()
    positions = np.asarray(jnp.maximum(jnp.cumsum(mask, -1) - 1, 0))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(_logits(params, ids, mask, config))[real], ref[real], atol=1e-4)


def test_bad_lora_settings_are_refused():
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="target_regex"):
        lora.LoraConfig(target_regex="(")


def test_router_aux_loss_is_weighted_by_the_config_and_logged():
    import optax

    moe = CFG.replace(model_type="mixtral", num_local_experts=4, sliding_window=0)
    params = mistral.init_params(moe, jax.random.key(2))
    ids, mask = _batch()
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.astype(np.float32)}
    aux = mistral.MistralForCausalLM(moe).apply({"params": params}, ids, mask).aux_loss
    grads = {}
    for coef in (0.0, 1.0):
        config = moe.replace(router_aux_loss_coef=coef)
        opt = optax.sgd(1.0)
        step = jax.jit(sft.make_train_step(mistral.MistralForCausalLM(config), opt, dropout=False))
        new, metrics = step(sft.create_train_state(params, opt, 0), batch)
        np.testing.assert_allclose(float(metrics["train/aux_loss"]), float(aux), rtol=1e-5)
        grads[coef] = np.asarray(params["layers_0"]["block_sparse_moe"]["gate"]["kernel"]
                                 - new.params["layers_0"]["block_sparse_moe"]["gate"]["kernel"])
    aux_grad = jax.grad(lambda p: mistral.MistralForCausalLM(moe).apply({"params": p}, ids, mask).aux_loss)(params)
    np.testing.assert_allclose(grads[1.0] - grads[0.0],
                               np.asarray(aux_grad["layers_0"]["block_sparse_moe"]["gate"]["kernel"]), atol=1e-5)


def test_train_embeddings_adds_the_embedding_and_head_to_the_trainable_set():
    config = CFG.replace(lora=lora.LoraConfig(rank=4, train_embeddings=True))
    params = mistral.init_params(config, jax.random.key(0))
    optimizer = families.trainable_optimizer(config, optax.adam(1e-2))
    state = sft.create_train_state(params, optimizer, 0)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0)
    assert moments == 2 * (lora.count_adapter_params(params) + 2 * 61 * 32)
    frozen = families.trainable_optimizer(config, optax.adam(1e-2), embeddings=False)  # PPO's choice
    moments = sum(x.size for x in jax.tree.leaves(frozen.init(params)) if getattr(x, "ndim", 0) > 0)
    assert moments == 2 * lora.count_adapter_params(params)
