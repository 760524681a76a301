"""GPT-2 model and HF I/O: parity with transformers' PyTorch GPT-2 on a random tiny checkpoint."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from therapy_rl.models.gpt2 import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    count_params,
    flops_per_token,
    init_cache,
    init_params,
    position_ids_from_mask,
)
from therapy_rl.models.hf_io import load_hf_gpt2, resize_token_embeddings, save_hf_gpt2  # noqa: E402

VOCAB, POSITIONS, EMBD, LAYERS, HEADS = 300, 64, 64, 2, 4


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, ids, mask, config, cache=None):
    return GPT2LMHeadModel(config).apply({"params": params}, ids, mask, cache=cache)


def _random_hf_model(seed=0):
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=EMBD, n_layer=LAYERS,
                                        n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters so their mapping is exercised
        for name, param in model.named_parameters():
            if "ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_tiny"))
    _random_hf_model().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return load_hf_gpt2(hf_dir)


def _left_padded_batch(rng, batch=3, length=10):
    ids = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row, pad in enumerate([0, 3, 7][:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def _hf_logits(model, ids, mask, positions):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.numpy()


def test_config_from_hf_and_names(hf_dir, loaded):
    config, params = loaded
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head) == (
        VOCAB, POSITIONS, EMBD, LAYERS, HEADS)
    assert params["h_1"]["attn"]["c_attn"]["kernel"].shape == (EMBD, 3 * EMBD)
    assert params["h_0"]["mlp"]["c_proj"]["kernel"].shape == (4 * EMBD, EMBD)
    fresh = jax.eval_shape(lambda key: init_params(config, key), jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    hf = _random_hf_model()
    assert count_params(params) == sum(p.numel() for p in hf.parameters())


def test_left_padded_logits_match_hf(hf_dir, loaded):
    config, params = loaded
    ids, mask = _left_padded_batch(np.random.default_rng(0))
    positions = np.asarray(position_ids_from_mask(jnp.asarray(mask)))
    ours = np.asarray(_forward(params, jnp.asarray(ids), jnp.asarray(mask), config).logits)
    theirs = _hf_logits(_random_hf_model(), ids, mask, positions)
    real = mask.astype(bool)
    diff = np.abs(ours - theirs)[real].max()
    assert diff <= 1e-4, diff
    assert np.isfinite(ours).all()  # fully masked (padding) query rows stay finite


def test_left_padding_equals_unpadded(loaded):
    config, params = loaded
    ids, mask = _left_padded_batch(np.random.default_rng(1))
    padded = np.asarray(_forward(params, jnp.asarray(ids), jnp.asarray(mask), config).logits)
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        alone = _forward(params, jnp.asarray(ids[row:row + 1, start:]), jnp.ones((1, ids.shape[1] - start)),
                         config).logits
        np.testing.assert_allclose(padded[row, start:], np.asarray(alone[0]), atol=2e-5, rtol=1e-5)


def test_pickle_only_dir_refused(tmp_path, hf_dir):
    with open(os.path.join(hf_dir, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_hf_gpt2(str(tmp_path))


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a local directory"):
        load_hf_gpt2("someone/not-a-real-gpt2-model")


def test_bad_config_field_named(tmp_path, hf_dir):
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(open(os.path.join(hf_dir, "model.safetensors"), "rb").read())
    with pytest.raises(ValueError, match="activation_function"):
        load_hf_gpt2(str(tmp_path))


def test_old_style_names_and_shape_errors(tmp_path, hf_dir, loaded):
    """Older GPT-2 files: no `transformer.` prefix, plus causal-mask buffers; a wrong shape names the tensor."""
    from safetensors.numpy import load_file, save_file

    config, params = loaded
    saved = load_file(os.path.join(hf_dir, "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in saved.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, POSITIONS, POSITIONS), np.float32))
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    (old_dir / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    save_file(tensors, str(old_dir / "model.safetensors"))
    _, old_params = load_hf_gpt2(str(old_dir))
    np.testing.assert_array_equal(np.asarray(old_params["h_1"]["mlp"]["c_fc"]["kernel"]),
                                  np.asarray(params["h_1"]["mlp"]["c_fc"]["kernel"]))
    tensors["h.1.mlp.c_fc.weight"] = tensors["h.1.mlp.c_fc.weight"].T.copy()
    save_file(tensors, str(old_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.weight"):
        load_hf_gpt2(str(old_dir))


def test_round_trip_through_save_hf(tmp_path, loaded):
    config, params = loaded
    save_hf_gpt2(config, params, str(tmp_path))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ids, mask = _left_padded_batch(np.random.default_rng(2))
    positions = np.asarray(position_ids_from_mask(jnp.asarray(mask)))
    original = _hf_logits(_random_hf_model(), ids, mask, positions)
    again = _hf_logits(reloaded, ids, mask, positions)
    np.testing.assert_allclose(again, original, atol=1e-6)
    config2, params2 = load_hf_gpt2(str(tmp_path))
    assert config2 == config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bf16_close_to_fp32(loaded):
    config, params = loaded
    ids, mask = _left_padded_batch(np.random.default_rng(3))
    fp32 = _forward(params, jnp.asarray(ids), jnp.asarray(mask), config)
    bf16 = _forward(params, jnp.asarray(ids), jnp.asarray(mask), config.replace(dtype="bfloat16"))
    assert bf16.logits.dtype == jnp.float32
    real = mask.astype(bool)
    diff = np.abs(np.asarray(bf16.logits) - np.asarray(fp32.logits))[real]
    scale = np.abs(np.asarray(fp32.logits))[real].max()
    assert diff.max() <= 0.05 * scale, (diff.max(), scale)
    assert diff.max() > 0  # it really ran in bfloat16


def test_remat_same_logits_and_grads(loaded):
    config, params = loaded
    ids, mask = _left_padded_batch(np.random.default_rng(4))

    def loss(p, cfg, rng):
        out = GPT2LMHeadModel(cfg).apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask), deterministic=False,
                                         rngs={"dropout": rng})
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 5]), out.logits

    cfg = config.replace(dropout_rate=0.1)
    rng = jax.random.PRNGKey(7)
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l1, logits1), g1 = grad_fn(params, cfg, rng)
    (l2, logits2), g2 = grad_fn(params, cfg.replace(remat=True), rng)
    np.testing.assert_allclose(np.asarray(logits1), np.asarray(logits2), atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), g1, g2)
    # Dropout really is active: another key changes the output.
    (_, logits3), _ = grad_fn(params, cfg, jax.random.PRNGKey(8))
    jaxpr_remat = str(jax.make_jaxpr(jax.grad(lambda p: loss(p, cfg.replace(remat=True), rng)[0]))(params))
    jaxpr_plain = str(jax.make_jaxpr(jax.grad(lambda p: loss(p, cfg, rng)[0]))(params))
    assert "remat" in jaxpr_remat and "remat" not in jaxpr_plain
    assert not np.allclose(np.asarray(logits1), np.asarray(logits3))


def test_kv_cache_prefill_and_decode_match_full_forward(loaded):
    config, params = loaded
    ids, mask = _left_padded_batch(np.random.default_rng(5), length=12)
    prompt_len, total = 8, 12
    full = _forward(params, jnp.asarray(ids), jnp.asarray(mask), config).logits
    cache = init_cache(config, ids.shape[0], total)
    key_mask = jnp.asarray(mask)
    out = _forward(params, jnp.asarray(ids[:, :prompt_len]), key_mask, config, cache)
    pieces = [out.logits]
    cache = out.cache
    assert int(cache.index) == prompt_len
    for t in range(prompt_len, total):
        out = _forward(params, jnp.asarray(ids[:, t:t + 1]), key_mask, config, cache)
        pieces.append(out.logits)
        cache = out.cache
    assert int(cache.index) == total
    stepped = np.asarray(jnp.concatenate(pieces, axis=1))
    real = mask.astype(bool)
    np.testing.assert_allclose(stepped[real], np.asarray(full)[real], atol=2e-5, rtol=1e-5)


def test_resize_token_embeddings(loaded):
    config, params = loaded
    grown = resize_token_embeddings(params, VOCAB + 5, jax.random.PRNGKey(0))
    emb = np.asarray(grown["wte"]["embedding"])
    assert emb.shape == (VOCAB + 5, EMBD)
    np.testing.assert_array_equal(emb[:VOCAB], np.asarray(params["wte"]["embedding"]))
    assert 0.005 < emb[VOCAB:].std() < 0.05
    mean = resize_token_embeddings(params, VOCAB + 2, jax.random.PRNGKey(0), method="mean")
    np.testing.assert_allclose(np.asarray(mean["wte"]["embedding"])[VOCAB:],
                               np.tile(np.asarray(params["wte"]["embedding"]).mean(0), (2, 1)), atol=1e-6)
    out = _forward(grown, jnp.ones((1, 3), jnp.int32), None, config.replace(vocab_size=VOCAB + 5))
    assert out.logits.shape == (1, 3, VOCAB + 5)


def test_named_sizes_and_flops():
    small = GPT2Config.named("gpt2")
    shapes = jax.eval_shape(lambda k: init_params(small, k), jax.random.PRNGKey(0))
    assert count_params(shapes) == 124_439_808  # the published GPT-2 small size (tied head)
    n_no_wpe = 124_439_808 - small.n_positions * small.n_embd
    assert flops_per_token(small, 1024) == 6 * n_no_wpe + 12 * 12 * 768 * 1024
    assert GPT2Config.from_hf_dict(small.to_hf_dict()) == small
    with pytest.raises(ValueError, match="n_head"):
        GPT2Config.named("tiny", n_head=5)
