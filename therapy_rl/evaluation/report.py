"""Evaluation report of one workdir: report.json, report.md and PNG plots (matplotlib, Agg backend).

`write_report(workdir, results, ...)` takes an `evaluate_generations` result (CIs are added when missing) and
writes:
- report.json: everything, per-sample values included (compare.py pairs checkpoints on them);
- report.md: metrics with 95% CIs, emotion accuracy beside the majority baselines, macro-F1 and the confusion
  matrix, the paper's rows beside ours, the METEOR variant, which split chose the decoding settings, judge
  scores, sample generations and the plots;
- plots/metrics_ci.png, plots/emotion_confusion.png, plots/training_curves.png (when metrics.jsonl has curves).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from therapy_rl.evaluation.bootstrap import confidence_intervals

# Zhang & Ive, Table 5 (MESC test, 454 samples) and Table 6 (ESConv, cross-domain). Facts from the paper.
PAPER_COLUMNS = ("bleu", "rouge1", "rouge2", "rougeL", "meteor", "emotion_accuracy")
PAPER_TABLE5_MESC = {
    "GPT-2": {"bleu": .0021, "rouge1": .0478, "rouge2": .0064, "rougeL": .0408, "meteor": .0691,
              "emotion_accuracy": .6696},
    "SFT (no emotion)": {"bleu": .0106, "rouge1": .1160, "rouge2": .0159, "rougeL": .1058, "meteor": .0433,
                         "emotion_accuracy": .8084},
    "SFT (emotion)": {"bleu": .0108, "rouge1": .1164, "rouge2": .0175, "rougeL": .1076, "meteor": .0485,
                      "emotion_accuracy": .9229},
    "RL": {"bleu": .0111, "rouge1": .1397, "rouge2": .0213, "rougeL": .1317, "meteor": .0581,
           "emotion_accuracy": .9934},
}
PAPER_TABLE6_ESCONV = {
    "SFT": {"bleu": .0050, "rouge1": .1046, "rouge2": .0089, "rougeL": .0925, "meteor": .0354},
    "RL": {"bleu": .0042, "rouge1": .1110, "rouge2": .0092, "rougeL": .1002, "meteor": .0290},
}
PAPER_TABLES = {"mesc": ("Table 5, MESC test", PAPER_TABLE5_MESC), "esconv": ("Table 6, ESConv", PAPER_TABLE6_ESCONV)}
PAPER_MESC_MAJORITY_BASELINE = 452 / 454  # 452 of 454 reference therapist emotions are "neutral"
PAPER_JUDGE_OVERALL = {"GPT-2": 1.062, "SFT": 1.655, "RL": 1.718}  # GPT-4o-mini, first 100 test samples

METRIC_LABELS = {
    "bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "meteor": "METEOR",
    "token_f1": "token F1", "bertscore_minilm_p": "BERTScore-MiniLM P", "bertscore_minilm_r": "BERTScore-MiniLM R",
    "bertscore_minilm_f1": "BERTScore-MiniLM F1", "length_words": "mean length (words)",
    "repeated_2gram_rate": "repeated 2-gram rate", "repeated_3gram_rate": "repeated 3-gram rate",
    "emotion_correct": "emotion accuracy", "emotion_tag_valid": "emotion-tag coverage",
    "strategy_correct": "strategy accuracy", "distinct_1": "distinct-1", "distinct_2": "distinct-2",
    "emotion_macro_f1": "emotion macro-F1",
}
# Metrics on a 0-1 scale drawn in the bar plot.
BAR_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "meteor", "token_f1", "bertscore_minilm_f1", "distinct_1",
               "distinct_2", "emotion_correct", "emotion_macro_f1", "strategy_correct")
OVERLAP_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "meteor", "token_f1", "bertscore_minilm_f1")
PLOTS_DIR = "plots"


# ------------------------------------------------------------------------------------------------ report dict
def metric_table(results: Mapping[str, Any]) -> dict[str, dict]:
    """{metric: {"mean", "low", "high", "kind"}} from a result with "ci" (per-sample, then corpus metrics)."""
    ci = results["ci"]
    table = {name: {**ci["per_sample"][name], "kind": "per-sample mean"} for name in results["per_sample"]}
    for name, value in ci["corpus"].items():
        table[name] = {**value, "kind": "corpus"}
    return table


def build_report(results: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
                 decoding: Mapping[str, Any] | None = None, judge: Mapping[str, Any] | None = None,
                 paper_table: str | None = "mesc", n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> dict:
    """The report.json content (JSON-ready)."""
    if "ci" not in results:
        results = {**results, "ci": confidence_intervals(results, n_resamples=n_resamples, seed=seed,
                                                         confidence=confidence)}
    if paper_table is not None and paper_table not in PAPER_TABLES:
        raise ValueError(f"paper_table must be one of {sorted(PAPER_TABLES)} or None, got {paper_table!r}")
    report = {
        "meta": dict(meta or {}),
        "n_samples": results["n_samples"],
        "meteor_variant": results["meteor_variant"],
        "tokenization": results.get("tokenization"),
        "metrics": metric_table(results),
        "means": results["means"],
        "corpus": results["corpus"],
        "emotion": results["emotion"],
        "strategy": results.get("strategy"),
        "decoding": _decoding_summary(decoding),
        "judge": _judge_summary(judge),
        "paper_table": paper_table,
        "ci": {k: results["ci"][k] for k in ("n_resamples", "seed", "confidence", "method")},
        "per_sample": results["per_sample"],
        "samples": results["samples"],
    }
    return _json_ready(report)


def _decoding_summary(decoding: Mapping[str, Any] | None) -> dict | None:
    if decoding is None:
        return None
    out = {"settings": dict(decoding.get("settings", {})),
           "chosen_on_split": decoding.get("chosen_on_split"),
           "forced_on_test_split": bool(decoding.get("forced_on_test_split", False)),
           "metric": decoding.get("metric"), "objective": decoding.get("objective"),
           "n_candidates": decoding.get("n_candidates")}
    return out


def _judge_summary(judge: Mapping[str, Any] | None) -> dict | None:
    if judge is None:
        return None
    return {k: judge.get(k) for k in ("model", "mode", "per_criterion", "overall", "counts", "per_item")}


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------ markdown
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def _cell(text: Any, limit: int = 160) -> str:
    text = "" if text is None else " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _metric_rows(metrics: Mapping[str, dict]) -> list[str]:
    rows = ["| metric | mean | 95% CI | kind |", "|---|---|---|---|"]
    for name, m in metrics.items():
        digits = 2 if name == "length_words" else 4
        ci = f"[{_fmt(m.get('low'), digits)}, {_fmt(m.get('high'), digits)}]"
        rows.append(f"| {METRIC_LABELS.get(name, name)} | {_fmt(m.get('mean'), digits)} | {ci} | {m['kind']} |")
    return rows


def _emotion_lines(report: Mapping[str, Any]) -> list[str]:
    emo, metrics = report["emotion"], report["metrics"]
    acc = metrics.get("emotion_correct", {"mean": emo["accuracy"]})
    f1 = metrics.get("emotion_macro_f1", {"mean": emo["macro_f1"]})
    lines = ["| | accuracy | macro-F1 |", "|---|---|---|",
             f"| **this model** | **{_fmt(acc['mean'])}** [{_fmt(acc.get('low'))}, {_fmt(acc.get('high'))}] "
             f"| {_fmt(f1['mean'])} [{_fmt(f1.get('low'))}, {_fmt(f1.get('high'))}] |"]
    for key in ("majority_baseline", "train_majority_baseline"):
        base = emo.get(key)
        if base:
            lines.append(f"| always \"{base['label']}\" (majority of {base['source']}) | {_fmt(base['accuracy'])} "
                         f"| {_fmt(base['macro_f1'])} |")
    lines.append("")
    base = emo.get("majority_baseline")
    if base:
        verdict = "beats" if emo["accuracy"] > base["accuracy"] else "does NOT beat"
        lines.append(f"Emotion accuracy {_fmt(emo['accuracy'])} {verdict} the majority-class baseline "
                     f"{_fmt(base['accuracy'])} (always \"{base['label']}\").")
    lines.append(f"Emotion-tag coverage (a valid label after `<therapist_emotion>`): {_fmt(emo['tag_coverage'])}; "
                 f"tag present: {_fmt(emo.get('tag_present_rate'))}. A missing or invalid tag counts as wrong "
                 "(column \"none\").")
    conf = emo["confusion"]
    lines += ["", "Confusion matrix (rows: reference, columns: generated):", "",
              "| reference \\ generated | " + " | ".join(conf["columns"]) + " |",
              "|---|" + "---|" * len(conf["columns"])]
    for label, row in zip(conf["rows"], conf["matrix"]):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def _paper_lines(report: Mapping[str, Any]) -> list[str]:
    key = report.get("paper_table")
    if key is None:
        return []
    caption, rows = PAPER_TABLES[key]
    columns = [c for c in PAPER_COLUMNS if any(c in r for r in rows.values())]
    ours = dict(report["means"])
    ours["emotion_accuracy"] = report["emotion"]["accuracy"]
    ours_name = report["meta"].get("name") or "ours (this run)"
    head = ["model", *[("emotion acc." if c == "emotion_accuracy" else METRIC_LABELS[c]) for c in columns]]
    lines = [f"### The paper's rows ({caption}) beside ours", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in rows.items():
        lines.append(f"| paper: {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    lines.append(f"| **{_cell(ours_name)}** | " + " | ".join(f"**{_fmt(ours.get(c))}**" for c in columns) + " |")
    lines += ["", f"Our METEOR variant: `{report['meteor_variant']}` (the paper: NLTK METEOR with WordNet)."]
    if key == "mesc":
        lines.append(f"The paper's MESC majority baseline (always \"neutral\") is {PAPER_MESC_MAJORITY_BASELINE:.4f}, "
                     "above its RL model's 0.9934. The paper tuned decoding on the first 100 *test* samples.")
    return lines


def _decoding_lines(report: Mapping[str, Any]) -> list[str]:
    dec = report.get("decoding")
    meta_settings = report["meta"].get("decoding_settings")
    if dec is None:
        text = "No decoding search: the settings come from the config"
        return [text + (f": `{json.dumps(meta_settings)}`." if meta_settings else ".")]
    lines = [f"Decoding settings `{json.dumps(dec['settings'])}` were chosen on split **{dec['chosen_on_split']}** "
             f"(metric `{dec['metric']}`, {dec['n_candidates']} candidates)."]
    if dec.get("forced_on_test_split"):
        lines.append("**WARNING: they were chosen on a test split (forced); test scores are optimistic.**")
    return lines


def _judge_lines(report: Mapping[str, Any]) -> list[str]:
    judge = report.get("judge")
    if judge is None:
        return ["No LLM-judge scores in this run."]
    lines = [f"Judge model `{judge['model']}`, mode `{judge['mode']}`, scores 1–5.", "",
             "| criterion | mean | n |", "|---|---|---|"]
    for criterion, value in judge["per_criterion"].items():
        lines.append(f"| {criterion} | {_fmt(value['mean'], 3)} | {value['n']} |")
    lines.append(f"| **overall** | **{_fmt(judge['overall'], 3)}** | |")
    counts = judge.get("counts") or {}
    lines += ["", "Counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
              "The paper's overall judge scores (GPT-4o-mini, first 100 test samples): "
              + ", ".join(f"{k} {v}" for k, v in PAPER_JUDGE_OVERALL.items()) + "."]
    return lines


def _sample_lines(report: Mapping[str, Any], n_rows: int) -> list[str]:
    s = report["samples"]
    n = min(n_rows, len(s["generated"]))
    lines = ["| # | user | reference | generated | gold emo. | gen. emo. |", "|---|---|---|---|---|---|"]
    for i in range(n):
        pred = s["pred_emotion"][i] or f"none ({_cell(s['raw_pred_emotion'][i], 20) or 'no tag'})"
        lines.append(f"| {i} | {_cell(s['user_text'][i])} | {_cell(s['reference'][i])} | {_cell(s['generated'][i])} "
                     f"| {s['gold_emotion'][i]} | {pred} |")
    return lines


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str], n_sample_rows: int = 10) -> str:
    meta = report["meta"]
    title = meta.get("title") or f"Evaluation report: {meta.get('name', 'run')}"
    lines = [f"# {title}", ""]
    for key in ("dataset", "split", "checkpoint", "workdir"):
        if meta.get(key):
            lines.append(f"- {key}: `{meta[key]}`")
    lines += [f"- samples: {report['n_samples']}", f"- METEOR variant: `{report['meteor_variant']}`",
              f"- confidence intervals: {report['ci']['confidence']:.0%} percentile bootstrap, "
              f"{report['ci']['n_resamples']} resamples, seed {report['ci']['seed']}; corpus metrics' intervals "
              "are shifted by the bootstrap bias (resampling repeats replies)", ""]
    lines += ["## Decoding", "", *_decoding_lines(report), ""]
    lines += ["## Metrics", "", *_metric_rows(report["metrics"]), ""]
    lines += ["BERTScore-MiniLM is greedy cosine matching of all-MiniLM-L6-v2 token states (no idf, no rescaling); "
              "it is not comparable to roberta-large BERTScore.", ""]
    if plots.get("metrics"):
        lines += [f"![metrics with 95% CIs]({plots['metrics']})", ""]
    lines += ["## Emotion", "", *_emotion_lines(report), ""]
    if plots.get("confusion"):
        lines += [f"![emotion confusion matrix]({plots['confusion']})", ""]
    strategy = report.get("strategy")
    if strategy and strategy.get("accuracy") is not None:
        base = strategy["majority_baseline"]
        lines += ["## Strategy", "", f"Strategy accuracy {_fmt(strategy['accuracy'])} on {strategy['n_with_gold']} "
                  f"samples with a reference strategy; majority baseline (always \"{base['label']}\") "
                  f"{_fmt(base['accuracy'])}.", ""]
    lines += ["## Paper comparison", "", *_paper_lines(report), ""]
    lines += ["## LLM judge", "", *_judge_lines(report), ""]
    if plots.get("training"):
        lines += ["## Training curves", "", f"![training curves]({plots['training']})", ""]
    lines += ["## Sample generations", "", *_sample_lines(report, n_sample_rows), ""]
    tok = report.get("tokenization") or {}
    if tok:
        lines += ["## Tokenisation", ""] + [f"- {k}: {v}" for k, v in tok.items()] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(metrics: Mapping[str, dict], path: str, *, baseline: float | None = None,
                     title: str = "Metrics (95% bootstrap CI)") -> str:
    """Two panels: reference-overlap metrics (y autoscaled, they are small) and 0-1 rates (distinct-n, emotion,
    strategy), with the emotion majority baseline drawn over the emotion-accuracy bar."""
    plt = _pyplot()
    names = [n for n in BAR_METRICS if n in metrics and metrics[n].get("mean") is not None]
    groups = [("reference overlap", [n for n in names if n in OVERLAP_METRICS], False),
              ("diversity and labels", [n for n in names if n not in OVERLAP_METRICS], True)]
    groups = [g for g in groups if g[1]]
    widths = [max(2.0, 0.75 * len(g[1]) + 1) for g in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(sum(widths) + 1, 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (panel, keys, unit_scale) in zip(axes[0], groups):
        means = np.array([metrics[n]["mean"] for n in keys], np.float64)
        low = np.array([_or(metrics[n].get("low"), metrics[n]["mean"]) for n in keys], np.float64)
        high = np.array([_or(metrics[n].get("high"), metrics[n]["mean"]) for n in keys], np.float64)
        x = np.arange(len(keys))
        yerr = np.maximum(np.stack([means - low, high - means]), 0.0)  # a point outside its CI draws no bar
        ax.bar(x, means, color="#4C72B0", yerr=yerr, capsize=4,
               error_kw={"elinewidth": 1.2})
        top = 1.05 if unit_scale else max(float(high.max()) * 1.2, 1e-3)
        for xi, m, h in zip(x, means, high):
            ax.text(xi, h + 0.015 * top, f"{m:.3f}", ha="center", va="bottom", fontsize=8)
        if baseline is not None and "emotion_correct" in keys:
            xi = keys.index("emotion_correct")
            ax.hlines(baseline, xi - 0.45, xi + 0.45, colors="#C44E52", linestyles="--", linewidth=2,
                      label=f"majority baseline {baseline:.3f}")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_xticks(x, [METRIC_LABELS.get(n, n) for n in keys], rotation=35, ha="right", fontsize=9)
        ax.set_ylim(0, top)
        ax.set_title(panel, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _or(value, default):
    return default if value is None else value


def plot_confusion(confusion: Mapping[str, Any], path: str,
                   title: str = "Therapist emotion: reference vs generated") -> str:
    plt = _pyplot()
    matrix = np.asarray(confusion["matrix"], np.float64)
    row_sums = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6))
    image = ax.imshow(matrix / row_sums, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            share = matrix[i, j] / row_sums[i, 0]
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=9,
                    color="white" if share > 0.5 else "black")
    ax.set_xticks(range(matrix.shape[1]), confusion["columns"], rotation=40, ha="right")
    ax.set_yticks(range(matrix.shape[0]), confusion["rows"])
    ax.set_xlabel("generated tag")
    ax.set_ylabel("reference")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the reference row")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_metrics_jsonl(path: str) -> list[dict]:
    """Rows of a metrics.jsonl. A malformed line raises naming file and line, except a truncated LAST line
    (a run killed while writing), which is skipped."""
    rows = []
    with open(path) as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{number}: field 'step' is missing")
        rows.append(row)
    return rows


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: str) -> str | None:
    """The run's training curves (``therapy_rl.curves``); None when nothing to plot."""
    from therapy_rl import curves

    return curves.plot_training_curves(rows, path)


# ------------------------------------------------------------------------------------------------ writing
def write_report(workdir: str, results: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
                 decoding: Mapping[str, Any] | None = None, judge: Mapping[str, Any] | None = None,
                 paper_table: str | None = "mesc", n_sample_rows: int = 10, n_resamples: int = 1000,
                 seed: int = 0, confidence: float = 0.95, metrics_jsonl: str | None = None) -> dict[str, str]:
    """Write report.json, report.md and plots into `workdir`; returns their paths.

    `decoding` is the workdir's decoding.json content (`decoding_search.load_decoding`), or None when the config's
    settings were used (pass them as meta["decoding_settings"]). `metrics_jsonl` defaults to
    `<workdir>/metrics.jsonl` (training curves are drawn when it exists).
    """
    os.makedirs(os.path.join(workdir, PLOTS_DIR), exist_ok=True)
    meta = {"workdir": os.path.abspath(workdir), **dict(meta or {})}
    report = build_report(results, meta=meta, decoding=decoding, judge=judge, paper_table=paper_table,
                          n_resamples=n_resamples, seed=seed, confidence=confidence)
    plots: dict[str, str] = {}
    base = report["emotion"].get("majority_baseline") or {}
    plot_metric_bars(report["metrics"], os.path.join(workdir, PLOTS_DIR, "metrics_ci.png"),
                     baseline=base.get("accuracy"))
    plots["metrics"] = f"{PLOTS_DIR}/metrics_ci.png"
    plot_confusion(report["emotion"]["confusion"], os.path.join(workdir, PLOTS_DIR, "emotion_confusion.png"))
    plots["confusion"] = f"{PLOTS_DIR}/emotion_confusion.png"
    jsonl = metrics_jsonl or os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(jsonl):
        if plot_training_curves(read_metrics_jsonl(jsonl), os.path.join(workdir, PLOTS_DIR, "training_curves.png")):
            plots["training"] = f"{PLOTS_DIR}/training_curves.png"
    report["plots"] = plots
    paths = {"json": os.path.join(workdir, "report.json"), "markdown": os.path.join(workdir, "report.md")}
    _write_text(paths["json"], json.dumps(report, indent=1))
    _write_text(paths["markdown"], render_markdown(report, plots, n_sample_rows))
    paths.update({name: os.path.join(workdir, rel) for name, rel in plots.items()})
    return paths


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def console_summary(results: Mapping[str, Any]) -> str:
    """A few lines for the terminal: paper metrics and emotion accuracy beside the majority baseline."""
    m, emo = results["means"], results["emotion"]
    base = emo.get("majority_baseline") or {}
    parts = [f"{METRIC_LABELS[k]} {m[k]:.4f}" for k in ("bleu", "rouge1", "rouge2", "rougeL", "meteor") if k in m]
    text = " | ".join(parts) + f" | METEOR variant {results['meteor_variant']}\n"
    text += (f"emotion accuracy {emo['accuracy']:.4f} vs majority baseline {base.get('accuracy', float('nan')):.4f} "
             f"(always \"{base.get('label')}\") | macro-F1 {emo['macro_f1']:.4f} | tag coverage "
             f"{emo['tag_coverage']:.4f}")
    train = emo.get("train_majority_baseline")
    if train:
        text += f"\ntraining-split majority baseline (always \"{train['label']}\"): {train['accuracy']:.4f}"
    return text
