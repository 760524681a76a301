"""Inputs a user hands over: HF GPT-2 folders (weights without a tokenizer, missing or truncated weights, a
config.json that does not match the tensors) and MESC CSVs (huge fields, over-long texts, no records, no
validation dialogues). Each is refused with the file named, or read and counted as data/SCHEMA.md says."""

import csv
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import pytest

from conftest import load_config
from therapy_rl import config_validation, errors
from therapy_rl.data import pipeline, sources, tokenize
from therapy_rl.models import hf_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT_FILES = ("config.json", "model.safetensors")


def _main(args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("THERAPY_RL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "therapy_rl.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_one_line(result, *fragments):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------------------------------ HF folders


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A 1-layer HF GPT-2 (n_embd 32) saved with safetensors, next to its byte-level BPE tokenizer."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny_gpt2")
    texts = ["I can't sleep before Mondays.", "What keeps you up at night?", "Work, mostly, and my family."] * 5
    tok = tokenize.train_bpe_tokenizer(texts, 300, path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=tok.vocab_size)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(path))
    return path


def _copy(hf_dir, target, names):
    target.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(hf_dir / name, target / name)
    return target


def _sft_config(hf_checkpoint):
    return load_config("quickstart", **{"model.hf_checkpoint": str(hf_checkpoint)})


def test_complete_hf_folder_passes(hf_dir, tmp_path):
    config = hf_io.check_hf_dir(str(hf_dir))
    assert (config.n_layer, config.n_embd, config.n_positions) == (1, 32, 128)
    tokenize.check_tokenizer_dir(hf_dir)
    assert tokenize.load_tokenizer(hf_dir).encode_text("What keeps you up?")
    config_validation.validate(_sft_config(hf_dir), str(tmp_path / "run"))


def test_weights_without_tokenizer_refused(hf_dir, tmp_path):
    """Today's failure: such a folder loaded as a tokenizer that encodes nothing, trained on empty token lists
    and was cached in the workdir. Now it is refused before the workdir exists."""
    bare = _copy(hf_dir, tmp_path / "weights_only", WEIGHT_FILES)
    with pytest.raises(errors.MissingFileError, match="no tokenizer files") as info:
        tokenize.check_tokenizer_dir(bare)
    assert str(bare) in str(info.value)
    with pytest.raises(errors.MissingFileError, match="no tokenizer files"):
        tokenize.load_tokenizer(bare)
    with pytest.raises(errors.MissingFileError, match="hf_checkpoint"):
        config_validation.validate(_sft_config(bare), str(tmp_path / "run"))
    config_validation.validate(load_config("quickstart", **{"model.hf_checkpoint": str(bare),
                                                            "tokenizer.path": str(hf_dir)}), str(tmp_path / "run"))

    workdir = tmp_path / "cli_run"
    result = _main(["--config", os.path.join(REPO, "configs", "quickstart.py"), "--workdir", str(workdir),
                    f"--config.model.hf_checkpoint={bare}"])
    _assert_one_line(result, str(bare), "no tokenizer files", "--config.tokenizer.path")
    assert not workdir.exists()


def test_missing_weights_named(hf_dir, tmp_path):
    no_weights = _copy(hf_dir, tmp_path / "no_weights", ("config.json", "tokenizer.json"))
    expected = str(no_weights / "model.safetensors")
    for load in (hf_io.check_hf_dir, hf_io.load_hf_gpt2):
        with pytest.raises(errors.MissingFileError) as info:
            load(str(no_weights))
        assert expected in str(info.value)
    no_config = _copy(hf_dir, tmp_path / "no_config", ("model.safetensors", "tokenizer.json"))
    with pytest.raises(errors.MissingFileError, match="config.json"):
        hf_io.check_hf_dir(str(no_config))


def test_truncated_weights_named(hf_dir, tmp_path):
    cut = _copy(hf_dir, tmp_path / "cut", WEIGHT_FILES + ("tokenizer.json",))
    weights = cut / "model.safetensors"
    data = weights.read_bytes()
    for size in (len(data) // 2, 20):
        weights.write_bytes(data[:size])
        for load in (hf_io.check_hf_dir, hf_io.load_hf_gpt2):
            with pytest.raises(errors.InputError, match="truncated") as info:
                load(str(cut))
            assert str(weights) in str(info.value)


@pytest.mark.parametrize("field,value,named", [
    ("n_embd", 64, "has shape"),  # every weight is the wrong size
    ("n_layer", 2, "no tensor 'h.1."),  # config.json promises a block the file lacks
    ("vocab_size", 999, "'wte.weight' has shape"),
    ("n_positions", 256, "'wpe.weight' has shape"),
])
def test_config_not_matching_tensors_named(hf_dir, tmp_path, field, value, named):
    odd = _copy(hf_dir, tmp_path / "odd", WEIGHT_FILES + ("tokenizer.json",))
    hf_config = json.loads((odd / "config.json").read_text())
    hf_config[field] = value
    (odd / "config.json").write_text(json.dumps(hf_config))
    for load in (hf_io.check_hf_dir, hf_io.load_hf_gpt2):
        with pytest.raises(errors.InputError) as info:
            load(str(odd))
        message = str(info.value)
        assert str(odd / "model.safetensors") in message and str(odd / "config.json") in message, message
        assert named in message and f"{field}={value}" in message, message


def test_one_layer_too_few_in_config_named(hf_dir, tmp_path):
    """Weights with more blocks than config.json describes: the extra tensor is named."""
    import torch
    import transformers

    two = tmp_path / "two_layers"
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=300)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(two))
    hf_config = json.loads((two / "config.json").read_text())
    hf_config["n_layer"] = 1
    (two / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(errors.InputError, match=r"'h\.1\..*' .* is not part of the model") as info:
        hf_io.check_hf_dir(str(two))
    assert str(two / "model.safetensors") in str(info.value)


# ------------------------------------------------------------------------------------------ MESC CSVs

HEADER = ["Utterance", "Speaker", "Emotion", "Strategy", "Dialogue_ID", "Utterance_ID"]
TRAIN_IDS, VAL_ID, TEST_ID = (0, 1, 2, 4, 5, 6, 7, 8), 3, 10


def _write_mesc(folder, dialogue_ids, texts=None):
    """MESC.csv in ``folder``: two client/therapist exchanges per dialogue; ``texts`` replaces utterances by
    (dialogue id, utterance id)."""
    texts = texts or {}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "MESC.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for d in dialogue_ids:
            for u, (speaker, text, emotion, strategy) in enumerate([
                    ("Client", f"I keep worrying about work, dialogue {d}.", "fear", "undefined"),
                    ("Therapist", "What worries you most?", "neutral", "Open question"),
                    ("Client", "That I will be let go.", "sadness", "undefined"),
                    ("Therapist", "That sounds frightening.", "neutral", "Restatement")]):
                writer.writerow([texts.get((d, u), text), speaker, emotion, strategy, d, u])
    return path


def _data_cfg(folder, **changes):
    cfg = load_config("quickstart").data
    cfg.source, cfg.data_dir = "mesc", str(folder)
    for key, value in changes.items():
        cfg[key] = value
    return ml_collections.ConfigDict(cfg.to_dict())


@pytest.fixture
def default_csv_field_limit():
    """The csv module's own limit (131,072 characters), as a fresh process has it."""
    before = csv.field_size_limit()
    csv.field_size_limit(131072)
    yield
    csv.field_size_limit(before)


def test_huge_field_read_and_long_texts_truncated_and_counted(tmp_path, default_csv_field_limit, capsys):
    client = "START, " + "and so, " * 25_000 + "the END"  # 200,014 characters, commas and all
    therapist = "Begin here. " + "words " * 30_000 + "finish"
    assert len(client) > 200_000
    _write_mesc(tmp_path, (0, VAL_ID, TEST_ID), {(0, 0): client, (0, 1): therapist})
    dialogues, report = sources.read_mesc(tmp_path, "train")
    first, reply = dialogues[0].utterances[:2]
    limit = sources.MAX_TEXT_CHARS
    assert len(first.text) <= limit and first.text.endswith("the END")  # a client text keeps its end
    assert len(reply.text) <= limit and reply.text.startswith("Begin here.")  # a therapist text its start
    assert len(first.text) > limit - 10 and len(reply.text) > limit - 10
    assert report.truncated_texts == 2 and "2 texts truncated" in report.summary()
    _, val_report = sources.read_mesc(tmp_path, "val")
    assert val_report.truncated_texts == 0  # counted per split

    pipeline.load_samples(_data_cfg(tmp_path), ("train",))
    assert f"2 texts over {limit} characters truncated" in capsys.readouterr().out


def test_header_only_csv_names_file_and_split(tmp_path):
    path = _write_mesc(tmp_path / "data", ())
    with pytest.raises(errors.InputError) as info:
        pipeline.load_samples(_data_cfg(path.parent), ("train", "val"))
    message = str(info.value)
    assert str(path) in message and "train split" in message and "no records" in message

    workdir = tmp_path / "run"
    result = _main(["--config", os.path.join(REPO, "configs", "quickstart.py"), "--workdir", str(workdir),
                    "--config.data.source=mesc", f"--config.data.data_dir={path.parent}"])
    _assert_one_line(result, str(path), "no records", "train split")


def test_split_without_validation_dialogues(tmp_path):
    path = _write_mesc(tmp_path, TRAIN_IDS + (TEST_ID,))
    with pytest.raises(errors.InputError) as info:
        pipeline.load_samples(_data_cfg(tmp_path), ("train", "val"))
    message = str(info.value)
    assert str(path) in message and "val split" in message and "allow_empty_validation=True" in message
    splits = pipeline.load_samples(_data_cfg(tmp_path), ("train", "val"), allow_empty_validation=True)
    assert splits["val"] == [] and len(splits["train"]) == 2 * len(TRAIN_IDS)
    with pytest.raises(errors.InputError, match="val split"):  # PPO and eval never opt out
        pipeline.load_samples(_data_cfg(tmp_path, allow_empty_validation=True), ("val",))


def test_sft_without_validation_keeps_no_best(tmp_path):
    """With the opt-out, SFT trains, logs no val/loss and saves no best/ (nothing to choose it by)."""
    from therapy_rl import sft

    _write_mesc(tmp_path / "data", TRAIN_IDS + (TEST_ID,))
    config = load_config("quickstart", **{
        "data.source": "mesc", "data.data_dir": str(tmp_path / "data"), "data.allow_empty_validation": True,
        "data.max_length_tokens": 160, "data.max_prompt_tokens": 96, "sampling.max_new_tokens": 16,
        "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.n_positions": 192,
        "tokenizer.bpe_vocab_size": 300, "global_batch_size": 8, "eval_batch_size": 8, "max_steps": 2,
        "log_every_steps": 1, "eval_every_steps": 1, "checkpoint_every_steps": 2, "num_sample_replies": 2,
        "progress_bar": False})
    workdir = tmp_path / "run"
    config_validation.validate(config, str(workdir))
    assert sft.train_and_evaluate(config, str(workdir)) == {}
    best = workdir / "best"
    assert not best.exists() or not [name for name in os.listdir(best) if name.isdigit()]
    assert (workdir / "checkpoints" / "2").is_dir()
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged and not any(key.startswith("val/") for record in logged for key in record)
