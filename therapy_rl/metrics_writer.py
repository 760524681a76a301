"""Run logging: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events and a progress bar.

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


class MetricsWriter:
    """Writes scalars to metrics.jsonl and TensorBoard; shows a tqdm bar over steps."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, description: str = "train",
                 enable_progress_bar: bool = True):
        self.is_writer = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if self.is_writer:
            os.makedirs(workdir, exist_ok=True)
            truncate_metrics(self.path, initial_step)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True,
                             disable=not enable_progress_bar)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.is_writer:
            return
        record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def advance(self, steps: int = 1, postfix: Mapping[str, Any] | None = None) -> None:
        if self._bar is None:
            return
        self._bar.update(steps)
        if postfix:
            self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
