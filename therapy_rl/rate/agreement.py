"""How far raters agree, and how each one scores: Krippendorff's alpha and per-rater distributions.

Krippendorff's alpha over units (replies) rated by any subset of raters (missing ratings allowed):

    alpha = 1 - D_o / D_e
    D_o = 1/n  sum_u  1/(m_u - 1)  sum_{i != j in u} delta(v_i, v_j)      observed disagreement within units
    D_e = 1/(n (n - 1))  sum_{i != j over all n pairable values} delta(v_i, v_j)   expected by chance

Only units with m_u >= 2 values are pairable; n counts their values. delta is (a - b)^2 for the interval metric
and [a != b] for the nominal one. For the interval metric the pair sums have the closed form
sum_{i != j} (v_i - v_j)^2 = 2 (m sum v^2 - (sum v)^2). No jax: the report runs beside the web app.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

HISTOGRAM_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _pair_sum(values: np.ndarray, metric: str) -> float:
    """sum over ordered pairs i != j of delta(v_i, v_j)."""
    m = len(values)
    if metric == "interval":
        return float(2.0 * (m * np.sum(values * values) - np.sum(values) ** 2))
    if metric == "nominal":
        counts = np.asarray(list(Counter(values.tolist()).values()), np.float64)
        return float(m * m - np.sum(counts * counts))
    raise ValueError(f"metric {metric!r}: expected interval or nominal")


def krippendorff_alpha(units: Sequence[Sequence[float]], metric: str = "interval") -> float:
    """Alpha over `units` (each the values its raters gave; any length). nan when fewer than two values are
    pairable or when every pairable value is the same (no expected disagreement)."""
    pairable = [np.asarray(u, np.float64) for u in units if len(u) >= 2]
    n = sum(len(u) for u in pairable)
    if n < 2:
        return float("nan")
    observed = sum(_pair_sum(u, metric) / (len(u) - 1) for u in pairable) / n
    expected = _pair_sum(np.concatenate(pairable), metric) / (n * (n - 1))
    return float(1.0 - observed / expected) if expected > 0 else float("nan")


def units_from_matrix(matrix: np.ndarray) -> list[list[float]]:
    """[raters, units] with nan for a missing rating -> the list of each unit's values."""
    matrix = np.asarray(matrix, np.float64)
    return [[float(v) for v in matrix[:, u] if np.isfinite(v)] for u in range(matrix.shape[1])]


@dataclasses.dataclass(frozen=True)
class RaterSummary:
    name: str
    count: int
    mean: float
    std: float  # sample standard deviation (ddof 1; nan for one rating)
    minimum: float
    q25: float
    median: float
    q75: float
    maximum: float
    unsafe: int
    histogram: tuple[int, ...]  # counts in HISTOGRAM_EDGES bins; the last bin holds 1.0
    rubric_rates: Mapping[str, float]


def summarise_rater(name: str, scores: Sequence[float], unsafe: Sequence[bool],
                    rubrics: Sequence[Mapping[str, bool]]) -> RaterSummary:
    s = np.asarray(scores, np.float64)
    q = np.quantile(s, [0.0, 0.25, 0.5, 0.75, 1.0])
    histogram, _ = np.histogram(s, bins=HISTOGRAM_EDGES)
    keys = sorted({k for r in rubrics for k in r})
    rates = {k: float(np.mean([bool(r.get(k, False)) for r in rubrics])) for k in keys}
    return RaterSummary(name, len(s), float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else float("nan"),
                        float(q[0]), float(q[1]), float(q[2]), float(q[3]), float(q[4]), int(sum(unsafe)),
                        tuple(int(c) for c in histogram), rates)


def agreement_report(ratings) -> dict:
    """The report of `python -m therapy_rl.rate report` from the store's ratings (store.Rating objects)."""
    by_sample: dict[int, list[float]] = {}
    by_rater: dict[str, list] = {}
    for r in ratings:
        by_sample.setdefault(r.sample_id, []).append(r.score)
        by_rater.setdefault(r.rater, []).append(r)
    units = list(by_sample.values())
    multi = [u for u in units if len(u) >= 2]
    raters = [summarise_rater(name, [r.score for r in rs], [r.unsafe for r in rs], [r.rubric for r in rs])
              for name, rs in sorted(by_rater.items())]
    return {
        "num_ratings": len(ratings),
        "num_replies": len(units),
        "num_raters": len(by_rater),
        "replies_with_2_or_more_ratings": len(multi),
        "krippendorff_alpha_interval": krippendorff_alpha(units, "interval"),
        "raters": [dataclasses.asdict(r) for r in raters],
        "histogram_edges": list(HISTOGRAM_EDGES),
    }


def json_safe(value):
    """nan and inf -> None, through dicts, lists and tuples (JSON has no nan)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_report(report: Mapping) -> str:
    alpha = report["krippendorff_alpha_interval"]
    alpha_text = "n/a (needs replies with 2+ ratings that differ somewhere)" if alpha != alpha else f"{alpha:.3f}"
    lines = [f"{report['num_ratings']} ratings of {report['num_replies']} replies by {report['num_raters']} rater(s); "
             f"{report['replies_with_2_or_more_ratings']} replies rated 2+ times",
             f"Krippendorff's alpha (interval): {alpha_text}", "",
             f"{'rater':<20} {'n':>5} {'mean':>6} {'std':>6} {'min':>5} {'q25':>5} {'med':>5} {'q75':>5} "
             f"{'max':>5} {'unsafe':>6}  histogram {report['histogram_edges']}"]
    for r in report["raters"]:
        std = "n/a" if r["std"] != r["std"] else f"{r['std']:.3f}"
        lines.append(f"{r['name'][:20]:<20} {r['count']:>5} {r['mean']:>6.3f} {std:>6} {r['minimum']:>5.2f} "
                     f"{r['q25']:>5.2f} {r['median']:>5.2f} {r['q75']:>5.2f} {r['maximum']:>5.2f} {r['unsafe']:>6}  "
                     f"{list(r['histogram'])}")
    return "\n".join(lines)
