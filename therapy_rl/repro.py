"""The MESC reproduction, every stage in one command (configs/repro_mesc.py documents the stages):

    python -m therapy_rl.repro --config configs/repro_mesc.py --workdir runs/repro [--config.a.b=v]

Each stage runs in ``<workdir>/<stage>/`` through the stage's own Python entry point (``pretrain.run``,
``sft.train_and_evaluate``, ``ppo.trainer.train_and_evaluate``, ``evaluation.runner.evaluate``) with a config built
from the configs/ file the stage names and the repro config's sizes. After a stage succeeds it writes
``<stage>/DONE`` (JSON: wall-clock seconds); a repeated command skips stages with a DONE file, and a killed stage
resumes from its own checkpoints. ``<workdir>/RESULTS.md`` comes last (tools/repro_results.py).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable

from therapy_rl import defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = "DONE"
SFT_RUNS = {"sft_emotion": True, "sft_no_emotion": False}


def run_stage(workdir: str, name: str, fn: Callable[[str], object], log=print) -> bool:
    """Runs ``fn(<workdir>/<name>)`` unless its DONE file exists; True when it ran."""
    stage_dir = os.path.join(workdir, name)
    marker = os.path.join(stage_dir, DONE)
    if os.path.exists(marker):
        log(f"[repro] {name}: done, skipped")
        return False
    log(f"[repro] {name}: running in {stage_dir}")
    start = time.time()
    fn(stage_dir)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"wall_s": time.time() - start, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    return True


def model_runs(rc) -> list[str]:
    """Stage names of every model that is evaluated, in table order."""
    return ["pretrained", *SFT_RUNS, *rc.ppo.configs]


def sft_config(rc, workdir: str, with_emotion: bool, pretrained_only: bool = False):
    c = defaults.config_file("sft_mesc")
    hf = os.path.join(workdir, "pretrain", "hf")
    c.seed = rc.seed
    c.model.hf_checkpoint = c.tokenizer.path = hf
    c.data.include_therapist_emotion = with_emotion
    c.data.max_train_samples, c.data.max_eval_samples = rc.sft.max_train_samples, rc.sft.max_eval_samples
    c.global_batch_size = rc.sft.global_batch_size
    c.num_epochs, c.max_steps, c.learning_rate = rc.sft.num_epochs, rc.sft.max_steps, rc.sft.learning_rate
    c.eval_every_steps = c.checkpoint_every_steps = rc.sft.eval_every_steps
    c.early_stopping_patience_evals = rc.sft.early_stopping_patience_evals
    c.eval_batch_size = rc.sft.global_batch_size
    c.log_every_steps = min(c.log_every_steps, rc.sft.eval_every_steps)
    c.num_sample_replies, c.progress_bar = 0, False
    if pretrained_only:  # the pre-trained model as a run: one step at a negligible learning rate, no emotion tags
        c.max_steps, c.learning_rate, c.warmup_fraction = 1, 1e-12, 0.0
        c.eval_every_steps = c.checkpoint_every_steps = 1
    return c


def ppo_config(rc, workdir: str, name: str):
    c = defaults.config_file(name)
    c.seed = rc.seed
    c.init_from = os.path.join(workdir, "sft_emotion")
    c.data.max_train_samples, c.data.max_eval_samples = rc.sft.max_train_samples, rc.sft.max_eval_samples
    c.num_epochs, c.max_iterations = rc.ppo.num_epochs, rc.ppo.max_iterations
    c.global_batch_size, c.ppo.minibatch_size = rc.ppo.global_batch_size, rc.ppo.minibatch_size
    c.sampling.max_new_tokens = rc.ppo.max_new_tokens
    c.eval_every_iterations = c.checkpoint_every_iterations = rc.ppo.eval_every_iterations
    c.num_eval_prompts, c.eval_batch_size = rc.ppo.num_eval_prompts, min(c.eval_batch_size, rc.ppo.num_eval_prompts)
    c.num_sample_replies, c.progress_bar = 0, False
    return c


def eval_config(rc, workdir: str, model: str, dataset: str):
    c = defaults.config_file("eval_mesc" if dataset == "mesc" else "eval_esconv")
    c.seed = rc.seed
    c.name = model
    c.checkpoint = os.path.join(workdir, model)
    c.sampling.max_new_tokens = rc.eval.max_new_tokens
    c.eval_batch_size = rc.eval.eval_batch_size
    c.metrics.bertscore = rc.eval.bertscore
    c.metrics.bootstrap_resamples = rc.eval.bootstrap_resamples
    limit = rc.sft.max_eval_samples if dataset == "mesc" else rc.eval.max_esconv_samples
    c.data.max_eval_samples = limit or None
    if dataset == "mesc":  # the decoding is chosen on MESC validation, then reused for ESConv
        d = c.decoding_search
        d.enabled, d.split, d.limit, d.metric = True, "val", rc.eval.search_limit, rc.eval.search_metric
        d.top_p, d.top_k, d.temperature = tuple(rc.eval.top_p), tuple(rc.eval.top_k), tuple(rc.eval.temperature)
    return c


def _validated(config, stage_dir: str):
    from therapy_rl import config_validation

    config_validation.validate(config, stage_dir)
    return config


def run_all(rc, workdir: str, log=print) -> dict:
    """Every stage in order; returns {stage: ran (True) or skipped (False)}."""
    from therapy_rl import pretrain, sft
    from therapy_rl.evaluation import runner
    from therapy_rl.ppo import trainer

    if rc.data_root:
        os.environ["THERAPY_RL_DATA"] = os.path.abspath(rc.data_root)
    data_root = os.environ.get("THERAPY_RL_DATA", "")
    if not data_root or not os.path.isdir(data_root):
        from therapy_rl.errors import ConfigError
        raise ConfigError("no dataset folder: set $THERAPY_RL_DATA or --config.data_root")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "repro_config.json"), "w", encoding="utf-8") as f:
        json.dump(rc.to_dict(), f, indent=1, default=str)
    ran = {"pretrain": run_stage(workdir, "pretrain", lambda d: pretrain.run(rc.pretrain, d, data_root, rc.seed), log)}
    ran["pretrained"] = run_stage(workdir, "pretrained", lambda d: sft.train_and_evaluate(
        _validated(sft_config(rc, workdir, False, pretrained_only=True), d), d), log)
    for name, with_emotion in SFT_RUNS.items():
        ran[name] = run_stage(workdir, name, lambda d, e=with_emotion: sft.train_and_evaluate(
            _validated(sft_config(rc, workdir, e), d), d), log)
    for name in rc.ppo.configs:
        ran[name] = run_stage(workdir, name, lambda d, n=name: trainer.train_and_evaluate(
            _validated(ppo_config(rc, workdir, n), d), d), log)
    datasets = ("mesc", "esconv") if rc.eval.esconv else ("mesc",)
    for model in model_runs(rc):
        for dataset in datasets:
            stage = os.path.join("eval", f"{model}_{dataset}")

            def evaluate(d, m=model, ds=dataset):
                os.makedirs(d, exist_ok=True)
                if ds != "mesc":  # the decoding chosen on MESC validation
                    chosen = os.path.join(workdir, "eval", f"{m}_mesc", "decoding.json")
                    if os.path.exists(chosen):
                        shutil.copy(chosen, os.path.join(d, "decoding.json"))
                runner.evaluate(_validated(eval_config(rc, workdir, m, ds), d), d)

            ran[stage] = run_stage(workdir, stage, evaluate, log)
    import sys
    sys.path.insert(0, REPO)
    from tools import repro_results

    repro_results.write_results(workdir, os.path.join(workdir, "RESULTS.md"))
    log(f"[repro] wrote {os.path.join(workdir, 'RESULTS.md')}")
    return ran


def main(argv):
    from absl import flags

    if len(argv) > 1:
        from therapy_rl.errors import ConfigError
        raise ConfigError(f"unexpected arguments {argv[1:]}: pass every option as --flag=value")
    FLAGS = flags.FLAGS
    if not FLAGS.workdir:
        from therapy_rl.errors import ConfigError
        raise ConfigError("--workdir is required")
    run_all(FLAGS.config, FLAGS.workdir)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Folder of every stage's run and of RESULTS.md.")
    config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "repro_mesc.py"),
                                    "configs/repro_mesc.py or a file like it.", lock_config=False)


if __name__ == "__main__":
    from therapy_rl import cli

    _define_flags()
    cli.run_cli(main)
