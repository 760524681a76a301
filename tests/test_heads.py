"""Reward heads: maths vs NumPy, npz round trip, shipped weights and their reported metrics."""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl.data.labels import EMOTIONS
from therapy_rl.rewards import heads as H


def _np_logits(params, x):
    x = np.asarray(x, np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    if "w_hidden" in p:
        x = np.maximum(x @ p["w_hidden"] + p["b_hidden"], 0.0)
    return x @ p["w_out"] + p["b_out"]


def _np_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _random_emb(rng, n):
    x = rng.normal(size=(n, H.EMBED_DIM))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def random_heads():
    heads = H.init_reward_heads(jax.random.PRNGKey(3), hidden_dim=16)
    # non-zero biases so the bias terms are exercised too
    bump = lambda d, k: {n: (v + 0.3 * jax.random.normal(jax.random.PRNGKey(k), v.shape)) for n, v in d.items()}
    return heads.replace(empathy=bump(heads.empathy, 1), sentiment=bump(heads.sentiment, 2),
                         emotion=bump(heads.emotion, 3), crisis=bump(heads.crisis, 4))


def test_apply_functions_match_numpy(random_heads):
    emb = _random_emb(np.random.default_rng(0), 5)
    h = random_heads
    np.testing.assert_allclose(H.sentiment_positive_probability(h, emb),
                               1 / (1 + np.exp(-_np_logits(h.sentiment, emb)[:, 0])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(H.crisis_probability(h, emb),
                               1 / (1 + np.exp(-_np_logits(h.crisis, emb)[:, 0])), rtol=1e-5, atol=1e-6)
    emo = H.emotion_probabilities(h, emb)
    assert emo.shape == (5, len(EMOTIONS))
    np.testing.assert_allclose(emo, _np_softmax(_np_logits(h.emotion, emb)), rtol=1e-5, atol=1e-6)
    levels = _np_softmax(_np_logits(h.empathy, emb).reshape(5, 3, 3))
    np.testing.assert_allclose(H.empathy_level_probabilities(h, emb), levels, rtol=1e-5, atol=1e-6)


def test_linear_head_matches_numpy():
    params = H.init_head(jax.random.PRNGKey(0), 4, hidden_dim=0)
    assert "w_hidden" not in params
    emb = _random_emb(np.random.default_rng(1), 3)
    np.testing.assert_allclose(H.head_logits(params, emb), _np_logits(params, emb), rtol=1e-5, atol=1e-6)


def test_empathy_probability_is_p_total_at_least_two(random_heads):
    """Brute-force reference: sum the 27 level combinations whose total is >= 2."""
    emb = _random_emb(np.random.default_rng(2), 6)
    p = np.asarray(H.empathy_level_probabilities(random_heads, emb), np.float64)  # [B, 3, 3]
    expected = np.zeros(len(emb))
    for a, b, c in itertools.product(range(3), repeat=3):
        if a + b + c >= H.EMPATHETIC_MIN_TOTAL:
            expected += p[:, 0, a] * p[:, 1, b] * p[:, 2, c]
    np.testing.assert_allclose(H.empathy_probability(random_heads, emb), expected, rtol=1e-5, atol=1e-6)


def test_empathetic_from_levels_edge_cases():
    none = np.tile(np.array([1.0, 0.0, 0.0]), (1, 3, 1))
    one_weak = none.copy()
    one_weak[0, 1] = [0.0, 1.0, 0.0]
    one_strong = none.copy()
    one_strong[0, 2] = [0.0, 0.0, 1.0]
    two_weak = one_weak.copy()
    two_weak[0, 0] = [0.0, 1.0, 0.0]
    got = H.empathetic_from_levels(jnp.asarray(np.concatenate([none, one_weak, one_strong, two_weak])))
    np.testing.assert_allclose(got, [0.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_apply_functions_jit(random_heads):
    emb = jnp.asarray(_random_emb(np.random.default_rng(3), 4))
    for fn in (H.empathy_probability, H.sentiment_positive_probability, H.crisis_probability):
        np.testing.assert_allclose(jax.jit(fn)(random_heads, emb), fn(random_heads, emb), rtol=1e-6)
    assert jax.jit(H.emotion_probabilities)(random_heads, emb).shape == (4, 7)


def test_npz_round_trip(tmp_path, random_heads):
    H.save_reward_heads(random_heads, str(tmp_path / H.WEIGHTS_FILE))
    loaded = H.load_reward_heads(str(tmp_path))
    for name in H.HEAD_NAMES:
        a, b = getattr(random_heads, name), getattr(loaded, name)
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    for k in H.DEFAULT_CRISIS_THRESHOLDS:
        assert float(loaded.crisis_thresholds[k]) == pytest.approx(float(random_heads.crisis_thresholds[k]))
    with np.load(tmp_path / H.WEIGHTS_FILE, allow_pickle=False) as npz:  # plain arrays only
        assert tuple(str(x) for x in npz["emotion/labels"]) == EMOTIONS


def test_load_rejects_bad_files(tmp_path, random_heads):
    with pytest.raises(FileNotFoundError, match="heads.npz"):
        H.load_reward_heads(str(tmp_path))
    path = tmp_path / H.WEIGHTS_FILE
    H.save_reward_heads(random_heads, str(path))
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    data["emotion/w_out"] = data["emotion/w_out"][:, :5]
    np.savez(path, **data)
    with pytest.raises(H.HeadsFileError, match="emotion/w_out"):
        H.load_reward_heads(str(tmp_path))
    data.pop("emotion/w_out")
    np.savez(path, **data)
    with pytest.raises(H.HeadsFileError, match="missing field 'emotion/w_out'"):
        H.load_reward_heads(str(tmp_path))


# ------------------------------------------------------------------------------------ shipped weights


@pytest.fixture(scope="module")
def shipped():
    return H.load_reward_heads()


@pytest.fixture(scope="module")
def encoder():
    from therapy_rl.rewards.encoder import load_sentence_encoder

    return load_sentence_encoder(max_length=128)


def test_shipped_weights_are_small():
    total = sum(os.path.getsize(os.path.join(H.default_weights_dir(), f)) for f in os.listdir(H.default_weights_dir()))
    # 5 MiB: the reward heads (0.7 MB) and the guard, whose adapters cover all six MiniLM layers (3.6 MB)
    assert total < 5 * 2**20, total


def test_shipped_heads_sane_predictions(shipped, encoder):
    texts = [
        "This is a wonderful, delightful film and I loved every minute of it.",  # 0 positive
        "A boring, ugly, miserable mess. I hated it.",  # 1 negative
        "I am so happy and grateful, today was amazing!",  # 2 joy
        "I'm furious at him, this is outrageous and I won't stand for it!",  # 3 anger
        "I'm terrified, I'm so scared something awful will happen",  # 4 fear
        "I want to kill myself, I can't go on anymore",  # 5 crisis
        "What a lovely afternoon at the park with my friends",  # 6 not crisis
        "I'm so sorry you're going through this. It sounds really painful and lonely. "
        "What has been the hardest part for you?",  # 7 empathetic reply
        "ok.",  # 8 not empathetic
    ]
    emb = jnp.asarray(encoder.embed(texts, batch_size=16))
    sent = np.asarray(H.sentiment_positive_probability(shipped, emb))
    emo = np.asarray(H.emotion_probabilities(shipped, emb))
    crisis = np.asarray(H.crisis_probability(shipped, emb))
    emp = np.asarray(H.empathy_probability(shipped, emb))
    print("sentiment", sent.round(3), "crisis", crisis.round(3), "empathy", emp.round(3))
    print("emotion argmax", [EMOTIONS[i] for i in emo.argmax(-1)])
    assert sent[0] > 0.8 and sent[1] < 0.2 and sent[2] > 0.5
    assert EMOTIONS[emo[2].argmax()] == "joy"
    assert EMOTIONS[emo[3].argmax()] == "anger"
    assert EMOTIONS[emo[4].argmax()] == "fear"
    np.testing.assert_allclose(emo.sum(-1), 1.0, atol=1e-5)
    assert crisis[5] > 0.9 and crisis[6] < 0.1
    assert emp[7] > 0.5 and emp[8] < 0.5 and emp[7] > emp[8]


def test_shipped_metrics_beat_majority_baseline():
    with open(os.path.join(H.default_weights_dir(), "metrics.json"), encoding="utf-8") as f:
        m = json.load(f)
    checks = {
        "sentiment": m["sentiment"]["test"],
        "emotion/mesc": m["emotion"]["test"]["mesc_client_7way"],
        "emotion/goemotions": m["emotion"]["test"]["goemotions_ekman_single_label"],
        "empathy/binary": m["empathy"]["test"]["empathetic(total>=2)"],
        **{f"empathy/{k}": m["empathy"]["test"][k] for k in H.EMPATHY_MECHANISMS},
    }
    for name, r in checks.items():
        print(f"{name}: acc {r['model']['accuracy']:.3f} (majority {r['majority_baseline']['accuracy']:.3f}), "
              f"macro-F1 {r['model']['macro_f1']:.3f} (majority {r['majority_baseline']['macro_f1']:.3f})")
        assert r["model"]["macro_f1"] > r["majority_baseline"]["macro_f1"], name
