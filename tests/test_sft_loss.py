"""The SFT loss that training imports (and its kernel, `ops.softmax_token_stats`), against a plain NumPy reference:
values, gradient, masks, ties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl import ops, sft


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_sums(logits, input_ids, loss_mask):
    logp = _np_log_softmax(logits[:, :-1].astype(np.float64))
    targets, weights = input_ids[:, 1:], loss_mask[:, 1:].astype(np.float64)
    target_logp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    correct = (logits[:, :-1].argmax(-1) == targets)
    return {"nll_sum": -(target_logp * weights).sum(), "target_count": weights.sum(),
            "correct_count": (correct * weights).sum()}


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    ids = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    mask = np.zeros((3, 7), np.float32)
    mask[0, 3:] = 1  # a reply at the end
    mask[1, 2:5] = 1  # padding after the reply
    # row 2: no targets at all (a padding row) contributes nothing
    return logits, ids, mask


def test_masked_lm_sums_match_numpy(batch):
    logits, ids, mask = batch
    got = jax.device_get(sft.masked_lm_sums(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask)))
    want = _reference_sums(logits, ids, mask)
    np.testing.assert_allclose(got["nll_sum"], want["nll_sum"], rtol=1e-5)
    assert got["target_count"] == want["target_count"] == 7
    assert got["correct_count"] == want["correct_count"]


def test_gradient_matches_numpy_softmax_minus_onehot(batch):
    logits, ids, mask = batch
    grad = jax.grad(lambda x: sft.masked_lm_sums(x, jnp.asarray(ids), jnp.asarray(mask))["nll_sum"])(
        jnp.asarray(logits))
    probs = np.exp(_np_log_softmax(logits[:, :-1].astype(np.float64)))
    onehot = np.eye(11)[ids[:, 1:]]
    want = np.zeros_like(logits, dtype=np.float64)
    want[:, :-1] = (probs - onehot) * mask[:, 1:, None]
    np.testing.assert_allclose(np.asarray(grad), want, atol=1e-5)


def test_tied_target_counts_as_correct():
    logits = jnp.asarray([[2.0, 5.0, 5.0, 1.0]])
    stats = ops.softmax_token_stats(logits, jnp.asarray([2]))
    np.testing.assert_allclose(stats.nll, -_np_log_softmax(np.asarray(logits, np.float64))[0, 2], rtol=1e-6)
    np.testing.assert_allclose(stats.logp, -stats.nll, rtol=1e-6)
    assert float(stats.correct[0]) == 1.0
    assert float(ops.softmax_token_stats(logits, jnp.asarray([0])).correct[0]) == 0.0
