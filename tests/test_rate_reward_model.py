"""The learned human reward: Spearman and ridge against SciPy/NumPy, a fit on synthetic ratings that beats the
baselines on held-out replies, the jitted reward on policy token ids, and the train-rm / export-unsafe commands."""

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import scipy.stats

from rate_helpers import REPO_ROOT
from therapy_rl.rate import reward_model, store as store_lib

WARM = ["I hear how heavy this feels", "That sounds really painful", "It makes sense that you feel worn down",
        "Thank you for telling me this", "I'm sorry you're carrying so much"]
WARM_TAIL = ["you're not alone in this.", "would you like to tell me more about what has been happening?",
             "what has helped you a little in hard weeks before?", "we can look at this together, one step at a time."]
COLD = ["Just get over it", "Everyone feels sad sometimes, stop complaining", "That's not a real problem",
        "You should simply think positive", "Cheer up, it could be worse"]
COLD_TAIL = ["and move on.", "honestly.", "there is nothing to talk about.",
             "people have much bigger problems than you and they manage to cope without any fuss at all."]


def _synthetic_store(path):
    """Warm replies rated high, dismissive ones low (unsafe now and then), from two raters."""
    rng = np.random.default_rng(0)
    store = store_lib.RatingStore(path)
    for name in ("a", "b"):
        store.add_rater(name)
    raters = store.raters()
    replies = [(f"{w}, {t}", 0.85) for w in WARM for t in WARM_TAIL] + [(f"{c} {t}", 0.15) for c in COLD
                                                                           for t in COLD_TAIL]
    batch = store.queue_batch("synthetic", 0, 0, 1, [
        store_lib.NewSample(i, "depression", "I'm feeling depressed and hopeless. Can you help me?", "depression",
                            text, None, (i,)) for i, (text, _) in enumerate(replies)])
    for sample, (_, level) in zip(store.samples(batch.id), replies):
        for rater in raters:
            score = float(np.clip(level + rng.normal(0, 0.08), 0, 1))
            store.add_rating(rater, sample.id, score, unsafe=bool(level < 0.5 and rng.uniform() < 0.2))
    return store, replies


@pytest.fixture(scope="module")
def encoder():
    from therapy_rl.rewards.encoder import load_sentence_encoder

    return load_sentence_encoder()


def test_spearman_and_ridge_match_references():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30)
    b[:5] = b[5]  # ties
    assert reward_model.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, rel=1e-12)
    assert np.isnan(reward_model.spearman(a, np.ones(30)))
    x, y = rng.normal(size=(40, 6)), rng.normal(size=40)
    w, bias = reward_model.fit_ridge(x, y, 0.0)
    reference = np.linalg.lstsq(np.c_[x, np.ones(40)], y, rcond=None)[0]
    np.testing.assert_allclose(np.r_[w, bias], reference, rtol=1e-8, atol=1e-10)
    w2, _ = reward_model.fit_ridge(x, y, 10.0)
    xc, yc = x - x.mean(0), y - y.mean()
    np.testing.assert_allclose(w2, np.linalg.solve(xc.T @ xc + 10 * np.eye(6), xc.T @ yc), rtol=1e-10)


def test_fit_beats_baselines_and_scores_policy_tokens(tmp_path, encoder):
    store, replies = _synthetic_store(str(tmp_path / "r.sqlite"))
    data = reward_model.rated_data(store)
    assert data.num_ratings == 2 * len(replies) and np.all(data.targets[data.targets < 0.5] >= 0)
    report = reward_model.train_reward_model(store, str(tmp_path / "rm"), encoder=encoder, seed=0)
    held = report["heldout"]
    print(json.dumps(report, indent=1))
    assert report["num_heldout"] == 8 and report["num_replies"] == 40
    assert held["spearman_model"] > 0.6
    assert held["spearman_model"] > (held["spearman_length_baseline"] or 0.0) + 0.3
    assert held["mae_model"] < held["mae_mean_baseline"]
    assert json.loads((tmp_path / "rm" / "report.json").read_text())["alpha"] == report["alpha"]

    # The RewardFn on policy token ids: ids -> text (a stand-in tokenizer) -> MiniLM -> head, jitted.
    texts = {1: "I hear how heavy this feels, would you like to tell me more?", 2: "Just get over it and move on.",
             3: "That sounds really painful; you're not alone."}
    cfg = ml_collections.ConfigDict({"model_path": str(tmp_path / "rm" / reward_model.MODEL_FILE), "scale": 2.0})

    class Tok:  # decode_reply needs marker ids; a plain object keeps the test on the reward's own path
        pass

    reward = reward_model.learned_reward(cfg, Tok(), encoder=encoder)
    reward.decode_fn = lambda ids: texts[ids[0]]
    prompts = reward.register_prompts({"valid": np.ones(3, np.int32)}, ["I'm feeling depressed and hopeless."] * 3)
    assert prompts["rm_user_id"].tolist() == [0, 0, 0] and len(reward.user_texts) == 1
    batch = {"valid": np.asarray([1, 1, 1, 0], np.int32), "rm_user_id": np.zeros(4, np.int32)}
    tokens = np.asarray([[1, 0], [2, 0], [3, 0], [1, 0]], np.int32)
    mask = np.asarray([[1, 0], [1, 0], [1, 0], [1, 0]], np.int32)
    total, parts = reward(batch, tokens, mask)
    predicted = np.asarray(parts["learned_human"])
    head = reward_model.load_head(cfg.model_path)
    user = encoder.embed(["I'm feeling depressed and hopeless."])
    expected = reward_model.features(encoder.embed([texts[1], texts[2], texts[3]]), user) @ head.w + head.b
    np.testing.assert_allclose(predicted[:3], expected, atol=2e-4)
    assert predicted[3] == 0.0, "padding rows score 0"
    np.testing.assert_allclose(np.asarray(total), 2.0 * predicted)
    assert predicted[0] > predicted[1] + 0.3 and predicted[2] > predicted[1] + 0.3


def test_learned_reward_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model_path is empty"):
        reward_model.learned_reward(ml_collections.ConfigDict({"model_path": "", "scale": 1.0}), None)
    with pytest.raises(FileNotFoundError, match="train-rm"):
        reward_model.load_head(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", format_version=np.asarray(1), w=np.zeros(3))
    with pytest.raises(ValueError, match="missing field"):
        reward_model.load_head(str(tmp_path / "bad.npz"))


def test_train_rm_and_export_unsafe_commands(tmp_path):
    workdir = str(tmp_path)
    store, _ = _synthetic_store(store_lib.store_path(workdir))
    out = subprocess.run([sys.executable, "-m", "therapy_rl.rate", "train-rm", "--workdir", workdir],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Spearman: model" in out.stdout and "length baseline" in out.stdout
    assert (tmp_path / "reward_model" / "reward_model.npz").is_file()
    out = subprocess.run([sys.executable, "-m", "therapy_rl.rate", "export-unsafe", "--workdir", workdir],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (tmp_path / "unsafe_replies.jsonl").read_text().splitlines()]
    flagged = {s.id for s, ratings in store.rated_samples() if any(r.unsafe for r in ratings)}
    assert flagged and {r["sample_id"] for r in records} == flagged
    assert all(r["label"] == "harmful" and r["role"] == "reply" and r["history"] and r["flagged_by"]
               for r in records)
    empty = tmp_path / "empty"
    store_lib.RatingStore.in_workdir(str(empty))
    out = subprocess.run([sys.executable, "-m", "therapy_rl.rate", "train-rm", "--workdir", str(empty)],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 2 and "needs at least 10" in out.stderr


def test_ppo_trains_on_the_learned_reward(quickstart_sft_workdir, tmp_path, encoder):
    """reward.kind = learned_human: the trainer builds the fitted head as its reward and logs it."""
    import os

    store, _ = _synthetic_store(str(tmp_path / "r.sqlite"))
    reward_model.train_reward_model(store, str(tmp_path / "rm"), encoder=encoder)
    workdir = str(tmp_path / "ppo")
    command = [sys.executable, "-m", "therapy_rl.main", "--config", "configs/ppo_human_fixed_prompt.py",
               "--workdir", workdir, f"--config.init_from={quickstart_sft_workdir}", "--config.max_iterations=1",
               "--config.reward.kind=learned_human",
               f"--config.reward.learned_human.model_path={tmp_path / 'rm' / reward_model.MODEL_FILE}",
               "--config.eval_at_start=False", "--config.eval_batch_size=4", "--config.num_sample_replies=0",
               "--config.progress_bar=False", "--config.sampling.max_new_tokens=16", "--config.ppo.num_ppo_epochs=1"]
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if "reward/learned_human" in r and "objective/scores" in r]
    assert len(train) == 1 and np.isfinite(train[0]["reward/learned_human"])
    assert train[0]["objective/scores"] == pytest.approx(train[0]["reward/learned_human"], rel=1e-5)
    assert any("eval/reward/learned_human" in r for r in records), "validation uses the learned reward too"
