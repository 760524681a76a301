"""therapy_rl.ppo.core and the shared kernels it uses (therapy_rl.ops: masked statistics, gradient accumulation)
against plain NumPy / Python-loop references in float64, on edge-case masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl import ops
from therapy_rl.ppo import core

# rows: ragged, full, single token, all-zero, ragged (T = 6)
PREFIX_MASK = np.array([
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 1],
    [1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0],
], dtype=np.int32)
# masks with holes (e.g. tool/observation tokens inside a response)
HOLE_MASK = np.array([
    [1, 0, 1, 1, 0, 0],
    [0, 1, 1, 0, 1, 1],
    [0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0],
], dtype=np.int32)
MASKS = {"prefix": PREFIX_MASK, "holes": HOLE_MASK}


@pytest.fixture(autouse=True)
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def rand(seed, shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


# ---------------------------------------------------------------------------------------------- references


def np_masked_mean(x, m):
    m = m.astype(np.float64)
    return (x * m).sum() / m.sum() if m.sum() > 0 else 0.0


def np_masked_var(x, m, unbiased=True):
    vals = x[m != 0]
    if len(vals) <= (1 if unbiased else 0):
        return 0.0
    return float(np.var(vals, ddof=1 if unbiased else 0))


def np_gae_loop(rewards, values, mask, gamma, lam):
    """Per row, over the real positions only, from the last to the first."""
    adv = np.zeros_like(rewards)
    ret = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_v, next_a = 0.0, 0.0
        for t in reversed([t for t in range(rewards.shape[1]) if mask[b, t]]):
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            next_a = delta + gamma * lam * next_a
            next_v = values[b, t]
            adv[b, t] = next_a
            ret[b, t] = next_a + values[b, t]
    return adv, ret


def np_gae_trl011(rewards, values, mask, gamma, lam):
    """TRL 0.11 compute_advantages (values, rewards masked; plain recursion over the full length)."""
    values, rewards = values * mask, rewards * mask
    last, out = 0.0, []
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] if t < rewards.shape[1] - 1 else 0.0
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = np.stack(out[::-1], axis=1)
    return adv, adv + values


def np_whiten(x, m, shift_mean=True, eps=1e-8):
    mean, var = np_masked_mean(x, m), np_masked_var(x, m)
    y = (x - mean) / np.sqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return np.where(m != 0, y, x)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("name", list(MASKS))
def test_masked_mean_var_match_numpy(name):
    m = MASKS[name]
    x = rand(0, m.shape)
    np.testing.assert_allclose(ops.masked_mean(x, m), np_masked_mean(x, m), rtol=1e-12)
    np.testing.assert_allclose(ops.masked_var(x, m), np_masked_var(x, m), rtol=1e-12)
    np.testing.assert_allclose(ops.masked_var(x, m, unbiased=False), np_masked_var(x, m, False), rtol=1e-12)
    per_row = ops.masked_mean(x, m, axis=-1)
    for b in range(m.shape[0]):
        np.testing.assert_allclose(per_row[b], np_masked_mean(x[b], m[b]), rtol=1e-12, atol=1e-15)


def test_masked_stats_empty_and_single_and_nan_padding():
    x = np.array([[1.0, np.nan, np.inf]])
    assert float(ops.masked_mean(x, np.zeros((1, 3)))) == 0.0
    assert float(ops.masked_var(x, np.zeros((1, 3)))) == 0.0
    one = np.array([[1, 0, 0]])
    assert float(ops.masked_mean(x, one)) == 1.0
    assert float(ops.masked_var(x, one)) == 0.0          # n = 1: Bessel undefined -> 0
    assert float(ops.masked_var(x, one, unbiased=False)) == 0.0
    assert np.isfinite(ops.masked_sum(x, one))


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_numpy(name, shift_mean):
    m = MASKS[name]
    x = rand(1, m.shape, 3.0) + 2.0
    y = np.asarray(ops.masked_whiten(x, m, shift_mean=shift_mean))
    np.testing.assert_allclose(y, np_whiten(x, m, shift_mean), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(y[m == 0], x[m == 0])  # padding untouched
    if shift_mean:
        assert abs(y[m != 0].mean()) < 1e-10
        np.testing.assert_allclose(np.var(y[m != 0], ddof=1), 1.0, rtol=1e-6)
    else:
        np.testing.assert_allclose(y[m != 0].mean(), x[m != 0].mean(), rtol=1e-10)


def test_whiten_scores_batch_level_with_valid_rows():
    scores = rand(2, (8,), 4.0) + 1.0
    valid = np.array([1, 1, 1, 0, 1, 1, 0, 1])
    out = np.asarray(core.whiten_scores(scores, valid))
    real = scores[valid == 1]
    expected = (real - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(out[valid == 1], expected, rtol=1e-10)
    np.testing.assert_array_equal(out[valid == 0], scores[valid == 0])
    all_rows = (scores - scores.mean()) / np.sqrt(scores.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(core.whiten_scores(scores), all_rows, rtol=1e-10)
    with pytest.raises(ValueError, match="whiten_scores"):
        core.whiten_scores(np.zeros((2, 3)))


def test_clip_scores_leaves_the_after_clip_part_alone():
    scores = rand(3, (16,), 12.0)
    after = np.where(rand(4, (16,)) > 0, -np.abs(rand(5, (16,), 8.0)), 0.0)
    np.testing.assert_allclose(core.clip_scores(scores, 10.0, after), np.clip(scores - after, -10, 10) + after,
                               rtol=1e-12)
    np.testing.assert_allclose(core.clip_scores(scores, 10.0), np.clip(scores, -10, 10), rtol=1e-12)
    # base -12 plus safety -5 (raw -17) stays below base -12 alone; a plain clip makes them equal
    raw, safety = np.array([-17.0, -12.0, 15.0, 14.0]), np.array([-5.0, 0.0, -5.0, 0.0])
    np.testing.assert_allclose(core.clip_scores(raw, 10.0, safety), [-15.0, -10.0, 5.0, 10.0])
    assert core.clip_scores(raw, 10.0)[0] == core.clip_scores(raw, 10.0)[1]
    with pytest.raises(ValueError, match="clip_scores"):
        core.clip_scores(raw, 10.0, safety[:3])


# ---------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("name", list(MASKS))
def test_kl_estimators_match_numpy(name):
    m = MASKS[name]
    logp = -np.abs(rand(3, m.shape))
    ref = -np.abs(rand(4, m.shape))
    logp_pad = np.where(m != 0, logp, -np.inf)  # padding may hold garbage
    d = logp - ref
    expected = {
        "k1": d,
        "k2": 0.5 * d ** 2,
        "k3": np.exp(ref - logp) - 1 - (ref - logp),
        "abs": np.abs(d),
    }
    for est, ref_value in expected.items():
        out = np.asarray(core.kl_per_token(logp_pad, ref, m, est))
        np.testing.assert_allclose(out, np.where(m != 0, ref_value, 0.0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(core.kl_k1(logp, ref, m), np.where(m != 0, d, 0), rtol=1e-12)
    np.testing.assert_allclose(core.kl_k3(logp, ref, m), np.where(m != 0, expected["k3"], 0), rtol=1e-12)
    assert np.all(np.asarray(core.kl_k3(logp, ref, m)) >= 0)
    with pytest.raises(ValueError, match="estimator"):
        core.kl_per_token(logp, ref, m, "k4")
    with pytest.raises(ValueError, match="shapes must match"):
        core.kl_k1(logp, ref[:, :-1], m)


def test_kl_full_matches_numpy():
    m = PREFIX_MASK
    logits, ref_logits = rand(5, m.shape + (7,)), rand(6, m.shape + (7,))
    lp, lq = np_log_softmax(logits), np_log_softmax(ref_logits)
    expected = (np.exp(lp) * (lp - lq)).sum(-1) * m
    np.testing.assert_allclose(core.kl_full(logits, ref_logits, m), expected, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------- KL controller


def test_adaptive_kl_controller_follows_ziegler_loop():
    cfg = core.KLControllerConfig(adaptive=True, init_coef=0.2, target=6.0, horizon=10000.0)
    observed_kl = [0.0, 3.0, 6.0, 7.0, 9.0, 50.0, -4.0, 5.5, 6.6, 1e3]
    n_steps = 16
    coef_ref, expected = 0.2, []
    for kl in observed_kl:
        error = min(max(kl / 6.0 - 1.0, -0.2), 0.2)
        coef_ref *= 1 + error * n_steps / 10000.0
        expected.append(coef_ref)

    update = jax.jit(core.kl_controller_update, static_argnums=3)
    state = core.kl_controller_init(cfg)
    got = []
    for kl in observed_kl:
        state = update(state, jnp.asarray(kl), n_steps, cfg)
        got.append(float(state.coef))
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # coef is float32 in the state

    def body(s, kl):
        s = core.kl_controller_update(s, kl, n_steps, cfg)
        return s, s.coef
    _, scanned = jax.lax.scan(body, core.kl_controller_init(cfg), jnp.asarray(observed_kl))
    np.testing.assert_allclose(scanned, expected, rtol=1e-6)
    assert scanned.dtype == jnp.float32


def test_fixed_kl_controller_and_bad_config():
    cfg = core.KLControllerConfig(adaptive=False, init_coef=0.05)
    state = core.kl_controller_init(cfg)
    for kl in [0.0, 100.0, -3.0]:
        state = core.kl_controller_update(state, kl, 16, cfg)
    np.testing.assert_allclose(state.coef, 0.05, rtol=1e-7)
    np.testing.assert_allclose(core.adaptive_kl_update(0.2, 12.0, 10000, 6.0, 10000.0), 0.2 * 1.2, rtol=1e-12)
    with pytest.raises(ValueError, match="kl_controller_init"):
        core.kl_controller_init(core.KLControllerConfig(target=0.0))


# ---------------------------------------------------------------------------------------------- rewards / GAE


@pytest.mark.parametrize("name", list(MASKS))
def test_token_rewards_places_score_at_last_real_token(name):
    m = MASKS[name]
    kl = rand(7, m.shape)
    scores = np.arange(1, m.shape[0] + 1, dtype=np.float64) * 0.7
    rewards, non_score = core.token_rewards(scores, kl, 0.2, m)
    expected_ns = np.where(m != 0, -0.2 * kl, 0.0)
    expected = expected_ns.copy()
    for b in range(m.shape[0]):
        real = np.nonzero(m[b])[0]
        if len(real):                    # all-zero row: score dropped, everything 0
            expected[b, real[-1]] += scores[b]
    np.testing.assert_allclose(non_score, expected_ns, rtol=1e-12)
    np.testing.assert_allclose(rewards, expected, rtol=1e-12)
    assert rewards.dtype == jnp.float64
    # int kl inputs do not truncate a float score
    r_int, _ = core.token_rewards(np.array([0.7]), np.zeros((1, 3), np.int32), 0.1, np.array([[1, 1, 0]]))
    np.testing.assert_allclose(r_int, [[0.0, 0.7, 0.0]])
    with pytest.raises(ValueError, match="token_rewards"):
        core.token_rewards(scores[:-1], kl, 0.2, m)


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_python_loop(name, gamma, lam):
    m = MASKS[name]
    rewards, values = rand(8, m.shape), rand(9, m.shape)
    values_pad = np.where(m != 0, values, np.nan)  # padding values never read
    adv, ret = jax.jit(core.gae)(rewards, values_pad, m, gamma, lam)
    adv_ref, ret_ref = np_gae_loop(rewards, values, m, gamma, lam)
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret, ret_ref, rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(adv)[m == 0] == 0) and np.all(np.asarray(ret)[m == 0] == 0)


def test_gae_matches_trl011_on_prefix_masks():
    m = PREFIX_MASK
    rewards, values = rand(10, m.shape), rand(11, m.shape)
    adv, ret = core.gae(rewards, values, m, 1.0, 0.95)
    adv_ref, ret_ref = np_gae_trl011(rewards, values, m, 1.0, 0.95)
    np.testing.assert_allclose(np.asarray(adv)[m != 0], adv_ref[m != 0], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ret)[m != 0], ret_ref[m != 0], rtol=1e-12)


def test_gae_dtype_float32_and_bf16():
    m = PREFIX_MASK
    adv, ret = core.gae(jnp.ones(m.shape, jnp.bfloat16), jnp.zeros(m.shape, jnp.bfloat16), m, 1.0, 0.95)
    assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32
    adv, _ = core.gae(jnp.ones(m.shape, jnp.float32), jnp.zeros(m.shape, jnp.float32), m, 1.0, 0.95)
    assert adv.dtype == jnp.float32


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_token_rewards", [False, True])
def test_rollout_targets_match_trl_pipeline(estimator, whiten_token_rewards):
    m = PREFIX_MASK
    logp, ref = -np.abs(rand(12, m.shape)), -np.abs(rand(13, m.shape))
    values, scores = rand(14, m.shape), rand(15, (m.shape[0],), 3.0)
    kl_coef = 0.2
    out = core.rollout_targets(scores, logp, ref, values, m, kl_coef, gamma=1.0, lam=0.95,
                               kl_estimator=estimator, whiten_token_rewards=whiten_token_rewards)
    # numpy: TRL compute_rewards + compute_advantages (padding rewards zeroed after whitening, as in TRL >= 0.12)
    d = logp - ref
    kl = (d if estimator == "k1" else np.exp(-d) - 1 + d) * m
    rewards = -kl_coef * kl
    for b in range(m.shape[0]):
        real = np.nonzero(m[b])[0]
        if len(real):
            rewards[b, real[-1]] += scores[b]
    if whiten_token_rewards:
        rewards = np.where(m != 0, np_whiten(rewards, m, shift_mean=False), 0.0)
    adv, ret = np_gae_trl011(rewards, values, m, 1.0, 0.95)
    adv = np_whiten(np.where(m != 0, adv, 0.0), m)
    np.testing.assert_allclose(out.kl, kl, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.rewards, rewards, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out.advantages)[m != 0], adv[m != 0], rtol=1e-9)
    np.testing.assert_allclose(np.asarray(out.returns)[m != 0], ret[m != 0], rtol=1e-10)

    stats = core.rollout_stats(scores, logp, out, values, m, kl_coef)
    np.testing.assert_allclose(stats["objective/kl"], (kl * m).sum(-1).mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["objective/entropy"], (-logp * m).sum(-1).mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["ppo/mean_non_score_reward"], np_masked_mean(-kl_coef * kl, m), rtol=1e-12)
    np.testing.assert_allclose(stats["ppo/std_scores"], scores.std(ddof=1), rtol=1e-12)
    np.testing.assert_allclose(stats["objective/rlhf_reward"], (scores - kl_coef * kl.sum(-1)).mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["returns/var"], np_masked_var(ret, m), rtol=1e-10)
    np.testing.assert_allclose(stats["value/mean"], np_masked_mean(values, m), rtol=1e-12)
    np.testing.assert_allclose(stats["tokens/responses_len_mean"], m.sum(-1).mean(), rtol=1e-12)


def test_rollout_stats_ignores_invalid_rows():
    m = PREFIX_MASK
    logp, ref, values = -np.abs(rand(16, m.shape)), -np.abs(rand(17, m.shape)), rand(18, m.shape)
    scores = rand(19, (m.shape[0],))
    valid = np.array([1, 1, 0, 1, 1])
    out = core.rollout_targets(scores, logp, ref, values, m * valid[:, None], 0.1)
    stats = core.rollout_stats(scores, logp, out, values, m, 0.1, valid=valid)
    kl = (logp - ref) * m
    np.testing.assert_allclose(stats["objective/kl"], kl.sum(-1)[valid == 1].mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["ppo/mean_scores"], scores[valid == 1].mean(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------- losses


def np_policy_loss(logp, old, adv, m, eps):
    ratio = np.exp(logp - old)
    l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
    return (np_masked_mean(np.maximum(l1, l2), m), np_masked_mean((l2 > l1).astype(float), m),
            np_masked_mean(0.5 * (logp - old) ** 2, m), np_masked_mean(ratio - 1 - (logp - old), m),
            np_masked_mean(old - logp, m), np_masked_mean(ratio, m))


@pytest.mark.parametrize("name", list(MASKS))
def test_clipped_policy_loss_matches_numpy(name):
    m = MASKS[name]
    old = -np.abs(rand(20, m.shape))
    logp = old + rand(21, m.shape, 0.4)  # ratios well outside [0.8, 1.2] on both sides
    adv = rand(22, m.shape)
    loss, aux = core.clipped_policy_loss(np.where(m != 0, logp, np.inf), old, adv, m, 0.2)
    ref = np_policy_loss(logp, old, adv, m, 0.2)
    assert 0 < ref[1] < 1  # clipping really happens on some tokens
    got = [loss, aux["clipfrac"], aux["approxkl"], aux["approxkl_k3"], aux["policykl"], aux["ratio_mean"]]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)


def test_clipped_policy_loss_sequence_mean():
    m = PREFIX_MASK
    old = -np.abs(rand(23, m.shape))
    logp, adv = old + rand(24, m.shape, 0.3), rand(25, m.shape)
    loss, aux = core.clipped_policy_loss(logp, old, adv, m, 0.2, mode="sequence_mean")
    ratio = np.exp(logp - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    rows = [np_masked_mean(per[b], m[b]) for b in range(m.shape[0]) if m[b].sum() > 0]
    np.testing.assert_allclose(loss, np.mean(rows), rtol=1e-12)
    assert core.loss_denominator(m, "sequence_mean") == len(rows)
    with pytest.raises(ValueError, match="mode"):
        core.clipped_policy_loss(logp, old, adv, m, 0.2, mode="sum")


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_clipped_value_loss_matches_numpy(name, clip_eps):
    m = MASKS[name]
    old_v, ret = rand(26, m.shape), rand(27, m.shape)
    v = old_v + rand(28, m.shape, 0.5)
    loss, aux = core.clipped_value_loss(v, old_v, ret, m, clip_eps)
    l1 = (v - ret) ** 2
    l2 = l1 if clip_eps is None else (np.clip(v, old_v - clip_eps, old_v + clip_eps) - ret) ** 2
    np.testing.assert_allclose(loss, 0.5 * np_masked_mean(np.maximum(l1, l2), m), rtol=1e-12)
    np.testing.assert_allclose(aux["vf_clipfrac"], np_masked_mean((l2 > l1).astype(float), m), rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(aux["error"], np_masked_mean(l1, m), rtol=1e-12)
    np.testing.assert_allclose(aux["vpred_mean"], np_masked_mean(v, m), rtol=1e-12, atol=1e-15)
    if clip_eps is not None:
        assert float(aux["vf_clipfrac"]) > 0


def test_entropy_and_logprobs_match_numpy_softmax():
    m = PREFIX_MASK
    logits = rand(29, m.shape + (11,), 2.0)
    lp = np_log_softmax(logits)
    p = np.exp(lp)
    h = -(p * lp).sum(-1)
    np.testing.assert_allclose(core.token_entropy(logits), h, rtol=1e-10)
    np.testing.assert_allclose(core.masked_entropy(logits, m), np_masked_mean(h, m), rtol=1e-10)
    tokens = np.random.default_rng(30).integers(0, 11, m.shape)
    np.testing.assert_allclose(core.token_logprobs(logits, tokens),
                               np.take_along_axis(lp, tokens[..., None], -1)[..., 0], rtol=1e-10)
    np.testing.assert_allclose(core.token_logprobs(logits, tokens, temperature=0.5),
                               np.take_along_axis(np_log_softmax(logits / 0.5), tokens[..., None], -1)[..., 0],
                               rtol=1e-10)
    assert core.token_entropy(jnp.asarray(logits, jnp.bfloat16)).dtype == jnp.float32


def test_slice_response_alignment():
    full = np.arange(2 * 9).reshape(2, 9)  # prompt 4 + response 5
    np.testing.assert_array_equal(core.slice_response(full, 4), full[:, 3:8])
    with pytest.raises(ValueError, match="prompt_length"):
        core.slice_response(full, 0)


def test_ppo_loss_combines_terms_with_trl_names():
    m = PREFIX_MASK
    old = -np.abs(rand(31, m.shape))
    mb = {"old_logp": old, "old_values": rand(32, m.shape), "advantages": rand(33, m.shape),
          "returns": rand(34, m.shape), "response_mask": m}
    logp, values, ent = old + rand(35, m.shape, 0.3), mb["old_values"] + rand(36, m.shape, 0.4), np.abs(
        rand(37, m.shape))
    cfg = core.PPOLossConfig(entropy_coef=0.01)
    total, metrics = core.ppo_loss(logp, values, mb, cfg, entropy=ent)
    pg, _ = core.clipped_policy_loss(logp, old, mb["advantages"], m, 0.2)
    vf, _ = core.clipped_value_loss(values, mb["old_values"], mb["returns"], m, 0.2)
    np.testing.assert_allclose(total, float(pg) + 0.1 * float(vf) - 0.01 * np_masked_mean(ent, m), rtol=1e-12)
    assert {"loss/policy", "loss/value", "loss/total", "policy/clipfrac", "policy/approxkl", "policy/entropy",
            "value/clipfrac", "value/vpred", "value/error", "returns/mean"} <= set(metrics)
    with pytest.raises(ValueError, match="lacks"):
        core.ppo_loss(logp, values, {"old_logp": old}, cfg)
    with pytest.raises(ValueError, match="entropy"):
        core.ppo_loss(logp, values, mb, cfg)


# ---------------------------------------------------------------------------------------------- accumulation


def _toy_problem(seed, batch=8, length=6, dim=5, vocab=7):
    rng = np.random.default_rng(seed)
    lengths = np.array([6, 1, 0, 3, 6, 2, 5, 4])[:batch]
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    params = {"w": rng.normal(size=(dim, vocab)), "v": rng.normal(size=(dim,))}
    mb = {"features": rng.normal(size=(batch, length, dim)), "tokens": rng.integers(0, vocab, (batch, length)),
          "old_logp": -np.abs(rng.normal(size=(batch, length))) - 1.0, "old_values": rng.normal(size=(batch, length)),
          "advantages": rng.normal(size=(batch, length)), "returns": rng.normal(size=(batch, length)),
          "response_mask": mask}
    return params, jax.tree_util.tree_map(jnp.asarray, mb)


def _toy_loss(params, mb, rng, config, denominator):
    del rng
    logits = mb["features"] @ params["w"]
    logp = core.token_logprobs(logits, mb["tokens"])
    values = mb["features"] @ params["v"]
    return core.ppo_loss(logp, values, mb, config, denominator, entropy=core.token_entropy(logits))


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean"])
def test_gradient_accumulation_equals_full_batch(mode):
    params, mb = _toy_problem(40)
    cfg = core.PPOLossConfig(aggregation=mode, entropy_coef=0.01)
    full_grads, full_metrics = jax.grad(lambda p: _toy_loss(p, mb, None, cfg, None), has_aux=True)(params)
    full_loss = full_metrics["loss/total"]
    denom = core.loss_denominator(mb["response_mask"], mode)

    def loss_fn(p, micro, rng):
        return _toy_loss(p, micro, rng, cfg, denom)
    loss, grads, metrics = jax.jit(ops.accumulate_gradients, static_argnums=(0, 3))(loss_fn, params, mb, 4)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-10)
    for k in grads:
        np.testing.assert_allclose(grads[k], full_grads[k], rtol=1e-9, atol=1e-12)
    for k in full_metrics:
        np.testing.assert_allclose(metrics[k], full_metrics[k], rtol=1e-9, atol=1e-12)

    # sanity: averaging per-micro-batch means (own denominators) would NOT match the ragged full batch
    def naive(p, micro, rng):
        return _toy_loss(p, micro, rng, cfg, None)
    naive_loss, _, _ = ops.accumulate_gradients(naive, params, mb, 4)
    assert abs(float(naive_loss) / 4 - float(full_loss)) > 1e-6


def test_accumulate_gradients_passes_one_key_per_microbatch():
    params = {"a": jnp.ones(())}
    mb = {"x": jnp.arange(8.0)}

    def loss_fn(p, micro, rng):
        noise = jax.random.uniform(rng, ())
        return p["a"] * jnp.sum(micro["x"]) * noise, noise
    key = jax.random.key(3)
    keys = jax.random.split(key, 2)
    loss, grads, noise_sum = ops.accumulate_gradients(loss_fn, params, mb, 2, keys)
    n = [jax.random.uniform(k, ()) for k in keys]
    np.testing.assert_allclose(noise_sum, n[0] + n[1], rtol=1e-12)
    np.testing.assert_allclose(grads["a"], 6.0 * n[0] + 22.0 * n[1], rtol=1e-12)
    with pytest.raises(ValueError, match="divisible"):
        ops.accumulate_gradients(loss_fn, params, mb, 3, jax.random.split(key, 3))


def test_aggregate_is_additive_over_row_splits():
    m = PREFIX_MASK
    x = rand(41, m.shape)
    for mode in core.AGGREGATIONS:
        d = core.loss_denominator(m, mode)
        parts = core.aggregate(x[:2], m[:2], mode, d) + core.aggregate(x[2:], m[2:], mode, d)
        np.testing.assert_allclose(parts, core.aggregate(x, m, mode), rtol=1e-12)


def test_gate_on_ratio():
    grads = {"w": jnp.ones((3,))}
    g, skipped = core.gate_on_ratio(grads, 11.0, 10.0)
    assert bool(skipped) and np.all(np.asarray(g["w"]) == 0)
    g, skipped = core.gate_on_ratio(grads, 1.0, 10.0)
    assert not bool(skipped) and np.all(np.asarray(g["w"]) == 1)
    g, skipped = core.gate_on_ratio(grads, 1e9, None)
    assert not bool(skipped) and np.all(np.asarray(g["w"]) == 1)


# ---------------------------------------------------------------------------------------------- schedule


def test_minibatch_schedule_is_per_epoch_permutation_and_deterministic():
    key = jax.random.key(7)
    sched = np.asarray(core.ppo_minibatch_schedule(key, 16, 4, 3))
    assert sched.shape == (3, 4, 4) and sched.dtype == np.int32
    for epoch in sched:
        np.testing.assert_array_equal(np.sort(epoch.ravel()), np.arange(16))
    assert not np.array_equal(sched[0], sched[1])
    np.testing.assert_array_equal(sched, core.ppo_minibatch_schedule(key, 16, 4, 3))
    assert not np.array_equal(sched, core.ppo_minibatch_schedule(jax.random.key(8), 16, 4, 3))
    one = np.asarray(core.ppo_minibatch_schedule(key, 16, 1, 4))  # the paper: batch == mini-batch, 4 epochs
    assert one.shape == (4, 1, 16)
    with pytest.raises(ValueError, match="divisible"):
        core.ppo_minibatch_schedule(key, 16, 3, 1)
    with pytest.raises(ValueError, match="num_epochs"):
        core.ppo_minibatch_schedule(key, 16, 4, 0)


def test_run_minibatch_epochs_visits_schedule_in_order():
    key = jax.random.key(11)
    sched = core.ppo_minibatch_schedule(key, 8, 2, 3)
    batch = {"row": jnp.arange(8, dtype=jnp.int32), "x": jnp.arange(8.0) * 10.0}

    def update(state, mb):
        step, seen, total = state
        seen = seen.at[step].set(mb["row"])
        return (step + 1, seen, total + jnp.sum(mb["x"])), {"x_sum": jnp.sum(mb["x"])}

    init = (jnp.asarray(0, jnp.int32), jnp.zeros((6, 4), jnp.int32), jnp.asarray(0.0))
    (steps, seen, total), metrics = jax.jit(core.run_minibatch_epochs, static_argnums=0)(update, init, batch, sched)
    assert int(steps) == 6
    np.testing.assert_array_equal(seen, np.asarray(sched).reshape(6, 4))
    assert metrics["x_sum"].shape == (3, 2)
    np.testing.assert_allclose(metrics["x_sum"], (np.asarray(sched) * 10.0).sum(-1))
    np.testing.assert_allclose(total, 3 * 280.0)


# ---------------------------------------------------------------------------------------------- EOS handling


def test_mask_after_eos_and_penalty_match_python_loop():
    eos, pad = 2, 0
    tokens = np.array([
        [5, 6, 2, 7, 2, 9],   # EOS mid-way, later EOS ignored
        [2, 5, 5, 5, 5, 5],   # EOS first
        [5, 6, 7, 8, 9, 4],   # never EOS
        [5, 6, 7, 8, 9, 2],   # EOS last
    ])
    expected = np.zeros_like(tokens)
    for b, row in enumerate(tokens):
        for t, tok in enumerate(row):
            expected[b, t] = 1
            if tok == eos:
                break
    mask = np.asarray(core.mask_after_eos(tokens, eos))
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(core.pad_after_eos(tokens, eos, pad), np.where(expected == 1, tokens, pad))
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(core.missing_eos_penalty(scores, tokens, eos, 1.5), [1.0, 2.0, 1.5, 4.0])
    np.testing.assert_array_equal(core.has_eos(tokens, eos, mask=np.array([[1, 1, 0, 0, 0, 0]] * 4)),
                                  [False, True, False, False])
    np.testing.assert_array_equal(core.response_lengths(mask), expected.sum(-1))


def test_epochs_minibatches_microbatches_compose_under_one_jit():
    """The trainer's shape: schedule -> scan over mini-batches -> micro-batch accumulation -> SGD, vs a Python loop."""
    params, batch = _toy_problem(50)
    cfg = core.PPOLossConfig()
    lr, threshold = 0.05, 10.0
    sched = core.ppo_minibatch_schedule(jax.random.key(1), 8, 2, 3)

    def update(state, mb):
        p, step = state
        denom = core.loss_denominator(mb["response_mask"], cfg.aggregation)
        loss, grads, metrics = ops.accumulate_gradients(
            lambda q, micro, rng: _toy_loss(q, micro, rng, cfg, denom), p, mb, 2)
        grads, skipped = core.gate_on_ratio(grads, metrics["policy/ratio_mean"], threshold)
        p = jax.tree_util.tree_map(lambda w, g: w - lr * g, p, grads)
        return (p, step + 1), {"loss": loss, "skipped": skipped}

    run = jax.jit(lambda s, b, sc: core.run_minibatch_epochs(update, s, b, sc))
    (final, steps), metrics = run((params, jnp.asarray(0, jnp.int32)), batch, sched)
    assert int(steps) == 6 and metrics["loss"].shape == (3, 2) and not bool(jnp.any(metrics["skipped"]))

    full_batch_grad = jax.jit(jax.grad(lambda q, mb: _toy_loss(q, mb, None, cfg, None), has_aux=True))
    p = params
    for idx in np.asarray(sched).reshape(6, 4):
        grads, _ = full_batch_grad(p, core.take_rows(batch, jnp.asarray(idx)))
        p = jax.tree_util.tree_map(lambda w, g: w - lr * g, p, grads)
    for k in p:
        np.testing.assert_allclose(final[k], p[k], rtol=1e-9, atol=1e-12)
    assert not np.allclose(final["w"], params["w"])
