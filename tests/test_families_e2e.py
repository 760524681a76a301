"""End to end on 8 simulated devices:
a tiny HF Mistral with LoRA through `python -m therapy_rl.main` SFT -> PPO -> eval, then `therapy_rl.export`
(data 2 x fsdp 2 x tensor 2); a tiny Mixtral SFT, then PPO with configs/ppo_mixtral8x7b.py, with the router's
load-balancing loss logged (expert 2 x fsdp 2 x tensor 2)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, load_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


def main(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", *args, "--debug"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory):
    """An HF Mistral folder (config.json, model.safetensors, tokenizer.json) with a vocabulary smaller than the
    run's tokenizer, so loading also grows the embedding and LM head."""
    from therapy_rl import defaults
    from therapy_rl.data import pipeline, tokenize

    path = str(tmp_path_factory.mktemp("tiny_mistral"))
    samples = pipeline.load_samples(defaults.sft_defaults().data, ("train",))["train"]
    tokenize.train_bpe_tokenizer(tokenize.training_texts(samples), 400, path)
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        sliding_window=32)
    transformers.MistralForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mistral_sft(tiny_mistral_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mistral_sft"))
    main("therapy_rl.main", "--config", "configs/sft_mistral7b_lora_esconv.py", f"--workdir={workdir}",
         f"--config.model.hf_checkpoint={tiny_mistral_dir}", "--config.data.source=bundled_sample",
         "--config.model.dtype=float32", "--config.max_steps=4", "--config.global_batch_size=8",
         "--config.eval_batch_size=8", "--config.data.max_length_tokens=96", "--config.data.max_prompt_tokens=64",
         "--config.sampling.max_new_tokens=8", "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
         "--config.num_sample_replies=0", "--config.progress_bar=False", "--config.learning_rate=1e-2", *MESH)
    return workdir


@pytest.fixture(scope="module")
def mistral_ppo(mistral_sft, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mistral_ppo"))
    main("therapy_rl.main", "--config", "configs/quickstart_ppo.py", f"--workdir={workdir}",
         f"--config.init_from={mistral_sft}", "--config.max_iterations=1", "--config.global_batch_size=8",
         "--config.ppo.minibatch_size=4", "--config.ppo.num_ppo_epochs=1", "--config.sampling.max_new_tokens=8",
         "--config.eval_every_iterations=1", "--config.checkpoint_every_iterations=1", "--config.num_eval_prompts=8",
         "--config.eval_batch_size=8", "--config.num_sample_replies=0", "--config.progress_bar=False", *MESH)
    return workdir


def test_lora_sft_on_the_mesh(mistral_sft):
    with open(os.path.join(mistral_sft, "run_info.json")) as f:
        model_config = json.load(f)["model_config"]
    assert model_config["family"] == "mistral" and model_config["lora"]["rank"] == 16
    assert model_config["vocab_size"] > 300 and model_config["sliding_window"] == 32
    val = [m["val/loss"] for m in metrics(mistral_sft) if "val/loss" in m]
    assert len(val) == 2 and val[1] < val[0]


def test_ppo_eval_and_export(mistral_ppo, tmp_path):
    assert any("eval/scores" in m for m in metrics(mistral_ppo))
    eval_dir, out = str(tmp_path / "eval"), str(tmp_path / "export")
    main("therapy_rl.main", "--config", "configs/eval_quickstart.py", f"--workdir={eval_dir}",
         f"--config.checkpoint={mistral_ppo}", "--config.sampling.max_new_tokens=8", "--config.eval_batch_size=8",
         "--config.decoding_search.enabled=False", *MESH)
    assert os.path.exists(os.path.join(eval_dir, "report.json"))
    main("therapy_rl.export", f"--workdir={mistral_ppo}", f"--out={out}")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(os.path.join(out, "peft_adapter")))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "MistralForCausalLM"

    from therapy_rl import run as run_lib
    from therapy_rl.models import families

    run = run_lib.open_run(mistral_ppo, "best")
    ids = np.arange(5, 25, dtype=np.int32)[None]
    ours = families.module(run.model_config).apply({"params": run.read_params()}, ids).logits
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)  # merged export == base + adapters


def test_tiny_mixtral_sft_then_ppo_logs_the_aux_loss(tmp_path):
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    from therapy_rl import sft
    from therapy_rl.ppo import trainer

    mesh = {"mesh.data": 1, "mesh.expert": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    sft_dir, ppo_dir = str(tmp_path / "sft"), str(tmp_path / "ppo")
    config = load_config("quickstart", **{"model.family": "mixtral", "model.n_layer": 1, "model.n_embd": 32,
                                          "model.n_head": 4, "model.decoder.n_kv_head": 2,
                                          "model.decoder.intermediate_size": 32, "model.decoder.num_experts": 4,
                                          "model.router_aux_loss_coef": 0.1, "max_steps": 2,
                                          "eval_every_steps": 2, "checkpoint_every_steps": 2,
                                          "num_sample_replies": 0, "progress_bar": False, **mesh})
    sft.train_and_evaluate(config, sft_dir)
    sft_aux = [m["train/aux_loss"] for m in metrics(sft_dir) if "train/aux_loss" in m]
    assert sft_aux and all(1.9 < a < 4.0 for a in sft_aux)  # k = 2 when balanced, E = 4 at worst
    # configs/ppo_mixtral8x7b.py itself on ESConv, on its expert x fsdp x tensor mesh scaled to 8 devices; the
    # emotion-tag reward stands in for the therapy reward (the reward models are tested elsewhere).
    config = load_config("ppo_mixtral8x7b", init_from=sft_dir, max_iterations=1, global_batch_size=8,
                         eval_every_iterations=1, checkpoint_every_iterations=1, num_sample_replies=0,
                         num_eval_prompts=8, eval_batch_size=8, progress_bar=False,
                         **{"ppo.minibatch_size": 4, "ppo.num_ppo_epochs": 1, "sampling.max_new_tokens": 8,
                            "reward.kind": "emotion_tag", "data.max_train_samples": 64, "data.max_eval_samples": 16,
                            "mesh.fsdp": 2})
    assert (config.mesh.data, config.mesh.expert, config.mesh.tensor, config.data.source) == (1, 2, 2, "esconv")
    trainer.train_and_evaluate(config, ppo_dir)
    ppo_aux = [m["policy/aux_loss_avg"] for m in metrics(ppo_dir) if "policy/aux_loss_avg" in m]
    assert ppo_aux and all(1.9 < a < 4.0 for a in ppo_aux)
