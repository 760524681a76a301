"""Decoding-settings search (top_p x top_k x temperature) on a VALIDATION split, saved to `decoding.json`.

The paper tuned its grid on the first 100 test samples; here a search on a split whose name contains the word
"test" raises unless `allow_test_split=True`, and the chosen split is saved and printed in every report.
Generation is the caller's: `search_decoding` takes callables.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

from therapy_rl import errors

# The paper's grid (top_k 0 = no top-k filter).
PAPER_GRID = {
    "top_p": (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95),
    "top_k": (0, 5, 10, 15, 20, 25, 30, 35),
    "temperature": (1.0, 1.1, 1.2, 1.3),
}
DECODING_FILE = "decoding.json"

Metric = str | Mapping[str, float]  # a score name, or weights of a weighted sum of scores


def decoding_grid(top_p: Sequence[float] = PAPER_GRID["top_p"], top_k: Sequence[int] = PAPER_GRID["top_k"],
                  temperature: Sequence[float] = PAPER_GRID["temperature"]) -> list[dict]:
    """All combinations, in top_p-major order, as dicts {"top_p", "top_k", "temperature"}."""
    for name, values in (("top_p", top_p), ("top_k", top_k), ("temperature", temperature)):
        if not values:
            raise errors.ConfigError(f"decoding_grid: {name} has no values")
    for p in top_p:
        if not 0.0 < p <= 1.0:
            raise errors.ConfigError(f"decoding_grid: top_p {p} is outside (0, 1]")
    for k in top_k:
        if int(k) != k or k < 0:
            raise errors.ConfigError(f"decoding_grid: top_k {k} must be a non-negative integer")
    for t in temperature:
        if t <= 0:
            raise errors.ConfigError(f"decoding_grid: temperature {t} must be positive")
    return [{"top_p": float(p), "top_k": int(k), "temperature": float(t)}
            for p, k, t in itertools.product(top_p, top_k, temperature)]


def is_test_split(split_name: str) -> bool:
    """True when the split's name has the word "test" (test, mesc_test, esconv-test, Test...)."""
    return "test" in re.split(r"[^a-z0-9]+", split_name.lower())


def metric_value(scores: Mapping[str, float], metric: Metric) -> float:
    if isinstance(metric, str):
        if metric not in scores:
            raise KeyError(f"metric {metric!r} is not among the scores {sorted(scores)}")
        return float(scores[metric])
    missing = [name for name in metric if name not in scores]
    if missing:
        raise KeyError(f"weighted metric needs scores {missing}, have {sorted(scores)}")
    return float(sum(weight * float(scores[name]) for name, weight in metric.items()))


def select_best(results: Sequence[Mapping[str, Any]], metric: Metric) -> dict:
    """The entry {"settings", "scores"} with the highest metric; ties go to the earliest entry."""
    if not results:
        raise ValueError("select_best: no results")
    best_i = max(range(len(results)), key=lambda i: (metric_value(results[i]["scores"], metric), -i))
    best = results[best_i]
    return {"settings": dict(best["settings"]), "scores": dict(best["scores"]),
            "objective": metric_value(best["scores"], metric), "index": best_i}


def search_decoding(generate_fn: Callable[[dict], Any], score_fn: Callable[[Any], Mapping[str, float]],
                    grid: Sequence[dict], split_name: str, *, metric: Metric = "rougeL",
                    allow_test_split: bool = False, log_fn: Callable[[str], None] | None = print) -> dict:
    """Run `score_fn(generate_fn(settings))` for every grid entry and pick the best by `metric`.

    `generate_fn(settings)` generates for the search split (the caller fixes its PRNG key); `score_fn` returns a
    flat dict of floats. Returns {"split", "metric", "best", "results", "forced_on_test_split"}.
    """
    if is_test_split(split_name) and not allow_test_split:
        raise errors.ConfigError(f"refusing to search decoding settings on split {split_name!r}: use the validation "
                                 "split (allow_test_split=True forces it, and reports will say so)")
    if not grid:
        raise ValueError("search_decoding: empty grid")
    results, started = [], time.perf_counter()
    for i, settings in enumerate(grid):
        t = time.perf_counter()
        scores = {k: float(v) for k, v in dict(score_fn(generate_fn(dict(settings)))).items()}
        results.append({"settings": dict(settings), "scores": scores, "seconds": round(time.perf_counter() - t, 3)})
        if log_fn is not None:
            log_fn(f"[decoding {i + 1}/{len(grid)}] {settings} -> {metric_value(scores, metric):.4f} "
                   f"({results[-1]['seconds']:.1f}s)")
    return {"split": split_name, "metric": metric if isinstance(metric, str) else dict(metric),
            "best": select_best(results, metric), "results": results,
            "forced_on_test_split": bool(is_test_split(split_name)),
            "search_seconds": round(time.perf_counter() - started, 2)}


def decoding_payload(search: Mapping[str, Any]) -> dict:
    """What `save_decoding` writes: the chosen settings, the split that chose them and all candidates."""
    return {
        "settings": search["best"]["settings"],
        "chosen_on_split": search["split"],
        "forced_on_test_split": bool(search.get("forced_on_test_split", False)),
        "metric": search["metric"],
        "objective": search["best"]["objective"],
        "n_candidates": len(search["results"]),
        "search_seconds": search.get("search_seconds"),  # generation and scoring of every candidate
        "compiled_samplers": search.get("compiled_samplers"),  # distinct sampler programs the grid needed
        "results": search["results"],
    }


def save_decoding(workdir: str, search: Mapping[str, Any]) -> str:
    """Write `decoding_payload(search)` to `<workdir>/decoding.json`."""
    os.makedirs(workdir, exist_ok=True)
    payload = decoding_payload(search)
    path = os.path.join(workdir, DECODING_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    return path


def load_decoding(workdir: str) -> dict | None:
    """The saved search of a workdir, or None when there is none. Raises on a file without settings/split."""
    path = os.path.join(workdir, DECODING_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        payload = json.load(f)
    for field in ("settings", "chosen_on_split"):
        if field not in payload:
            raise errors.InputError(f"{path}: field {field!r} is missing; delete the file to search again")
    return payload
