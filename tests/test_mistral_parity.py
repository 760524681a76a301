"""Mistral / Llama / Qwen2 / Mixtral in Flax: parity with transformers' PyTorch models on tiny random checkpoints."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from therapy_rl import errors  # noqa: E402
from therapy_rl.models import families, mistral  # noqa: E402
from therapy_rl.models.gpt2 import position_ids_from_mask  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.2,
              attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _hf_model(kind, **overrides):
    torch.manual_seed(0)
    if kind == "mistral":
        cfg = transformers.MistralConfig(**{**COMMON, "sliding_window": 5, **overrides})
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(**{**COMMON, "attention_bias": True, "rope_theta": 500.0, **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True, **overrides})
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(**{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                                            "sliding_window": None, "router_aux_loss_coef": 0.05, **overrides})
        model = transformers.MixtralForCausalLM(cfg)
    model.eval()
    with torch.no_grad():  # non-trivial norms and biases so their mapping is exercised
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module", params=["mistral", "llama", "qwen2", "mixtral"])
def hf_case(request, tmp_path_factory):
    kind = request.param
    model = _hf_model(kind)
    path = str(tmp_path_factory.mktemp(f"hf_{kind}"))
    model.save_pretrained(path, safe_serialization=True)
    config = families.read_hf_config(path)
    params = families.load_hf(path, config)
    return kind, model, path, config, params


def _left_padded(rng, batch=3, length=12):
    ids = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row, pad in enumerate([0, 4, 9][:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def _hf_forward(model, ids, mask, **kwargs):
    positions = np.asarray(position_ids_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions, dtype=torch.long), **kwargs)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, ids, mask, config):
    return families.module(config).apply({"params": params}, ids, mask)


def test_config_reads_family_features(hf_case):
    kind, _, _, config, params = hf_case
    assert isinstance(config, mistral.MistralConfig) and config.model_type == kind
    assert config.num_key_value_heads == 2 and config.head_dim_ == 8
    assert config.sliding_window == (5 if kind == "mistral" else 0)
    assert config.qkv_bias == (kind in ("llama", "qwen2")) and config.o_bias == (kind == "llama")
    assert config.tie_word_embeddings == (kind == "qwen2") and ("lm_head" in params) == (kind != "qwen2")
    assert config.is_moe == (kind == "mixtral")
    assert params["layers_1"]["self_attn"]["k_proj"]["kernel"].shape == (32, 16)
    fresh = jax.eval_shape(lambda key: families.init_params(config, key), jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, fresh) == jax.tree.map(lambda x: x.shape, params)


def test_logits_match_hf_on_left_padded_input(hf_case):
    kind, model, _, config, params = hf_case
    ids, mask = _left_padded(np.random.default_rng(1))
    ours = _forward(params, ids, mask, config)
    ref = _hf_forward(model, ids, mask, output_router_logits=kind == "mixtral")
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours.logits)[real], ref.logits.numpy()[real], atol=1e-4, rtol=1e-4)
    if kind == "mixtral":
        np.testing.assert_allclose(float(ours.aux_loss), float(ref.aux_loss), rtol=1e-5)
    # A left-padded row equals the same tokens without padding.
    alone = _forward(params, ids[2:, 9:], mask[2:, 9:], config)
    np.testing.assert_allclose(np.asarray(alone.logits)[0], np.asarray(ours.logits)[2, 9:], atol=1e-5)


def test_sliding_window_changes_logits():
    """The window is live in the test above: without it the long rows differ (so parity there means something)."""
    ids, mask = _left_padded(np.random.default_rng(2))
    cfg = mistral.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                sliding_window=5)
    params = mistral.init_params(cfg, jax.random.key(0))
    windowed = _forward(params, ids, mask, cfg).logits
    full = _forward(params, ids, mask, cfg.replace(sliding_window=0)).logits
    assert not np.allclose(np.asarray(windowed)[0, 8:], np.asarray(full)[0, 8:], atol=1e-4)
    np.testing.assert_allclose(np.asarray(windowed)[0, :5], np.asarray(full)[0, :5], atol=1e-6)


def test_kv_cache_decode_equals_full_forward(hf_case):
    """Prefill a prompt into the cache, then feed tokens one at a time: each step's logits equal a full forward."""
    kind, _, _, config, params = hf_case
    ids, mask = _left_padded(np.random.default_rng(3), length=14)
    prompt_len, total = 6, 14
    full_mask = mask.copy()
    full = _forward(params, ids, full_mask, config).logits
    model = families.module(config)
    cache = families.init_cache(config, ids.shape[0], total)
    key_mask = jnp.asarray(full_mask)
    out = model.apply({"params": params}, ids[:, :prompt_len], key_mask, cache=cache)
    got = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(prompt_len, total):
        out = model.apply({"params": params}, ids[:, t:t + 1], key_mask, cache=cache)
        cache = out.cache
        got.append(np.asarray(out.logits))
    got = np.concatenate(got, axis=1)
    real = full_mask.astype(bool)
    np.testing.assert_allclose(got[real], np.asarray(full)[real], atol=1e-5)
    assert int(cache.index) == total


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_rolling_cache_keeps_the_window_only(chunk):
    """A window shorter than the sequence gives a cache of `window` slots; feeding the sequence in chunks (wrapping
    the buffer mid-chunk, and a chunk longer than the window) gives the full forward's logits."""
    window, prompt_len, total = 5, 4, 19
    cfg = mistral.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                sliding_window=window, initializer_range=0.2)
    params = mistral.init_params(cfg, jax.random.key(1))
    ids, mask = _left_padded(np.random.default_rng(4), length=total)
    full = np.asarray(_forward(params, ids, mask, cfg).logits)
    model = families.module(cfg)
    cache = families.init_cache(cfg, ids.shape[0], total)
    assert cache.keys[0].shape == (3, 2, window, 8)
    got, start = [], 0
    for stop in [prompt_len, *range(prompt_len + chunk, total, chunk), total]:
        if stop <= start:
            continue
        out = model.apply({"params": params}, ids[:, start:stop], jnp.asarray(mask), cache=cache)
        cache, start = out.cache, stop
        got.append(np.asarray(out.logits))
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], full[real], atol=1e-5)
    assert int(cache.index) == total


def test_rolling_cache_sampler_matches_teacher_forcing():
    """Greedy decoding through the rolling cache picks, at every step, the argmax of a full forward pass."""
    from therapy_rl import sampling

    cfg = mistral.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                sliding_window=4, initializer_range=0.5)
    params = mistral.init_params(cfg, jax.random.key(2))
    ids, mask = _left_padded(np.random.default_rng(5), length=10)
    settings = sampling.SamplingConfig(max_new_tokens=12, greedy=True, eos_id=-1, pad_id=0)
    out = sampling.generate(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    seq_mask = np.concatenate([mask, np.ones_like(np.asarray(out.tokens))], axis=1)
    logits = np.asarray(_forward(params, seq, seq_mask, cfg).logits)
    np.testing.assert_array_equal(logits[:, 9:-1].argmax(-1), np.asarray(out.tokens))


def test_export_round_trip_loads_in_transformers(hf_case, tmp_path):
    kind, model, _, config, params = hf_case
    out = str(tmp_path / "export")
    families.save_hf(config, params, out, max_shard_bytes=20_000)  # several shards + index
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = _left_padded(np.random.default_rng(4))
    real = mask.astype(bool)
    np.testing.assert_allclose(_hf_forward(reloaded, ids, mask).logits.numpy()[real],
                               _hf_forward(model, ids, mask).logits.numpy()[real], atol=1e-5)
    again = families.load_hf(out, families.read_hf_config(out))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), again, params))


def test_vocabulary_growth_keeps_the_checkpoint_rows(hf_case):
    kind, _, path, config, params = hf_case
    grown = families.load_hf(path, config.replace(vocab_size=VOCAB + 5), seed=3)
    emb = np.asarray(grown["embed_tokens"]["embedding"])
    assert emb.shape == (VOCAB + 5, 32)
    np.testing.assert_array_equal(emb[:VOCAB], np.asarray(params["embed_tokens"]["embedding"]))
    assert 0.5 * config.initializer_range < np.std(emb[VOCAB:]) < 1.5 * config.initializer_range  # N(0, std^2) rows
    if "lm_head" in grown:
        assert grown["lm_head"]["kernel"].shape == (32, VOCAB + 5)


def test_config_mismatch_names_the_file(hf_case, tmp_path):
    kind, _, path, _, _ = hf_case
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(os.path.join(path, "model.safetensors"), bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps({**hf, "intermediate_size": 40}))
    with pytest.raises(errors.InputError, match="model.safetensors.*implies"):
        families.load_hf(str(bad), families.read_hf_config(str(bad)))
    (bad / "config.json").write_text(json.dumps({**hf, "hidden_act": "gelu"}))
    with pytest.raises(errors.InputError, match="config.json.*hidden_act"):
        families.read_hf_config(str(bad))
