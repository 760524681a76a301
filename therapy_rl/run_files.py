"""Files a run leaves beside its checkpoints so later stages (PPO, eval, chat) rebuild the same model:
``run_info.json`` (model shape, data options) and ``tokenizer/``."""

from __future__ import annotations

import fnmatch
import json
import os
import time
from typing import Any

from therapy_rl import errors
from therapy_rl.models import gpt2

RUN_INFO = "run_info.json"


def write_run_info(workdir: str, config, model_config: gpt2.GPT2Config, resume: dict | None = None) -> None:
    """Atomically writes the model config, the data options and the config the run is trained with (process 0).

    The ``resumes`` list of an existing file is kept; ``resume`` (from `check_resume`) is appended to it.
    """
    import jax

    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, RUN_INFO)
    resumes = read_run_info(workdir).get("resumes", []) if os.path.exists(path) else []
    info = {
        "mode": config.mode,
        "model_config": _model_config_dict(model_config),
        "data": config.data.to_dict(),
        "config": _config_json(config),
        "resumes": resumes + ([resume] if resume is not None else []),
    }
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)


def read_run_info(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, RUN_INFO)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a therapy_rl run directory?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ resume check

# Fields a resume may change: how long to train, the optimizer's step size and schedule, the logging, eval and
# checkpoint cadence, the device layout and memory knobs, and what is printed. Any other change is refused: it
# would change the model, tokenizer, data, reward or run identity under the saved checkpoints.
RESUMABLE_FIELDS = (
    "max_steps", "max_iterations", "num_epochs",
    "learning_rate", "warmup_fraction", "lr_schedule", "weight_decay", "grad_clip_norm",
    "adam_b1", "adam_b2", "adam_eps",
    "log_every_*", "eval_every_*", "checkpoint_every_*", "keep_checkpoints", "early_stopping_patience_evals",
    "eval_at_start", "eval_batch_size", "progress_bar", "num_sample_replies",
    "mesh.*", "grad_accum_steps", "ppo.grad_accum_steps", "model.remat", "wandb.*",
)
RESUMABLE_IN_MODE = {"sft": ("sampling.*", "export_hf")}  # SFT samples only for the printed replies
MAP_FIELDS = ("data.esconv_emotion_map",)  # user maps, compared whole


def _config_json(config) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = prefix + key
        if isinstance(value, dict) and value and path not in MAP_FIELDS:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _defaults_of(mode: str) -> dict[str, Any]:
    from therapy_rl import defaults

    make = {"sft": defaults.sft_defaults, "ppo": defaults.ppo_defaults}.get(mode)
    return _flatten(_config_json(make())) if make else {}


def _same(field: str, old: Any, new: Any) -> bool:
    if field == "init_from" and old and new:  # one folder, spelled relative or absolute
        return os.path.realpath(old) == os.path.realpath(new)
    return old == new


def _refusal(field: str, old: Any, new: Any, mode: str) -> str | None:
    """Why ``field`` may not change from ``old`` to ``new`` on resume; None when it may."""
    allowed = RESUMABLE_FIELDS + RESUMABLE_IN_MODE.get(mode, ())
    if not any(fnmatch.fnmatchcase(field, pattern) for pattern in allowed):
        return f"config.{field}: {old!r} -> {new!r}"
    if field == "grad_clip_norm" and (float(old or 0) > 0) != (float(new or 0) > 0):
        return f"config.{field}: {old!r} -> {new!r} (turning clipping on or off changes the optimizer state)"
    return None


def config_changes(saved: dict[str, Any], config) -> dict[str, list]:
    """{field: [saved value, new value]} for every field ``config`` sets differently from the ``saved`` config
    (run_info.json's "config"). A field the saved config lacks (added since) counts only when set away from
    its default; a field the new config lacks (removed since) is ignored."""
    old, new = _flatten(saved), _flatten(_config_json(config))
    defaults = _defaults_of(str(new.get("mode", "")))
    changes = {}
    for field, value in new.items():
        before = old[field] if field in old else defaults.get(field, value)
        if not _same(field, before, value):
            changes[field] = [old.get(field), value]
    return changes


def check_resume(workdir: str, config) -> dict[str, Any] | None:
    """Compares ``config`` with the one saved in ``workdir/run_info.json`` before anything is written.

    Returns None for a new run, else the resume record to append to run_info.json's ``resumes``:
    {"time", "changed": {field: [old, new]}}. Raises `IncompatibleResumeError` naming each field that may not
    change (RESUMABLE_FIELDS lists those that may), with its saved and new values.
    """
    path = os.path.join(workdir, RUN_INFO)
    if not os.path.exists(path):
        return None
    try:
        saved = read_run_info(workdir)
    except ValueError as e:
        raise errors.InputError(f"{path} is not valid JSON ({e}): is {workdir!r} a therapy_rl run directory?")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_step": _last_checkpoint_step(workdir)}
    if saved.get("mode") != config.mode:
        raise errors.IncompatibleResumeError(
            f"{workdir} holds a {saved.get('mode')} run ({path}); this {config.mode} run needs its own --workdir")
    if "config" not in saved:  # written before run_info.json held the config: nothing to compare with
        return {**record, "changed": {}}
    changes = config_changes(saved["config"], config)
    mode = str(config.mode)
    refused = [reason for field, (old, new) in changes.items() if (reason := _refusal(field, old, new, mode))]
    if refused:
        raise errors.IncompatibleResumeError(
            f"cannot resume {workdir} with this config, it differs from the run's ({path}) in {len(refused)} "
            f"field(s) that fix the model, tokenizer, data, reward or run: {'; '.join(refused)}. Resume with the "
            f"saved values, or pass a new --workdir")
    return {**record, "changed": changes}


def _last_checkpoint_step(workdir: str) -> int | None:
    """The latest committed step under ``workdir/checkpoints`` (orbax renames a step's folder when complete)."""
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(name) for name in os.listdir(folder) if name.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=None)


def _model_config_dict(model_config) -> dict:
    from therapy_rl.models import families

    return families.config_to_dict(model_config)


def model_config_of(workdir: str, **overrides) -> gpt2.GPT2Config:
    from therapy_rl.models import families

    return families.config_from_dict(read_run_info(workdir)["model_config"]).replace(**overrides)


def tokenizer_dir(workdir: str) -> str:
    path = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} not found: the run's tokenizer is missing")
    return path


# Data options that define the sequence format a model learned: later stages must use the run's values.
FORMAT_FIELDS = ("include_therapist_emotion", "include_strategy", "context_turns", "user_emotion_from",
                 "therapist_run")


def is_unset(key: str, value: Any) -> bool:
    """A PPO / eval data option left for the run to decide: None (``defaults.unset``), an empty map, or source ""."""
    return value is None or (key == "source" and value == "") or (hasattr(value, "keys") and not len(value))


def inherit_data_options(requested, run_data: dict[str, Any], where: str = "config.data",
                         always_from_request: tuple[str, ...] = ()):
    """A run's data options overlaid with every requested field that is set (see `is_unset`): a set value always
    wins, even when it equals the default; an unset one takes the run's value (``data_defaults()``'s if the run
    has none).

    A changed source (e.g. esconv for a cross-domain eval) resets the run's data_dir unless one is requested.
    ``always_from_request`` fields never come from the run (unset = ``data_defaults()``'s value).
    FORMAT_FIELDS must agree with the run: the model only knows that format.
    """
    import ml_collections

    from therapy_rl import defaults

    base = defaults.data_defaults().to_dict()
    wanted = requested.to_dict() if hasattr(requested, "to_dict") else dict(requested)
    resolved = {**base, **run_data}
    for key, value in wanted.items():
        if not is_unset(key, value):
            resolved[key] = value
        elif key in always_from_request:
            resolved[key] = base.get(key)
    if resolved.get("source") != run_data.get("source") and wanted.get("data_dir") in (None, ""):
        resolved["data_dir"] = ""  # the run's folder belongs to its own source
    for key in FORMAT_FIELDS:
        if key in run_data and resolved.get(key) != run_data[key]:
            raise ValueError(f"{where}.{key}={resolved.get(key)!r} differs from the run's {run_data[key]!r}: "
                             "the model was trained on that format")
    if not resolved.get("source"):
        raise ValueError(f"{where}.source is not set and the run's run_info.json has no data source")
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
