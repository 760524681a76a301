"""Export to a Hugging Face directory: a PPO run loads in transformers, greedy generation is token-identical to our
sampler and stops at <eos>; SFT runs, --checkpoint last/STEP, the model card and its evaluation, CLI errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from therapy_rl import errors, export, run as run_lib, sampling
from therapy_rl.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 48


def cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "therapy_rl.export", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def exported_tensors(out_dir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(out_dir, "model.safetensors"))


def assert_exports(out_dir, opened):
    """The directory's weights are exactly the params of the opened checkpoint (the name map itself is tested in
    test_gpt2_parity)."""
    from therapy_rl.models import hf_io

    tensors = exported_tensors(out_dir)
    expected = hf_io.params_to_hf_tensors(opened.model_config, opened.read_params())
    assert sorted(tensors) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value)


@pytest.fixture(scope="module")
def ppo_export(quickstart_ppo_workdir, tmp_path_factory):
    """The PPO run's best/ exported through the CLI."""
    out = str(tmp_path_factory.mktemp("export") / "ppo_hf")
    proc = cli("--workdir", quickstart_ppo_workdir, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def val_prompts(run, count):
    import ml_collections

    data = ml_collections.ConfigDict(dict(run.data))
    split = pipeline.load_samples(data, ("val",))["val"]
    arrays = pipeline.encode_split(run.tokenizer, data, split, with_sft=False, name="val")
    return {k: v[:count] for k, v in arrays.prompts.items()}, arrays.samples


def test_ppo_export_files_and_card(ppo_export, quickstart_ppo_workdir):
    run = run_lib.open_run(quickstart_ppo_workdir)
    tok = run.tokenizer
    names = set(os.listdir(ppo_export))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    config = json.load(open(os.path.join(ppo_export, "config.json")))
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.eos_id,
                                                                                     tok.pad_id)
    generation = json.load(open(os.path.join(ppo_export, "generation_config.json")))
    assert generation["eos_token_id"] == tok.eos_id and generation["pad_token_id"] == tok.pad_id
    assert generation["max_new_tokens"] == run.sampling["max_new_tokens"]
    assert_exports(ppo_export, run)  # best/: the trunk of the PPO state
    card = open(os.path.join(ppo_export, "README.md")).read()
    assert "**PPO**" in card and run.label in card
    assert "not a therapist and not a crisis service" in card and "guard is not part of these weights" in card
    assert "No evaluation of this checkpoint was found" in card


def test_transformers_greedy_matches_ours_and_stops_at_eos(ppo_export, quickstart_ppo_workdir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_lib.open_run(quickstart_ppo_workdir)
    tok = run.tokenizer
    hf_tok = AutoTokenizer.from_pretrained(ppo_export)
    model = AutoModelForCausalLM.from_pretrained(ppo_export).eval()
    prompts, samples = val_prompts(run, 6)

    config = sampling.SamplingConfig(max_new_tokens=MAX_NEW, greedy=True, eos_id=tok.eos_id, pad_id=tok.pad_id)
    out = sampling.make_generate_fn(run.model_config, config)(
        jax.device_put(run.read_params()), jnp.asarray(prompts["prompt_ids"]), jnp.asarray(prompts["prompt_mask"]),
        jax.random.key(0))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    stopped = 0
    for row in range(len(tokens)):
        ids = prompts["prompt_ids"][row][prompts["prompt_mask"][row] == 1].tolist()
        sample = samples[int(prompts["sample_index"][row])]
        # The card's prompt string gives the same ids through the exported tokenizer.
        text = export.prompt_text(sample.problem, sample.user_text, sample.user_emotion)
        assert hf_tok(text, add_special_tokens=False).input_ids == ids
        with torch.no_grad():  # generation_config.json supplies eos/pad; greedy asked for explicitly
            hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=MAX_NEW)[0, len(ids):].tolist()
        ours = tokens[row, :lengths[row]].tolist()
        assert hf == ours, (row, hf, ours)
        if ours[-1] == tok.eos_id:
            stopped += 1
            assert len(hf) < MAX_NEW and hf[-1] == tok.eos_id  # stopped at <eos>, not at the length limit
    assert stopped >= 3, "too few replies end with <eos> to test stopping"


def test_sft_export_hf_flag_writes_the_best_checkpoint(quickstart_sft_workdir):
    """--config.export_hf=True: the run's own hf_export/ is the export of best/, card included."""
    out = os.path.join(quickstart_sft_workdir, "hf_export")
    assert_exports(out, run_lib.open_run(quickstart_sft_workdir, "best"))
    for name in ("config.json", "generation_config.json", "README.md"):
        assert os.path.isfile(os.path.join(out, name)), name


def test_sft_export_last_and_step(quickstart_sft_workdir, tmp_path):
    best = export.export_run(quickstart_sft_workdir, str(tmp_path / "best"))
    last = export.export_run(quickstart_sft_workdir, str(tmp_path / "last"), "last")
    step = export.export_run(quickstart_sft_workdir, str(tmp_path / "step30"), "30")
    for out, choice in ((best, "best"), (last, "last"), (step, 30)):
        opened = run_lib.open_run(quickstart_sft_workdir, choice)
        assert_exports(out, opened)
        card = open(os.path.join(out, "README.md")).read()
        assert "**SFT**" in card and f"step {opened.step}" in card
    assert run_lib.open_run(quickstart_sft_workdir, 30).step == 30
    wte = "transformer.wte.weight"
    assert not np.array_equal(exported_tensors(step)[wte], exported_tensors(last)[wte])  # step 30 vs 60


def _fake_report(folder, run, checkpoint_label=None):
    os.makedirs(folder, exist_ok=True)
    report = {"meta": {"run_workdir": run.workdir, "checkpoint": checkpoint_label or run.label,
                       "dataset": "bundled_sample", "split": "test", "decoding_settings": {"top_p": 0.9},
                       "decoding_source": "a test"},
              "n_samples": 18, "ci": {"confidence": 0.95, "n_resamples": 200},
              "metrics": {"rougeL": {"mean": 0.1234, "low": 0.1, "high": 0.15}},
              "emotion": {"accuracy": 0.8, "majority_baseline": {"label": "neutral", "accuracy": 0.9}}}
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f)
    with open(os.path.join(folder, "decoding.json"), "w") as f:
        json.dump({"settings": {"top_p": 0.8, "top_k": 7, "temperature": 1.1}, "chosen_on_split": "val"}, f)


def test_card_takes_the_eval_of_this_checkpoint(quickstart_sft_workdir, tmp_path):
    link = tmp_path / "run"  # a run folder with evaluation folders beside it
    os.symlink(quickstart_sft_workdir, link)
    run = run_lib.open_run(str(link))
    _fake_report(str(tmp_path / "eval_best"), run)
    _fake_report(str(tmp_path / "eval_other"), run, checkpoint_label=f"{run.checkpoint_dir} step 999")
    out = export.export_run(str(link), str(tmp_path / "hf"))
    card = open(os.path.join(out, "README.md")).read()
    assert "| rougeL | 0.1234 | [0.1000, 0.1500] |" in card and card.count("### bundled_sample / test") == 1
    assert "0.8000 vs 0.9000" in card
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert (generation["top_k"], generation["top_p"], generation["temperature"]) == (7, 0.8, 1.1)

    out = export.export_run(str(link), str(tmp_path / "hf"), eval_dirs=[str(tmp_path / "eval_other")],
                            overwrite=True)
    assert "this evaluation scored" in open(os.path.join(out, "README.md")).read()
    with pytest.raises(errors.ConfigError, match="exists and is not empty"):
        export.export_run(str(link), str(tmp_path / "hf"))
    stranger = str(tmp_path / "elsewhere" / "eval")
    _fake_report(stranger, run)
    report = json.load(open(os.path.join(stranger, "report.json")))
    report["meta"]["run_workdir"] = str(tmp_path / "another_run")
    json.dump(report, open(os.path.join(stranger, "report.json"), "w"))
    with pytest.raises(errors.ConfigError, match="evaluated"):
        export.export_run(str(link), str(tmp_path / "hf2"), eval_dirs=[stranger])
    assert not os.path.exists(tmp_path / "hf2")


def test_cli_errors_are_one_line(quickstart_sft_workdir, tmp_path):
    proc = cli("--workdir", quickstart_sft_workdir, "--out", str(tmp_path / "x"), "--checkpoint", "latest")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint 'latest'")
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "x")
