"""Files a run leaves beside its checkpoints so later stages (PPO, eval, chat) rebuild the same model:
``run_info.json`` (model shape, data options) and ``tokenizer/``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from therapy_rl.models import gpt2

RUN_INFO = "run_info.json"


def write_run_info(workdir: str, config, model_config: gpt2.GPT2Config) -> None:
    """Atomically writes the model config and the data options the run was trained with."""
    import jax

    if jax.process_index() != 0:
        return
    info = {
        "mode": config.mode,
        "model_config": dataclasses.asdict(model_config),
        "data": config.data.to_dict(),
        "config": json.loads(config.to_json_best_effort()),
    }
    path = os.path.join(workdir, RUN_INFO)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)


def read_run_info(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, RUN_INFO)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a therapy_rl run directory?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_config_of(workdir: str, **overrides) -> gpt2.GPT2Config:
    return gpt2.GPT2Config(**{**read_run_info(workdir)["model_config"], **overrides})


def tokenizer_dir(workdir: str) -> str:
    path = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} not found: the run's tokenizer is missing")
    return path


# Data options that define the sequence format a model learned: later stages must use the run's values.
FORMAT_FIELDS = ("include_therapist_emotion", "include_strategy", "context_turns", "user_emotion_from",
                 "therapist_run")


def inherit_data_options(requested, run_data: dict[str, Any], where: str = "config.data",
                         always_from_request: tuple[str, ...] = ()):
    """A run's data options overlaid with every requested field set away from ``data_defaults()``.

    ``source = ""`` keeps the run's source; a changed source (e.g. esconv for a cross-domain eval) resets the
    run's data_dir unless one is requested. ``always_from_request`` fields always come from ``requested``.
    FORMAT_FIELDS must agree with the run: the model only knows that format.
    """
    import ml_collections

    from therapy_rl import defaults

    base = defaults.data_defaults().to_dict()
    wanted = requested.to_dict() if hasattr(requested, "to_dict") else dict(requested)
    resolved = dict(run_data)
    for key, value in wanted.items():
        if key == "source" and value == "":
            continue
        if key in always_from_request or key not in resolved or value != base.get(key):
            resolved[key] = value
    if resolved.get("source") != run_data.get("source") and wanted.get("data_dir", "") == "":
        resolved["data_dir"] = ""  # the run's folder belongs to its own source
    for key in FORMAT_FIELDS:
        if key in run_data and resolved.get(key) != run_data[key]:
            raise ValueError(f"{where}.{key}={resolved.get(key)!r} differs from the run's {run_data[key]!r}: "
                             "the model was trained on that format")
    if not resolved.get("source"):
        raise ValueError(f"{where}.source is empty and the run's run_info.json has no data source")
    return ml_collections.ConfigDict(resolved)


def resolve_run_checkpoint(path: str, which: str = "best", step: int = -1,
                           where: str = "config.checkpoint") -> tuple[str, int, str]:
    """(checkpoint manager folder, step, run workdir) for ``path``: a run workdir (its best/ or checkpoints/ by
    ``which``: best | last) or a manager folder inside one; step -1 = the latest step there."""
    from therapy_rl import checkpoint

    if not path:
        raise ValueError(f"{where} is empty: pass a run workdir, e.g. {where}=/path/to/sft_run")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}={path!r}: no such folder")
    if which not in ("best", "last"):
        raise ValueError(f"{where} checkpoint choice {which!r}: expected best or last")
    directory = checkpoint.find_checkpoint_dir(path, prefer="best" if which == "best" else "checkpoints")
    steps = checkpoint.Checkpointer(directory).all_steps()
    chosen = max(steps) if step < 0 else step
    if chosen not in steps:
        raise FileNotFoundError(f"{where}: no such step {step} in {directory} (has {sorted(steps)})")
    for candidate in (path, os.path.dirname(os.path.abspath(directory))):
        if os.path.exists(os.path.join(candidate, RUN_INFO)):
            return os.path.abspath(directory), int(chosen), os.path.abspath(candidate)
    raise FileNotFoundError(f"{where}={path!r}: no {RUN_INFO} there or beside {directory}")
