"""Evaluation metrics vs direct nltk / rouge-score calls and plain-Python references; bootstrap; decoding search."""
import math
import warnings
from collections import Counter

import numpy as np
import pytest

from therapy_rl.data.labels import EMOTIONS
from therapy_rl.evaluation import bootstrap, decoding_search, metrics

PAIRS = [  # (reference, generated)
    ("How did that make you feel when he left?", "How did you feel when he left you?"),
    ("It sounds like you were really scared.", "You sound scared, like you were afraid."),
    ("Tell me more about your father.", "Tell me about your mother and your father."),
    ("We can stop here today.", "Let's stop for today."),
    ("Mm-hmm.", "I see. Mm-hmm. Go on."),
    ("What do you think happened?", "nothing in common at all"),
    ("You keep coming back to the divorce.", ""),
]

NLTK_DOC_REF = "It is a guide to action that ensures that the military will forever heed Party commands"
NLTK_DOC_HYP = "It is a guide to action which ensures that the military always obeys the commands of the party"


def _nltk_bleu(ref, hyp):
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sentence_bleu([ref.split()], hyp.split(), smoothing_function=SmoothingFunction().method1)


# ------------------------------------------------------------------------------------------- paper metrics
@pytest.mark.parametrize("ref,hyp", PAIRS)
def test_bleu_matches_direct_nltk_call(ref, hyp):
    expected = _nltk_bleu(ref, hyp) if hyp.split() else 0.0
    assert metrics.bleu(ref, hyp) == pytest.approx(expected, abs=1e-12)


def test_bleu_is_case_sensitive_whitespace_tokens_like_the_paper():
    ref = "Tell me a bit more."
    assert metrics.bleu(ref, ref) == pytest.approx(1.0)
    # "more." vs "more" differ under whitespace tokenisation, so the score drops.
    assert metrics.bleu(ref, "Tell me a bit more") < 1.0
    assert metrics.bleu(ref, "tell me a bit more.") < 1.0


@pytest.mark.parametrize("ref,hyp", PAIRS)
def test_rouge_matches_direct_rouge_score_call(ref, hyp):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = scorer.score(ref, hyp)
    ours = metrics.rouge(ref, hyp)
    for name in ("rouge1", "rouge2", "rougeL"):
        assert ours[name] == pytest.approx(direct[name].fmeasure, abs=1e-12)


def _need_wordnet():
    if not metrics.wordnet_available():
        pytest.skip("WordNet is not installed for NLTK: run .ci/setup_wordnet.sh")


@pytest.mark.parametrize("ref,hyp", PAIRS + [("I fear the dark", "I dread the dark")])
def test_full_meteor_matches_direct_nltk_call_with_wordnet(ref, hyp):
    _need_wordnet()
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score

    expected = meteor_score([ref.split()], hyp.split(), wordnet=wordnet) if hyp.split() else 0.0
    assert metrics.meteor(ref, hyp, metrics.METEOR_FULL) == pytest.approx(expected, abs=1e-12)


def test_full_meteor_reproduces_nltk_documented_value():
    _need_wordnet()
    # NLTK's own docstring example scores 0.6944 with WordNet 3.0.
    assert metrics.meteor(NLTK_DOC_REF, NLTK_DOC_HYP, metrics.METEOR_FULL) == pytest.approx(0.6944, abs=5e-5)


def test_full_meteor_uses_synonyms_and_fallback_does_not():
    _need_wordnet()
    for ref, hyp in [("I fear the dark", "I dread the dark"), ("we can talk", "we can speak")]:
        full = metrics.meteor(ref, hyp, metrics.METEOR_FULL)
        fallback = metrics.meteor(ref, hyp, metrics.METEOR_EXACT_STEM)
        assert full > fallback + 0.2


def _reference_meteor_exact_stem(ref: str, hyp: str) -> float:
    """Plain METEOR (alpha .9, beta 3, gamma .5) with exact then Porter-stem matching, for texts whose words are
    unique on each side (so the alignment is unambiguous)."""
    from nltk.stem.porter import PorterStemmer

    stem = PorterStemmer().stem
    r, h = [w.lower() for w in ref.split()], [w.lower() for w in hyp.split()]
    assert len(set(r)) == len(r) and len(set(h)) == len(h)
    matches = {}
    for i, w in enumerate(h):
        if w in r:
            matches[i] = r.index(w)
    for i, w in enumerate(h):
        if i in matches:
            continue
        for j, v in enumerate(r):
            if j not in matches.values() and stem(w) == stem(v):
                matches[i] = j
                break
    m = len(matches)
    if m == 0:
        return 0.0
    pairs = sorted(matches.items())
    chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
    p, rc = m / len(h), m / len(r)
    fmean = p * rc / (0.9 * p + 0.1 * rc)
    return (1 - 0.5 * (chunks / m) ** 3) * fmean


@pytest.mark.parametrize("ref,hyp", [
    ("she was walking home alone", "alone she walked home"),
    ("I fear the dark", "I dread the dark"),
    ("the meetings were helpful", "these meeting helped"),
    ("nothing matches here", "totally different words"),
])
def test_fallback_meteor_matches_plain_exact_stem_reference(ref, hyp):
    assert metrics.meteor(ref, hyp, metrics.METEOR_EXACT_STEM) == pytest.approx(
        _reference_meteor_exact_stem(ref, hyp), abs=1e-12)


def test_fallback_runs_for_real_without_wordnet(tmp_path):
    """In a process whose NLTK search path has no WordNet, "auto" falls back, warns and names the variant."""
    import json
    import subprocess
    import sys

    code = (
        "import json, warnings, nltk\n"
        f"nltk.data.path[:] = [{str(tmp_path)!r}]\n"
        "from therapy_rl.evaluation import metrics\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    r = metrics.evaluate_generations([{'reference': 'I fear the dark', 'generated': 'I dread the dark',\n"
        "                                       'gold_emotion': 'fear', 'pred_emotion': 'fear'}])\n"
        "print(json.dumps({'variant': r['meteor_variant'], 'meteor': r['means']['meteor'],\n"
        "                  'available': metrics.wordnet_available(),\n"
        "                  'warned': any('exact+stem' in str(w.message) for w in caught)}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"variant": "exact+stem", "available": False, "warned": True,
                   "meteor": pytest.approx(_reference_meteor_exact_stem("I fear the dark", "I dread the dark"))}


def test_meteor_variant_is_named_and_fallback_never_silent(monkeypatch):
    monkeypatch.setattr(metrics, "wordnet_available", lambda: False)
    with pytest.warns(UserWarning, match="exact\\+stem"):
        assert metrics.resolve_meteor_variant("auto") == metrics.METEOR_EXACT_STEM
    with pytest.raises(RuntimeError, match="setup_wordnet"):
        metrics.resolve_meteor_variant(metrics.METEOR_FULL)
    with pytest.warns(UserWarning):
        result = metrics.evaluate_generations(_records(6))
    assert result["meteor_variant"] == metrics.METEOR_EXACT_STEM
    monkeypatch.setattr(metrics, "wordnet_available", lambda: True)
    assert metrics.resolve_meteor_variant("auto") == metrics.METEOR_FULL
    with pytest.raises(ValueError):
        metrics.resolve_meteor_variant("bogus")


# ------------------------------------------------------------------------------------------- our text metrics
def _plain_token_f1(ref, hyp):
    import re
    import string

    def norm(t):
        t = "".join(c for c in t.lower() if c not in string.punctuation)
        return re.sub(r"\b(a|an|the)\b", " ", t).split()

    r, h = norm(ref), norm(hyp)
    if not r or not h:
        return float(r == h)
    same = sum(min(r.count(w), h.count(w)) for w in set(r))
    if same == 0:
        return 0.0
    p, rc = same / len(h), same / len(r)
    return 2 * p * rc / (p + rc)


@pytest.mark.parametrize("ref,hyp", PAIRS + [("", ""), ("The end.", "the END")])
def test_token_f1_matches_plain_python(ref, hyp):
    assert metrics.token_f1(ref, hyp) == pytest.approx(_plain_token_f1(ref, hyp), abs=1e-12)


def test_distinct_n_and_repetition_match_plain_python():
    texts = [hyp for _, hyp in PAIRS] + ["okay okay okay okay", "I see I see I see"]
    toks = [metrics.words(t) for t in texts]
    for n in (1, 2):
        grams = []
        for t in toks:
            for i in range(len(t) - n + 1):
                grams.append(" ".join(t[i:i + n]))
        assert metrics.distinct_n(toks, n) == pytest.approx(len(set(grams)) / len(grams))
    assert metrics.repeated_ngram_rate(metrics.words("okay okay okay okay"), 2) == pytest.approx(2 / 3)
    assert metrics.repeated_ngram_rate(metrics.words("I see I see I see"), 2) == pytest.approx(3 / 5)
    assert metrics.repeated_ngram_rate(["one"], 2) == 0.0
    assert metrics.words("Don't STOP, now!") == ["don't", "stop", "now"]


def test_bertscore_greedy_matching_matches_loops():
    rng = np.random.default_rng(1)
    cand, ref = rng.normal(size=(5, 8)), rng.normal(size=(3, 8))
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    p = np.mean([max(cos(c, r) for r in ref) for c in cand])
    r = np.mean([max(cos(c, r_) for c in cand) for r_ in ref])
    got = metrics.bertscore_from_embeddings(cand, ref)
    assert got == pytest.approx((p, r, 2 * p * r / (p + r)), abs=1e-12)
    assert metrics.bertscore_from_embeddings(cand[:0], ref) == (0.0, 0.0, 0.0)
    assert metrics.bertscore_from_embeddings(cand, cand)[2] == pytest.approx(1.0)


def test_bertscore_minilm_matches_torch_sentence_transformer():
    """Whole chain on the real all-MiniLM-L6-v2: our Flax token states (batched, padded, [CLS]/[SEP] dropped)
    + greedy matching vs the PyTorch model run one text at a time."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from therapy_rl.rewards.encoder import gt_package_model_dir

    refs = ["How did that make you feel?", "Tell me more about your father and the summer.", "Okay."]
    cands = ["How did you feel about that?", "Let us talk about your dad.", ""]
    ours = metrics.bertscore_minilm(refs, cands, metrics.make_minilm_token_embedder(batch_size=4))
    assert ours["bertscore_minilm_f1"][2] == 0.0  # an empty reply has no tokens
    path = str(gt_package_model_dir())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def states(text):
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt")).last_hidden_state[0, 1:-1].double().numpy()

    for i, (r, c) in enumerate(zip(refs[:2], cands[:2])):
        sim = states(c) @ states(r).T / np.outer(np.linalg.norm(states(c), axis=1), np.linalg.norm(states(r), axis=1))
        p, rc = sim.max(1).mean(), sim.max(0).mean()
        assert ours["bertscore_minilm_p"][i] == pytest.approx(p, abs=1e-4)
        assert ours["bertscore_minilm_r"][i] == pytest.approx(rc, abs=1e-4)
        assert ours["bertscore_minilm_f1"][i] == pytest.approx(2 * p * rc / (p + rc), abs=1e-4)


# ------------------------------------------------------------------------------------------- labels
def test_parse_generation():
    p = metrics.parse_generation(" I hear you. <therapist_emotion> neutral<eos> junk <therapist_emotion> joy")
    assert (p.text, p.emotion, p.has_emotion_tag) == ("I hear you.", "neutral", True)
    p = metrics.parse_generation("No tag here<eos><pad><pad>")
    assert (p.text, p.emotion, p.has_emotion_tag) == ("No tag here", None, False)
    p = metrics.parse_generation("Hmm. <therapist_emotion> anger. more words")
    assert p.emotion == "anger." and metrics.valid_emotion(p.emotion) is None
    p = metrics.parse_generation("<strategy>Open question<therapist>How are you?<therapist_emotion>JOY")
    assert (p.strategy, p.text, p.emotion) == ("Open question", "How are you?", "joy")
    p = metrics.parse_generation("<strategy><Open question> How are you?<therapist_emotion>sadness<eos>")
    assert (p.strategy, p.text, p.emotion) == ("Open question", "How are you?", "sadness")
    p = metrics.parse_generation("Sure.<user>I made this turn up<therapist_emotion>neutral")
    assert p.text == "Sure." and p.emotion == "neutral"
    p = metrics.parse_generation("Text then tag only <therapist_emotion>")
    assert p.has_emotion_tag and p.emotion is None


def test_macro_f1_and_confusion_match_sklearn_and_counts():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    gold = list(rng.choice(["neutral", "sadness", "fear", "joy"], size=60, p=[.7, .1, .1, .1]))
    pred = [None if u < .15 else str(rng.choice(["neutral", "sadness", "anger"])) for u in rng.random(60)]
    labels = sorted(set(gold) | {p for p in pred if p})
    expected = sklearn_metrics.f1_score(gold, [p or "none" for p in pred], labels=labels, average="macro",
                                        zero_division=0)
    assert metrics.macro_f1(gold, pred) == pytest.approx(expected, abs=1e-12)
    conf = metrics.confusion_matrix(gold, pred)
    assert conf.shape == (7, 8) and conf.sum() == 60
    for g, p in set(zip(gold, pred)):
        col = EMOTIONS.index(p) if p else 7
        assert conf[EMOTIONS.index(g), col] == sum(1 for a, b in zip(gold, pred) if (a, b) == (g, p))


def test_emotion_metrics_majority_baselines():
    gold = ["neutral"] * 452 + ["sadness", "anger"]
    pred = ["neutral"] * 440 + [None] * 12 + ["sadness", "joy"]
    emo = metrics.emotion_metrics(gold, pred, train_gold=["neutral"] * 10 + ["fear"] * 30)
    assert emo["majority_baseline"]["label"] == "neutral"
    assert emo["majority_baseline"]["accuracy"] == pytest.approx(452 / 454)  # the paper's 99.56%
    assert emo["train_majority_baseline"]["label"] == "fear"
    assert emo["train_majority_baseline"]["accuracy"] == 0.0
    assert emo["accuracy"] == pytest.approx(441 / 454)
    assert emo["tag_coverage"] == pytest.approx(442 / 454)
    assert emo["confusion"]["matrix"][EMOTIONS.index("neutral")][7] == 12


def test_strategy_metrics():
    gold = ["Open question", "Restatement", None, "open question", "Approval"]
    pred = ["open  question", None, "Approval", "Restatement", "Approval"]
    s = metrics.strategy_metrics(gold, pred)
    assert s["n_with_gold"] == 4
    assert s["accuracy"] == pytest.approx(2 / 4)
    assert s["majority_baseline"] == {"label": "open question", "accuracy": 0.5}


# ------------------------------------------------------------------------------------------- everything
def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ref, hyp = PAIRS[i % len(PAIRS)]
        out.append({"reference": ref, "generated": hyp, "user_text": f"user turn {i}", "problem": "grief",
                    "gold_emotion": "neutral" if i % 5 else "sadness",
                    "pred_emotion": [None, "neutral", "joy", "sadness", "bogus"][int(rng.integers(5))]})
    return out


def test_evaluate_generations_per_sample_equals_direct_calls():
    records = _records(14)
    result = metrics.evaluate_generations(records, train_gold_emotions=["neutral", "neutral", "fear"],
                                          meteor_variant=metrics.METEOR_EXACT_STEM)
    assert result["meteor_variant"] == "exact+stem"
    ps = result["per_sample"]
    for i, r in enumerate(records):
        assert ps["bleu"][i] == pytest.approx(_nltk_bleu(r["reference"], r["generated"])
                                              if r["generated"].split() else 0.0)
        assert ps["token_f1"][i] == pytest.approx(_plain_token_f1(r["reference"], r["generated"]))
        assert ps["length_words"][i] == len(metrics.words(r["generated"]))
        pred = r["pred_emotion"] if r["pred_emotion"] in EMOTIONS else None
        assert ps["emotion_correct"][i] == float(pred == r["gold_emotion"])
    for name, values in ps.items():
        assert result["means"][name] == pytest.approx(float(np.mean(values)))
    assert result["emotion"]["accuracy"] == pytest.approx(result["means"]["emotion_correct"])
    assert result["strategy"] is None and "bertscore_minilm_f1" not in ps
    assert result["emotion"]["majority_baseline"]["accuracy"] == pytest.approx(
        Counter(r["gold_emotion"] for r in records).most_common(1)[0][1] / len(records))
    assert len(set(result["samples"]["sample_id"])) == len(records)


def test_evaluate_generations_with_strategy_and_embedder():
    records = _records(6)
    for i, r in enumerate(records):
        r["gold_strategy"] = "Open question" if i % 2 else None
        r["pred_strategy"] = "open question" if i < 3 else None
    fake_embed = lambda texts: [np.ones((len(t.split()), 4)) for t in texts]  # noqa: E731
    result = metrics.evaluate_generations(records, token_embed_fn=fake_embed, meteor_variant="exact+stem")
    assert result["strategy"]["n_with_gold"] == 3 and result["strategy"]["accuracy"] == pytest.approx(1 / 3)
    assert result["per_sample"]["strategy_correct"][0] is None
    assert result["means"]["strategy_correct"] == pytest.approx(1 / 3)
    assert result["per_sample"]["bertscore_minilm_f1"][0] == pytest.approx(1.0)


def test_evaluate_generations_rejects_bad_records():
    with pytest.raises(ValueError, match="record 1: field 'gold_emotion'"):
        metrics.evaluate_generations([_records(1)[0], {**_records(1)[0], "gold_emotion": "happy"}])
    with pytest.raises(ValueError, match="record 0: field 'generated'"):
        metrics.evaluate_generations([{"reference": "x", "gold_emotion": "joy"}])


# ------------------------------------------------------------------------------------------- bootstrap
def test_percentile_ci_covers_mean_is_deterministic_and_matches_loop():
    x = np.random.default_rng(5).normal(0.3, 0.1, size=200)
    a = bootstrap.percentile_ci(x, n_resamples=2000, seed=7)
    assert a == bootstrap.percentile_ci(x, n_resamples=2000, seed=7)
    assert a != bootstrap.percentile_ci(x, n_resamples=2000, seed=8)
    assert a["low"] < x.mean() < a["high"] and a["mean"] == pytest.approx(x.mean())
    idx = bootstrap.bootstrap_indices(200, 2000, 7)
    means = [x[row].mean() for row in idx]
    assert a["low"] == pytest.approx(np.quantile(means, 0.025))
    assert a["high"] == pytest.approx(np.quantile(means, 0.975))
    # The width is close to the normal-theory one, 2 * 1.96 * sd / sqrt(n).
    assert (a["high"] - a["low"]) == pytest.approx(2 * 1.96 * x.std() / math.sqrt(200), rel=0.15)


def test_percentile_ci_skips_missing_values():
    x = [1.0, None, 0.0, 1.0, None]
    ci = bootstrap.percentile_ci(x, n_resamples=500, seed=0)
    assert ci["mean"] == pytest.approx(2 / 3)
    assert 0.0 <= ci["low"] <= ci["high"] <= 1.0


def test_corpus_statistics_match_metrics_on_resamples():
    texts = [hyp for _, hyp in PAIRS] * 3 + ["okay okay okay", "fine"]
    toks = [metrics.words(t) for t in texts]
    rng = np.random.default_rng(2)
    gold = list(rng.choice(["neutral", "joy", "fear"], size=len(texts)))
    pred = [None if u < .2 else str(rng.choice(["neutral", "joy"])) for u in rng.random(len(texts))]
    d2 = bootstrap.distinct_n_statistic(toks, 2)
    f1 = bootstrap.macro_f1_statistic(gold, pred)
    for row in bootstrap.bootstrap_indices(len(texts), 25, 3):
        assert d2(row) == pytest.approx(metrics.distinct_n([toks[i] for i in row], 2))
        full_labels = sorted(set(gold) | {p for p in pred if p})
        assert f1(row) == pytest.approx(metrics.macro_f1([gold[i] for i in row], [pred[i] for i in row],
                                                         labels=full_labels))
    assert f1(np.arange(len(texts))) == pytest.approx(metrics.macro_f1(gold, pred))


def test_confidence_intervals_cover_every_metric():
    result = metrics.evaluate_generations(_records(30), meteor_variant="exact+stem")
    ci = bootstrap.confidence_intervals(result, n_resamples=300, seed=1)
    assert set(ci["per_sample"]) == set(result["per_sample"])
    assert set(ci["corpus"]) == {"distinct_1", "distinct_2", "emotion_macro_f1"}
    for name, value in ci["per_sample"].items():
        assert value["low"] <= result["means"][name] + 1e-12 <= value["high"] + 2e-12
    assert ci["corpus"]["distinct_1"]["mean"] == pytest.approx(result["corpus"]["distinct_1"])
    for value in ci["corpus"].values():
        assert value["low"] <= value["mean"] <= value["high"] and "bootstrap_bias" in value
    assert ci == bootstrap.confidence_intervals(result, n_resamples=300, seed=1)


def test_distinct_n_bootstrap_is_biased_and_the_shift_recentres_it():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(3000)]
    toks = [list(rng.choice(vocab, size=12)) for _ in range(300)]  # mostly unique bigrams
    stat = bootstrap.distinct_n_statistic(toks, 2)
    raw = bootstrap.statistic_ci(stat, 300, n_resamples=300, seed=0, bias_correct=False)
    shifted = bootstrap.statistic_ci(stat, 300, n_resamples=300, seed=0)
    assert raw["high"] < raw["mean"]  # resampling duplicates replies: the plain percentile CI misses the value
    assert shifted["low"] <= shifted["mean"] <= shifted["high"] and shifted["bootstrap_bias"] < -0.2
    assert shifted["high"] - shifted["low"] == pytest.approx(raw["high"] - raw["low"])


def test_paired_bootstrap_detects_real_difference_and_not_null():
    rng = np.random.default_rng(11)
    a = rng.uniform(0, 1, size=150)
    real = bootstrap.paired_bootstrap(a, a + 0.05 + rng.normal(0, 0.05, size=150), n_resamples=4000, seed=0)
    assert real["p_value"] < 0.01 and real["ci_low"] > 0
    noise = rng.normal(0, 0.05, size=75)
    null = bootstrap.paired_bootstrap(a, a + np.concatenate([noise, -noise]), n_resamples=4000, seed=0)
    assert null["mean_diff"] == pytest.approx(0.0, abs=1e-12) and null["p_value"] > 0.5
    assert null["ci_low"] < 0 < null["ci_high"]
    iid = bootstrap.paired_bootstrap(a, rng.permutation(a), n_resamples=4000, seed=0)
    assert iid["p_value"] > 0.05
    # p-value against a plain loop over the same resamples.
    d = (a + 0.05 + rng.normal(0, 0.05, size=150)) - a
    res = bootstrap.paired_bootstrap(a, a + d, n_resamples=500, seed=4)
    idx = bootstrap.bootstrap_indices(150, 500, 4)
    extreme = sum(abs(d[row].mean() - d.mean()) >= abs(d.mean()) for row in idx)
    assert res["p_value"] == pytest.approx((1 + extreme) / 501)
    with pytest.raises(ValueError):
        bootstrap.paired_bootstrap([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------------------- decoding search
def test_decoding_grid_and_test_split_refusal(tmp_path):
    grid = decoding_search.decoding_grid()
    assert len(grid) == 8 * 8 * 4 and grid[0] == {"top_p": 0.6, "top_k": 0, "temperature": 1.0}
    small = decoding_search.decoding_grid((0.7, 1.0), (0, 10), (1.0, 1.2))
    calls = []

    def generate(settings):
        calls.append(settings)
        return settings

    def score(gens):  # best: top_p 0.7, top_k 10, temperature 1.2
        return {"rougeL": -abs(gens["top_p"] - 0.7) - abs(gens["top_k"] - 10) / 100 - abs(gens["temperature"] - 1.2),
                "bleu": 0.0}

    for split in ("test", "mesc_test", "ESConv-Test"):
        with pytest.raises(ValueError, match="refusing"):
            decoding_search.search_decoding(generate, score, small, split, log_fn=None)
    assert calls == []
    search = decoding_search.search_decoding(generate, score, small, "validation", log_fn=None)
    assert search["best"]["settings"] == {"top_p": 0.7, "top_k": 10, "temperature": 1.2}
    assert len(calls) == len(small) == 8 and not search["forced_on_test_split"]
    path = decoding_search.save_decoding(str(tmp_path), search)
    loaded = decoding_search.load_decoding(str(tmp_path))
    assert path.endswith("decoding.json") and loaded["chosen_on_split"] == "validation"
    assert loaded["settings"] == search["best"]["settings"]
    forced = decoding_search.search_decoding(generate, score, small, "test", allow_test_split=True, log_fn=None)
    assert forced["forced_on_test_split"]
    assert decoding_search.load_decoding(str(tmp_path / "none")) is None
    assert not decoding_search.is_test_split("contest_val") and decoding_search.is_test_split("test")


def test_select_best_weighted_and_ties():
    results = [{"settings": {"i": 0}, "scores": {"a": 1.0, "b": 0.0}},
               {"settings": {"i": 1}, "scores": {"a": 0.0, "b": 2.0}},
               {"settings": {"i": 2}, "scores": {"a": 1.0, "b": 0.0}}]
    assert decoding_search.select_best(results, "a")["settings"] == {"i": 0}  # tie -> earliest
    assert decoding_search.select_best(results, {"a": 1.0, "b": 0.6})["settings"] == {"i": 1}
    with pytest.raises(KeyError):
        decoding_search.select_best(results, "missing")
