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
