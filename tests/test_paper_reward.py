"""The paper's reward pieces (rewards/paper_code.py and the switches that select them) against a plain-Python
reference written here from NOTES.md's formulas, independently of the module (different data structures)."""
import collections
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl import defaults
from therapy_rl.data.labels import EMOTION_GROUP, EMOTIONS
from therapy_rl.rewards import combine as R
from therapy_rl.rewards import components as C
from therapy_rl.rewards import paper_code as P

# ------------------------------------------------------------------------------------------- reference

SHORT_WORDS = {"yes", "no", "ok", "thank", "thanks"}


def ref_window_penalty(words, n, window, weight):
    total = 0.0
    if len(words) < n:
        return total
    starts = range(0, max(0, len(words) - window + 1))
    for s in starts:
        grams = collections.Counter(zip(*(words[s + k:s + window] for k in range(n))))
        total += sum(weight * math.pow(c - 1, 1.5) for c in grams.values() if c >= 2)
    return total


def ref_overuse(words):
    keys = collections.Counter("".join(ch for ch in w.lower() if ch.isalnum() or ch == "_") for w in words)
    return sum(min(8.0, 1.5 * math.pow(c - 1, 1.7)) for k, c in keys.items() if len(k) > 3 and c > 4)


def ref_meaningless(text):
    t = text.strip()
    if not t or not any(c.isascii() and c.isalpha() for c in t):
        return True
    if all(not (c.isalnum() or c == "_") for c in t):
        return True
    if len(t) >= 5 and len(set(t.lower())) == 1 and "\n" not in t:
        return True
    run = 0
    for c in t:  # 3+ non-ASCII in a row
        run = run + 1 if ord(c) > 127 else 0
        if run >= 3:
            return True
    if any(len(line) >= 100 for line in t.split("\n")):
        return True
    tokens = re.split(r"[^\w]+", t.lower())
    return any(tok in SHORT_WORDS for tok in tokens)


def ref_quality(text):
    if ref_meaningless(text):
        return -10.0
    w = text.split()
    q = 2.0 - ref_window_penalty(w, 2, 6, 4.0) - ref_window_penalty(w, 3, 5, 6.0) - ref_overuse(w)
    return max(-10.0, min(8.0, q))


TEXTS = [
    "I know. I know. I know. I know.", "", "   ", "!!!!", "aaaaa", "I", "ok", "Okay, go on.", "Thanks.",
    "Thank you for telling me.", "No.", "I don't know what to say.", "Nobody knows.", "yes, I see",
    "How does that make you feel? How does that make you feel? How does that make you feel?",
    "really really really really really really", "the the the the the the the",
    "It sounds like work has been really hard, and home has been hard too.",
    "x" * 99, "word " * 25, "café au lait is nice", "日本語のテキスト", "That's... hard.",
    "Feel feel feel feel feel, feel.", "So you feel that nobody listens. So you feel that nobody listens.",
    "Well, you know, I think that what you are saying is that you feel like nobody really listens to you.",
    "Mm-hmm.", "Tell me more.\nTell me more.\nTell me more.", "What do you want? What do you want?",
]


@pytest.mark.parametrize("text", TEXTS)
def test_quality_matches_reference(text):
    assert P.quality(text) == pytest.approx(ref_quality(text), abs=1e-9), text


def test_quality_examples_from_the_issue():
    assert P.quality("I know. I know. I know. I know.") == -10.0
    # bigram (I, know.) x3 and (know., I) x2 in each of the 3 six-word windows: 3 * (2^1.5*4 + 4) = 45.9
    assert P.ngram_repetition("I know. I know. I know. I know.".split(), 2, 6, 4.0) == pytest.approx(
        3 * (2 ** 1.5 * 4 + 4))
    assert P.quality("Thanks.") == -10.0 and P.quality("no") == -10.0 and P.quality("x" * 100 + " a") == -10.0
    assert P.quality("Tell me about your week.") == 2.0
    # over-use: "feel" 6 times -> min(5^1.7 * 1.5, 8) = 8, and windows repeat it too
    assert P.overuse_penalty("feel feel feel feel feel feel".split()) == 8.0
    assert P.overuse_penalty("word word word word".split()) == 0.0  # 4 times is allowed
    assert P.overuse_penalty("word " .split() * 5) == pytest.approx(min(4 ** 1.7 * 1.5, 8))


def test_relevance_cleaning_and_fallbacks():
    assert P.clean_for_relevance("It's OK, really!") == "it s ok  really"
    assert P.relevance_fallback("") == -8.0 and P.relevance_fallback("?!") == -5.0
    assert math.isnan(P.relevance_fallback("Hello there."))
    assert P.relevance_fallback("Hi", "") == -8.0 and P.relevance_fallback("Hi", "...") == -5.0


def ref_emotion(generated, target, absolute):
    group = EMOTION_GROUP
    if generated is None:
        return -7.0
    if generated not in EMOTIONS:
        return -6.0
    if generated == target:
        return 1.0 + (1.0 if group[target] == "neutral" else 6.0)
    if group[generated] == group[target]:
        return 1.0 + (1.0 if group[target] == "neutral" else 3.0)
    if {group[generated], group[target]} == {"positive", "negative"}:
        return -5.0 if absolute else 1.0 - 5.0
    return 1.0 - 1.0


@pytest.mark.parametrize("absolute", [False, True])
def test_emotion_table_matches_reference(absolute):
    table = C.emotion_score_matrix(C.EmotionScores(conflict_absolute=absolute))
    for t, target in enumerate(EMOTIONS):
        assert table[0, t] == ref_emotion(None, target, absolute)
        assert table[1, t] == ref_emotion("bogus", target, absolute)
        for g, gen in enumerate(EMOTIONS):
            assert table[2 + g, t] == ref_emotion(gen, target, absolute), (gen, target)
    joy, sad = EMOTIONS.index("joy"), EMOTIONS.index("sadness")
    got = C.emotion_alignment(jnp.array([joy, sad]), jnp.array([sad, joy]), C.EmotionScores(conflict_absolute=absolute))
    np.testing.assert_allclose(np.asarray(got), [-5.0, -5.0] if absolute else [-4.0, -4.0])


def test_config_switches_parse_and_validate():
    t = defaults.ppo_defaults().reward.therapy
    cfg = R.reward_config_from_dict(t)
    assert cfg.quality.formula == "tokens" and cfg.relevance_text == "raw" and not cfg.emotion_scores.conflict_absolute
    t.quality.formula, t.relevance_text, t.emotion_scores.conflict_absolute = "paper_code", "paper_clean", True
    cfg = R.reward_config_from_dict(t)
    assert cfg.quality.formula == "paper_code" and cfg.relevance_text == "paper_clean"
    assert cfg.emotion_scores.conflict_absolute
    with pytest.raises(ValueError, match="formula"):
        C.QualityConfig(formula="papr")
    with pytest.raises(ValueError, match="relevance_text"):
        R.RewardConfig(relevance_text="clean")


def test_reward_model_uses_the_host_pieces(tmp_path):
    """paper_code quality and cleaned relevance reach the jitted reward (stand-in heads, real MiniLM)."""
    from therapy_rl.data import labels
    from therapy_rl.data.tokenize import train_bpe_tokenizer
    from therapy_rl.rewards.encoder import load_sentence_encoder

    texts = ["I know. I know. I know. I know.", "Tell me about your week.", "?!", "It's OK, really!"]
    tok = train_bpe_tokenizer(texts * 4 + ["How are you feeling today?"] * 4, 400, tmp_path / "tok")
    encoder = load_sentence_encoder()
    backends = R.RewardBackends(lambda h, e: jnp.zeros(e.shape[0]), lambda h, e: jnp.zeros(e.shape[0]),
                                lambda *a: None, lambda *a: None)
    users = ["How are you feeling today?"] * len(texts)
    results = {}
    for name, clean in (("paper", "paper_clean"), ("ours", "raw")):
        cfg = R.RewardConfig(whiten=False, use_safety=False, use_sentiment=False, use_empathy=False,
                             relevance_text=clean,
                             quality=C.QualityConfig(formula="paper_code" if name == "paper" else "tokens"))
        model = R.RewardModel.create(cfg, tok, encoder=encoder, heads={}, lexicon={}, backends=backends,
                                     reply_max_length=32)
        m = tok.marker_ids
        ids = np.full((len(texts), 32), tok.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for i, text in enumerate(texts):
            row = tok.encode_text(text) + [m[labels.THERAPIST_EMOTION], tok.emotion_id("neutral"), m[labels.EOS]]
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        feats = model.user_features(users)
        fields = {"user_embedding": feats["user_embedding"], "user_emotion": np.zeros(len(texts), np.int32),
                  "therapist_emotion": np.full(len(texts), EMOTIONS.index("neutral"), np.int32)}
        _, comps = model.score(fields, ids, mask, tok.decode)
        results[name] = {k: np.asarray(v) for k, v in comps.items()}
        if name == "paper":
            np.testing.assert_allclose(results[name]["quality"], [ref_quality(t) for t in texts], atol=1e-6)
            assert results[name]["relevance"][2] == -5.0  # "?!" is empty once cleaned
            cos = encoder.embed([P.clean_for_relevance(texts[1])]) @ encoder.embed(
                [P.clean_for_relevance(users[1])]).T
            assert results[name]["relevance"][1] == float(np.asarray(C.relevance_steps(jnp.asarray(cos[0, 0]))))
    assert results["ours"]["quality"][0] > -10.0  # the project's softer repetition penalty (-4.86 in the issue)


def test_named_ppo_configs():
    from conftest import load_config

    described, as_run, ours = (load_config(n) for n in ("ppo_paper_as_described", "ppo_paper_as_run", "ppo_ours"))
    for c in (described, as_run):
        t = c.reward.therapy
        assert (t.quality.formula, t.relevance_text, t.emotion_scores.conflict_absolute) == (
            "paper_code", "paper_clean", True)
        assert not t.use_safety and not c.ppo.whiten_scores and c.ppo.whiten_token_rewards
    assert described.ppo.adaptive_kl and described.ppo.init_kl_coef == 0.2
    assert not as_run.ppo.adaptive_kl and as_run.ppo.init_kl_coef == 0.0
    assert ours.reward.therapy.use_safety and ours.ppo.init_kl_coef > 0
