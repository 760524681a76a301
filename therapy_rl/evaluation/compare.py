"""Compare several evaluated workdirs in one report.

    python -m therapy_rl.evaluation.compare WORKDIR1 WORKDIR2 ... --out DIR [--names a,b,...]
        [--n-resamples 10000] [--seed 0]

Reads each `<workdir>/report.json`, writes `DIR/compare.json`, `DIR/compare.md` and `DIR/compare_metrics.png`:
means with 95% CIs side by side, emotion accuracy beside each run's majority baseline, and a paired bootstrap
test of every later run against the first on the samples both scored (matched by sample id).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from therapy_rl.evaluation.bootstrap import paired_bootstrap
from therapy_rl.evaluation.report import METRIC_LABELS, BAR_METRICS, _fmt, _pyplot, _write_text

PAIRED_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "meteor", "token_f1", "bertscore_minilm_f1",
                  "emotion_correct", "strategy_correct")


def load_report(workdir: str) -> dict:
    path = os.path.join(workdir, "report.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no report.json (run the evaluation on this workdir first)")
    with open(path) as f:
        report = json.load(f)
    for field in ("metrics", "per_sample", "samples", "emotion"):
        if field not in report:
            raise ValueError(f"{path}: field {field!r} is missing")
    return report


def paired_tests(base: Mapping[str, Any], other: Mapping[str, Any], *, n_resamples: int, seed: int) -> dict:
    """Paired bootstrap of other - base per metric over the sample ids both reports scored."""
    ids_a = base["samples"]["sample_id"]
    ids_b = other["samples"]["sample_id"]
    pos_b = {sid: i for i, sid in enumerate(ids_b)}
    pairs = [(i, pos_b[sid]) for i, sid in enumerate(ids_a) if sid in pos_b]
    out: dict[str, Any] = {"n_shared_samples": len(pairs), "tests": {}}
    if not pairs:
        return out
    ia, ib = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    same_refs = all(base["samples"]["reference"][i] == other["samples"]["reference"][j] for i, j in pairs)
    out["same_references"] = same_refs
    if not same_refs:
        return out  # ids collide but texts differ: not the same samples, no paired test
    for metric in PAIRED_METRICS:
        if metric in base["per_sample"] and metric in other["per_sample"]:
            a = [base["per_sample"][metric][i] for i in ia]
            b = [other["per_sample"][metric][j] for j in ib]
            out["tests"][metric] = paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed)
    return out


def compare_reports(reports: Sequence[Mapping[str, Any]], names: Sequence[str], *, n_resamples: int = 10000,
                    seed: int = 0) -> dict:
    if len(reports) < 2:
        raise ValueError("compare needs at least two reports")
    metrics = sorted({m for r in reports for m in r["metrics"]},
                     key=lambda m: (list(METRIC_LABELS).index(m) if m in METRIC_LABELS else 99, m))
    table = {name: {m: r["metrics"].get(m) for m in metrics} for name, r in zip(names, reports)}
    emotion = {name: {"accuracy": r["emotion"]["accuracy"], "macro_f1": r["emotion"]["macro_f1"],
                      "majority_baseline": r["emotion"].get("majority_baseline")} for name, r in zip(names, reports)}
    paired = {f"{name} vs {names[0]}": paired_tests(reports[0], r, n_resamples=n_resamples, seed=seed)
              for name, r in zip(names[1:], reports[1:])}
    return {"runs": list(names), "metrics": metrics, "table": table, "emotion": emotion,
            "meteor_variants": {n: r.get("meteor_variant") for n, r in zip(names, reports)},
            "decoding": {n: r.get("decoding") for n, r in zip(names, reports)},
            "paired": paired, "n_resamples": n_resamples, "seed": seed}


def render_compare_markdown(comparison: Mapping[str, Any], plot: str | None) -> str:
    runs = comparison["runs"]
    lines = ["# Comparison of evaluated runs", "", "| metric | " + " | ".join(runs) + " |",
             "|---|" + "---|" * len(runs)]
    for metric in comparison["metrics"]:
        cells = []
        for run in runs:
            m = comparison["table"][run].get(metric)
            digits = 2 if metric == "length_words" else 4
            cells.append("–" if m is None else
                         f"{_fmt(m['mean'], digits)} [{_fmt(m.get('low'), digits)}, {_fmt(m.get('high'), digits)}]")
        lines.append(f"| {METRIC_LABELS.get(metric, metric)} | " + " | ".join(cells) + " |")
    lines += ["", "## Emotion accuracy beside the majority baseline", "",
              "| run | accuracy | majority baseline | macro-F1 |", "|---|---|---|---|"]
    for run in runs:
        e = comparison["emotion"][run]
        base = e["majority_baseline"] or {}
        lines.append(f"| {run} | {_fmt(e['accuracy'])} | {_fmt(base.get('accuracy'))} (always "
                     f"\"{base.get('label')}\") | {_fmt(e['macro_f1'])} |")
    lines += ["", "METEOR variants: " + ", ".join(f"{k} `{v}`" for k, v in comparison["meteor_variants"].items()),
              "", "Decoding settings chosen on: " + ", ".join(
                  f"{k} {(v or {}).get('chosen_on_split') or 'config (no search)'}"
                  for k, v in comparison["decoding"].items()), ""]
    lines += ["## Paired bootstrap tests", "",
              f"{comparison['n_resamples']} resamples, seed {comparison['seed']}; difference = run − first run; "
              "two-sided p-value.", ""]
    for label, result in comparison["paired"].items():
        lines.append(f"### {label} ({result['n_shared_samples']} shared samples)")
        lines.append("")
        if not result["tests"]:
            why = ("no shared sample ids" if not result["n_shared_samples"]
                   else "shared ids but different references")
            lines += [f"No paired test: {why}.", ""]
            continue
        lines += ["| metric | first | this | difference [95% CI] | p |", "|---|---|---|---|---|"]
        for metric, t in result["tests"].items():
            lines.append(f"| {METRIC_LABELS.get(metric, metric)} | {_fmt(t['mean_a'])} | {_fmt(t['mean_b'])} | "
                         f"{t['mean_diff']:+.4f} [{_fmt(t['ci_low'])}, {_fmt(t['ci_high'])}] | {t['p_value']:.4f} |")
        lines.append("")
    if plot:
        lines += [f"![metrics]({plot})", ""]
    return "\n".join(lines)


def plot_comparison(comparison: Mapping[str, Any], path: str) -> str | None:
    runs = comparison["runs"]
    names = [m for m in BAR_METRICS if any((comparison["table"][r].get(m) or {}).get("mean") is not None
                                           for r in runs)]
    if not names:
        return None
    plt = _pyplot()
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * len(names) + 2), 4.8))
    x = np.arange(len(names))
    for k, run in enumerate(runs):
        means, err_low, err_high = [], [], []
        for m in names:
            v = comparison["table"][run].get(m) or {}
            mean = v.get("mean") if v.get("mean") is not None else np.nan
            means.append(mean)
            err_low.append(max(0.0, mean - v["low"]) if v.get("low") is not None else 0.0)
            err_high.append(max(0.0, v["high"] - mean) if v.get("high") is not None else 0.0)
        ax.bar(x + (k - (len(runs) - 1) / 2) * width, means, width, yerr=[err_low, err_high], capsize=3, label=run)
    ax.set_xticks(x, [METRIC_LABELS.get(n, n) for n in names], rotation=35, ha="right", fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_title("Metrics by run (95% bootstrap CI)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_compare(workdirs: Sequence[str], out_dir: str, names: Sequence[str] | None = None, *,
                n_resamples: int = 10000, seed: int = 0) -> dict[str, str]:
    names = list(names) if names else [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(names) != len(workdirs):
        raise ValueError(f"--names has {len(names)} names for {len(workdirs)} workdirs")
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    reports = [load_report(w) for w in workdirs]
    comparison = compare_reports(reports, names, n_resamples=n_resamples, seed=seed)
    comparison["workdirs"] = [os.path.abspath(w) for w in workdirs]
    os.makedirs(out_dir, exist_ok=True)
    plot_path = plot_comparison(comparison, os.path.join(out_dir, "compare_metrics.png"))
    paths = {"json": os.path.join(out_dir, "compare.json"), "markdown": os.path.join(out_dir, "compare.md")}
    _write_text(paths["json"], json.dumps(comparison, indent=1))
    _write_text(paths["markdown"], render_compare_markdown(comparison, "compare_metrics.png" if plot_path else None))
    if plot_path:
        paths["plot"] = plot_path
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="evaluated workdirs (each with report.json)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--names", default=None, help="comma-separated display names, one per workdir")
    parser.add_argument("--n-resamples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else None
    paths = run_compare(args.workdirs, args.out, names, n_resamples=args.n_resamples, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
