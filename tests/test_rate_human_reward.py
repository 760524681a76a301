"""The human reward source without HTTP: queueing, waiting, skipping unrated replies, aggregation, resume
(re-attach, retire), validation, and the trainer leaving unrated rows out of the PPO update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl.rewards import protocol as reward_protocol
from therapy_rl.rewards import simple as simple_rewards
from therapy_rl.rate import guard_check, human_reward, store as store_lib
from therapy_rl.rate.store import Rating


class FakeSample:
    def __init__(self, user_text, problem="depression", user_emotion="depression"):
        self.user_text, self.problem, self.user_emotion = user_text, problem, user_emotion


class FakeClock:
    """Time that moves only when the reward sleeps; `on_sleep(now)` plays the raters."""

    def __init__(self, on_sleep=None):
        self.now, self.on_sleep, self.sleeps = 0.0, on_sleep, 0

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps += 1
        self.now += max(seconds, 0.01)
        if self.on_sleep:
            self.on_sleep(self.now)


def _guard(replies, user_texts):
    return [guard_check.GuardFlags(crisis=False, harmful="hurt" in r, categories=("reply:harm_encouragement",)
                                   if "hurt" in r else (), score=0.1) for r in replies]


def _decode(ids):
    return " ".join(f"w{i}" for i in ids), None


def _batch(prompts, rows):
    return {k: np.asarray(v)[rows] for k, v in prompts.items()}


def _reward(store, clock, timeout_s=10.0, aggregate="mean", auto=None, auto_weight=0.0, log=None):
    config = human_reward.HumanRewardConfig(min_ratings=1, timeout_s=timeout_s, poll_s=1.0, aggregate=aggregate,
                                            auto_weight=auto_weight, unsafe_penalty=2.0)
    lines = log if log is not None else []
    reward = human_reward.HumanReward(config, store, "run-a", _decode, auto=auto, guard=_guard, clock=clock.clock,
                                      sleep=clock.sleep, log=lines.append)
    prompts = {"valid": np.ones(2, np.int32), "prompt_ids": np.zeros((2, 3), np.int32)}
    prompts = reward.register_samples(prompts, [FakeSample("I feel hopeless"), FakeSample("I can't sleep", "sleep")])
    return reward, prompts


TOKENS = np.asarray([[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13], [5, 5, 0, 0]], np.int32)
MASK = np.asarray([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], np.int32)


def _four_rows(prompts):
    batch = _batch(prompts, [0, 1, 0, 1])
    batch["valid"] = np.asarray([1, 1, 1, 0], np.int32)  # row 3 is padding
    return batch


def test_queue_wait_timeout_skips_unrated_rows(tmp_path):
    store = store_lib.RatingStore(str(tmp_path / "r.sqlite"))
    store.add_rater("alice")
    alice = store.raters()[0]
    lines = []

    def raters(now):  # rows 0 and 1 get rated while the reward waits; row 2 never
        batch = store.live_batch("run-a", 0)
        by_row = {s.row: s for s in store.samples(batch.id)}
        if now >= 2 and store.count_ratings() == 0:
            store.add_rating(alice, by_row[0].id, 0.8, {"empathy": True}, "kind", False)
            store.add_rating(alice, by_row[1].id, 0.3, None, "dismissive", True)

    clock = FakeClock(raters)
    reward, prompts = _reward(store, clock, timeout_s=10.0, log=lines)
    total, parts = reward.for_iteration(0)(_four_rows(prompts), TOKENS, MASK)
    total, parts = np.asarray(total), {k: np.asarray(v) for k, v in parts.items()}

    np.testing.assert_array_equal(parts[reward_protocol.RATED], [1, 1, 0, 0])
    np.testing.assert_allclose(total, [0.8, 0.3 - 2.0, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(parts[reward_protocol.AFTER_CLIP], [0.0, -2.0, 0.0, 0.0])
    np.testing.assert_array_equal(parts["human_unsafe"], [0, 1, 0, 0])
    assert 9.9 <= clock.now <= 11.0, "waited until the timeout, not longer"
    assert any("timeout" in line and "1 unrated ones are skipped" in line for line in lines), lines

    batch = store.live_batch("run-a", 0)
    assert batch.status == "closed" and batch.min_ratings == 1
    samples = store.samples(batch.id)
    assert [s.row for s in samples] == [0, 1, 2], "padding rows are never queued"
    assert samples[0].reply == "w5 w6 w7" and samples[0].token_ids == (5, 6, 7)
    assert samples[0].user_text == "I feel hopeless" and samples[1].problem == "sleep"
    assert [s.used_rated for s in samples] == [True, True, False]
    assert samples[2].used_score is None


def test_waits_until_every_reply_has_k_ratings(tmp_path):
    store = store_lib.RatingStore(str(tmp_path / "r.sqlite"))
    for name in ("a", "b"):
        store.add_rater(name)
    a, b = store.raters()

    def raters(now):
        batch = store.live_batch("run-a", 3)
        for s in store.samples(batch.id):
            for rater, score, at in ((a, 0.2, 1), (b, 0.6, 3)):
                if now >= at and rater.name not in {r.rater for r in store.ratings(batch.id) if r.sample_id == s.id}:
                    store.add_rating(rater, s.id, score)

    clock = FakeClock(raters)
    config = human_reward.HumanRewardConfig(min_ratings=2, timeout_s=100.0, poll_s=1.0)
    reward = human_reward.HumanReward(config, store, "run-a", _decode, guard=_guard, clock=clock.clock,
                                      sleep=clock.sleep, log=lambda line: None)
    prompts = reward.register_samples({"valid": np.ones(1, np.int32)}, [FakeSample("hi")])
    batch = {"valid": np.ones(2, np.int32), "context_id": np.zeros(2, np.int32)}
    total, parts = reward.for_iteration(3)(batch, TOKENS[:2], MASK[:2])
    assert 3 <= clock.now < 5, "stopped waiting as soon as both replies had 2 ratings"
    np.testing.assert_allclose(np.asarray(total), [0.4, 0.4], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(parts["human_ratings"]), [2, 2])
    assert prompts["context_id"].tolist() == [0]


def test_guard_flags_are_stored_with_the_reply(tmp_path):
    store = store_lib.RatingStore(str(tmp_path / "r.sqlite"))
    clock = FakeClock()
    decode = lambda ids: ("I will hurt you" if ids[0] == 8 else "I hear you", None)  # noqa: E731
    config = human_reward.HumanRewardConfig(timeout_s=1.0)
    reward = human_reward.HumanReward(config, store, "run-a", decode, guard=_guard, clock=clock.clock,
                                      sleep=clock.sleep, log=lambda line: None)
    prompts = reward.register_samples({"valid": np.ones(1, np.int32)}, [FakeSample("hi")])
    batch = {"valid": np.ones(2, np.int32), "context_id": np.zeros(2, np.int32)}
    reward.for_iteration(0)(batch, TOKENS[:2], MASK[:2])
    samples = store.samples(store.live_batch("run-a", 0).id)
    assert [s.guard_flag for s in samples] == [False, True]
    assert samples[1].guard_categories == ("reply:harm_encouragement",)
    assert prompts["context_id"].tolist() == [0]


def test_zscore_aggregation_matches_numpy():
    ratings = [Rating(i, sample, rater, name, score, {}, "", False, 0.0)
               for i, (sample, rater, name, score) in enumerate([
                   (1, 1, "a", 0.2), (2, 1, "a", 0.4), (3, 1, "a", 0.9),
                   (1, 2, "b", 0.7), (2, 2, "b", 0.7), (3, 2, "b", 0.7),  # no spread: pooled moments
                   (1, 3, "c", 0.5)])]  # one rating: pooled moments
    moments = human_reward.rater_moments(ratings)
    scores = np.asarray([r.score for r in ratings])
    pooled = (scores.mean(), scores.std())
    a = np.asarray([0.2, 0.4, 0.9])
    assert moments[1] == pytest.approx((a.mean(), a.std()))
    assert moments[2] == pytest.approx(pooled) and moments[3] == pytest.approx(pooled)
    sample1 = [r for r in ratings if r.sample_id == 1]
    expected = np.mean([(0.2 - a.mean()) / a.std(), (0.7 - pooled[0]) / pooled[1], (0.5 - pooled[0]) / pooled[1]])
    assert human_reward.aggregate_scores(sample1, "zscore", moments) == pytest.approx(expected)
    assert human_reward.aggregate_scores(sample1, "mean") == pytest.approx(np.mean([0.2, 0.7, 0.5]))


def test_resumed_run_reattaches_closed_and_open_batches(tmp_path):
    store = store_lib.RatingStore(str(tmp_path / "r.sqlite"))
    store.add_rater("alice")
    alice = store.raters()[0]

    def rate_all(now):
        batch = store.live_batch("run-a", 0)
        for s in store.samples(batch.id):
            if not store.ratings(batch.id) or s.id not in {r.sample_id for r in store.ratings(batch.id)}:
                store.add_rating(alice, s.id, 0.5 + 0.1 * s.row)

    reward, prompts = _reward(store, FakeClock(rate_all))
    first_total, _ = reward.for_iteration(0)(_four_rows(prompts), TOKENS, MASK)

    # A new process after a crash between closing the batch and the checkpoint: same replies, same scores, no wait.
    clock, lines = FakeClock(), []
    again, prompts2 = _reward(store, clock, log=lines)
    total, parts = again.for_iteration(0)(_four_rows(prompts2), TOKENS, MASK)
    np.testing.assert_allclose(np.asarray(total), np.asarray(first_total))
    assert clock.sleeps == 0 and any("re-attached" in line for line in lines)
    assert len(store.batches("run-a")) == 1

    # Iteration 1 is queued, then the process dies while waiting (the sleep raises).
    def die(now):
        raise KeyboardInterrupt

    dying, prompts3 = _reward(store, FakeClock(die))
    with pytest.raises(KeyboardInterrupt):
        dying.for_iteration(1)(_four_rows(prompts3), TOKENS, MASK)
    pending = store.live_batch("run-a", 1)
    assert pending.status == "open"
    for s in store.samples(pending.id):  # raters keep rating while the trainer is down
        store.add_rating(alice, s.id, 0.9)
    clock, lines = FakeClock(), []
    resumed, prompts4 = _reward(store, clock, log=lines)
    total, parts = resumed.for_iteration(1)(_four_rows(prompts4), TOKENS, MASK)
    np.testing.assert_allclose(np.asarray(total), [0.9, 0.9, 0.9, 0.0], rtol=1e-6)
    assert store.live_batch("run-a", 1).id == pending.id and clock.sleeps == 0
    assert [b.iteration for b in store.batches("run-a")] == [0, 1]

    # Replies that differ from the queued ones (nondeterministic regeneration): the old batch is retired.
    store.queue_batch("run-a", 2, 2, 1, [store_lib.NewSample(0, "p", "u", "neutral", "old", None, (1, 2))])
    other, prompts5 = _reward(store, FakeClock(), timeout_s=0.5, log=lines)
    other.for_iteration(2)(_four_rows(prompts5), TOKENS, MASK)
    statuses = {b.id: b.status for b in store.batches("run-a") if b.iteration == 2}
    assert sorted(statuses.values()) == ["closed", "superseded"]
    assert any("retired" in line for line in lines)


def test_validation_uses_the_automatic_reward_alone(tmp_path):
    store = store_lib.RatingStore(str(tmp_path / "r.sqlite"))
    auto = simple_rewards.TargetTokenReward(target_id=5)
    reward, prompts = _reward(store, FakeClock(), auto=auto, auto_weight=0.5)
    batch = _four_rows(prompts)
    total, parts = reward(batch, TOKENS, MASK)
    expected, _ = auto(batch, TOKENS, MASK)
    np.testing.assert_allclose(np.asarray(total), np.asarray(expected))
    assert reward_protocol.RATED not in parts and store.batches() == []
    bare, prompts = _reward(store, FakeClock())
    total, parts = bare(_four_rows(prompts), TOKENS, MASK)
    np.testing.assert_array_equal(np.asarray(total), np.zeros(4))
    assert parts == {}


def test_auto_part_is_mixed_into_rated_rows_only(tmp_path):
    store = store_lib.RatingStore(str(tmp_path / "r.sqlite"))
    store.add_rater("alice")
    alice = store.raters()[0]

    def rate_row0(now):
        batch = store.live_batch("run-a", 0)
        s = store.samples(batch.id)[0]
        if not store.ratings(batch.id):
            store.add_rating(alice, s.id, 1.0)

    auto = simple_rewards.TargetTokenReward(target_id=5)
    reward, prompts = _reward(store, FakeClock(rate_row0), timeout_s=3.0, auto=auto, auto_weight=0.5)
    total, parts = reward.for_iteration(0)(_four_rows(prompts), TOKENS, MASK)
    share = np.asarray(auto(_four_rows(prompts), TOKENS, MASK)[0])
    np.testing.assert_allclose(np.asarray(total), [1.0 + 0.5 * share[0], 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(parts["auto_target_share"]), share)


def test_config_is_checked():
    with pytest.raises(ValueError, match="aggregate"):
        human_reward.HumanRewardConfig(aggregate="median")
    with pytest.raises(ValueError, match="min_ratings"):
        human_reward.HumanRewardConfig(min_ratings=0)


# ------------------------------------------------------------------------------------------ the trainer side


class MaskedReward:
    """A keyed reward whose rows 0..rated-1 are rated; the others hold `junk` (which must not matter)."""

    def __init__(self, rated_rows, junk):
        self.rated_rows, self.junk, self.iterations = rated_rows, junk, []

    def __call__(self, batch, tokens, mask):
        raise AssertionError("training must call for_iteration")

    def for_iteration(self, iteration):
        self.iterations.append(iteration)

        def reward(batch, tokens, mask):
            n = tokens.shape[0]
            rated = (jnp.arange(n) < self.rated_rows).astype(jnp.float32)
            share = jnp.mean((tokens == 5) & (mask != 0), axis=-1).astype(jnp.float32)
            return jnp.where(rated > 0, share, self.junk), {reward_protocol.RATED: rated}

        return reward


@pytest.fixture(scope="module")
def tiny_trainer():
    from therapy_rl import optim, parallel, sampling
    from therapy_rl.models import gpt2
    from therapy_rl.ppo import core, policy, step as ppo_step, trainer

    model = gpt2.GPT2Config(vocab_size=32, n_positions=32, n_embd=32, n_layer=1, n_head=2, dropout_rate=0.0)
    mesh = parallel.make_mesh(parallel.MeshShape(1, 1, 1), jax.devices()[:1])
    spec = policy.PolicySpec(model)
    hyper = ppo_step.PPOHyper(kl=core.KLControllerConfig(init_coef=0.01), num_epochs=2, num_minibatches=1, eos_id=1)
    optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-2, total_steps=100, schedule="constant",
                                                           grad_clip_norm=0.0))
    trunk = jax.device_get(gpt2.init_params(model, jax.random.key(0)))

    def fresh():
        return trainer.init_state(spec, optimizer, hyper.kl, trunk, mesh, jax.random.key(1))

    state, state_sh, ref, ref_sh = fresh()
    sampling_config = sampling.SamplingConfig(max_new_tokens=6, eos_id=1, pad_id=0)

    stages = trainer.build_stages(spec, hyper, sampling_config, optimizer, mesh, state_sh, ref_sh, None,
                                  reward_protocol.ResponseIds(eos_id=1), 8, 4)

    def stages_for(reward):  # the jitted stages do not depend on the reward
        return dataclasses.replace(stages, reward_fn=reward)

    rng = np.random.default_rng(0)
    prompts = {"prompt_ids": rng.integers(2, 32, size=(8, 4)).astype(np.int32),
               "prompt_mask": np.ones((8, 4), np.int32), "therapist_emotion": np.zeros(8, np.int32),
               "valid": np.ones(8, np.int32)}
    return trainer, parallel, mesh, fresh, stages_for, prompts


def _run(tiny_trainer, reward):
    trainer, parallel, mesh, fresh, stages_for, prompts = tiny_trainer
    state, _, ref, _ = fresh()
    before = jax.device_get(state.params)
    result = trainer.run_iteration(stages_for(reward), state, ref, parallel.global_batch_from_host(prompts, mesh))
    return before, jax.device_get(result.state.params), result.metrics


def test_unrated_rows_are_left_out_of_the_update(tiny_trainer):
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    reward = MaskedReward(rated_rows=0, junk=1e3)
    before, after, metrics = _run(tiny_trainer, reward)
    assert reward.iterations == [0], "the reward is asked for the state's iteration"
    assert np.all(np.isfinite(flat(after)))
    np.testing.assert_array_equal(flat(after), flat(before))  # nothing rated: zero gradients, no Adam step
    assert all(np.isfinite(v) for v in metrics.values()), metrics

    _, after_a, metrics_a = _run(tiny_trainer, MaskedReward(rated_rows=5, junk=1e3))
    _, after_b, _ = _run(tiny_trainer, MaskedReward(rated_rows=5, junk=-7.0))
    assert not np.array_equal(flat(after_a), flat(before)), "rated rows do train"
    np.testing.assert_array_equal(flat(after_a), flat(after_b))  # unrated rows' scores never reach the update
    assert abs(metrics_a["objective/scores"]) < 1.0, "the logged mean covers rated rows only"
