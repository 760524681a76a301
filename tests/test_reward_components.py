"""Reward components against plain-Python references on hand-written cases (and a random sweep)."""
import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl.data import labels
from therapy_rl.data.labels import EMOTION_GROUP, EMOTIONS
from therapy_rl.data.tokenize import train_bpe_tokenizer
from therapy_rl.rewards import components as C

CORPUS = [
    "I hear that you are feeling sad today.", "That sounds really hard for you.", "How does that make you feel?",
    "Tell me more about your week.", "It's okay to feel this way, don't you think?", "hope and care and trust",
    "The weather is nice and the market is up.", "yes no ok thanks okay", "well-being matters a lot",
]
N = 64  # fixed response length of every test batch


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe_tokenizer(CORPUS * 4, 420, tmp_path_factory.mktemp("tok"), strategies=("Open question",))


@pytest.fixture(scope="module")
def tables(tok):
    return C.build_policy_tables(tok)


def response(tok, text, tag="neutral", strategy=False, lead_therapist=False):
    """Policy ids of a generated continuation: [<therapist>][<strategy> S] text [<therapist_emotion> tag] <eos>.
    tag: an emotion name, None (no marker), or a list of raw ids to put after the marker."""
    m = tok.marker_ids
    ids = [m[labels.THERAPIST]] if lead_therapist else []
    if strategy:
        ids += [m[labels.STRATEGY], tok.strategy_id("Open question")]
    ids += tok.encode_text(text)
    if tag is not None:
        ids.append(m[labels.THERAPIST_EMOTION])
        ids += list(tag) if isinstance(tag, (list, tuple)) else [tok.emotion_id(tag)]
    return ids + [m[labels.EOS]]


def batch_of(tok, rows, length=N):
    ids = np.full((len(rows), length), tok.pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        assert len(r) <= length, f"test row {i} is longer than {length} tokens"
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


_quality_jit = jax.jit(C.quality_parts, static_argnums=3)


# ============================================================================ plain-Python quality reference

LETTER = r"(?:[A-Za-z]|[^\x00-\x7f])"  # ASCII letters and any non-ASCII character
WORD_RE = re.compile(f"{LETTER}+(?:'{LETTER}+)*")


def is_letter(ch):
    return ch.isascii() and ch.isalpha() or not ch.isascii()
SPACE = " \t\n\r\x0b\x0c"


def ref_words(text):
    return [w.lower() for w in WORD_RE.findall(text)]


def ref_repeated_fraction(words, n, window):
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    repeated = sum(1 for i, g in enumerate(grams) if any(grams[j] == g for j in range(max(0, i - window), i)))
    return repeated / max(len(grams), 1)


def ref_quality(text, cfg=C.QualityConfig()):
    """Returns (score, degenerate, bigram, trigram, overuse, length) by the module docstring's definitions."""
    nonspace = [ch for ch in text if ch not in SPACE]
    letters = sum(is_letter(ch) for ch in text)
    nonascii = sum(ord(ch) > 127 for ch in text)
    lowered = {ch.lower() for ch in nonspace}
    degenerate = (not nonspace) or letters == 0 or len(lowered) == 1
    if cfg.nonascii_is_degenerate and 2 * nonascii > len(nonspace):
        degenerate = True
    words = ref_words(text)
    bigram = cfg.bigram_weight * ref_repeated_fraction(words, 2, cfg.bigram_window)
    trigram = cfg.trigram_weight * ref_repeated_fraction(words, 3, cfg.trigram_window)
    counts = collections.Counter(words)
    overuse = cfg.overuse_weight * sum(1 for w, c in counts.items()
                                       if sum(is_letter(ch) for ch in w) >= cfg.overuse_min_letters
                                       and c > cfg.overuse_max_count)
    n = len(text)
    length = 0.0
    if cfg.length_rule == "range":
        if n < cfg.min_chars:
            length = cfg.length_weight * (cfg.min_chars - n) / cfg.min_chars
        elif n > cfg.max_chars:
            length = cfg.length_weight * min(1.0, (n - cfg.max_chars) / cfg.max_chars)
    if cfg.length_rule == "paper":
        if n >= cfg.paper_max_chars or any(w in cfg.paper_banned_words for w in words):
            degenerate = True
    raw = cfg.start - bigram - trigram - overuse - length
    score = cfg.degenerate_score if degenerate else min(max(raw, cfg.clip_min), cfg.clip_max)
    return score, degenerate, bigram, trigram, overuse, length


QUALITY_CASES = [
    # degenerate
    "", "   ", "\n\n", "!!!!", "...?!", "12345", "aaaa", "AaAa a", "I", "?", "こんにちは世界です",
    # ordinary
    "I hear that you are feeling sad today.", "That sounds really hard for you. How does that make you feel?",
    "hahahaha", "It's okay to feel this way, don't you think?", "well-being matters", "café au lait, s'il vous plaît",
    "Tell me more.\n\nAbout your week?", "ok", "I’m here — with you", "naïve naïve naïve naïve naïve",
    "Thanks.", "yes",
    # repetition
    "yes yes yes yes", "ok thanks ok thanks ok thanks", "I feel I feel I feel I feel",
    "hope hope hope hope", "hope hope hope hope hope", "Hope HOPE hope hope hOpe", "care care care care care care",
    "don't don't don't don't don't", "it's it's it's it's it's", "sad sad sad sad sad sad",
    # bigram window edges: "alpha beta" again with its start 6 (repeated) or 7 (not) words later
    "alpha beta c d e f alpha beta", "alpha beta c d e f g alpha beta",
    # trigram window edges: 5 (repeated) or 6 (not)
    "one two three x y one two three", "one two three x y z one two three",
    # length: short, long
    "Hi there", "x" * 3 + " word",
    " ".join(["Tell me what happened next"] * 9),
    "a" * 99, "b" * 100,
    "This is a long reply that goes on for quite some time, " * 2 + "ok.",
]


QUALITY_BATCH, QUALITY_LENGTH = 128, 192  # one shape for every quality test: one compilation per config


def run_quality(tok, tables, texts, cfg, **kw):
    rows = [response(tok, t, **kw) for t in texts]
    assert len(rows) <= QUALITY_BATCH
    ids, mask = batch_of(tok, rows + [[]] * (QUALITY_BATCH - len(rows)), QUALITY_LENGTH)
    return _quality_jit(tables, ids, mask, cfg)


CUSTOM_QUALITY = C.QualityConfig(min_chars=30, max_chars=60, length_weight=5.0, overuse_max_count=2,
                                 overuse_weight=1.5, bigram_window=2, trigram_window=1)


@pytest.mark.parametrize("cfg", [
    C.QualityConfig(),
    C.QualityConfig(length_rule="paper"),
    C.QualityConfig(length_rule="none", nonascii_is_degenerate=False),
    CUSTOM_QUALITY,
], ids=["range", "paper", "none", "custom"])
def test_quality_matches_reference(tok, tables, cfg):
    parts = run_quality(tok, tables, QUALITY_CASES, cfg)
    for i, text in enumerate(QUALITY_CASES):
        score, degenerate, bigram, trigram, overuse, length = ref_quality(text, cfg)
        got = (float(parts.score[i]), bool(parts.degenerate[i]), float(parts.bigram_penalty[i]),
               float(parts.trigram_penalty[i]), float(parts.overuse_penalty[i]), float(parts.length_penalty[i]))
        assert got[1] == degenerate, (text, got, (score, degenerate))
        np.testing.assert_allclose(got[0], score, atol=1e-5, err_msg=repr(text))
        if not degenerate:
            np.testing.assert_allclose(got[2:], (bigram, trigram, overuse, length), atol=1e-5, err_msg=repr(text))
        assert int(parts.num_chars[i]) == len(text), text
        assert -10.0 <= got[0] <= 8.0


def test_quality_hand_computed_values(tok, tables):
    """A few numbers worked out by hand (independent of the reference above)."""
    texts = ["I hear that you are feeling sad today.", "yes yes yes yes", "hope hope hope hope hope", "", "aaaa",
             "alpha beta c d e f alpha beta", "ok"]
    parts = run_quality(tok, tables, texts, C.QualityConfig())
    # clean sentence of 38 chars: nothing subtracted
    assert float(parts.score[0]) == pytest.approx(2.0)
    # yes×4: bigrams (yes,yes)×3, 2 repeated -> 4·2/3; trigrams ×2, 1 repeated -> 6·1/2; 15 chars in range
    assert float(parts.score[1]) == pytest.approx(2.0 - 8 / 3 - 3.0, abs=1e-5)
    # hope×5: bigrams 3/4 repeated -> 3; trigrams 2/3 -> 4; "hope" (4 letters) 5 times -> 2; 24 chars
    assert float(parts.score[2]) == pytest.approx(2.0 - 3.0 - 4.0 - 2.0, abs=1e-5)
    assert float(parts.score[3]) == -10.0 and float(parts.score[4]) == -10.0
    # 8 words, 7 bigrams, 1 repeated (distance 6): 4/7; 29 chars
    assert float(parts.score[5]) == pytest.approx(2.0 - 4.0 / 7, abs=1e-5)
    # "ok": 2 chars below 12 -> 3·10/12
    assert float(parts.score[6]) == pytest.approx(2.0 - 2.5, abs=1e-5)
    paper = run_quality(tok, tables, texts, C.QualityConfig(length_rule="paper"))
    assert float(paper.score[1]) == -10.0 and float(paper.score[6]) == -10.0  # yes / ok
    assert float(paper.score[0]) == pytest.approx(2.0)


def test_quality_random_sweep(tok, tables):
    """Random word sequences with heavy repetition, mixed case and punctuation, against the reference."""
    rng = np.random.default_rng(7)
    vocab = ["hope", "Hope", "sad", "feel", "feeling", "you", "I", "don't", "it's", "care", "trust", "ok", "yes",
             "market", "well", "being", "12", ",", ".", "?", "-", "café"]
    texts = []
    for _ in range(120):
        n = int(rng.integers(0, 16))
        words = [vocab[int(k)] for k in rng.integers(0, len(vocab), n)]
        texts.append(" ".join(words))
    for cfg in (C.QualityConfig(), C.QualityConfig(length_rule="paper"), CUSTOM_QUALITY):
        parts = run_quality(tok, tables, texts, cfg)
        for i, text in enumerate(texts):
            score = ref_quality(text, cfg)[0]
            np.testing.assert_allclose(float(parts.score[i]), score, atol=1e-5, err_msg=repr(text))


def test_quality_text_region(tok, tables):
    """Leading <therapist> / <strategy> S are skipped; text stops at the first marker; padding is ignored."""
    text = "hope hope hope hope hope"
    plain = run_quality(tok, tables, [text], C.QualityConfig())
    for kw in (dict(strategy=True), dict(lead_therapist=True), dict(strategy=True, lead_therapist=True),
               dict(tag=None)):
        other = run_quality(tok, tables, [text], C.QualityConfig(), **kw)
        assert float(other.score[0]) == pytest.approx(float(plain.score[0])), kw
        assert int(other.num_chars[0]) == len(text)
    # words after <eos> (inside the mask) and under mask 0 do not count
    m = tok.marker_ids
    row = tok.encode_text("I hear you.") + [m[labels.EOS]] + tok.encode_text(" hope hope hope hope hope")
    ids, mask = batch_of(tok, [row] + [[]] * (QUALITY_BATCH - 1), QUALITY_LENGTH)
    ids[0, len(row):len(row) + 5] = tok.encode_text("sad sad")[0]  # garbage under mask 0
    parts = _quality_jit(tables, ids, mask, C.QualityConfig())
    assert int(parts.num_chars[0]) == len("I hear you.")
    assert float(parts.score[0]) == pytest.approx(ref_quality("I hear you.")[0])


def test_quality_ids_outside_vocabulary_are_special(tok, tables):
    row = tok.encode_text("I hear you.") + [tables.vocab_size + 5] + tok.encode_text(" more")
    ids, mask = batch_of(tok, [row] + [[]] * (QUALITY_BATCH - 1), QUALITY_LENGTH)
    parts = _quality_jit(tables, ids, mask, C.QualityConfig())
    assert int(parts.num_chars[0]) == len("I hear you.")


def test_config_validation():
    with pytest.raises(ValueError, match="length_rule"):
        C.QualityConfig(length_rule="short")
    with pytest.raises(ValueError, match="min_chars"):
        C.QualityConfig(min_chars=50, max_chars=10)


# ============================================================================ emotion

def ref_emotion(generated, target):
    """generated: emotion name, "missing" or "invalid"; the table of issue 4, valid +1 added to the match term."""
    if generated == "missing":
        return -7.0
    if generated == "invalid":
        return -6.0
    score = 1.0
    g, t = EMOTION_GROUP[generated], EMOTION_GROUP[target]
    if generated == target:
        score += 1.0 if target == "neutral" else 6.0
    elif g == t:
        score += 1.0 if t == "neutral" else 3.0
    elif {g, t} == {"negative", "positive"}:
        score += -5.0
    else:
        score += -1.0
    return score


def ref_penalty(generated, user):
    return -1.5 if (EMOTION_GROUP[user] == "negative" and generated == "joy") else 0.0


def test_emotion_table_every_cell(tok, tables):
    """7 generated labels + missing + invalid, × 7 annotated labels, × 7 user emotions (both groups and neutral)."""
    generated = list(EMOTIONS) + ["missing", "invalid"]
    invalid_ids = tok.encode_text("banana")
    rows, cases = [], []
    for g in generated:
        tag = None if g == "missing" else (invalid_ids if g == "invalid" else g)
        for t in EMOTIONS:
            for u in EMOTIONS:
                rows.append(response(tok, "I hear you.", tag=tag))
                cases.append((g, t, u))
    ids, mask = batch_of(tok, rows)
    tag = jax.jit(C.read_emotion_tag)(tables, ids, mask)
    target = jnp.asarray([EMOTIONS.index(t) for _, t, _ in cases])
    user = jnp.asarray([EMOTIONS.index(u) for _, _, u in cases])
    scores = np.asarray(C.emotion_alignment(tag, target, C.EmotionScores()))
    penalty = np.asarray(C.joy_after_negative_penalty(tag, user, -1.5))
    for i, (g, t, u) in enumerate(cases):
        assert scores[i] == pytest.approx(ref_emotion(g, t)), (g, t)
        want_pen = 0.0 if g in ("missing", "invalid") else ref_penalty(g, u)
        assert penalty[i] == pytest.approx(want_pen), (g, u)
    assert len(cases) == 9 * 7 * 7


def test_emotion_table_hand_values():
    s = C.emotion_score_matrix(C.EmotionScores())
    e = EMOTIONS.index
    row = lambda g: 2 + e(g)  # noqa: E731
    assert s[row("joy"), e("joy")] == 7.0           # valid 1 + exact non-neutral 6
    assert s[row("neutral"), e("neutral")] == 2.0   # 1 + 1
    assert s[row("anger"), e("sadness")] == 4.0     # 1 + same negative group 3
    assert s[row("joy"), e("fear")] == -4.0         # 1 - 5 conflict
    assert s[row("fear"), e("joy")] == -4.0
    assert s[row("neutral"), e("anger")] == 0.0     # 1 - 1 other mismatch
    assert s[row("joy"), e("neutral")] == 0.0
    assert (s[0] == -7.0).all() and (s[1] == -6.0).all()


def test_unknown_target_scores_zero():
    out = C.emotion_alignment(jnp.asarray([6, -2]), jnp.asarray([-1, -1]), C.EmotionScores())
    np.testing.assert_array_equal(np.asarray(out), [0.0, 0.0])


def test_tag_reading_cases(tok, tables):
    m = tok.marker_ids
    te, eos = m[labels.THERAPIST_EMOTION], m[labels.EOS]
    text = tok.encode_text("I hear you.")
    neutral, joy = tok.emotion_id("neutral"), tok.emotion_id("joy")
    space = tok.encode_text(" ")
    cases = [
        (text + [eos], C.MISSING_TAG),                                 # no marker
        (text + [te, eos], C.MISSING_TAG),                             # marker, then <eos>
        (text + [te], C.MISSING_TAG),                                  # marker is the last real token
        (text + [te, m[labels.PAD]], C.MISSING_TAG),                   # marker then a marker/pad
        (text + [te] + tok.encode_text("banana") + [eos], C.INVALID_TAG),
        (text + [te] + tok.encode_text("hello") + [eos], C.INVALID_TAG),
        (text + [te, neutral] + tok.encode_text("ity") + [eos], C.INVALID_TAG),   # "neutral"+"ity"
        (text + [te, neutral] + tok.encode_text(".") + [eos], EMOTIONS.index("neutral")),
        (text + [te, joy, eos], EMOTIONS.index("joy")),
        (text + [te] + space + [joy, eos], EMOTIONS.index("joy")),     # blank token skipped
        (text + [te, joy, te, neutral, eos], EMOTIONS.index("joy")),   # the first marker counts
        ([te, neutral, eos], EMOTIONS.index("neutral")),               # empty reply, tag present
        ([m[labels.STRATEGY], tok.strategy_id("Open question")] + text + [te, joy, eos], EMOTIONS.index("joy")),
    ]
    ids, mask = batch_of(tok, [c[0] for c in cases])
    got = np.asarray(C.read_emotion_tag(tables, ids, mask))
    np.testing.assert_array_equal(got, [c[1] for c in cases])
    # a marker under mask 0 is not read
    ids2, mask2 = batch_of(tok, [text + [te, joy, eos]])
    mask2[0, len(text):] = 0
    assert int(C.read_emotion_tag(tables, ids2, mask2)[0]) == C.MISSING_TAG


def test_emotion_token_table(tok, tables):
    index = np.asarray(tables.emotion_index)
    for i, e in enumerate(EMOTIONS):
        assert index[tok.emotion_id(e)] == i
        assert not bool(tables.is_special[tok.emotion_id(e)])
    for marker in labels.MARKER_TOKENS:
        assert bool(tables.is_special[tok.marker_ids[marker]])
    assert bool(tables.is_special[tok.strategy_id("Open question")])


# ============================================================================ relevance

def ref_steps(x):
    """Paper steps with the float32 thresholds the component compares against."""
    for th, value in zip(C.RELEVANCE_THRESHOLDS, C.RELEVANCE_VALUES):
        if x < float(np.float32(th)):
            return value
    return C.RELEVANCE_VALUES[-1]


def test_relevance_steps_at_boundaries():
    xs = [-1.0, -0.2, 0.0, 0.999, 1.0]
    for th in C.RELEVANCE_THRESHOLDS:
        t32 = np.float32(th)
        xs += [float(t32), float(np.nextafter(t32, np.float32(-1))), float(np.nextafter(t32, np.float32(2)))]
    x = jnp.asarray(xs, jnp.float32)
    got = np.asarray(C.relevance_steps(x))
    want = [ref_steps(float(np.float32(v))) for v in xs]
    np.testing.assert_array_equal(got, want)
    # exactly at each threshold the new step applies (".03" is "not < .03")
    at = np.asarray(C.relevance_steps(jnp.asarray(C.RELEVANCE_THRESHOLDS, jnp.float32)))
    np.testing.assert_array_equal(at, C.RELEVANCE_VALUES[1:])
    assert float(C.relevance_steps(jnp.asarray([0.0299]))[0]) == -10.0
    assert float(C.relevance_steps(jnp.asarray([0.75]))[0]) == 8.0


def test_relevance_smooth_monotone_and_through_points():
    grid = jnp.linspace(-1.0, 1.0, 4001)
    smooth = np.asarray(C.relevance_smooth(grid))
    assert np.all(np.diff(smooth) >= 0)
    np.testing.assert_allclose(smooth, np.interp(np.asarray(grid), (0.0,) + C.RELEVANCE_THRESHOLDS,
                                                 C.RELEVANCE_VALUES), atol=1e-5)
    at = np.asarray(C.relevance_smooth(jnp.asarray(C.RELEVANCE_THRESHOLDS, jnp.float32)))
    np.testing.assert_allclose(at, C.RELEVANCE_VALUES[1:], atol=1e-5)
    assert smooth[0] == -10.0 and smooth[-1] == 8.0
    with pytest.raises(ValueError, match="relevance mode"):
        C.relevance_score(grid, "cubic")


def test_cosine_similarity():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    want = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(np.asarray(C.cosine_similarity(jnp.asarray(a), jnp.asarray(b))), want, rtol=1e-5)
    zero = C.cosine_similarity(jnp.zeros((1, 3)), jnp.ones((1, 3)))
    assert float(zero[0]) == 0.0


# ============================================================================ probabilities and safety

def test_scaled_probability():
    p = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
    np.testing.assert_allclose(np.asarray(C.scaled_probability(jnp.asarray(p))), p * 1.1 - 0.5, rtol=1e-6)


def test_safety_penalty_all_cases():
    cases = [(c, r, h) for c in (0, 1) for r in (0, 1) for h in (0, 1)]
    crisis, resources, harm = (jnp.asarray([x[i] for x in cases]) for i in range(3))
    got = np.asarray(C.safety_penalty(crisis, resources, harm, 5.0, 10.0))
    for i, (c, r, h) in enumerate(cases):
        want = (-5.0 if (c and not r) else 0.0) + (-10.0 if h else 0.0)
        assert got[i] == pytest.approx(want), (c, r, h)


# ============================================================================ tables

def test_token_features_reference():
    f = C.token_features(" Hello".encode())
    assert (f["char_len"], f["nonspace_chars"], f["letters"], f["starts_with_space"]) == (6, 5, 5, True)
    f = C.token_features("é".encode()[:1])  # a lone UTF-8 lead byte: one character starts here
    assert (f["char_len"], f["nonascii_chars"], f["letters"], f["wordish"]) == (1, 1, 1, True)
    f = C.token_features("é".encode()[1:])  # a continuation byte: no character starts here
    assert (f["char_len"], f["letters"], f["wordish"]) == (0, 0, True)
    assert C.token_features(b"...")["wordish"] is False
    assert C.token_features(b"!!")["single_char"] == ord("!")
    assert C.token_features(b" ")["single_char"] == -2
    assert C.token_features(b"ab")["single_char"] == -1
    # the hash composes over concatenation: hash("hel" + "lo") == hash("hello")
    h1, p1 = C.poly_hash(b"hel", C.HASH_BASE_A)
    h2, p2 = C.poly_hash(b"lo", C.HASH_BASE_A)
    assert (h1 * p2 + h2) & 0xFFFFFFFF == C.poly_hash(b"hello", C.HASH_BASE_A)[0]


def test_tables_decode_bytes_like_the_tokenizer(tok):
    """Concatenated table bytes of an encoded text are exactly the text's UTF-8 bytes."""
    token_bytes = C.vocab_token_bytes(tok)
    for text in ["I hear you, café!", " leading space", "日本語 ok"]:
        ids = tok.encode_text(text)
        assert b"".join(token_bytes[i] for i in ids) == text.encode("utf-8")


def test_tables_padded_to_model_vocab(tok):
    t = C.build_policy_tables(tok, vocab_size=tok.vocab_size + 16)
    assert t.vocab_size == tok.vocab_size + 16
    assert bool(np.asarray(t.is_special)[tok.vocab_size:].all())
