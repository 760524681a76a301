"""The combined reward: config parsing, an end-to-end batch against NumPy, switches, and no recompiles."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl import ops
from therapy_rl.data import labels
from therapy_rl.data.labels import EMOTION_GROUP, EMOTIONS
from therapy_rl.data.tokenize import train_bpe_tokenizer
from therapy_rl.rewards import combine as R
from therapy_rl.rewards import components as C
from therapy_rl.rewards.encoder import load_sentence_encoder

CORPUS = ["I hear that you are feeling sad today.", "That sounds really hard for you.", "How does that make you feel?",
          "Please call a crisis line or emergency services right now.", "The market closed higher today.",
          "I lost my job and I cannot sleep.", "You should hurt them back."]
N, L = 48, 32  # response length (policy ids), reply length (MiniLM ids)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe_tokenizer(CORPUS * 4, 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def encoder():
    return load_sentence_encoder()


# ---------------------------------------------------------------------------------------------- stand-ins
# Simple jittable stand-ins for heads/safety, so every number can be recomputed in NumPy here.

def fake_empathy(heads, emb):
    return jax.nn.sigmoid(heads["scale"] * emb[:, 0])


def fake_sentiment(heads, emb):
    return jax.nn.sigmoid(heads["scale"] * emb[:, 1])


def fake_resources(lexicon, ids, mask):
    return jnp.any((ids == lexicon["resource_id"]) & (mask > 0), axis=1).astype(jnp.int32)


def fake_harm(lexicon, ids, mask):
    return jnp.any((ids == lexicon["harm_id"]) & (mask > 0), axis=1).astype(jnp.int32)


TRACES = {"n": 0}


def counting_empathy(heads, emb):
    TRACES["n"] += 1  # runs only while jax traces
    return fake_empathy(heads, emb)


FAKE = R.RewardBackends(counting_empathy, fake_sentiment, fake_resources, fake_harm)


def fake_params(encoder):
    return {"scale": jnp.float32(7.0)}, {"resource_id": jnp.int32(encoder.tokenizer.token_to_id("crisis")),
                                         "harm_id": jnp.int32(encoder.tokenizer.token_to_id("hurt"))}


def make_model(tok, encoder, config, backends=FAKE, heads=None, lexicon=None):
    if heads is None and lexicon is None:
        heads, lexicon = fake_params(encoder)
    return R.RewardModel.create(config, tok, encoder=encoder, heads=heads, lexicon=lexicon, backends=backends,
                                reply_max_length=L)


def response_ids(tok, rows):
    """rows: (text, tag) -> right-padded [B,N] ids/mask of `text <therapist_emotion> tag <eos>`."""
    m = tok.marker_ids
    ids = np.full((len(rows), N), tok.pad_id, np.int32)
    mask = np.zeros((len(rows), N), np.int32)
    for i, (text, tag) in enumerate(rows):
        r = tok.encode_text(text)
        if tag is not None:
            r += [m[labels.THERAPIST_EMOTION], tok.emotion_id(tag)]
        r += [m[labels.EOS]]
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


USERS = ["I lost my job and I cannot sleep.", "I want to end it all tonight.", "My sister got married, I am happy.",
         "I feel nothing anymore.", "Work is fine I guess.", "Nobody listens to me."]
REPLIES = [("That sounds really hard for you.", "neutral"), ("It will pass.", "joy"),
           ("How does that make you feel?", "joy"), ("", "sadness"), ("The market closed higher today.", None),
           ("Please call a crisis line now.", "neutral")]
USER_EMOTION = ["sadness", "depression", "joy", "depression", "neutral", "anger"]
THERAPIST_EMOTION = ["neutral", "neutral", "joy", "sadness", "neutral", "neutral"]
USER_CRISIS = [0, 1, 0, 0, 0, 1]
VALID = [1, 1, 1, 1, 1, 0]  # the last row is padding


def fields(encoder, valid=VALID):
    return {"user_embedding": encoder.embed(USERS), "user_emotion": np.array([EMOTIONS.index(e) for e in USER_EMOTION]),
            "therapist_emotion": np.array([EMOTIONS.index(e) for e in THERAPIST_EMOTION]),
            "user_crisis": np.array(USER_CRISIS, np.int32), "valid": np.array(valid, np.int32)}


# ---------------------------------------------------------------------------------------------- references

def ref_emotion(g, t):
    if g is None:
        return -7.0
    s = 1.0
    if g == t:
        return s + (1.0 if t == "neutral" else 6.0)
    gg, tg = EMOTION_GROUP[g], EMOTION_GROUP[t]
    if gg == tg:
        return s + (1.0 if tg == "neutral" else 3.0)
    if {gg, tg} == {"negative", "positive"}:
        return s - 5.0
    return s - 1.0


def ref_steps(x):
    for th, v in zip(C.RELEVANCE_THRESHOLDS, C.RELEVANCE_VALUES):
        if x < float(np.float32(th)):
            return v
    return C.RELEVANCE_VALUES[-1]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_scores(tok, encoder, cfg, ids, mask, f):
    """Every component recomputed on the host, with NumPy and the encoder's own `embed` on the decoded text."""
    texts = [text for text, _ in REPLIES]
    reply_emb = encoder.embed(texts).astype(np.float64)
    user_emb = f["user_embedding"].astype(np.float64)
    cos = (reply_emb * user_emb).sum(-1) / np.linalg.norm(reply_emb, axis=-1) / np.linalg.norm(user_emb, axis=-1)
    tables = C.build_policy_tables(tok)
    quality = np.asarray(C.quality_score(tables, ids, mask, cfg.quality), np.float64)
    rows = []
    for i, (text, tag) in enumerate(REPLIES):
        r = {"quality": quality[i] if cfg.use_quality else 0.0}
        r["emotion"] = ref_emotion(tag, THERAPIST_EMOTION[i]) if cfg.use_emotion else 0.0
        r["penalty"] = (-1.5 if (EMOTION_GROUP[USER_EMOTION[i]] == "negative" and tag == "joy") else 0.0) \
            if cfg.use_penalty else 0.0
        if cfg.relevance_mode == "steps":
            rel = ref_steps(float(np.float32(cos[i])))
        else:
            rel = float(np.interp(cos[i], (0.0,) + C.RELEVANCE_THRESHOLDS, C.RELEVANCE_VALUES))
        r["relevance"] = rel if cfg.use_relevance else 0.0
        r["empathy"] = (sigmoid(7.0 * reply_emb[i, 0]) * 1.1 - 0.5) if cfg.use_empathy else 0.0
        r["sentiment"] = (sigmoid(7.0 * reply_emb[i, 1]) * 1.1 - 0.5) if cfg.use_sentiment else 0.0
        resources = "crisis" in text.lower()
        harm = "hurt" in text.lower()
        r["safety"] = ((-cfg.missing_resources_weight if (USER_CRISIS[i] and not resources) else 0.0)
                       - (cfg.encourages_harm_weight if harm else 0.0)) if cfg.use_safety else 0.0
        base = (cfg.quality_weight * r["quality"] + cfg.emotion_weight * r["emotion"]
                + cfg.relevance_weight * r["relevance"] + cfg.sentiment_weight * r["sentiment"]
                + cfg.empathy_weight * r["empathy"] + cfg.penalty_weight * r["penalty"])
        if cfg.safety_after_clip:
            total = np.clip(base, cfg.clip_min, cfg.clip_max) + r["safety"]
        else:
            total = np.clip(base + r["safety"], cfg.clip_min, cfg.clip_max)
        r["total_raw"] = total * VALID[i]
        r["cosine"] = cos[i]
        rows.append(r)
    raw = np.array([r["total_raw"] for r in rows])
    v = np.array(VALID, np.float64)
    mean = (raw * v).sum() / v.sum()
    var = (v * (raw - mean) ** 2).sum() / v.sum()
    total = (raw - mean) / np.sqrt(var + cfg.whiten_eps) * v if cfg.whiten else raw
    return rows, total


def check_against_reference(tok, encoder, cfg):
    model = make_model(tok, encoder, cfg)
    ids, mask = response_ids(tok, REPLIES)
    f = fields(encoder)
    total, comps = model.score(f, ids, mask, tok.decode)
    rows, want_total = reference_scores(tok, encoder, cfg, ids, mask, f)
    for i, r in enumerate(rows):
        for name in ("quality", "emotion", "penalty", "relevance", "empathy", "sentiment", "safety", "total_raw"):
            want = r[name] * VALID[i]
            np.testing.assert_allclose(float(comps[name][i]), want, atol=2e-4, err_msg=f"row {i} {name}")
    np.testing.assert_allclose(np.asarray(total), want_total, atol=2e-4)
    return model, comps


# ---------------------------------------------------------------------------------------------- tests

def test_config_defaults_and_from_dict():
    cfg = R.RewardConfig()
    assert (cfg.quality_weight, cfg.emotion_weight, cfg.relevance_weight, cfg.sentiment_weight,
            cfg.empathy_weight, cfg.penalty_weight) == (1.1, 1.2, 1.1, 0.7, 0.7, 1.0)
    assert (cfg.clip_min, cfg.clip_max, cfg.whiten) == (-10.0, 10.0, True)
    assert cfg.quality.length_rule == "range" and cfg.relevance_mode == "steps"
    got = R.reward_config_from_dict({"emotion_weight": 2, "use_safety": False, "relevance_mode": "smooth",
                                     "quality": {"length_rule": "paper", "paper_banned_words": ["ok"]},
                                     "emotion_scores": {"missing": -9}})
    assert got.emotion_weight == 2.0 and isinstance(got.emotion_weight, float)
    assert got.quality.length_rule == "paper" and got.quality.paper_banned_words == ("ok",)
    assert got.emotion_scores.missing == -9.0 and not got.use_safety
    hash(got)  # static jit argument
    ml_collections = pytest.importorskip("ml_collections")
    cd = ml_collections.ConfigDict({"whiten": False, "quality": {"min_chars": 5}})
    assert R.reward_config_from_dict(cd).quality.min_chars == 5
    with pytest.raises(ValueError, match="'emotion_wieght'"):
        R.reward_config_from_dict({"emotion_wieght": 1.0})
    with pytest.raises(ValueError, match="quality.*'length_rul'"):
        R.reward_config_from_dict({"quality": {"length_rul": "paper"}})
    with pytest.raises(ValueError, match="'whiten' must be a bool"):
        R.reward_config_from_dict({"whiten": "yes"})
    with pytest.raises(ValueError, match="relevance_mode"):
        R.reward_config_from_dict({"relevance_mode": "cubic"})


def test_end_to_end_batch_matches_numpy(tok, encoder):
    model, comps = check_against_reference(tok, encoder, R.RewardConfig())
    # padding row: every output is 0; the degenerate empty reply is flagged; the tag-less reply is counted
    assert all(float(v[5]) == 0.0 for v in comps.values())
    assert float(comps["degenerate"][3]) == 1.0 and float(comps["quality"][3]) == -10.0
    assert float(comps["tag_missing"][4]) == 1.0 and float(comps["emotion"][4]) == -7.0
    # the host step decodes exactly the reply text
    ids, mask = response_ids(tok, REPLIES)
    assert model.reply_texts(ids, mask, tok.decode) == [t for t, _ in REPLIES]


def test_variant_config_matches_numpy(tok, encoder):
    cfg = R.RewardConfig(relevance_mode="smooth", safety_after_clip=False, whiten=False, emotion_weight=3.0,
                         missing_resources_weight=2.0, quality=C.QualityConfig(length_rule="paper"))
    check_against_reference(tok, encoder, cfg)


def test_switches_off_skip_work(tok, encoder):
    cfg = R.RewardConfig(use_relevance=False, use_sentiment=False, use_empathy=False, use_safety=False,
                         use_penalty=False, whiten=False)
    assert not cfg.needs_reply_embedding
    _, comps = check_against_reference(tok, encoder, cfg)
    for name in ("relevance", "sentiment", "empathy", "safety", "penalty"):
        assert not np.asarray(comps[name]).any(), name
    assert "cosine" not in comps


def test_whitening_ignores_padding_rows():
    x = jnp.asarray([1.0, 2.0, 3.0, 100.0])
    out = np.asarray(ops.masked_whiten(x, jnp.asarray([1, 1, 1, 0]), unbiased=False, masked_value=0.0))
    ref = (np.array([1.0, 2.0, 3.0]) - 2.0) / np.sqrt(2.0 / 3.0 + 1e-8)
    np.testing.assert_allclose(out[:3], ref, rtol=1e-5)
    assert out[3] == 0.0
    # a single valid row gives 0 rather than NaN
    assert np.isfinite(np.asarray(ops.masked_whiten(x, jnp.asarray([0, 1, 0, 0]), unbiased=False))).all()


def test_compiles_once_for_a_batch_shape(tok, encoder):
    """Three batches with different texts, tags, labels and masks reuse one compiled executable."""
    model = make_model(tok, encoder, R.RewardConfig())
    rng = np.random.default_rng(0)
    words = "I hear you feel sad that sounds hard how does make job sleep call crisis line hurt".split()
    sizes, traces = [], []
    for step in range(3):
        rows = [(" ".join(rng.choice(words, int(rng.integers(0, 9)))), EMOTIONS[int(rng.integers(0, 7))])
                for _ in range(len(REPLIES))]
        ids, mask = response_ids(tok, rows)
        f = fields(encoder, valid=[1] * (len(REPLIES) - step) + [0] * step)
        f["user_emotion"] = rng.integers(0, 7, len(REPLIES))
        total, _ = model.score(f, ids, mask, tok.decode)
        assert np.isfinite(np.asarray(total)).all()
        sizes.append(R.reward_fn_jit._cache_size())
        traces.append(TRACES["n"])
    assert sizes[0] == sizes[1] == sizes[2], sizes
    assert traces[0] == traces[1] == traces[2] >= 1, traces


def test_real_heads_and_safety_backends(tok, encoder):
    """The real heads (random init) and the real safety lexicon plug in; safety matches the lexicon calls."""
    heads_lib = pytest.importorskip("therapy_rl.rewards.heads")
    safety = pytest.importorskip("therapy_rl.rewards.safety")
    heads = heads_lib.init_reward_heads(jax.random.key(3))
    lexicon = safety.build_safety_lexicon(encoder.tokenizer)
    model = R.RewardModel.create(R.RewardConfig(use_guard=True), tok, encoder=encoder, heads=heads, lexicon=lexicon,
                                 reply_max_length=L)
    ids, mask = response_ids(tok, REPLIES)
    f = fields(encoder)
    total, comps = model.score(f, ids, mask, tok.decode)
    texts = [t for t, _ in REPLIES]
    # crisis users: row 1 gets "It will pass." (no crisis resources: -5); row 5 is padding. A reply is harmful when
    # the lexicon or the learned guard (therapy_rl/guard.py, loaded with the real backends) flags it.
    from therapy_rl import guard as guard_lib

    assert model.params.guard is not None
    minilm_ids, minilm_mask = encoder.tokenize(texts, L)
    lexicon_harm = np.asarray(safety.encourages_harm(lexicon, minilm_ids, minilm_mask))
    learned = np.asarray(guard_lib.reply_harm_scores(model.params.guard, encoder.config, encoder.params, minilm_ids,
                                                     minilm_mask)["flag"])
    harm = np.maximum(lexicon_harm, learned) * np.asarray(VALID)
    assert not lexicon_harm.any() and harm[[0, 2]].sum() == 0  # "That sounds really hard", "How does that make..."
    np.testing.assert_allclose(np.asarray(comps["reply_harm"]), harm, atol=1e-6)
    want = (np.asarray([0.0, -5.0, 0.0, 0.0, 0.0, 0.0]) - 10.0 * harm) * np.asarray(VALID)
    np.testing.assert_allclose(np.asarray(comps["safety"]), want, atol=1e-6)
    no_guard = R.RewardModel.create(R.RewardConfig(use_guard=False), tok, encoder=encoder, heads=heads,
                                    lexicon=lexicon, reply_max_length=L)
    assert no_guard.params.guard is None
    _, plain = no_guard.score(f, ids, mask, tok.decode)
    np.testing.assert_allclose(np.asarray(plain["safety"]), [0.0, -5.0, 0.0, 0.0, 0.0, 0.0], atol=1e-6)
    emb = encoder.embed(texts)
    np.testing.assert_allclose(np.asarray(comps["empathy"])[:5],
                               (np.asarray(heads_lib.empathy_probability(heads, emb)) * 1.1 - 0.5)[:5], atol=1e-4)
    np.testing.assert_allclose(np.asarray(comps["sentiment"])[:5],
                               (np.asarray(heads_lib.sentiment_positive_probability(heads, emb)) * 1.1 - 0.5)[:5],
                               atol=1e-4)


def test_user_features(tok, encoder):
    """User-side features: the encoder's embedding and the backend's crisis flag on MiniLM ids."""
    def fake_crisis(lexicon, heads, ids, mask, emb):
        return jnp.any((ids == lexicon["harm_id"]) & (mask > 0), axis=1).astype(jnp.int32)

    backends = dataclasses.replace(FAKE, crisis_flags=fake_crisis)
    model = make_model(tok, encoder, R.RewardConfig(), backends=backends)
    users = USERS + ["They hurt me.", "hurt"]
    feats = model.user_features(users, batch_size=4)
    np.testing.assert_allclose(feats["user_embedding"], encoder.embed(users), atol=1e-6)
    np.testing.assert_array_equal(feats["user_crisis"], [0, 0, 0, 0, 0, 0, 1, 1])
    assert feats["user_crisis"].dtype == np.int32


def test_report_command_on_bundled_sample(tmp_path):
    """The report CLI (tools/reward_report.py) end to end on the package's bundled sample (no dataset needed), tiny
    shapes."""
    import io
    import sys

    from conftest import REPO_ROOT

    if REPO_ROOT not in sys.path:  # tools/ is beside the package, not in it
        sys.path.insert(0, REPO_ROOT)
    from tools import reward_report as report

    out = tmp_path / "report.json"
    stream = io.StringIO()
    result = report.run_report(data_dir=None, split="val", limit=6, vocab_size=600, batch_size=8,
                               response_length=48, reply_max_length=32, out=str(out), stream=stream)
    text = stream.getvalue()
    for name in ("reference", "reference_no_tag", *report.DEGENERATE_REPLIES):
        assert name in result["summary"] and name in text
    assert result["samples"] == 6 and out.is_file()
    summary = result["summary"]
    # the empty and symbol-only replies are degenerate everywhere; the tag-less reference loses the tag score
    assert summary["empty"]["quality"]["mean"] == -10.0 and summary["symbols"]["quality"]["std"] == 0.0
    assert summary["reference_no_tag"]["emotion"]["mean"] == -7.0
    assert summary["reference"]["total_raw"]["mean"] > summary["empty"]["total_raw"]["mean"]


def test_score_rejects_bad_shapes(tok, encoder):
    model = make_model(tok, encoder, R.RewardConfig())
    ids, mask = response_ids(tok, REPLIES)
    f = fields(encoder)
    with pytest.raises(KeyError, match="user_embedding"):
        model.score({k: v for k, v in f.items() if k != "user_embedding"}, ids, mask, tok.decode)
    with pytest.raises(ValueError, match="'user_emotion' has shape"):
        model.score({**f, "user_emotion": f["user_emotion"][:3]}, ids, mask, tok.decode)
    with pytest.raises(ValueError, match="same"):
        model.score(f, ids, mask[:, :10], tok.decode)


def test_safety_penalty_survives_every_clip_up_to_gae(tok, encoder):
    """Two identical degenerate replies with base -12 (quality -10 x 1.2), one to a crisis user (safety -5, no
    crisis resources): the crisis row scores below the other after combine's clip, the PPO adapter, the PPO
    step's score clip + whitening, and in the token rewards and advantages fed to / out of GAE."""
    from types import SimpleNamespace

    from therapy_rl import parallel
    from therapy_rl.ppo import core, step as ppo_step, trainer
    from therapy_rl.rewards import protocol as reward_protocol

    def fake_crisis(lexicon, heads, ids, mask, emb):
        return jnp.any((ids == lexicon["harm_id"]) & (mask > 0), axis=1).astype(jnp.int32)

    cfg = R.RewardConfig(quality_weight=1.2, use_emotion=False, use_relevance=False, use_sentiment=False,
                         use_empathy=False, use_penalty=False, whiten=False)
    model = make_model(tok, encoder, cfg, backends=dataclasses.replace(FAKE, crisis_flags=fake_crisis))
    reward = reward_protocol.TherapyReward(model=model, decode_fn=tok.decode)
    users = ["They hurt me.", "Work is fine I guess.", "I lost my job.", "Nobody listens to me."]
    replies = [("", "neutral"), ("", "neutral"), ("That sounds really hard for you.", "neutral"),
               ("How does that make you feel?", "neutral")]
    n = len(users)
    prompts = reward.register_prompts({"valid": np.ones(n, np.int32), "user_emotion": np.zeros(n, np.int32),
                                       "therapist_emotion": np.zeros(n, np.int32)}, users)
    ids, mask = response_ids(tok, replies)
    mesh = parallel.make_mesh(parallel.MeshShape(1, 1, 1), jax.devices()[:1])
    batch = parallel.global_batch_from_host(prompts, mesh)
    tokens, mask = jnp.asarray(ids), jnp.asarray(mask)

    # combine: base clipped to -10, then the penalty
    total, comps = reward(batch, tokens, mask)
    np.testing.assert_allclose(np.asarray(comps["quality"])[:2], [-10.0, -10.0])
    np.testing.assert_allclose(np.asarray(comps["safety"]), [-5.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(np.asarray(total)[:2], [-15.0, -10.0], atol=1e-5)
    # the trainer's split: the penalty travels to the update beside the raw score, never as a logged component
    raw, after_clip, logged = trainer._score_reward(SimpleNamespace(reward_fn=reward, mesh=mesh), batch, tokens, mask)
    np.testing.assert_allclose(np.asarray(after_clip), [-5.0, 0.0, 0.0, 0.0])
    assert reward_protocol.AFTER_CLIP not in logged and "safety" in logged

    # the PPO step: score clip to [-10, 10], whitening, then token rewards, GAE and whitened advantages
    hyper = ppo_step.PPOHyper(score_clip=10.0)
    valid = batch["valid"]
    scores = ppo_step.process_scores(raw, tokens, mask, valid, hyper, after_clip=after_clip)
    zeros = jnp.zeros(tokens.shape, jnp.float32)
    targets = core.rollout_targets(scores, zeros, zeros, zeros, mask, jnp.float32(0.2), gamma=hyper.gamma,
                                   lam=hyper.lam, whiten_advantages=True)
    s = np.asarray(scores)
    assert s[0] < s[1] - 0.1, s
    real = np.asarray(mask)[0] == 1
    np.testing.assert_array_equal(real, np.asarray(mask)[1] == 1)  # same reply: same tokens and mask
    rewards, advantages = np.asarray(targets.rewards), np.asarray(targets.advantages)
    assert rewards[0, real].sum() < rewards[1, real].sum() - 0.1
    assert np.all(advantages[0, real] < advantages[1, real]), advantages[:2]
    # without the split, the step's clip erases the penalty: both rows get the same score
    erased = np.asarray(ppo_step.process_scores(raw, tokens, mask, valid, hyper))
    assert erased[0] == erased[1]


def test_ppo_therapy_reward_refuses_its_own_whitening(tok):
    """The PPO step whitens over the global batch; the reward's own whitening would see one process's rows."""
    from therapy_rl.errors import ConfigError
    from therapy_rl.rewards import protocol as reward_protocol

    with pytest.raises(ConfigError, match="config.reward.therapy.whiten"):
        reward_protocol.therapy_reward({"whiten": True}, tok)
