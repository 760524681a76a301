"""training_curves.png from a run's metrics.jsonl: one panel per kind of quantity, so no panel mixes scales.

Panels (each drawn only when the run logged something for it):
  scores             objective/scores (train) beside eval/scores (validation) and the best so far
  reward components  reward/<part> and eval/reward/<part>, lengths excluded
  lengths            response lengths in tokens and characters
  KL                 objective/kl, eval/kl, approximate KLs (the KL coefficient has its own panel)
  KL coefficient     objective/kl_coef
  losses             train/loss, val/loss (SFT validation), loss/policy, loss/value, ...
  values             PPO's value predictions and returns: value/mean, value/vpred_avg, returns/mean, ...
  rates              clip fractions, EOS and emotion-tag rates, token accuracy
Time, throughput and learning-rate series are left to TensorBoard.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

_LENGTH_WORDS = ("length", "num_chars", "len_mean", "target_tokens")


def _is_length(key: str) -> bool:
    return any(word in key for word in _LENGTH_WORDS)


def _is_kl_coef(key: str) -> bool:
    return key.split("/")[-1].startswith("kl_coef")


def _is_kl(key: str) -> bool:
    return "kl" in key.split("/")[-1] and not _is_kl_coef(key)


def _is_score(key: str) -> bool:
    return key in ("objective/scores", "objective/rlhf_reward", "eval/scores", "eval/best_scores")


_SUMMED_COMPONENTS = ("quality", "emotion", "relevance", "empathy", "sentiment", "penalty", "safety")


def _is_reward_key(key: str) -> bool:
    return (key.startswith("reward/") or key.startswith("eval/reward/")) and not _is_length(key)


def _is_component(key: str) -> bool:
    """The pieces the total reward sums (train solid, validation dashed in the same colour)."""
    return _is_reward_key(key) and key.split("/")[-1] in _SUMMED_COMPONENTS


def _is_reward_diagnostic(key: str) -> bool:
    """Flags and raw signals behind the components (crisis flags, tag validity, cosine, ...)."""
    return _is_reward_key(key) and not _is_component(key)


def _is_loss(key: str) -> bool:
    return key.startswith("loss/") or key.endswith("/loss") or key.endswith("best_loss")


def _is_value(key: str) -> bool:
    """Value predictions and returns (one scale); their variances and errors are left to TensorBoard."""
    head, _, last = key.partition("/")
    return head in ("value", "returns") and last.split("_")[0] in ("mean", "vpred")


def _is_rate(key: str) -> bool:
    last = key.split("/")[-1]
    return last.endswith("_rate") or "clipfrac" in last or last == "token_accuracy"


PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("scores (train and validation)", _is_score),
    ("reward components", _is_component),
    ("reward diagnostics", _is_reward_diagnostic),
    ("lengths", _is_length),
    ("KL", _is_kl),
    ("KL coefficient", _is_kl_coef),
    ("losses", _is_loss),
    ("values", _is_value),
    ("rates", _is_rate),
)


def collect_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) of every finite numeric value in the rows."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(row["step"]))
            values.append(float(value))
    return series


def assign_panels(keys) -> list[tuple[str, list[str]]]:
    """(title, keys) for each panel with data; a key goes to the first panel that claims it."""
    taken: set[str] = set()
    panels = []
    for title, claims in PANELS:
        mine = sorted(k for k in keys if k not in taken and claims(k))
        taken.update(mine)
        if mine:
            panels.append((title, mine))
    return panels


def _train_name(key: str) -> str:
    """``eval/reward/quality`` -> ``reward/quality``: a validation curve shares its training curve's colour."""
    return key[len("eval/"):] if key.startswith("eval/") else key


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: str) -> str | None:
    """Writes the curves to ``path``; None when the rows hold nothing to plot."""
    series = collect_series(rows)
    panels = assign_panels(series)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    heights = [max(2.4, 0.16 * len(keys) + 0.4) for _, keys in panels]  # room for each panel's legend
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights)), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes[:, 0], panels):
        bases = list(dict.fromkeys(_train_name(k) for k in keys))
        for key in keys:
            steps, values = series[key]
            colour = palette[bases.index(_train_name(key)) % len(palette)]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key, color=colour,
                    linestyle="--" if key.startswith("eval/") else "-")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    axes[-1, 0].set_xlabel("step")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
