"""A trained run, opened once: ``open_run(path, checkpoint="best" | "last" | STEP) -> Run``.

PPO (its ``init_from``), the evaluation, the Python API, chat and export all read a run the same way:

- ``path`` is a run workdir (``run_info.json``, ``tokenizer/``, ``best/``, ``checkpoints/``) or one of its
  checkpoint folders (``best/`` or ``checkpoints/``);
- ``checkpoint`` picks the params: ``"best"`` (the best validation metric, what chat and eval use by default),
  ``"last"`` (the newest of ``checkpoints/``), or a step number (looked up in ``checkpoints/``, then ``best/``).

Opening reads only ``run_info.json`` and the checkpoint's step list; the tokenizer is loaded on first use and
params are read when asked for (``read_params``), so opening a run is cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from typing import Any, Mapping

from therapy_rl import errors, run_files

CHOICES = ("best", "last")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "greedy")
DECODING_FIELDS = ("top_p", "top_k", "temperature")  # what a decoding search chooses
DECODING_FILE = "decoding.json"  # written by evaluation/decoding_search.save_decoding
DEFAULT_SAMPLING = {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False}


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One checkpoint of a run workdir and the files saved beside it."""

    workdir: str  # absolute; holds run_info.json and tokenizer/
    checkpoint_dir: str  # absolute orbax manager folder (best/ or checkpoints/)
    step: int
    info: Mapping[str, Any]  # run_info.json

    @property
    def mode(self) -> str:
        return self.info.get("mode", "?")

    @property
    def config(self) -> Mapping[str, Any]:
        """The config the run was trained with (a plain dict from run_info.json)."""
        return self.info.get("config", {})

    @property
    def data(self) -> Mapping[str, Any]:
        return self.info["data"]

    @property
    def which(self) -> str:
        """best | last: the manager folder the checkpoint sits in."""
        return "best" if os.path.basename(self.checkpoint_dir) == "best" else "last"

    @property
    def label(self) -> str:
        return f"{self.checkpoint_dir} step {self.step}"

    @property
    def state_dir(self) -> str:
        """The saved state of this step (``<manager>/<step>/state``)."""
        return os.path.join(self.checkpoint_dir, str(self.step), "state")

    @property
    def tokenizer_dir(self) -> str:
        try:
            return run_files.tokenizer_dir(self.workdir)
        except FileNotFoundError as err:
            raise errors.MissingFileError(str(err)) from None

    @functools.cached_property
    def model_config(self):
        from therapy_rl.models import families

        return families.config_from_dict(self.info["model_config"])

    @functools.cached_property
    def tokenizer(self):
        from therapy_rl.data import tokenize

        tok = tokenize.load_tokenizer(self.tokenizer_dir)
        if tok.vocab_size > self.model_config.vocab_size:
            raise errors.InputError(f"the tokenizer of {self.workdir} has {tok.vocab_size} ids but its model only "
                                    f"{self.model_config.vocab_size}")
        return tok

    @property
    def sample_options(self):
        """The sequence format the model learned (context window, emotion and strategy tags)."""
        from therapy_rl.data import samples

        data = self.data
        return samples.SampleOptions(
            include_therapist_emotion=data["include_therapist_emotion"], include_strategy=data["include_strategy"],
            context_turns=data["context_turns"], user_emotion_from=data["user_emotion_from"],
            therapist_run=data.get("therapist_run", "first"))

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.data["max_prompt_tokens"])

    @property
    def reward(self) -> Mapping[str, Any] | None:
        """The reward settings of a PPO run (``config.reward``); None for SFT."""
        return self.config.get("reward")

    @property
    def sampling(self) -> dict:
        """The run's own ``config.sampling`` (what it printed its sample replies with)."""
        saved = dict(self.config.get("sampling") or {})
        return {k: saved[k] for k in SAMPLING_FIELDS if k in saved}

    @functools.cached_property
    def decoding(self) -> dict | None:
        """``decoding.json`` in the run workdir (a decoding search's choice), or None."""
        path = os.path.join(self.workdir, DECODING_FILE)
        return read_decoding(path) if os.path.exists(path) else None

    def default_sampling(self, decoding: Any = None) -> tuple[dict, str]:
        """(sampling fields, where they come from) for replies of this run: its config.sampling with the settings
        of a decoding search on top. ``decoding``: None = the run's decoding.json if any; a decoding.json path, a
        folder holding one or a dict; False = none (config.sampling only). A search's choice turns greedy off."""
        values = {**DEFAULT_SAMPLING, **self.sampling}
        source = f"{self.workdir} config.sampling"
        if decoding is None and self.decoding is not None:
            decoding, source = self.decoding, os.path.join(self.workdir, DECODING_FILE)
        elif decoding is not None and decoding is not False:
            source = "the given decoding settings" if isinstance(decoding, Mapping) else str(decoding)
            decoding = read_decoding(decoding)
        if decoding is not None and decoding is not False:
            values.update(decoding_settings(decoding), greedy=False)
        return values, source

    def read_params(self) -> Any:
        """The GPT-2 params of this checkpoint as host numpy (a PPO state's trunk unwrapped; no optimizer state)."""
        from therapy_rl import checkpoint

        return checkpoint.read_params_as_numpy(self.state_dir)

    def copy_tokenizer(self, target_workdir: str) -> str:
        """``target_workdir/tokenizer``, copied atomically from this run once (process 0; all processes wait)."""
        import jax

        target = os.path.join(target_workdir, "tokenizer")
        if not os.path.isdir(target) and jax.process_index() == 0:
            building = target + ".building"
            shutil.rmtree(building, ignore_errors=True)
            shutil.copytree(self.tokenizer_dir, building)
            os.replace(building, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("copy tokenizer")
        return target


def checkpoint_choice(which: str, step: int) -> str | int:
    """A config's (which, step) pair as ``open_run``'s checkpoint: the step when it is >= 0, else which."""
    return int(step) if int(step) >= 0 else which


def parse_checkpoint(value: str | int) -> str | int:
    """best | last | a step number (an int or its digits, as typed on a command line)."""
    if isinstance(value, bool):
        raise errors.ConfigError(f"checkpoint {value!r}: expected best, last or a step number")
    if isinstance(value, int):
        if value < 0:
            raise errors.ConfigError(f"checkpoint step {value}: expected a step >= 0")
        return value
    text = str(value).strip()
    if text in CHOICES:
        return text
    if text.isdigit():
        return int(text)
    raise errors.ConfigError(f"checkpoint {value!r}: expected best, last or a step number")


def open_run(path: str, checkpoint: str | int = "best", *, where: str = "workdir") -> Run:
    """Opens ``path`` (a run workdir or one of its checkpoint folders) at ``checkpoint`` (see module docstring).
    ``where`` names the setting in error messages (e.g. ``config.checkpoint``)."""
    choice = parse_checkpoint(checkpoint)
    if isinstance(choice, str):
        directory, step, workdir = _resolve(path, choice, -1, where)
    else:
        directory, step, workdir = _resolve_step(path, choice, where)
    return Run(workdir=workdir, checkpoint_dir=directory, step=step, info=_read_info(workdir))


def _resolve(path: str, which: str, step: int, where: str) -> tuple[str, int, str]:
    """run_files.resolve_run_checkpoint with its errors as user errors."""
    try:
        return run_files.resolve_run_checkpoint(path, which, step, where=where)
    except errors.UserError:
        raise
    except FileNotFoundError as err:
        raise errors.MissingFileError(str(err)) from None
    except ValueError as err:
        raise errors.ConfigError(str(err)) from None


def _resolve_step(path: str, step: int, where: str) -> tuple[str, int, str]:
    """A step of checkpoints/, else of best/."""
    problems = []
    for which in ("last", "best"):
        try:
            return _resolve(path, which, step, where)
        except errors.MissingFileError as err:
            problems.append(str(err))
    if all("no such step" in p for p in problems):
        raise errors.MissingFileError(" and ".join(dict.fromkeys(problems)))
    raise errors.MissingFileError(problems[0])


def _read_info(workdir: str) -> dict:
    try:
        return run_files.read_run_info(workdir)
    except errors.UserError:
        raise
    except FileNotFoundError as err:
        raise errors.MissingFileError(str(err)) from None
    except ValueError as err:  # a torn or hand-edited file
        raise errors.InputError(f"{os.path.join(workdir, run_files.RUN_INFO)}: {err}") from None


def decoding_settings(payload: Mapping[str, Any]) -> dict:
    """top_p / top_k / temperature of a decoding.json payload (``decoding_search.save_decoding``)."""
    settings = dict(payload["settings"])
    unknown = sorted(set(settings) - set(DECODING_FIELDS))
    missing = sorted(set(DECODING_FIELDS) - set(settings))
    if unknown or missing:
        raise errors.InputError(f"decoding.json: field 'settings' has unknown keys {unknown} or misses {missing}")
    return {"top_p": float(settings["top_p"]), "top_k": int(settings["top_k"]),
            "temperature": float(settings["temperature"])}


def read_decoding(source: str | Mapping[str, Any]) -> dict:
    """A decoding.json payload from a file, a folder holding one (an eval workdir), or a dict (a payload, or
    just its settings)."""
    import json

    if isinstance(source, Mapping):
        payload = dict(source)
        return payload if "settings" in payload else {"settings": payload, "chosen_on_split": "(given)"}
    path = os.path.join(source, DECODING_FILE) if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"{path}: no such file (expected a decoding.json or a folder holding one)")
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except ValueError as err:
        raise errors.InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(payload, dict) or "settings" not in payload:
        raise errors.InputError(f"{path}: field 'settings' is missing")
    decoding_settings(payload)  # checks its keys
    return payload
