"""Sampler: filters against NumPy, a fake model with a known answer, EOS, keys, and parity with HF greedy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl.models.gpt2 import GPT2Config, GPT2LMHeadModel, init_params
from therapy_rl.sampling import (
    NUCLEUS_CANDIDATES,
    SamplingConfig,
    apply_top_k,
    apply_top_p,
    categorical,
    filter_logits,
    generate,
    make_generate_fn,
    sample_loop,
)

# ----------------------------------------------------------------------------------------------- NumPy references


def np_top_k(logits, k):
    out = np.array(logits, dtype=np.float64)
    if k <= 0 or k >= out.shape[-1]:
        return out
    for row in out:
        kth = sorted(row, reverse=True)[k - 1]
        row[row < kth] = -np.inf
    return out


def np_top_p(logits, p):
    out = np.array(logits, dtype=np.float64)
    if p >= 1.0:
        return out
    for row in out:
        finite = row[np.isfinite(row)]
        probs = np.exp(row - finite.max())
        probs /= probs.sum()
        order = sorted(range(len(row)), key=lambda i: -row[i])
        mass, threshold = 0.0, None
        for i in order:
            if mass >= p:
                break
            threshold = row[i]
            mass += probs[i]
        row[row < threshold] = -np.inf
    return out


def _assert_same_mask(ours, ref):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


TIES = np.array([[3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 0.5, -1.0],
                 [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                 [5.0, -np.inf, 4.0, 4.0, -2.0, 4.0, 1.0, 1.0]], np.float32)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 7, 8, 20])
def test_top_k_matches_numpy_with_ties(k):
    _assert_same_mask(apply_top_k(jnp.asarray(TIES), k), np_top_k(TIES, k))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0])
def test_top_p_matches_numpy_with_ties(p):
    _assert_same_mask(apply_top_p(jnp.asarray(TIES), p), np_top_p(TIES, p))


@pytest.mark.parametrize("scale", [0.05, 8.0])  # flat: top-256 hold < p (full sort); peaked: candidates suffice
def test_top_p_large_vocab_both_paths(scale):
    vocab = 3 * NUCLEUS_CANDIDATES
    logits = (scale * np.random.default_rng(0).normal(size=(4, vocab))).astype(np.float32)
    logits[1, 10:20] = logits[1, 10]  # a block of ties
    for p in (0.5, 0.9):
        _assert_same_mask(apply_top_p(jnp.asarray(logits), p), np_top_p(logits, p))


def test_nucleus_bisection_equals_sorted_threshold():
    from therapy_rl.sampling import _nucleus_threshold_by_bisection

    rng = np.random.default_rng(3)
    logits = np.concatenate([rng.normal(size=(3, 300)) * np.array([[0.1], [2.0], [30.0]]), TIES],
                            axis=1).astype(np.float32)
    logits[0, 5] = -np.inf
    logits[2] -= 100.0  # all-negative logits exercise the sign-folded keys
    x = jnp.asarray(logits)
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    for p in (0.05, 0.5, 0.95):
        threshold = np.asarray(_nucleus_threshold_by_bisection(x, lse, p))
        ref = np_top_p(logits, p)
        expected = np.where(np.isfinite(ref), ref, np.inf).min(-1, keepdims=True)
        np.testing.assert_array_equal(threshold, expected.astype(np.float32))


@pytest.mark.parametrize("k,p,t", [(0, 0.8, 1.0), (5, 1.0, 1.0), (5, 0.6, 0.7), (300, 0.9, 1.5), (3, 0.9, 1.0)])
def test_filter_logits_is_temperature_then_top_k_then_top_p(k, p, t):
    rng = np.random.default_rng(1)
    logits = (3 * rng.normal(size=(5, 2 * NUCLEUS_CANDIDATES))).astype(np.float32)
    logits[0, :6] = logits[0, 0]  # ties at the top-k cut
    ours = filter_logits(jnp.asarray(logits), SamplingConfig(max_new_tokens=1, top_k=k, top_p=p, temperature=t))
    _assert_same_mask(ours, np_top_p(np_top_k(logits.astype(np.float64) / t, k), p))


def test_categorical_matches_softmax_frequencies():
    vocab, draws = 1100, 6000  # several blocks of the two-level draw, and a ragged last block
    rng = np.random.default_rng(2)
    logits = rng.normal(size=vocab).astype(np.float32) * 2
    logits[rng.choice(vocab, 500, replace=False)] = -np.inf  # filtered tokens must never come out
    logits[7], logits[1099] = 6.0, 5.0
    probs = np.exp(logits - logits[np.isfinite(logits)].max())
    probs /= probs.sum()
    ids = np.asarray(categorical(jax.random.PRNGKey(0), jnp.tile(jnp.asarray(logits), (draws, 1))))
    assert np.isfinite(logits[ids]).all()
    counts = np.bincount(ids, minlength=vocab) / draws
    top = np.argsort(-probs)[:20]
    assert np.abs(counts[top] - probs[top]).max() < 4 * np.sqrt(probs[top].max() / draws)
    # Coarse check over all tokens: total variation small.
    assert 0.5 * np.abs(counts - probs).sum() < 0.12


# ----------------------------------------------------------------------------------------------- fake model


def _successor_step(vocab, eos_at=None):
    """A fake model whose next token is always previous + 1 (lm1b's test idea); optional EOS per row at a step."""

    def logits_for(prev, step):
        nxt = (prev + 1) % vocab
        if eos_at is not None:
            nxt = jnp.where(step == jnp.asarray(eos_at), 0, nxt)
        return jnp.where(jax.nn.one_hot(nxt, vocab) > 0, 0.0, -jnp.inf)

    def step_fn(prev, step, state):
        return logits_for(prev, step), state + 1

    return logits_for, step_fn


def test_fake_logits_known_answer():
    vocab = 20
    logits_for, step_fn = _successor_step(vocab)
    first = logits_for(jnp.array([4, 10]), 0)
    sampling = SamplingConfig(max_new_tokens=5, top_k=3, temperature=0.8)
    out = sample_loop(first, step_fn, jnp.zeros(()), jax.random.PRNGKey(0), sampling)
    np.testing.assert_array_equal(out.tokens, [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15]])
    np.testing.assert_array_equal(out.response_mask, np.ones((2, 5)))
    np.testing.assert_array_equal(out.lengths, [5, 5])
    np.testing.assert_allclose(out.logprobs, 0.0)  # each chosen token had probability 1


def test_eos_masks_pads_and_stops_early():
    vocab, eos, pad = 20, 0, 19
    eos_at = np.array([2, 0, 9])  # row 1 ends at once; row 2 never within 6 steps
    logits_for, step_fn = _successor_step(vocab, eos_at=eos_at)
    calls = []

    def counted(prev, step, state):
        jax.debug.callback(lambda s: calls.append(int(s)), step)
        return step_fn(prev, step, state)

    sampling = SamplingConfig(max_new_tokens=6, greedy=True, eos_id=eos, pad_id=pad)
    first = logits_for(jnp.array([3, 3, 3]), 0)
    out = sample_loop(first, counted, jnp.zeros(()), jax.random.PRNGKey(0), sampling)
    np.testing.assert_array_equal(out.tokens, [[4, 5, 0, pad, pad, pad], [0, pad, pad, pad, pad, pad],
                                               [4, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(out.response_mask, [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1] * 6])
    np.testing.assert_array_equal(out.lengths, [3, 1, 6])
    assert calls == [1, 2, 3, 4, 5]

    # All rows finish at step 1: the loop stops without running the remaining steps.
    calls.clear()
    logits_for2, step_fn2 = _successor_step(vocab, eos_at=np.array([1, 1, 1]))
    first = logits_for2(jnp.array([3, 3, 3]), 0)
    out = sample_loop(first, lambda *a: (jax.debug.callback(lambda s: calls.append(int(s)), a[1]), step_fn2(*a))[1],
                      jnp.zeros(()), jax.random.PRNGKey(0), sampling)
    assert calls == [1]
    np.testing.assert_array_equal(out.tokens[:, :3], [[4, 0, pad]] * 3)
    np.testing.assert_array_equal(out.lengths, [2, 2, 2])


def test_inactive_rows_only_pad():
    logits_for, step_fn = _successor_step(10)
    sampling = SamplingConfig(max_new_tokens=3, greedy=True, eos_id=0, pad_id=9)
    out = sample_loop(logits_for(jnp.array([1, 2]), 0), step_fn, jnp.zeros(()), jax.random.PRNGKey(0), sampling,
                      active=jnp.array([True, False]))
    np.testing.assert_array_equal(out.tokens, [[2, 3, 4], [9, 9, 9]])
    np.testing.assert_array_equal(out.lengths, [3, 0])


# ----------------------------------------------------------------------------------------------- real (tiny) model

CONFIG = GPT2Config.tiny(vocab_size=97, n_positions=48, initializer_range=0.3, dropout_rate=0.0)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


def _prompts():
    ids = np.array([[0, 0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26, 27], [0, 0, 0, 0, 0, 31, 32]], np.int32)
    mask = (np.arange(7)[None, :] >= np.array([3, 0, 5])[:, None]).astype(np.int32)
    return ids, mask


def _reference_greedy(params, ids, mask, steps):
    """Full forward over the whole sequence at every step: no cache.

    The sequence lives in a fixed [B, P + steps] buffer (one compile); slots after the current token are
    invisible to it under the causal mask, so their content does not matter.
    """
    forward = jax.jit(lambda seq, seq_mask: GPT2LMHeadModel(CONFIG).apply({"params": params}, seq, seq_mask).logits)
    batch, prompt_len = ids.shape
    seq = np.concatenate([ids, np.zeros((batch, steps), np.int32)], axis=1)
    seq_mask = np.concatenate([mask, np.ones((batch, steps), np.int32)], axis=1)
    for n in range(steps):
        logits = np.asarray(forward(jnp.asarray(seq), jnp.asarray(seq_mask)))[:, prompt_len + n - 1]
        seq[:, prompt_len + n] = logits.argmax(-1)
    return seq[:, prompt_len:]


def test_greedy_cache_equals_no_cache_reference(params):
    ids, mask = _prompts()
    sampling = SamplingConfig(max_new_tokens=10, greedy=True)
    out = make_generate_fn(CONFIG, sampling)(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(out.tokens), _reference_greedy(params, ids, mask, 10))


def test_logprobs_match_teacher_forced_forward(params):
    ids, mask = _prompts()
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, eos_id=5, pad_id=0)
    out = jax.jit(generate, static_argnames=("config", "sampling"))(
        params, CONFIG, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(3), sampling)
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    seq_mask = np.concatenate([mask, np.asarray(out.response_mask)], axis=1)
    logits = GPT2LMHeadModel(CONFIG).apply({"params": params}, jnp.asarray(seq), jnp.asarray(seq_mask)).logits
    logits = np.asarray(logits[:, ids.shape[1] - 1:-1], np.float64)  # predicts each response token
    tokens = np.asarray(out.tokens)
    resp = np.asarray(out.response_mask).astype(bool)

    def chosen(lg):
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        return np.take_along_axis(lg, tokens[..., None], -1)[..., 0] - lse

    np.testing.assert_allclose(np.asarray(out.logprobs)[resp], chosen(logits)[resp], atol=2e-4)
    filtered = np_top_p(np_top_k(logits.reshape(-1, CONFIG.vocab_size) / 0.7, 20), 0.9).reshape(logits.shape)
    np.testing.assert_allclose(np.asarray(out.sampling_logprobs)[resp], chosen(filtered)[resp], atol=2e-4)
    assert np.all(np.asarray(out.logprobs)[~resp] == 0)


@pytest.mark.parametrize("block", [3, 4, 7])
def test_block_cache_decode_equals_teacher_forcing(params, block):
    """Generated tokens in cache blocks (each step reads only the blocks filled so far, several segments):
    the same greedy tokens as full forwards with no cache, and raw log-probs equal to a teacher-forced pass."""
    ids, mask = _prompts()
    steps = 17
    sampling = SamplingConfig(max_new_tokens=steps, greedy=True)
    out = jax.jit(lambda p, i, m, k: generate(p, CONFIG, i, m, k, sampling, decode_block=block))(
        params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(out.tokens), _reference_greedy(params, ids, mask, steps))
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    logits = GPT2LMHeadModel(CONFIG).apply({"params": params}, jnp.asarray(seq),
                                           jnp.asarray(np.concatenate([mask, np.ones_like(seq[:, 7:])], 1))).logits
    logits = np.asarray(logits[:, ids.shape[1] - 1:-1], np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = np.take_along_axis(logits, np.asarray(out.tokens)[..., None], -1)[..., 0] - lse
    np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=2e-4)


def test_decode_block_size_bounds_the_segments():
    from therapy_rl.sampling import MAX_DECODE_SEGMENTS, MIN_DECODE_BLOCK, decode_block_size

    for n in (1, 31, 32, 64, 128, 256, 1000):
        size = decode_block_size(n)
        assert size >= MIN_DECODE_BLOCK and -(-n // size) <= MAX_DECODE_SEGMENTS


def test_decoding_grid_shares_one_compiled_sampler(params):
    """Temperature, top_p and top_k (within a candidate bucket) are traced: one program, the same tokens as
    sampling with the values baked in as constants."""
    ids, mask = _prompts()
    grid = [SamplingConfig(max_new_tokens=8, temperature=t, top_k=k, top_p=p, eos_id=5)
            for t, k, p in [(1.0, 5, 0.7), (1.3, 20, 0.9), (0.7, 35, 0.95), (1.1, 1, 0.6)]]
    baked = jax.jit(generate, static_argnames=("config", "sampling"))
    fns = [make_generate_fn(CONFIG, sampling) for sampling in grid]
    assert len({id(fn.jitted) for fn in fns}) == 1
    outs = []
    for sampling, fn in zip(grid, fns):
        out = fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(9))
        want = baked(params, CONFIG, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(9), sampling)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want.tokens))
        np.testing.assert_allclose(np.asarray(out.sampling_logprobs), np.asarray(want.sampling_logprobs), atol=1e-5)
        outs.append(np.asarray(out.tokens))
    assert fns[0].jitted._cache_size() == 1
    assert len({o.tobytes() for o in outs}) > 1  # the values do reach the program
    # top_k 1 keeps only the argmax (ties aside): the grid's last setting decodes greedily.
    greedy = make_generate_fn(CONFIG, SamplingConfig(max_new_tokens=8, greedy=True, eos_id=5))(
        params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(outs[-1], np.asarray(greedy.tokens))


def test_keys_control_samples(params):
    ids, mask = _prompts()
    fn = make_generate_fn(CONFIG, SamplingConfig(max_new_tokens=12, temperature=1.0))
    a = fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(5))
    b = fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(5))
    c = fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(6))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_active_rows(params):
    ids, mask = _prompts()
    fn = make_generate_fn(CONFIG, SamplingConfig(max_new_tokens=6, greedy=True, pad_id=7))
    out = fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0), jnp.array([1, 0, 1]))
    full = fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.tokens)[1], [7] * 6)
    np.testing.assert_array_equal(np.asarray(out.lengths), [6, 0, 6])
    np.testing.assert_array_equal(np.asarray(out.tokens)[[0, 2]], np.asarray(full.tokens)[[0, 2]])


def test_prompt_too_long_refused(params):
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="n_positions"):
        generate(params, CONFIG, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                 SamplingConfig(max_new_tokens=CONFIG.n_positions))


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(max_new_tokens=4, top_p=0.0)
    SamplingConfig(max_new_tokens=4, temperature=0.0, greedy=True)


def test_greedy_matches_hf_generate(tmp_path, params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from therapy_rl.models.hf_io import save_hf_gpt2

    pad = 0
    save_hf_gpt2(CONFIG, params, str(tmp_path), bos_token_id=None, eos_token_id=None, pad_token_id=pad)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ids, mask = _prompts()
    steps = 12
    with torch.no_grad():
        hf_out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             do_sample=False, max_new_tokens=steps, pad_token_id=pad)
    hf_tokens = hf_out[:, ids.shape[1]:].numpy()
    out = make_generate_fn(CONFIG, SamplingConfig(max_new_tokens=steps, greedy=True, pad_id=pad))(
        params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_tokens)


# ----------------------------------------------------------------------------------------------- decode-step LM head


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["gpt2", "mistral_tied", "mistral_untied"])
def test_decode_logits_equal_the_lm_head(family, dtype):
    """The sampler's decode-step head (a tied [V, D] embedding applied vocab-major) equals `lm_logits`."""
    from therapy_rl import ops
    from therapy_rl.models import families, mistral

    if family == "gpt2":
        config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=1, n_head=2, dtype=dtype)
        params = init_params(config, jax.random.PRNGKey(0))
    else:
        config = mistral.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                       dtype=dtype,
                                       tie_word_embeddings=family == "mistral_tied")
        params = mistral.init_params(config, jax.random.PRNGKey(0))
    hidden = jax.random.normal(jax.random.PRNGKey(1), (16, 32), jnp.float32)
    expected = np.asarray(families.lm_logits(params, hidden, config))
    got = families.decode_logits(params, hidden, config)
    assert got.shape == (16, 97) and got.dtype == jnp.float32
    tol = 1e-5 if dtype == "float32" else 1e-3
    np.testing.assert_allclose(np.asarray(got), expected, rtol=tol, atol=tol)
    hlo = jax.jit(lambda p, h: families.decode_logits(p, h, config)).lower(params, hidden).as_text()
    assert ("opt-barrier" in hlo or "optimization_barrier" in hlo) == (family != "mistral_untied")
    direct = ops.vocab_major_logits(hidden[:3], jnp.ones((5, 32)), jnp.float32)
    np.testing.assert_allclose(np.asarray(direct), np.asarray(hidden[:3]).sum(-1, keepdims=True) * np.ones((1, 5)),
                               rtol=1e-5)
