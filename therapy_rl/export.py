"""Export a run (SFT or PPO) as a Hugging Face model directory.

    python -m therapy_rl.export --workdir runs/qs_ppo --out runs/qs_ppo_hf [--checkpoint best|last|STEP]
        [--eval_dir runs/qs_eval] [--decoding FILE_OR_DIR] [--overwrite]

Writes into ``--out`` (built beside it, then renamed, so a failed export leaves nothing half-written):

- ``model.safetensors`` + ``config.json``: a transformers ``GPT2LMHeadModel`` (or ``MistralForCausalLM``,
  ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MixtralForCausalLM``) with the run's bos/eos/pad ids; a LoRA
  run's adapters are merged in, and ``peft_adapter/`` holds them alone in PEFT's format;
- ``generation_config.json``: stops at ``<eos>`` and pads with ``<pad>``; the run's decoding defaults (as
  `therapy_rl.load` uses them: a decoding search's choice, else the run's config.sampling);
- the tokenizer files (with every marker and emotion token) and ``therapy_tokenizer.json``;
- ``README.md``: a model card with the data, the method, the base model, the evaluation of this checkpoint with
  its confidence intervals (an eval whose report names this run and checkpoint: ``--eval_dir``, else one found
  in a sibling folder of the run) and the intended use and safety statement.

The crisis guard of `therapy_rl.api` is not part of the exported weights; the card says so.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Sequence

from therapy_rl import errors, run as run_lib

REPORT_FILE = "report.json"
CARD_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "meteor", "token_f1", "bertscore_minilm_f1", "distinct_1",
                "distinct_2", "emotion_correct", "emotion_macro_f1", "emotion_tag_valid")  # shown first


def export_run(workdir: str, out_dir: str, checkpoint: str | int = "best", *, eval_dirs: Sequence[str] = (),
               decoding: Any = None, overwrite: bool = False) -> str:
    """Exports ``checkpoint`` of the run in ``workdir`` to ``out_dir`` (see the module docstring); returns it."""
    from therapy_rl.models import families

    run = run_lib.open_run(workdir, checkpoint)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise errors.ConfigError(f"--out {out_dir} exists and is not empty (pass --overwrite to replace it)")
    evals = [_explicit_eval(d, run) for d in eval_dirs] if eval_dirs else find_evals(run)
    if decoding is None and run.decoding is None:
        decoding = next((e["decoding"] for e in evals if e["decoding"] and not e["warning"]), None)
    settings, decoding_source = run.default_sampling(decoding)
    tok = run.tokenizer

    building = out_dir + ".partial"
    shutil.rmtree(building, ignore_errors=True)
    os.makedirs(building)
    params = run.read_params()
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    families.save_hf(run.model_config, params, building, **ids)  # LoRA adapters merged in
    if families.lora_config(run.model_config) is not None:  # and the adapter alone, in PEFT's format
        base = (run.config.get("model") or {}).get("hf_checkpoint") or ""
        families.save_peft_adapter(run.model_config, params, os.path.join(building, "peft_adapter"), base)
    write_generation_config(building, tok, settings)
    tok.save(building)
    with open(os.path.join(building, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(run, evals, settings, decoding_source))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(building, out_dir)
    return out_dir


def write_generation_config(out_dir: str, tok, settings: Mapping[str, Any]) -> None:
    """generation_config.json: stop at <eos>, pad with <pad>, the run's decoding defaults."""
    from transformers import GenerationConfig

    sample = not settings["greedy"]
    values = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                  max_new_tokens=int(settings["max_new_tokens"]), do_sample=sample)
    if sample:  # top_k 0 is written out: transformers' own default would be 50
        values.update(temperature=float(settings["temperature"]), top_k=int(settings["top_k"]),
                      top_p=float(settings["top_p"]))
    GenerationConfig(**values).save_pretrained(out_dir)


# ------------------------------------------------------------------------------------------ evaluations


def _read_report(eval_dir: str) -> dict | None:
    path = os.path.join(eval_dir, REPORT_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("meta"), dict) else None


def _eval_entry(eval_dir: str, report: Mapping[str, Any], warning: str | None) -> dict:
    decoding_path = os.path.join(eval_dir, run_lib.DECODING_FILE)
    return {"dir": os.path.abspath(eval_dir), "report": report, "warning": warning,
            "decoding": decoding_path if os.path.isfile(decoding_path) else None}


def _same_path(a: str | None, b: str) -> bool:
    return bool(a) and os.path.realpath(a) == os.path.realpath(b)


def _scored_this_checkpoint(meta: Mapping[str, Any], run: run_lib.Run) -> bool:
    """The report's "checkpoint" ("<manager dir> step N", `Run.label`) is this run's folder and step."""
    directory, _, step = str(meta.get("checkpoint", "")).rpartition(" step ")
    return _same_path(directory, run.checkpoint_dir) and step == str(run.step)


def find_evals(run: run_lib.Run) -> list[dict]:
    """Evaluations of exactly this checkpoint in the folders beside the run (e.g. runs/qs_eval by runs/qs_ppo)."""
    parent = os.path.dirname(run.workdir)
    found = []
    for name in sorted(os.listdir(parent)):
        folder = os.path.join(parent, name)
        if folder == run.workdir or not os.path.isfile(os.path.join(folder, REPORT_FILE)):
            continue
        report = _read_report(folder)
        meta = report["meta"] if report is not None else {}
        if _same_path(meta.get("run_workdir"), run.workdir) and _scored_this_checkpoint(meta, run):
            found.append(_eval_entry(folder, report, None))
    return found


def _explicit_eval(eval_dir: str, run: run_lib.Run) -> dict:
    """An --eval_dir: it must have scored this run; another checkpoint of it is shown with a warning."""
    report = _read_report(eval_dir)
    if report is None:
        raise errors.MissingFileError(f"--eval_dir {eval_dir}: no readable {REPORT_FILE} there")
    meta = report["meta"]
    if not _same_path(meta.get("run_workdir"), run.workdir):
        raise errors.ConfigError(f"--eval_dir {eval_dir} evaluated {meta.get('run_workdir')!r}, not {run.workdir}")
    warning = None
    if not _scored_this_checkpoint(meta, run):
        warning = f"this evaluation scored {meta.get('checkpoint')}, not the exported {run.label}"
    return _eval_entry(eval_dir, report, warning)


# ------------------------------------------------------------------------------------------ the card


def prompt_text(problem: str, user_text: str, user_emotion: str, context: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt string of the run's format (the markers are single tokens of the exported tokenizer)."""
    from therapy_rl.data import labels

    parts = [labels.BOS, labels.PROBLEM, problem]
    if context:
        parts.append(labels.CONTEXT)
        for speaker, text in context:
            parts += [labels.USER if speaker == "client" else labels.THERAPIST, text]
    parts += [labels.USER, user_text, labels.USER_EMOTION, user_emotion, labels.THERAPIST]
    return "".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def _eval_section(entry: Mapping[str, Any]) -> list[str]:
    report = entry["report"]
    meta = report["meta"]
    ci = report.get("ci", {})
    lines = [f"### {meta.get('dataset', '?')} / {meta.get('split', '?')} ({report.get('n_samples', '?')} samples)", "",
             f"From `{entry['dir']}` (checkpoint `{meta.get('checkpoint')}`; decoding "
             f"`{json.dumps(meta.get('decoding_settings'))}` from {meta.get('decoding_source', '?')}). Intervals: "
             f"{ci.get('confidence', 0.95):.0%} percentile bootstrap, {ci.get('n_resamples', '?')} resamples.", ""]
    if entry["warning"]:
        lines += [f"**Note: {entry['warning']}.**", ""]
    if meta.get("decoding_warning"):
        lines += [f"**Note: {meta['decoding_warning']}.**", ""]
    lines += ["| metric | value | 95% CI |", "|---|---|---|"]
    metrics = report.get("metrics", {})
    for name in [m for m in CARD_METRICS if m in metrics] + sorted(set(metrics) - set(CARD_METRICS)):
        m = metrics[name]
        if isinstance(m, Mapping) and "mean" in m:
            lines.append(f"| {name} | {_fmt(m['mean'])} | [{_fmt(m.get('low'))}, {_fmt(m.get('high'))}] |")
    emotion = report.get("emotion") or {}
    baseline = emotion.get("majority_baseline")
    if baseline:
        lines += ["", f"Emotion accuracy beside the majority-class baseline (always `{baseline.get('label')}`): "
                      f"{_fmt(emotion.get('accuracy'))} vs {_fmt(baseline.get('accuracy'))}."]
    return lines + [""]


def _method_lines(run: run_lib.Run) -> list[str]:
    config = run.config
    if run.mode == "ppo":
        reward = run.reward or {}
        lines = [f"- method: **PPO** from the SFT run `{config.get('init_from')}` "
                 f"({config.get('init_checkpoint', 'best')} checkpoint), reward `{reward.get('kind')}`, "
                 f"learning rate {config.get('learning_rate')}, rollout batch {config.get('global_batch_size')}, "
                 f"initial KL coefficient {(config.get('ppo') or {}).get('init_kl_coef')}"]
        base = _base_of_sft(config.get("init_from"))
    else:
        lines = [f"- method: **SFT** (loss on the therapist part only), learning rate {config.get('learning_rate')}, "
                 f"batch {config.get('global_batch_size')}, {config.get('num_epochs')} epochs "
                 f"(max_steps {config.get('max_steps')})"]
        base = (config.get("model") or {}).get("hf_checkpoint") or None
    shape = run.model_config
    lines.append(f"- base: {f'`{base}`' if base else 'none: GPT-2 architecture trained from scratch'} "
                 f"({shape.n_layer} layers, {shape.n_embd} wide, {shape.n_head} heads, {shape.n_positions} positions, "
                 f"vocabulary {shape.vocab_size})")
    return lines


def _base_of_sft(init_from: str | None) -> str | None:
    """The HF checkpoint a PPO run's SFT run started from, when its run_info.json is still there."""
    try:
        sft = run_lib.open_run(init_from) if init_from else None
    except errors.UserError:
        return None
    return ((sft.config.get("model") or {}).get("hf_checkpoint") or None) if sft else None


def model_card(run: run_lib.Run, evals: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
               decoding_source: str) -> str:
    """README.md of the exported directory."""
    from therapy_rl.data import labels

    data = run.data
    opts = run.sample_options
    example = prompt_text("unknown", "I had a long week at work and I feel drained.", "sadness")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [gpt2, therapy_rl, emotional-support, research]", "---", "",
             f"# {os.path.basename(run.workdir)} ({run.mode.upper()})", "",
             "A GPT-2 model trained with `therapy_rl` (JAX/Flax) to write context- and emotion-aware "
             "therapeutic replies (Zhang & Ive, *Context-Emotion Aware Therapeutic Dialogue Generation*, "
             "arXiv 2511.11884).", "",
             "## Intended use and safety", "",
             "**Assistive research software. It is not a therapist and not a crisis service.** Use it to study "
             "reply generation, never as the only support for a person in distress. The model can write wrong, "
             "unhelpful or harmful replies. The `therapy_rl` API and chat put a crisis guard in front of the "
             "model (a crisis message gets crisis-line guidance, never model output; a reply that encourages harm "
             "is replaced). **That guard is not part of these weights**: anyone serving this model to people must "
             "add their own crisis detection and escalation to human help.", "",
             "## Training", "",
             f"- exported checkpoint: `{run.which}` step {run.step} (`{run.label}`)",
             *_method_lines(run),
             f"- data: `{data.get('source')}`{' (' + data['data_dir'] + ')' if data.get('data_dir') else ''}; "
             f"format: therapist emotion tag {'on' if opts.include_therapist_emotion else 'off'}, strategy tag "
             f"{'on' if opts.include_strategy else 'off'}, {opts.context_turns} context turns, user emotion from "
             f"the {opts.user_emotion_from} client utterance; prompts up to {run.max_prompt_tokens} tokens", "",
             "## Evaluation", ""]
    if evals:
        for entry in evals:
            lines += _eval_section(entry)
    else:
        lines += ["No evaluation of this checkpoint was found (run `python -m therapy_rl.main --config "
                  "configs/eval_mesc.py --config.checkpoint=RUN` and export again, or pass `--eval_dir`).", ""]
    gen = {k: settings[k] for k in ("max_new_tokens", "greedy", "temperature", "top_k", "top_p")}
    lines += ["## Use", "",
              "Prompt format (every marker and emotion label is one token; the reply ends with `<eos>`):", "",
              "```", f"<bos><problem>P{'<context>(<user>c|<therapist>t)...' if opts.context_turns else ''}"
              "<user>U<user_emotion>E<therapist>"
              f"{'[<strategy>S]' if opts.include_strategy else ''}"
              f"T{'<therapist_emotion>E' if opts.include_therapist_emotion else ''}<eos>", "```", "",
              f"Emotion labels E: {', '.join(labels.EMOTIONS)}. `generation_config.json` stops at `<eos>`; its "
              f"decoding defaults `{json.dumps(gen)}` come from {decoding_source}.", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tok = AutoTokenizer.from_pretrained("THIS_DIR")',
              'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
              f"prompt = {example!r}",
              'ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids',
              "out = model.generate(ids)  # stops at <eos>",
              "print(tok.decode(out[0, ids.shape[1]:]))  # reply<therapist_emotion>label<eos>", "```", "",
              "With the guard: `therapy_rl.load(RUN_WORKDIR).reply(text)` on the original run directory.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str]) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    out = export_run(f.workdir, f.out, f.checkpoint, eval_dirs=f.eval_dir or (), decoding=f.decoding,
                     overwrite=f.overwrite)
    print(f"[export] {f.workdir} ({f.checkpoint}) -> {out}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "A trained run (SFT or PPO) or one of its checkpoint folders.")
    flags.DEFINE_string("out", None, "The HF directory to write.")
    flags.DEFINE_string("checkpoint", "best", "best, last or a step number.")
    flags.DEFINE_multi_string("eval_dir", None, "An eval workdir of this run (its report.json goes into the card); "
                              "default: evals of this checkpoint in folders beside the run.")
    flags.DEFINE_string("decoding", None, "A decoding.json (or a folder holding one) for generation_config.json; "
                        "default: the run's, else the found eval's, else the run's config.sampling.")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
    flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
    from therapy_rl import cli

    _define_flags()
    cli.run_cli(main)  # a UserError prints one line ``error: ...``, exit status 2
