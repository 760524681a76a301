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

from therapy_rl.data import batches, labels, samples as samples_lib, sources, tokenize

SPLITS = ("train", "val", "test")
ESCONV_FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}


def dataset_dir(data_cfg, source: str) -> str:
    """``data_cfg.data_dir`` or ``$THERAPY_RL_DATA/<source>``, with a clear error when neither exists."""
    if data_cfg.data_dir:
        return data_cfg.data_dir
    root = os.environ.get("THERAPY_RL_DATA", "")
    if not root:
        raise FileNotFoundError(f"data source {source!r} needs --config.data.data_dir or $THERAPY_RL_DATA "
                                "(the folder holding mesc/, esconv/, ...)")
    return os.path.join(root, source)


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
        path = os.path.join(dataset_dir(data_cfg, "esconv"), ESCONV_FILES[split])
        return sources.read_esconv(path, emotion_map=emotion_map, strict=strict,
                                   supporter_emotion=data_cfg.get("esconv_supporter_emotion", "neutral"))
    if source == "jsonl":
        path = {"train": data_cfg.train_path, "val": data_cfg.val_path, "test": data_cfg.test_path}[split]
        if not path:
            raise ValueError(f"data.source=jsonl needs --config.data.{split}_path")
        return sources.read_jsonl(path, strict=strict)
    raise ValueError(f"unknown data.source {source!r}; expected bundled_sample, mesc, esconv or jsonl")


def sample_options(data_cfg) -> samples_lib.SampleOptions:
    return samples_lib.SampleOptions(
        include_therapist_emotion=data_cfg.include_therapist_emotion,
        include_strategy=data_cfg.include_strategy,
        context_turns=data_cfg.context_turns,
        user_emotion_from=data_cfg.user_emotion_from,
        therapist_run=data_cfg.therapist_run,
    )


def load_samples(data_cfg, splits: Sequence[str] = ("train", "val")) -> dict[str, list[samples_lib.Sample]]:
    """Samples per split, logging dialogue counts, skipped records and sample counts."""
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
        print(f"[data] {data_cfg.source} {split}: {len(dialogues)} dialogues, {len(split_samples)} samples"
              f"{' (' + str(read_report.records_skipped) + ' bad records skipped)' if read_report.records_skipped else ''}")
        out[split] = split_samples
    return out


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
                 with_prompts: bool = True, name: str = "") -> SplitArrays:
    opts = sample_options(data_cfg)
    encoded = tokenize.encode_samples(tok, split_samples, opts)
    sft_arrays = prompt_arrays = None
    if with_sft:
        sft_arrays, report = batches.make_sft_arrays(encoded, data_cfg.max_length_tokens, pad_id=tok.pad_id,
                                                     drop_long=data_cfg.drop_long)
        print(f"[data] {name} sequences: {report.summary()}")
    if with_prompts:
        prompt_arrays, report = batches.make_prompt_arrays(encoded, split_samples, data_cfg.max_prompt_tokens,
                                                           pad_id=tok.pad_id, drop_long=False)
        print(f"[data] {name} prompts: {report.summary()}")
    return SplitArrays(list(split_samples), sft_arrays, prompt_arrays)


def bundled_sample_dir() -> Path:
    return Path(sources.SAMPLE_DIR)
