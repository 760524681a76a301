"""therapy_rl.models.value_head: param layout, NumPy parity, init schemes, dropout behaviour."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl.models import value_head as vh
from therapy_rl.ppo import core


def test_param_layout_and_path():
    params = vh.init_value_head(jax.random.key(0), 16)
    assert jax.tree_util.tree_map(jnp.shape, params) == {"summary": {"kernel": (16, 1), "bias": (1,)}}
    tree = {vh.VALUE_HEAD_KEY: params}
    paths = sorted("/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
    assert paths == ["value_head/summary/bias", "value_head/summary/kernel"]


def test_values_match_numpy_dense():
    params = vh.init_value_head(jax.random.key(1), 8)
    hidden = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
    out = vh.values_from_hidden(params, hidden)
    w = np.asarray(params["summary"]["kernel"], np.float64)[:, 0]
    b = float(params["summary"]["bias"][0])
    np.testing.assert_allclose(out, hidden.astype(np.float64) @ w + b, rtol=1e-5, atol=1e-6)
    assert out.shape == (3, 5) and out.dtype == jnp.float32
    out_bf16 = vh.values_from_hidden(params, jnp.asarray(hidden, jnp.bfloat16))
    assert out_bf16.dtype == jnp.float32
    np.testing.assert_allclose(out_bf16, out, atol=0.05)
    # response alignment helper used by the trainer
    np.testing.assert_allclose(core.slice_response(out, 2), np.asarray(out)[:, 1:4])


def test_gradient_matches_numpy():
    params = vh.init_value_head(jax.random.key(2), 4)
    hidden = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    grads = jax.grad(lambda p: jnp.sum(vh.values_from_hidden(p, hidden)))(params)
    np.testing.assert_allclose(grads["summary"]["kernel"][:, 0], hidden.reshape(-1, 4).sum(0), rtol=1e-5)
    np.testing.assert_allclose(grads["summary"]["bias"], [6.0], rtol=1e-6)


def test_init_schemes():
    d = 4096
    torch_like = vh.init_value_head(jax.random.key(3), d, "torch_linear")["summary"]
    k = np.asarray(torch_like["kernel"])
    bound = 1 / np.sqrt(d)
    assert np.all(np.abs(k) <= bound) and abs(float(torch_like["bias"][0])) <= bound
    np.testing.assert_allclose(k.std(), bound / np.sqrt(3), rtol=0.05)
    normal = vh.init_value_head(jax.random.key(4), d, "scaled_normal")["summary"]
    np.testing.assert_allclose(np.asarray(normal["kernel"]).std(), 1 / np.sqrt(d + 1), rtol=0.05)
    assert float(normal["bias"][0]) == 0.0
    zeros = vh.init_value_head(jax.random.key(5), 8, "zeros")
    assert np.all(np.asarray(vh.values_from_hidden(zeros, np.ones((2, 3, 8), np.float32))) == 0)
    with pytest.raises(ValueError, match="init_scheme"):
        vh.init_value_head(jax.random.key(6), 8, "xavier")


def test_dropout_only_with_key():
    params = vh.init_value_head(jax.random.key(7), 32)
    hidden = np.random.default_rng(2).normal(size=(2, 6, 32)).astype(np.float32)
    det = vh.values_from_hidden(params, hidden)
    key = jax.random.key(8)
    a = vh.values_from_hidden(params, hidden, dropout_rate=0.5, rng=key)
    b = vh.values_from_hidden(params, hidden, dropout_rate=0.5, rng=key)
    np.testing.assert_array_equal(a, b)                       # deterministic given the key
    assert not np.allclose(a, det)                            # dropout active
    np.testing.assert_allclose(vh.values_from_hidden(params, hidden, dropout_rate=0.0, rng=key), det, rtol=1e-6)
    np.testing.assert_array_equal(vh.values_from_hidden(params, hidden, dropout_rate=0.5), det)


def test_bad_shapes_raise():
    params = vh.init_value_head(jax.random.key(9), 8)
    with pytest.raises(ValueError, match="hidden must be"):
        vh.values_from_hidden(params, np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match="hidden_size"):
        vh.init_value_head(jax.random.key(9), 0)
