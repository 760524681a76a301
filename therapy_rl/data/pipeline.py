"""Config → dialogues → samples → tokenizer → fixed-shape arrays: the data set-up shared by SFT, PPO and eval.

Reads ``config.data`` / ``config.tokenizer`` at this edge and hands plain values to the rooms below.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from absl import logging

from therapy_rl import errors
from therapy_rl.data import batches, labels, samples as samples_lib, sources, tokenize

SPLITS = ("train", "val", "test")
ESCONV_FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}


def dataset_dir(data_cfg, source: str) -> str:
    """``data_cfg.data_dir`` or ``$THERAPY_RL_DATA/<source>``, with a clear error when neither exists."""
    if data_cfg.data_dir:
        if not os.path.isdir(data_cfg.data_dir):
            raise errors.MissingFileError(f"--config.data.data_dir={data_cfg.data_dir}: no such folder; pass the "
                                          f"folder holding the {source} files")
        return data_cfg.data_dir
    root = os.environ.get("THERAPY_RL_DATA", "")
    if not root:
        raise errors.MissingFileError(f"data source {source!r} needs --config.data.data_dir=<folder> or "
                                      "$THERAPY_RL_DATA (the folder holding mesc/, esconv/, ...)")
    return os.path.join(root, source)


def _split_file(data_cfg, split: str) -> str | None:
    """The file one split is read from (None for the bundled sample and MESC, whose splits share one file)."""
    if data_cfg.source == "esconv":
        return os.path.join(dataset_dir(data_cfg, "esconv"), ESCONV_FILES[split])
    if data_cfg.source == "jsonl":
        path = {"train": data_cfg.train_path, "val": data_cfg.val_path, "test": data_cfg.test_path}[split]
        if not path:
            raise errors.ConfigError(f"--config.data.{split}_path is empty: data.source=jsonl reads the {split} "
                                     f"split from it")
        return path
    return None


def check_data_files(data_cfg, splits: Sequence[str]) -> None:
    """Every file the splits will be read from exists (nothing is read): the config check before a run."""
    if data_cfg.source not in ("bundled_sample", "mesc", "esconv", "jsonl"):
        raise errors.ConfigError(f"--config.data.source={data_cfg.source!r}: expected bundled_sample, mesc, esconv "
                                 "or jsonl")
    if data_cfg.source == "mesc":
        csv_path = sources.mesc_csv_path(dataset_dir(data_cfg, "mesc"))
        for split in splits:
            json_path = csv_path.parent / f"{split}.json"
            if data_cfg.problem_type == "json" and split != "train" and not json_path.is_file():
                raise errors.MissingFileError(f"{json_path}: no such file (needed by --config.data.problem_type=json);"
                                              " add it or use problem_type=unknown")
    for split in splits:
        path = _split_file(data_cfg, split)
        if path is not None and not os.path.isfile(path):
            where = "--config.data.data_dir" if data_cfg.source == "esconv" else f"--config.data.{split}_path"
            raise errors.MissingFileError(f"{path}: no such file for the {split} split; check {where}")


def read_split(data_cfg, split: str) -> tuple[list[sources.Dialogue], sources.ReadReport]:
    """Dialogues of one split from the configured source."""
    source, strict = data_cfg.source, data_cfg.strict
    if source == "bundled_sample":
        return sources.read_bundled_sample(split, strict=strict)
    if source == "mesc":
        return sources.read_mesc(dataset_dir(data_cfg, "mesc"), split, strict=strict,
                                 problem_types=data_cfg.problem_type)
    if source == "esconv":
        emotion_map = dict(data_cfg.esconv_emotion_map) if data_cfg.get("esconv_emotion_map") else None
        return sources.read_esconv(_split_file(data_cfg, split), emotion_map=emotion_map, strict=strict,
                                   supporter_emotion=data_cfg.get("esconv_supporter_emotion", "neutral"))
    if source == "jsonl":
        return sources.read_jsonl(_split_file(data_cfg, split), strict=strict)
    raise errors.ConfigError(f"--config.data.source={source!r}: expected bundled_sample, mesc, esconv or jsonl")


def sample_options(data_cfg) -> samples_lib.SampleOptions:
    return samples_lib.SampleOptions(
        include_therapist_emotion=data_cfg.include_therapist_emotion,
        include_strategy=data_cfg.include_strategy,
        context_turns=data_cfg.context_turns,
        user_emotion_from=data_cfg.user_emotion_from,
        therapist_run=data_cfg.therapist_run,
    )


def load_samples(data_cfg, splits: Sequence[str] = ("train", "val"),
                 allow_empty_validation: bool = False) -> dict[str, list[samples_lib.Sample]]:
    """Samples per split, logging dialogue counts, skipped records, truncated texts and sample counts.

    A split without samples is an ``errors.InputError`` naming its file, except "val" with
    ``allow_empty_validation`` (SFT then runs without validation)."""
    opts = sample_options(data_cfg)
    out = {}
    for split in splits:
        dialogues, read_report = read_split(data_cfg, split)
        split_samples, sample_report = samples_lib.build_samples_with_report(dialogues, opts)
        limit = data_cfg.max_train_samples if split == "train" else data_cfg.max_eval_samples
        if limit:
            split_samples = split_samples[:limit]
        logging.info("data %s/%s: %s; %s; kept %d samples", data_cfg.source, split, read_report.summary(),
                     sample_report.summary(), len(split_samples))
        notes = []
        if read_report.records_skipped:
            notes.append(f"{read_report.records_skipped} bad records skipped")
        if read_report.truncated_texts:
            notes.append(f"{read_report.truncated_texts} texts over {sources.MAX_TEXT_CHARS} characters truncated")
        print(f"[data] {data_cfg.source} {split}: {len(dialogues)} dialogues, {len(split_samples)} samples"
              f"{' (' + '; '.join(notes) + ')' if notes else ''}")
        if not split_samples:
            if not (split == "val" and allow_empty_validation):
                raise errors.InputError(_empty_split_message(split, read_report, len(dialogues)))
            print("[data] no validation samples: training runs without validation and keeps no best/ checkpoint")
        out[split] = split_samples
    return out


def _empty_split_message(split: str, report: sources.ReadReport, num_dialogues: int) -> str:
    if report.records_read == 0:
        skipped = f" ({report.records_skipped} bad records skipped)" if report.records_skipped else ""
        problem = f"no records{skipped}, so the {split} split is empty"
    elif num_dialogues == 0:
        problem = f"none of its {report.records_read} records belongs to the {split} split"
    else:
        problem = (f"the {split} split's {num_dialogues} dialogues give no samples (no client turn answered by a "
                   "therapist turn)")
    fix = ("; add validation dialogues, or for SFT pass --config.data.allow_empty_validation=True to train "
           "without validation" if split == "val" else f"; add {split} dialogues")
    return f"{report.path}: {problem}{fix}"


def build_tokenizer(tokenizer_cfg, model_cfg, data_cfg, train_samples, workdir: str) -> tokenize.TherapyTokenizer:
    """The run's tokenizer, saved under ``workdir/tokenizer`` so a resumed run and evaluation reuse it exactly.

    Order: an existing ``workdir/tokenizer``; ``tokenizer.path``; the HF checkpoint's tokenizer; else a
    byte-level BPE trained on the training texts.
    """
    strategies = ()
    if data_cfg.include_strategy:  # every strategy the source defines, so val/test-only ones still encode
        known = {"mesc": labels.MESC_STRATEGIES, "esconv": labels.ESCONV_STRATEGIES}.get(data_cfg.source, ())
        strategies = tuple(sorted(set(known) | {s.strategy for s in train_samples if s.strategy}))
    saved = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(saved) and _is_main_process():
        building = saved + ".building"
        shutil.rmtree(building, ignore_errors=True)
        source = tokenizer_cfg.path or model_cfg.hf_checkpoint
        if source:
            tokenize.load_tokenizer(source, strategies=strategies or None).save(building)
        else:
            tokenize.train_bpe_tokenizer(tokenize.training_texts(train_samples), tokenizer_cfg.bpe_vocab_size,
                                         building, strategies=strategies)
        os.replace(building, saved)  # atomic: a killed run never leaves a half-written tokenizer
    _wait_for_all_processes("tokenizer")
    return tokenize.load_tokenizer(saved, strategies=strategies or None)


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _wait_for_all_processes(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass
class SplitArrays:
    samples: list[samples_lib.Sample]
    sft: dict[str, Any] | None  # right-padded training sequences
    prompts: dict[str, Any] | None  # left-padded prompts with labels; sample_index indexes ``samples``


def encode_split(tok: tokenize.TherapyTokenizer, data_cfg, split_samples, with_sft: bool = True,
                 with_prompts: bool = True, name: str = "", allow_empty: bool = False) -> SplitArrays:
    """Arrays of one split. No SFT sequence left after fitting ``max_length_tokens`` is an ``InputError``, or
    with ``allow_empty`` an empty SplitArrays (no samples, no arrays)."""
    if not split_samples and allow_empty:
        return SplitArrays([], None, None)
    opts = sample_options(data_cfg)
    encoded = tokenize.encode_samples(tok, split_samples, opts)
    sft_arrays = prompt_arrays = None
    if with_sft:
        sft_arrays, report = batches.make_sft_arrays(encoded, data_cfg.max_length_tokens, pad_id=tok.pad_id,
                                                     drop_long=data_cfg.drop_long)
        print(f"[data] {name} sequences: {report.summary()}")
        if report.kept == 0:
            if allow_empty:
                print(f"[data] no {name} sequence is left: running without it")
                return SplitArrays([], None, None)
            trim = ", or pass --config.data.drop_long=False to trim long user texts" if data_cfg.drop_long else ""
            raise errors.InputError(
                f"none of the {report.total} {name} sequences fits --config.data.max_length_tokens="
                f"{data_cfg.max_length_tokens} (longest {report.longest} tokens): raise it{trim}")
    if with_prompts:
        prompt_arrays, report = batches.make_prompt_arrays(encoded, split_samples, data_cfg.max_prompt_tokens,
                                                           pad_id=tok.pad_id, drop_long=False)
        print(f"[data] {name} prompts: {report.summary()}")
    return SplitArrays(list(split_samples), sft_arrays, prompt_arrays)


def bundled_sample_dir() -> Path:
    return Path(sources.SAMPLE_DIR)
