"""Bootstrap confidence intervals and the paired bootstrap test (NumPy, explicit seeds).

- Percentile CI: resample the N samples with replacement R times (`np.random.default_rng(seed)`), take the
  statistic on each resample, report the (1-c)/2 and (1+c)/2 quantiles of those R values around the statistic
  on the full data.
- Corpus-level metrics (distinct-n, emotion macro-F1) are recomputed on each resample of samples; a sample drawn
  twice contributes its n-grams twice (so they count twice in the denominator, once in the distinct set). That
  biases set statistics downward, so their percentile interval is shifted by the bootstrap bias
  (mean of resampled values - value on the data), reported beside it (see `statistic_ci`).
- Paired test between systems A and B scored on the same samples: resample sample indices, take
  mean(B - A) on each resample; CI from the percentiles; two-sided p-value from the resampled differences
  re-centred on 0 (the null), p = (1 + #{|d* - d| >= |d|}) / (R + 1).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from therapy_rl.data.labels import EMOTIONS


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n] indices drawn with replacement; the same (n, n_resamples, seed) gives the same draw."""
    if n <= 0:
        raise ValueError("bootstrap needs at least one sample")
    if n_resamples <= 0:
        raise ValueError("n_resamples must be positive")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _interval(point: float, resampled: np.ndarray, confidence: float) -> dict:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    resampled = resampled[np.isfinite(resampled)]
    if resampled.size == 0:
        return {"mean": point, "low": None, "high": None}
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [alpha, 1.0 - alpha])
    return {"mean": point, "low": float(low), "high": float(high)}


def _as_array(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def percentile_ci(values: Sequence[float | None], *, n_resamples: int = 1000, seed: int = 0,
                  confidence: float = 0.95, indices: np.ndarray | None = None) -> dict:
    """CI of the mean of per-sample values (None/NaN entries, e.g. samples without a gold strategy, are left out
    of each mean). Returns {"mean", "low", "high"}."""
    x = _as_array(values)
    idx = bootstrap_indices(len(x), n_resamples, seed) if indices is None else indices
    point = float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
    resampled = x[idx]
    valid = np.isfinite(resampled)
    counts = valid.sum(axis=1)
    sums = np.where(valid, resampled, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return _interval(point, means, confidence)


def statistic_ci(statistic: Callable[[np.ndarray], float], n: int, *, n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95, indices: np.ndarray | None = None, bias_correct: bool = True,
                 bounds: tuple[float, float] | None = None) -> dict:
    """CI of any statistic of a set of samples: `statistic(index_array) -> float` (full data: arange(n)).

    With `bias_correct`, the percentile interval is shifted by the bootstrap bias b = mean(stat*) - stat, which
    is reported as "bootstrap_bias" (`bounds` clips the shifted interval). Set statistics need it: a resample
    leaves out about a third of the replies and draws others two or more times, whose n-grams then repeat, so
    resampled distinct-2 on the MESC test references averages 0.49 against 0.725 on the data itself; the spread
    is still informative (its sd, 0.015, is close to the half-sampling estimate, 0.011), the location is not.
    """
    idx = bootstrap_indices(n, n_resamples, seed) if indices is None else indices
    point = float(statistic(np.arange(n)))
    resampled = np.array([statistic(row) for row in idx], np.float64)
    if not bias_correct:
        return _interval(point, resampled, confidence)
    bias = float(np.mean(resampled[np.isfinite(resampled)])) - point if np.isfinite(resampled).any() else 0.0
    out = _interval(point, resampled - bias, confidence)
    if bounds is not None and out["low"] is not None:  # the shift must not leave the statistic's range
        out["low"], out["high"] = (float(np.clip(out[k], *bounds)) for k in ("low", "high"))
    out["bootstrap_bias"] = bias
    return out


# ---------------------------------------------------------------------------------------------- corpus statistics
def ngram_id_lists(token_lists: Sequence[Sequence[str]], n: int) -> list[np.ndarray]:
    """Each reply's n-grams as integer ids shared across the corpus."""
    vocab: dict[tuple, int] = {}
    out = []
    for tokens in token_lists:
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        out.append(np.array([vocab.setdefault(g, len(vocab)) for g in grams], np.int64))
    return out


def distinct_n_statistic(token_lists: Sequence[Sequence[str]], n: int) -> Callable[[np.ndarray], float]:
    """statistic(indices) = distinct-n of the replies at `indices` (repeats count in the denominator)."""
    ids = ngram_id_lists(token_lists, n)
    totals = np.array([len(a) for a in ids], np.int64)

    def stat(indices: np.ndarray) -> float:
        total = int(totals[indices].sum())
        if total == 0:
            return 0.0
        unique_rows = np.unique(indices)
        distinct = np.unique(np.concatenate([ids[i] for i in unique_rows])).size
        return distinct / total

    return stat


def macro_f1_statistic(gold: Sequence[str], pred: Sequence[str | None]) -> Callable[[np.ndarray], float]:
    """statistic(indices) = macro-F1 (as `metrics.macro_f1`) over the samples at `indices`, always averaged over
    the labels present in the FULL data (a resample that happens to miss a rare label scores 0 on it rather than
    dropping it, which would make the statistic jump)."""
    k = len(EMOTIONS)
    index = {name: i for i, name in enumerate(EMOTIONS)}
    g = np.array([index[x] for x in gold], np.int64)
    p = np.array([index[x] if x is not None else k for x in pred], np.int64)  # k = "none"
    present = np.zeros(k, bool)
    present[g] = True
    present[p[p < k]] = True

    def stat(indices: np.ndarray) -> float:
        gi, pi = g[indices], p[indices]
        conf = np.bincount(gi * (k + 1) + pi, minlength=k * (k + 1)).reshape(k, k + 1)
        tp = np.diag(conf[:, :k]).astype(np.float64)
        fp = conf[:, :k].sum(axis=0) - tp
        fn = conf.sum(axis=1) - tp
        if not present.any():
            return 0.0
        denom = 2 * tp + fp + fn
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        return float(f1[present].mean())

    return stat


# ---------------------------------------------------------------------------------------------- whole results
def confidence_intervals(results: dict, *, n_resamples: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> dict:
    """CIs for every per-sample metric and for the corpus metrics of an `evaluate_generations` result.
    All metrics use the same resampled index sets."""
    from therapy_rl.evaluation.metrics import words

    n = int(results["n_samples"])
    idx = bootstrap_indices(n, n_resamples, seed)
    per_sample = {name: percentile_ci(values, indices=idx, confidence=confidence)
                  for name, values in results["per_sample"].items()}
    gen_words = [words(text) for text in results["samples"]["generated"]]
    corpus = {f"distinct_{k}": statistic_ci(distinct_n_statistic(gen_words, k), n, indices=idx,
                                           confidence=confidence, bounds=(0.0, 1.0)) for k in (1, 2)}
    corpus["emotion_macro_f1"] = statistic_ci(
        macro_f1_statistic(results["samples"]["gold_emotion"], results["samples"]["pred_emotion"]), n,
        indices=idx, confidence=confidence, bounds=(0.0, 1.0))
    return {"per_sample": per_sample, "corpus": corpus, "n_resamples": n_resamples, "seed": seed,
            "confidence": confidence, "method": "percentile bootstrap over samples"}


def add_confidence_intervals(results: dict, **kwargs) -> dict:
    """A copy of `results` with "ci" filled in (see `confidence_intervals`)."""
    return {**results, "ci": confidence_intervals(results, **kwargs)}


# ---------------------------------------------------------------------------------------------- paired test
def paired_bootstrap(a: Sequence[float | None], b: Sequence[float | None], *, n_resamples: int = 10000,
                     seed: int = 0, confidence: float = 0.95) -> dict:
    """Paired bootstrap of mean(b - a) over samples scored by both systems (pairs with a None are dropped).

    Returns {"n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value", "n_resamples", "seed"};
    `p_value` is two-sided for H0: mean difference = 0.
    """
    x, y = _as_array(a), _as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"paired_bootstrap: systems scored {x.size} and {y.size} samples; pairs need equal counts")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    d = y - x
    observed = float(d.mean())
    idx = bootstrap_indices(d.size, n_resamples, seed)
    resampled = d[idx].mean(axis=1)
    ci = _interval(observed, resampled, confidence)
    # Tiny tolerance so that exact ties (e.g. observed 0 and resampled 0) count as "at least as extreme".
    extreme = np.abs(resampled - observed) >= abs(observed) - 1e-12
    p_value = (1.0 + float(extreme.sum())) / (n_resamples + 1.0)
    return {"n": int(d.size), "mean_a": float(x.mean()), "mean_b": float(y.mean()), "mean_diff": observed,
            "ci_low": ci["low"], "ci_high": ci["high"], "p_value": min(1.0, p_value),
            "n_resamples": n_resamples, "seed": seed}
