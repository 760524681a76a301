"""The whole config, checked before any data is read or anything is written: ``validate(config, workdir)``.

Three passes, each naming the field as the flag that sets it (``--config.a.b=...``) and what it expects:

1. values: enums, ranges, batch splits, the mesh against ``jax.device_count()``; every bad value is listed in
   one ``errors.ConfigError``;
2. paths: the workdir, HF directories (weights, tokenizer), the run named by ``init_from`` / ``checkpoint``, the
   dataset files of every split the stage reads; the first missing one raises ``errors.MissingFileError`` (a
   malformed one ``errors.InputError``);
3. lengths that need a file to be known: sequence and generation lengths against the model's ``n_positions``.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Callable

from therapy_rl import errors

MODES = ("sft", "ppo", "eval")
SOURCES = ("bundled_sample", "mesc", "esconv", "jsonl")
LR_SCHEDULES = ("linear", "cosine", "constant")
CHECKPOINT_CHOICES = ("best", "last")

Rule = tuple[Callable[[Any], bool], str]  # (accepts the value, what is expected)


def one_of(*choices: Any) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def integer(minimum: int) -> Rule:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum), f"an integer >= {minimum}"


def number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Rule:
    def accepts(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return accepts, (f"a finite number in {left}{low:g}, {high:g}{right}" if math.isfinite(high)
                     else f"a finite number {'>' if low_open else '>='} {low:g}")


def numbers(rule: Rule) -> Rule:
    """A non-empty tuple whose every item passes ``rule``."""
    accepts, expected = rule
    return (lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(accepts(x) for x in v),
            f"a non-empty tuple, each item {expected}")


BOOL: Rule = (lambda v: isinstance(v, bool)), "True or False"
FINITE: Rule = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)), \
    "a finite number"
TEXT: Rule = (lambda v: isinstance(v, str)), "a string"
POSITIVE = integer(1)
COUNT = integer(0)
STEP_OR_LATEST = integer(-1)

DATA_RULES = {
    "strict": BOOL, "max_length_tokens": POSITIVE, "drop_long": BOOL, "include_therapist_emotion": BOOL,
    "include_strategy": BOOL, "context_turns": COUNT, "user_emotion_from": one_of("first", "last"),
    "therapist_run": one_of("first", "merge"), "problem_type": one_of("unknown", "json"),
    "max_train_samples": COUNT, "max_eval_samples": COUNT, "max_prompt_tokens": POSITIVE,
    "allow_empty_validation": BOOL,
}
SAMPLING_RULES = {
    "max_new_tokens": POSITIVE, "temperature": number(0, low_open=True), "top_k": COUNT,
    "top_p": number(0, 1, low_open=True), "greedy": BOOL,
}
MESH_RULES = {axis: (lambda v: isinstance(v, int) and not isinstance(v, bool) and (v == -1 or v >= 1),
                     "-1 (the remaining devices) or an integer >= 1") for axis in ("data", "fsdp", "tensor", "expert")}
WANDB_RULES = {"wandb.enabled": BOOL, "wandb.mode": one_of("offline", "online", "disabled"), "wandb.project": TEXT,
               "wandb.name": TEXT}
OPTIMIZER_RULES = {
    "seed": COUNT, "global_batch_size": POSITIVE, "num_epochs": number(0),
    "learning_rate": number(0, low_open=True), "warmup_fraction": number(0, 1), "lr_schedule": one_of(*LR_SCHEDULES),
    "weight_decay": number(0), "grad_clip_norm": FINITE,
    "keep_checkpoints": POSITIVE, "early_stopping_patience_evals": COUNT, "eval_batch_size": POSITIVE,
    "progress_bar": BOOL, "num_sample_replies": COUNT, **WANDB_RULES,
}
SFT_RULES = {
    **OPTIMIZER_RULES, "grad_accum_steps": POSITIVE, "max_steps": COUNT, "log_every_steps": POSITIVE,
    "eval_every_steps": POSITIVE, "checkpoint_every_steps": POSITIVE, "export_hf": BOOL,
    "model.n_layer": POSITIVE, "model.n_head": POSITIVE, "model.n_embd": POSITIVE, "model.n_positions": POSITIVE,
    "model.dropout_rate": number(0, 1, high_open=True), "model.dtype": one_of("float32", "bfloat16"),
    "model.remat": BOOL, "tokenizer.bpe_vocab_size": POSITIVE,
    "model.family": one_of("", "gpt2", "mistral", "llama", "qwen2", "mixtral"), "model.lora.rank": COUNT,
    "model.lora.alpha": number(0, low_open=True), "model.lora.train_embeddings": BOOL, "model.lora.dropout_rate": number(0, 1, high_open=True),
    "model.decoder.n_kv_head": COUNT, "model.decoder.intermediate_size": COUNT, "model.decoder.sliding_window": COUNT,
    "model.decoder.num_experts": POSITIVE, "model.decoder.experts_per_token": POSITIVE,
}
PPO_RULES = {
    **OPTIMIZER_RULES, "init_checkpoint": one_of(*CHECKPOINT_CHOICES), "init_step": STEP_OR_LATEST,
    "max_iterations": COUNT, "adam_b1": number(0, 1, high_open=True), "adam_b2": number(0, 1, high_open=True),
    "adam_eps": number(0, low_open=True), "log_every_iterations": POSITIVE, "eval_every_iterations": POSITIVE,
    "checkpoint_every_iterations": POSITIVE, "eval_at_start": BOOL, "num_eval_prompts": COUNT,
    "ppo.minibatch_size": POSITIVE, "ppo.num_ppo_epochs": POSITIVE, "ppo.grad_accum_steps": POSITIVE,
    "ppo.clip_eps": number(0, low_open=True), "ppo.value_clip_eps": FINITE, "ppo.vf_coef": number(0),
    "ppo.entropy_coef": FINITE, "ppo.loss_aggregation": one_of("token_mean", "sequence_mean"),
    "ppo.adaptive_kl": BOOL, "ppo.init_kl_coef": number(0), "ppo.kl_target": number(0, low_open=True),
    "ppo.kl_horizon": number(0, low_open=True), "ppo.kl_estimator": one_of("k1", "k2", "k3", "abs"),
    "ppo.gamma": number(0, 1), "ppo.lam": number(0, 1), "ppo.score_clip": FINITE,
    "ppo.whiten_scores": BOOL, "ppo.whiten_advantages": BOOL, "ppo.whiten_token_rewards": BOOL,
    "ppo.missing_eos_penalty": FINITE, "ppo.ratio_threshold": FINITE,
    "ppo.separate_critic": BOOL, "ppo.dropout": BOOL, "ppo.value_dropout_rate": number(0, 1, high_open=True),
    "ppo.value_head_init": one_of("torch_linear", "scaled_normal", "zeros"),
    "reward.kind": one_of("therapy", "emotion_tag", "target_token", "human", "learned_human"),
    "reward.therapy.relevance_text": one_of("raw", "paper_clean"),
    "reward.therapy.quality.formula": one_of("tokens", "paper_code"),
    "reward.therapy.quality.length_rule": one_of("range", "paper", "none"),
    "reward.therapy.emotion_scores.conflict_absolute": BOOL,
}
EVAL_RULES = {
    "seed": COUNT, "checkpoint_which": one_of(*CHECKPOINT_CHOICES), "checkpoint_step": STEP_OR_LATEST,
    "split": one_of("val", "test"), "eval_batch_size": POSITIVE, "use_saved_decoding": BOOL,
    "decoding_search.enabled": BOOL, "decoding_search.redo": BOOL, "decoding_search.split": one_of("val", "test"),
    "decoding_search.allow_test_split": BOOL, "decoding_search.limit": COUNT,
    "decoding_search.top_p": numbers(number(0, 1, low_open=True)), "decoding_search.top_k": numbers(COUNT),
    "decoding_search.temperature": numbers(number(0, low_open=True)),
    "metrics.bertscore": BOOL, "metrics.bertscore_batch_size": POSITIVE,
    "metrics.meteor_variant": one_of("auto", "nltk-full", "exact+stem"), "metrics.bootstrap_resamples": POSITIVE,
    "metrics.confidence": number(0, 1, low_open=True, high_open=True),
    "emotion.source": one_of("auto", "tag", "classifier"), "judge.enabled": BOOL,
    "judge.mode": one_of("per_criterion", "all_criteria"), "judge.limit": COUNT,
    "judge.temperature": number(0), "judge.timeout_s": number(0, low_open=True), "judge.max_retries": COUNT,
    "report.paper_table": one_of("auto", "mesc", "esconv", "none"), "report.n_sample_rows": COUNT,
}
MODE_RULES = {"sft": SFT_RULES, "ppo": PPO_RULES, "eval": EVAL_RULES}


class _Checker:
    """Collects value problems as ``--config.path=value: expected ...`` lines."""

    def __init__(self, config):
        self.config = config
        self.problems: list[str] = []

    def has(self, path: str) -> bool:
        node = self.config
        for key in path.split("."):
            if not hasattr(node, "keys") or key not in node:
                return False
            node = node[key]
        return True

    def get(self, path: str, default: Any = None) -> Any:
        if not self.has(path):
            return default
        node = self.config
        for key in path.split("."):
            node = node[key]
        return node

    def add(self, path: str, problem: str) -> None:
        self.problems.append(f"--config.{path}={self.get(path)!r}: {problem}")

    def rule(self, path: str, rule: Rule) -> bool:
        """Checks one field (absent fields pass: a config may leave a section out); True when it passes."""
        if not self.has(path):
            return True
        accepts, expected = rule
        value = self.get(path)
        if accepts(value):
            return True
        hint = ""
        if isinstance(value, str) and expected.startswith("one of"):
            close = difflib.get_close_matches(value, [c.strip("'") for c in expected[7:].split(", ")], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.add(path, f"expected {expected}{hint}")
        return False

    def rules(self, table: dict[str, Rule], prefix: str = "") -> bool:
        return all([self.rule(prefix + path, rule) for path, rule in table.items()])


def validate(config, workdir: str, device_count: int | None = None, process_count: int | None = None) -> None:
    """Raises a ``UserError`` for the first kind of problem found (see the module docstring); returns None when
    the config can run. ``device_count`` / ``process_count`` default to jax's."""
    check = _Checker(config)
    if not check.rule("mode", one_of(*MODES)):
        raise errors.ConfigError(check.problems[0])
    mode = config.mode
    check.rules(MODE_RULES[mode])
    _check_data_values(check, mode)
    check.rules(SAMPLING_RULES, "sampling.")
    check.rules(MESH_RULES, "mesh.")
    if not check.problems:  # fields that depend on each other, once each is valid alone
        if mode in ("sft", "ppo"):
            _check_batches(check, mode, device_count, process_count)
            steps = "max_steps" if mode == "sft" else "max_iterations"
            if config.num_epochs == 0 and config[steps] == 0:
                check.add("num_epochs", f"and --config.{steps}=0 leave nothing to train; set one of them above 0")
        else:
            _check_eval_values(check)
            if check.has("mesh"):
                _check_batches(check, mode, device_count, process_count)
    if check.problems:
        raise errors.ConfigError("; ".join(check.problems))

    check_workdir(workdir)
    if mode == "sft":
        n_positions = _check_sft_files(config, workdir)
        data_cfg = config.data
    else:
        n_positions, data_cfg = _check_run(config, mode)
    heads_dir = check.get("emotion.heads_dir")
    if heads_dir and not os.path.isdir(heads_dir):
        raise errors.MissingFileError(f"--config.emotion.heads_dir={heads_dir}: no such folder; pass the folder "
                                      "holding heads.npz, or '' for the shipped heads")
    from therapy_rl.data import pipeline

    pipeline.check_data_files(data_cfg, _splits_read(config, mode))
    _check_lengths(check, mode, data_cfg, n_positions)
    if check.problems:
        raise errors.ConfigError("; ".join(check.problems))


def _check_data_values(check: _Checker, mode: str) -> None:
    if mode == "sft":
        check.rule("data.source", one_of(*SOURCES))
        check.rules(DATA_RULES, "data.")
    else:  # None (not set) and a source "" take the run's value
        check.rule("data.source", one_of(None, "", *SOURCES))
        check.rules({k: rule for k, rule in DATA_RULES.items() if check.get(f"data.{k}") is not None}, "data.")
    if mode != "sft" and check.get("data.allow_empty_validation"):
        check.add("data.allow_empty_validation", "only SFT can run without validation (PPO and evaluation need "
                  "the split); leave it False")
    from therapy_rl.data import labels

    emotions = one_of(*labels.EMOTIONS)
    if mode == "sft" or check.get("data.esconv_supporter_emotion") is not None:
        check.rule("data.esconv_supporter_emotion", emotions)
    for key in (check.get("data.esconv_emotion_map") or {}):
        check.rule(f"data.esconv_emotion_map.{key}", emotions)


def _check_batches(check: _Checker, mode: str, device_count: int | None, process_count: int | None) -> None:
    """Batch splits: gradient accumulation and mini-batches divide their batch; batches split evenly over the
    processes and over the mesh's batch axes (data x expert x fsdp)."""
    import jax

    from therapy_rl import parallel

    config = check.config
    devices = jax.device_count() if device_count is None else device_count
    processes = jax.process_count() if process_count is None else process_count
    mesh = config.mesh
    try:
        data, expert, fsdp, _ = parallel.mesh_shape_of(mesh).resolve(devices)
    except ValueError as err:
        check.problems.append(f"--config.mesh.data={mesh.data} --config.mesh.expert={mesh.get('expert', 1)} "
                              f"--config.mesh.fsdp={mesh.fsdp} --config.mesh.tensor={mesh.tensor}: {err}; "
                              f"their product must be the device count "
                              f"{devices} (one axis may be -1 for the rest)")
        return
    batch = config.get("global_batch_size")  # none in eval
    if mode == "sft" and batch % config.grad_accum_steps:
        check.add("grad_accum_steps", f"must divide --config.global_batch_size={batch}")
    if mode == "ppo":
        minibatch = config.ppo.minibatch_size
        if batch % minibatch:
            check.add("ppo.minibatch_size", f"must divide --config.global_batch_size={batch}")
        elif minibatch % config.ppo.grad_accum_steps:
            check.add("ppo.grad_accum_steps", f"must divide --config.ppo.minibatch_size={minibatch}")
    shards = data * expert * fsdp
    for field in ("eval_batch_size",) if mode == "eval" else ("global_batch_size", "eval_batch_size"):
        size = config[field]
        if size % processes or size % shards:
            check.add(field, f"must be a multiple of the {processes} process(es) and of the mesh's batch shards "
                      f"(data {data} x expert {expert} x fsdp {fsdp} = {shards})")


def _check_eval_values(check: _Checker) -> None:
    config = check.config
    search = config.decoding_search
    if search.enabled and search.split == "test" and not search.allow_test_split:
        check.add("decoding_search.split", "tuning decoding on the test split is refused; use 'val' or set "
                  "--config.decoding_search.allow_test_split=True")
    if search.enabled and config.sampling.greedy:
        check.add("sampling.greedy", "greedy decoding ignores the searched top_p/top_k/temperature; set it False "
                  "or --config.decoding_search.enabled=False")
    if config.judge.enabled:
        for field in ("base_url", "model"):
            if not config.judge[field]:
                check.add(f"judge.{field}", "required with --config.judge.enabled=True")
        key_env = config.judge.api_key_env
        if key_env and not os.environ.get(key_env):
            check.add("judge.api_key_env", f"the environment variable {key_env} is not set; set it, or pass "
                      "--config.judge.api_key_env='' for an endpoint without auth")


def check_workdir(workdir: str) -> None:
    """The workdir is a folder or can be created: never a file, and its nearest existing parent is writable."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise errors.ConfigError(f"--workdir={workdir}: is a file, not a folder; pass a folder for the run")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise errors.ConfigError(f"--workdir={workdir}: {parent} is not a writable folder; pass a workdir you can "
                                 "write to")


def _check_sft_files(config, workdir: str) -> int:
    """HF weights and tokenizer; returns the model's n_positions (the checkpoint's when one is given)."""
    from therapy_rl.data import tokenize

    n_positions = config.model.n_positions
    if config.model.hf_checkpoint:
        from therapy_rl.models import families

        hf_config = families.check_hf_dir(config.model.hf_checkpoint, where="--config.model.hf_checkpoint")
        n_positions = hf_config.n_positions
    saved = os.path.join(workdir, "tokenizer")
    source = config.tokenizer.path or config.model.hf_checkpoint
    if os.path.isdir(saved):
        return n_positions  # a resumed run keeps its own tokenizer
    if config.tokenizer.path:
        tokenize.check_tokenizer_dir(config.tokenizer.path, where="--config.tokenizer.path")
    elif source:
        tokenize.check_tokenizer_dir(source, where="--config.model.hf_checkpoint")  # its tokenizer is the run's
    else:
        minimum = tokenize.min_bpe_vocab_size()
        if config.tokenizer.bpe_vocab_size < minimum:
            raise errors.ConfigError(f"--config.tokenizer.bpe_vocab_size={config.tokenizer.bpe_vocab_size}: a "
                                     f"byte-level BPE needs at least {minimum} ids (256 bytes + the markers)")
    return n_positions


def _check_run(config, mode: str):
    """The run PPO starts from or the evaluation scores: (its n_positions, the data options in effect)."""
    from therapy_rl import run_files

    if mode == "ppo":
        where, path = "config.init_from", config.init_from
        which, step = config.init_checkpoint, config.init_step
    else:
        where, path = "config.checkpoint", config.checkpoint
        which, step = config.checkpoint_which, config.checkpoint_step
    if not path:
        raise errors.ConfigError(f"--{where} is empty: pass a run workdir, e.g. --{where}=runs/sft")
    try:
        if mode == "ppo":  # as the trainer resolves it
            _, _, run_workdir = run_files.resolve_run_checkpoint(path, which, step, where=f"--{where}")
        else:  # as the evaluation opens it
            from therapy_rl import run as run_lib

            run_workdir = run_lib.open_run(path, run_lib.checkpoint_choice(which, step), where=f"--{where}").workdir
        info = run_files.read_run_info(run_workdir)
        data_cfg = run_files.inherit_data_options(config.data, info["data"], where="--config.data")
        from therapy_rl.models import families

        n_positions = int(families.config_from_dict(info["model_config"]).n_positions)
    except FileNotFoundError as err:  # MissingFileError included
        fix = ("pick one of those steps, or -1 for the latest" if "no such step" in str(err) else
               "pass a run workdir (it holds run_info.json, best/ or checkpoints/) or one of its checkpoint folders")
        raise errors.MissingFileError(f"{_named(where, path, err)}; {fix}") from err
    except errors.UserError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise errors.ConfigError(_named(where, path, err)) from err
    return n_positions, data_cfg


def _named(where: str, path: str, err: Exception) -> str:
    """The error's message, led by the flag it is about unless it names it already."""
    text = str(err)
    return text if text.startswith(f"--{where}") else f"--{where}={path}: {text}"


def _splits_read(config, mode: str) -> tuple[str, ...]:
    if mode == "sft":
        return "train", "val", "test"
    if mode == "ppo":
        return "train", "val"
    splits = [config.split]
    if config.decoding_search.enabled and config.decoding_search.split not in splits:
        splits.append(config.decoding_search.split)
    return tuple(splits)


def _check_lengths(check: _Checker, mode: str, data_cfg, n_positions: int) -> None:
    """Sequences and prompt + reply fit the model's position table."""
    if mode == "sft" and data_cfg.max_length_tokens > n_positions:
        check.add("data.max_length_tokens", f"exceeds the model's n_positions {n_positions}")
    generates = mode != "sft" or check.config.num_sample_replies > 0
    total = data_cfg.max_prompt_tokens + check.config.sampling.max_new_tokens
    if generates and total > n_positions:
        check.problems.append(
            f"--config.data.max_prompt_tokens={data_cfg.max_prompt_tokens} + --config.sampling.max_new_tokens="
            f"{check.config.sampling.max_new_tokens} = {total} exceeds the model's n_positions {n_positions}; "
            "lower one of them")
