"""Run logging: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events (scalars, sample replies
as text, the config as hparams), optional Weights & Biases, a progress bar, and ``training_curves.png`` at close.

Only process 0 writes. On resume, lines beyond the restored step (and a torn last line from a killed run)
are dropped by an atomic rewrite, so the curves never hold two versions of a step.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from tqdm import tqdm


def _to_python(value: Any) -> Any:
    value = np.asarray(value)
    if value.size != 1:
        return value.tolist()
    scalar = value.item()
    if isinstance(scalar, float) and not math.isfinite(scalar):
        return str(scalar)
    return scalar


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Parsed lines of a metrics.jsonl; a torn final line (killed writer) is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_metrics(path: str, last_step: int) -> None:
    """Keeps only records with step <= last_step, rewriting the file atomically."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", -1)) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested config dict; lists and tuples become strings (hparams take scalars)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def start_wandb(settings: Mapping[str, Any] | None, workdir: str, config: Mapping[str, Any] | None):
    """A W&B run when ``settings["enabled"]`` (``mode="offline"`` needs no network), else None."""
    if not settings or not settings.get("enabled"):
        return None
    try:
        import wandb
    except ImportError as err:
        from therapy_rl.errors import ConfigError

        raise ConfigError("config.wandb.enabled=True but wandb is not installed: pip install -e \".[viz]\"") from err
    return wandb.init(project=settings.get("project") or "therapy_rl", name=settings.get("name") or None,
                      mode=settings.get("mode") or "offline", dir=workdir, config=dict(config or {}),
                      resume="allow", id=settings.get("run_id") or None)


class MetricsWriter:
    """Writes scalars to metrics.jsonl, TensorBoard and (optionally) W&B; shows a tqdm bar over steps."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, description: str = "train",
                 enable_progress_bar: bool = True, wandb_settings: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None):
        self.is_writer = jax.process_index() == 0
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        self._wandb = None
        if self.is_writer:
            os.makedirs(workdir, exist_ok=True)
            truncate_metrics(self.path, initial_step)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True,
                             disable=not enable_progress_bar)
            self._wandb = start_wandb(wandb_settings, workdir, flat_config(config) if config else None)

    def write_config(self, config: Mapping[str, Any], metric_keys: tuple[str, ...]) -> None:
        """The run's config as TensorBoard hparams (compared across runs against ``metric_keys``) and as text."""
        if not self.is_writer:
            return
        from tensorboardX.summary import hparams

        flat = flat_config(config)
        for summary in hparams(flat, {key: 0.0 for key in metric_keys}):
            self._tb.file_writer.add_summary(summary)
        self._tb.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in sorted(flat.items())), 0)
        self._tb.flush()

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Text entries (e.g. sample replies at an eval) in TensorBoard and W&B."""
        if not self.is_writer:
            return
        for tag, text in texts.items():
            self._tb.add_text(tag, text, int(step))
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({tag: text for tag, text in texts.items()}, step=int(step))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.is_writer:
            return
        record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, int(step))
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def advance(self, steps: int = 1, postfix: Mapping[str, Any] | None = None) -> None:
        if self._bar is None:
            return
        self._bar.update(steps)
        if postfix:
            self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        """Closes the logs and draws ``training_curves.png`` from the whole metrics.jsonl."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.is_writer:
            from therapy_rl import curves

            curves.plot_training_curves(read_metrics(self.path), os.path.join(self.workdir, "training_curves.png"))
