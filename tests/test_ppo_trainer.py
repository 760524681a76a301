"""PPO trainer on a tiny random GPT-2 on CPU: the toy task learns, log-probs match the sampler, the KL coefficient
is read from the state, and a (2, 2, 2) mesh of 8 devices gives the 1-device iteration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl import optim, parallel, sampling
from therapy_rl.models import gpt2
from therapy_rl.ppo import core, policy, step as ppo_step, trainer
from therapy_rl.rewards import protocol as reward_protocol
from therapy_rl.rewards import simple as simple_rewards

VOCAB, PROMPT, NEW, BATCH = 32, 6, 8, 16
EOS, PAD, TARGET = 1, 0, 5
MODEL = gpt2.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, dropout_rate=0.0)


def _prompts(seed, batch=BATCH):
    """Left-padded random prompts of 2..PROMPT real tokens (ids 2.. so none is EOS/PAD)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, PROMPT + 1, size=batch)
    mask = (np.arange(PROMPT)[None, :] >= PROMPT - lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(2, VOCAB, size=(batch, PROMPT)), PAD).astype(np.int32)
    return {"prompt_ids": ids, "prompt_mask": mask, "therapist_emotion": np.zeros(batch, np.int32),
            "valid": np.ones(batch, np.int32)}


def _optimizer(lr):
    return optim.make_optimizer(optim.OptimizerConfig(learning_rate=lr, total_steps=1000, schedule="constant",
                                                      grad_clip_norm=0.0))


def _fresh_state(spec, hyper, mesh, lr, seed=0):
    trunk = jax.device_get(gpt2.init_params(MODEL, jax.random.key(seed)))
    return trainer.init_state(spec, _optimizer(lr), hyper.kl, trunk, mesh, jax.random.key(seed + 1))


def _setup(mesh_shape=(1, 1, 1), devices=None, lr=3e-3, init_kl=0.01, num_minibatches=2):
    devices = jax.devices()[:1] if devices is None else devices
    mesh = parallel.make_mesh(parallel.MeshShape(*mesh_shape), devices)
    spec = policy.PolicySpec(MODEL)
    hyper = ppo_step.PPOHyper(kl=core.KLControllerConfig(init_coef=init_kl), num_epochs=4,
                              num_minibatches=num_minibatches, eos_id=EOS)
    state, state_sh, ref, ref_sh = _fresh_state(spec, hyper, mesh, lr)
    sampling_config = sampling.SamplingConfig(max_new_tokens=NEW, eos_id=EOS, pad_id=PAD)
    stages = trainer.build_stages(spec, hyper, sampling_config, _optimizer(lr), mesh, state_sh, ref_sh,
                                  simple_rewards.TargetTokenReward(TARGET), reward_protocol.ResponseIds(eos_id=EOS),
                                  BATCH, PROMPT)
    return stages, state, ref, mesh


@pytest.fixture(scope="module")
def single():
    """One set of compiled stages on 1 device, shared by the tests (compiling dominates their time)."""
    stages, _, _, mesh = _setup()
    return stages, mesh


def _fresh(single):
    """A new (state, ref) for the shared stages: states are donated by the update, so each test makes its own."""
    stages, mesh = single
    state, _, ref, _ = _fresh_state(stages.spec, stages.hyper, mesh, 3e-3)
    return stages, state, ref, mesh


def test_toy_task_reward_rises(single):
    stages, state, ref, mesh = _fresh(single)
    rewards = []
    for it in range(20):
        batch = parallel.global_batch_from_host(_prompts(1000 + it), mesh)
        result = trainer.run_iteration(stages, state, ref, batch)
        state = result.state
        rewards.append(result.metrics["objective/scores"])
        for key in ("objective/kl", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/value_avg"):
            assert np.isfinite(result.metrics[key]), key
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    print(f"toy task mean share of the target token: first 5 {first:.3f}, last 5 {last:.3f}")
    assert last > first + 0.15, rewards
    assert int(state.step) == 20


def _reference_logprobs(params, prompt_ids, prompt_mask, tokens, response_mask):
    """Teacher forcing on RIGHT-padded rows (prompt without its left padding, then the response): a layout
    where the real tokens sit at slots 0..L-1, so positions and causality need no help from the mask."""
    batch, total = tokens.shape[0], prompt_ids.shape[1] + tokens.shape[1]
    seqs = np.zeros((batch, total), np.int32)
    mask = np.zeros((batch, total), np.int32)
    starts = []
    for b in range(batch):
        prompt = prompt_ids[b][prompt_mask[b] == 1]
        row = np.concatenate([prompt, tokens[b, :int(response_mask[b].sum())]])
        seqs[b, :len(row)], mask[b, :len(row)] = row, 1
        starts.append(len(prompt))
    logits = np.asarray(gpt2.GPT2LMHeadModel(MODEL).apply({"params": params}, seqs, mask).logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    out = np.zeros(tokens.shape, np.float32)
    for b in range(batch):
        for t in range(int(response_mask[b].sum())):
            out[b, t] = logp[b, starts[b] + t - 1, tokens[b, t]]
    return out


def test_update_logprobs_equal_sampler_logprobs_under_left_padding(single):
    stages, state, ref, mesh = _fresh(single)
    batch = parallel.global_batch_from_host(_prompts(7), mesh)
    key = jax.device_put(jax.random.key(3), parallel.replicated(mesh))
    sample = stages.generate(state.params[policy.TRUNK_KEY], batch["prompt_ids"], batch["prompt_mask"], key)
    rollout = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"], "tokens": sample.tokens,
               "response_mask": sample.response_mask}
    # the function the update step calls for the old log-probs and values
    logp, values, _ = jax.jit(lambda p, b: policy.policy_outputs(stages.spec, p, b))(state.params, rollout)
    mask = np.asarray(sample.response_mask)
    assert mask.sum() > BATCH  # real responses
    np.testing.assert_allclose(np.where(mask == 1, logp, 0), np.asarray(sample.logprobs), atol=2e-5)
    host = jax.device_get(rollout)
    expected = _reference_logprobs(jax.device_get(state.params[policy.TRUNK_KEY]), host["prompt_ids"],
                                   host["prompt_mask"], host["tokens"], host["response_mask"])
    np.testing.assert_allclose(np.where(mask == 1, logp, 0), expected, atol=2e-5)
    # the reference starts equal to the policy: zero KL on every token
    ref_logp = policy.response_logprobs(stages.spec, ref, rollout)
    np.testing.assert_allclose(np.where(mask == 1, ref_logp, 0), np.where(mask == 1, logp, 0), atol=1e-6)
    assert values.shape == mask.shape and values.dtype == jnp.float32


def test_kl_coef_is_read_from_state_without_recompiling(single):
    stages, state, ref, mesh = _fresh(single)
    cache_before = stages.update._cache_size()
    batch = parallel.global_batch_from_host(_prompts(11), mesh)
    # a rollout with a policy that already moved away from the reference, so the KL term is non-zero
    moved = jax.tree_util.tree_map(lambda x: x * 1.3, jax.device_get(state.params[policy.TRUNK_KEY]))
    key = jax.device_put(jax.random.key(5), parallel.replicated(mesh))
    sample = stages.generate(moved, batch["prompt_ids"], batch["prompt_mask"], key)
    rollout = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"], "tokens": sample.tokens,
               "response_mask": sample.response_mask, "valid": batch["valid"],
               "scores": jax.device_put(jnp.linspace(-1.0, 1.0, BATCH), parallel.batch_sharding(mesh, 1)),
               "scores_after_clip": jax.device_put(jnp.zeros(BATCH), parallel.batch_sharding(mesh, 1)),
               "rollout_logp": sample.logprobs, "rollout_hidden": sample.hidden, "rollout_entropy": sample.entropy}

    def run(coef):
        host = jax.device_get(state)
        host = host.replace(params=dict(host.params, **{policy.TRUNK_KEY: moved}), kl_coef=np.float32(coef))
        fresh = jax.tree_util.tree_map(lambda x, like: jax.device_put(x, like.sharding), host, state)
        new_state, metrics = stages.update(fresh, ref, rollout)
        return jax.device_get(new_state), jax.device_get(metrics)

    s1, m1 = run(0.2)
    s2, m2 = run(2.0)
    assert stages.update._cache_size() == max(cache_before, 1)
    assert float(m1["objective/kl_coef"]) == pytest.approx(0.2) and float(m2["objective/kl_coef"]) == pytest.approx(2.0)
    assert abs(float(m1["objective/kl"])) > 1e-3
    # non-score reward = -coef * KL: ten times the coefficient, ten times the penalty
    np.testing.assert_allclose(m2["ppo/mean_non_score_reward"], 10 * m1["ppo/mean_non_score_reward"], rtol=1e-4)
    assert not np.isclose(float(m1["loss/policy_avg"]), float(m2["loss/policy_avg"]))
    k1, k2 = s1.params["value_head"]["summary"]["kernel"], s2.params["value_head"]["summary"]["kernel"]
    assert np.max(np.abs(k1 - k2)) > 0
    # the adaptive controller moved each coefficient from its own value
    expected = [core.adaptive_kl_update(c, m["objective/kl"], BATCH, 6.0, 10000.0) for c, m in ((0.2, m1), (2.0, m2))]
    np.testing.assert_allclose([s1.kl_coef, s2.kl_coef], expected, rtol=1e-6)


@pytest.mark.parametrize("separate_critic", [False, True])
def test_rollout_logprobs_and_hidden_replace_the_old_forward_pass(separate_critic):
    """The sampler's log-probs (and hidden states under the value head) equal a teacher-forced pass of the policy,
    and an iteration that reuses them updates the policy like one that runs the pass."""
    mesh = parallel.make_mesh(parallel.MeshShape(1, 1, 1), jax.devices()[:1])
    spec = policy.PolicySpec(MODEL, separate_critic=separate_critic)
    hyper = ppo_step.PPOHyper(kl=core.KLControllerConfig(init_coef=0.05), num_epochs=2, num_minibatches=2,
                              eos_id=EOS)
    sampling_config = sampling.SamplingConfig(max_new_tokens=NEW, eos_id=EOS, pad_id=PAD)
    results = {}
    for reuse in (True, False):
        state, state_sh, ref, ref_sh = _fresh_state(spec, hyper, mesh, 3e-3, seed=4)
        stages = trainer.build_stages(spec, hyper, sampling_config, _optimizer(3e-3), mesh, state_sh, ref_sh,
                                      simple_rewards.TargetTokenReward(TARGET),
                                      reward_protocol.ResponseIds(eos_id=EOS), BATCH, PROMPT, reuse_rollout=reuse)
        assert stages.reuse_rollout == reuse
        batch = parallel.global_batch_from_host(_prompts(31), mesh)
        if reuse:
            sample = stages.generate(state.params[policy.TRUNK_KEY], batch["prompt_ids"], batch["prompt_mask"],
                                     ppo_step.rollout_key(state))
            assert (sample.hidden is None) == separate_critic
            rollout = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
                       "tokens": sample.tokens, "response_mask": sample.response_mask,
                       "rollout_logp": sample.logprobs, "rollout_hidden": sample.hidden,
                       "rollout_entropy": sample.entropy}
            if separate_critic:
                rollout.pop("rollout_hidden")
            reused = jax.jit(lambda p, r: ppo_step.rollout_logp_and_values(spec, p, r, r))(state.params, rollout)
            forward = jax.jit(lambda p, r: policy.policy_outputs(spec, p, r)[:2])(state.params, rollout)
            mask = np.asarray(sample.response_mask)
            assert mask.sum() > BATCH and (mask == 0).any()  # real responses, some ended early
            for got, want in zip(reused, forward):
                np.testing.assert_allclose(np.asarray(got), np.where(mask == 1, np.asarray(want), 0), atol=2e-5)
            # the sampler's entropy equals the teacher-forced policy's (the metric the update then leaves out)
            entropy = jax.jit(lambda p, r: policy.policy_outputs(spec, p, r, with_entropy=True)[2])(state.params,
                                                                                                   rollout)
            np.testing.assert_allclose(np.asarray(sample.entropy), np.where(mask == 1, np.asarray(entropy), 0),
                                       atol=2e-5)
            start_entropy = float(np.sum(np.asarray(entropy) * mask) / mask.sum())
        result = trainer.run_iteration(stages, state, ref, batch)
        results[reuse] = (jax.device_get(result.state.params), result.metrics, np.asarray(result.tokens))
    (p_reuse, m_reuse, t_reuse), (p_pass, m_pass, t_pass) = results[True], results[False]
    np.testing.assert_array_equal(t_reuse, t_pass)
    assert "policy/entropy_avg" not in m_reuse and "policy/entropy" not in m_pass
    assert m_reuse["policy/entropy"] == pytest.approx(start_entropy, rel=1e-5)  # the rollout's, before the update
    assert m_pass["policy/entropy_avg"] == pytest.approx(start_entropy, rel=0.05)  # during the update
    for key in ("objective/kl", "loss/policy_avg", "loss/value_avg", "value/mean"):
        np.testing.assert_allclose(m_reuse[key], m_pass[key], atol=1e-5, rtol=1e-4, err_msg=key)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), p_reuse, p_pass)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 5e-5, diffs


def _one_iteration(stages, state, ref, mesh):
    result = trainer.run_iteration(stages, state, ref, parallel.global_batch_from_host(_prompts(21), mesh))
    return jax.device_get(result.state), result.metrics, np.asarray(jax.device_get(result.tokens)), result.state


def test_sharded_iteration_matches_single_device(single):
    assert jax.device_count() >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
    stages, state0, ref, mesh = _fresh(single)
    initial = jax.device_get(state0.params)
    ref_state, ref_metrics, ref_tokens, _ = _one_iteration(stages, state0, ref, mesh)
    state, metrics, tokens, live = _one_iteration(*_setup((2, 2, 2), jax.devices()[:8]))
    np.testing.assert_array_equal(tokens, ref_tokens)
    for key in ("objective/kl", "objective/scores", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], atol=1e-5, rtol=1e-4, err_msg=key)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                   state.params, ref_state.params)
    # Adam turns float noise on zero-gradient entries (e.g. the key bias, which softmax ignores) into steps of
    # ~lr, so entries may differ by a few 1e-5 after 8 updates at lr 3e-3; the update as a whole must agree.
    assert max(jax.tree_util.tree_leaves(diffs)) <= 5e-5, diffs
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    delta, ref_delta = flat(state.params) - flat(initial), flat(ref_state.params) - flat(initial)
    assert np.linalg.norm(delta - ref_delta) <= 1e-3 * np.linalg.norm(ref_delta)
    assert float(state.kl_coef) == pytest.approx(float(ref_state.kl_coef), rel=1e-6)
    kernel = live.params[policy.TRUNK_KEY]["h_0"]["mlp"]["c_fc"]["kernel"]
    assert kernel.sharding.spec == parallel.P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (MODEL.n_embd // 2, 4 * MODEL.n_embd // 2)


def test_separate_critic_params_and_value_head_layout():
    spec = policy.PolicySpec(MODEL, separate_critic=True)
    trunk = gpt2.init_params(MODEL, jax.random.key(0))
    params = policy.init_policy_params(trunk, jax.random.key(1), spec)
    assert set(params) == {"trunk", "value_head", "critic_trunk"}
    mesh = parallel.make_mesh(parallel.MeshShape(1, 2, 2), jax.devices()[:4])
    specs = parallel.partition_specs(params, parallel.GPT2_PARTITION_RULES, mesh)
    assert specs["critic_trunk"]["h_0"]["attn"]["c_attn"]["kernel"] == parallel.P("fsdp", "tensor")
    assert specs["value_head"]["summary"]["kernel"] == parallel.P("fsdp", None)
    batch = {k: jnp.asarray(v) for k, v in _prompts(3, 4).items()}
    batch["tokens"] = jnp.full((4, NEW), 7, jnp.int32)
    batch["response_mask"] = jnp.ones((4, NEW), jnp.int32)
    _, values, _ = policy.policy_outputs(spec, params, batch)
    # the critic trunk feeds the head: changing it changes the values, not the policy log-probs
    bumped = dict(params, critic_trunk=jax.tree_util.tree_map(lambda x: x * 1.5, params["critic_trunk"]))
    logp2, values2, _ = policy.policy_outputs(spec, bumped, batch)
    logp1, _, _ = policy.policy_outputs(spec, params, batch)
    np.testing.assert_allclose(logp1, logp2, atol=0)
    assert np.max(np.abs(np.asarray(values) - np.asarray(values2))) > 1e-4


def test_response_stats_and_emotion_tag_match_python():
    marker, emotions = 9, (20, 21, 22, 23, 24, 25, 26)
    ids = reward_protocol.ResponseIds(eos_id=EOS, therapist_emotion_id=marker, emotion_ids=emotions)
    tokens = np.array([[4, 5, 6, 4, 5, 6, marker, 22, EOS, 0],    # tag "depression" (index 2), a repeated trigram
                       [4, 4, 4, 4, marker, 7, EOS, 0, 0, 0],        # marker followed by a non-label
                       [3, 5, 7, 2, 6, 8, 4, 3, 3, 3],               # no marker, no EOS
                       [marker, 20, EOS, 0, 0, 0, 0, 0, 0, 0]], np.int32)
    mask = np.asarray(core.mask_after_eos(tokens, EOS))
    target = np.array([2, 0, 1, 5], np.int32)
    stats = jax.device_get(simple_rewards.response_stats(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(target),
                                                         ids, 3))

    def py_rate(row, n):
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        return sum(g in grams[:i] for i, g in enumerate(grams)) / len(grams) if grams else 0.0

    for b in range(4):
        row = tokens[b][mask[b] == 1].tolist()
        assert stats["length"][b] == len(row)
        assert stats["has_eos"][b] == (EOS in row)
        assert stats["repeated_ngram"][b] == pytest.approx(py_rate(row, 3))
        tag = -2
        if marker in row and row.index(marker) + 1 < len(row):
            nxt = row[row.index(marker) + 1]
            tag = emotions.index(nxt) if nxt in emotions else -1
        assert stats["emotion_tag"][b] == (tag >= 0)
        assert stats["emotion_correct"][b] == (tag == target[b])
    reward = simple_rewards.EmotionTagReward(ids, target_length=4)
    total, comps = reward({"therapist_emotion": jnp.asarray(target)}, jnp.asarray(tokens), jnp.asarray(mask))
    lengths = mask.sum(1)
    expected = (np.asarray(stats["emotion_tag"]) + 2 * np.asarray(stats["emotion_correct"])
                - np.minimum(1, np.abs(lengths - 4) / 4))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    share, _ = simple_rewards.TargetTokenReward(4)({}, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(share, [(tokens[b][mask[b] == 1] == 4).mean() for b in range(4)], rtol=1e-6)


def test_process_scores_clip_whiten_and_eos_penalty():
    raw = jnp.asarray([20.0, -3.0, 1.0, 2.0, 100.0])
    valid = jnp.asarray([1, 1, 1, 1, 0])
    tokens = jnp.asarray([[3, EOS], [3, 3], [EOS, 0], [3, EOS], [3, 3]])
    mask = core.mask_after_eos(tokens, EOS)
    hyper = ppo_step.PPOHyper(score_clip=10.0, missing_eos_penalty=1.5, eos_id=EOS)
    got = np.asarray(ppo_step.process_scores(raw, tokens, mask, valid, hyper))
    clipped = np.array([10.0, -3.0, 1.0, 2.0])
    white = (clipped - clipped.mean()) / np.sqrt(clipped.var(ddof=1) + 1e-8)
    white[1] -= 1.5
    np.testing.assert_allclose(got[:4], white, rtol=1e-5)
    assert got[4] == 0.0


def test_update_keeps_the_after_clip_penalty_out_of_the_score_clip(single):
    """The update step reads `scores_after_clip`: base -12 plus safety -5 enters GAE as -15, not as -10."""
    import dataclasses

    stages, state, ref, _ = _fresh(single)
    hyper = dataclasses.replace(stages.hyper, whiten_scores=False, num_epochs=1, num_minibatches=1)
    update = jax.jit(ppo_step.make_update_step(stages.spec, hyper, _optimizer(3e-3)))
    prompts = _prompts(13)
    raw, after_clip = np.full(BATCH, -12.0, np.float32), np.zeros(BATCH, np.float32)
    raw[0], after_clip[0] = -17.0, -5.0
    rollout = {"prompt_ids": prompts["prompt_ids"], "prompt_mask": prompts["prompt_mask"],
               "tokens": np.random.default_rng(0).integers(2, VOCAB, (BATCH, NEW)).astype(np.int32),
               "response_mask": np.ones((BATCH, NEW), np.int32), "valid": prompts["valid"], "scores": raw,
               "scores_after_clip": after_clip}
    _, metrics = update(state, ref, rollout)
    assert float(metrics["ppo/mean_scores"]) == pytest.approx((-15.0 - 10.0 * (BATCH - 1)) / BATCH)


def test_resolve_data_config_inherits_sft_format():
    from therapy_rl import defaults

    sft_data = defaults.data_defaults().to_dict()
    sft_data.update(source="mesc", include_strategy=True, max_prompt_tokens=80)
    ppo_data = defaults.ppo_defaults().data
    resolved = trainer.resolve_data_config(ppo_data, sft_data)
    assert resolved.source == "mesc" and resolved.include_strategy and resolved.max_prompt_tokens == 80
    ppo_data.max_prompt_tokens = 40
    assert trainer.resolve_data_config(ppo_data, sft_data).max_prompt_tokens == 40
    ppo_data.context_turns = 3
    with pytest.raises(ValueError, match="context_turns"):
        trainer.resolve_data_config(ppo_data, sft_data)


class _FakeRewardModel:
    """Stands in for rewards.combine.RewardModel: features are functions of the text alone."""

    def __init__(self):
        self.calls = []

    def user_features(self, texts, batch_size=64):
        self.calls.append(list(texts))
        emb = np.array([[len(t), t.count("a")] for t in texts], np.float32)
        return {"user_embedding": emb, "user_crisis": np.array([int("help" in t) for t in texts], np.int32)}

    def score(self, fields, tokens, mask, decode_fn):
        total = fields["user_embedding"][:, 0] + 100 * fields["user_crisis"] + mask.sum(1)
        return total, {"length": mask.sum(1).astype(np.float32), "total_raw": total}


def test_therapy_reward_adapter_caches_user_features_in_fixed_chunks():
    model = _FakeRewardModel()
    reward = reward_protocol.TherapyReward(model=model, decode_fn=str, chunk_size=4)
    texts = [f"text {'a' * i}" + (" help" if i % 5 == 0 else "") for i in range(10)]
    base = {"valid": np.ones(10, np.int32), "user_emotion": np.zeros(10, np.int32),
            "therapist_emotion": np.zeros(10, np.int32)}
    train = reward.register_prompts(base, texts)
    val = reward.register_prompts({k: v[:3] for k, v in base.items()}, ["x", "yy", "zzz help"])
    np.testing.assert_array_equal(train["user_text_id"], np.arange(10))
    np.testing.assert_array_equal(val["user_text_id"], [10, 11, 12])

    rows = np.array([9, 2, 11, 2])
    batch = {"user_text_id": jnp.asarray(rows), "user_emotion": jnp.zeros(4, jnp.int32),
             "therapist_emotion": jnp.zeros(4, jnp.int32), "valid": jnp.ones(4, jnp.int32)}
    tokens, mask = jnp.ones((4, 5), jnp.int32), jnp.asarray(np.tril(np.ones((4, 5), np.int32)))
    total, comps = reward(batch, tokens, mask)
    every = texts + ["x", "yy", "zzz help"]
    expected = [len(every[i]) + 100 * ("help" in every[i]) + int(np.asarray(mask)[r].sum()) for r, i in enumerate(rows)]
    np.testing.assert_allclose(total, expected)
    assert set(comps) == {"length"}
    assert set(reward.last_timing) == {"user_features"} and reward.last_timing["user_features"] >= 0
    # only the chunks holding rows 9, 2 and 11 were embedded, each whole and once
    assert sorted(map(tuple, model.calls)) == sorted([tuple(every[0:4]), tuple(every[8:12])])
    reward(batch, tokens, mask)
    assert len(model.calls) == 2  # cached
    with pytest.raises(KeyError, match="register_prompts"):
        reward({k: v for k, v in batch.items() if k != "user_text_id"}, tokens, mask)


def test_fused_logprobs_and_entropy_match_numpy_and_core_gradient():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, size=(3, 5))
    z = logits.astype(np.float64)
    logp_all = z - z.max(-1, keepdims=True)
    logp_all = logp_all - np.log(np.exp(logp_all).sum(-1, keepdims=True))
    p = np.exp(logp_all)
    logp, entropy = policy.logprobs_and_entropy(jnp.asarray(logits), jnp.asarray(tokens))
    np.testing.assert_allclose(logp, np.take_along_axis(logp_all, tokens[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(entropy, -(p * logp_all).sum(-1), atol=1e-5)
    weights = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    fused = jax.grad(lambda x: jnp.sum(weights * policy.logprobs_and_entropy(x, jnp.asarray(tokens))[0]))
    plain = jax.grad(lambda x: jnp.sum(weights * core.token_logprobs(x, jnp.asarray(tokens))))
    np.testing.assert_allclose(fused(jnp.asarray(logits)), plain(jnp.asarray(logits)), atol=1e-6)
    # numpy gradient of sum_w logp: w * (onehot - p)
    onehot = np.eye(11)[tokens]
    np.testing.assert_allclose(fused(jnp.asarray(logits)), np.asarray(weights)[..., None] * (onehot - p), atol=1e-6)
