"""The eval mode (with its decoding search) on a mesh: 4 devices with sharded params, and 2 processes x 2 devices,
give the same replies, scores and chosen settings as one device."""
import json
import os
import subprocess
import sys

import jax
import pytest

from therapy_rl import config_validation, errors
from therapy_rl.evaluation import runner

from conftest import REPO_ROOT, load_config

# A tiny grid (top-k on: two compiled plans) on 8 validation prompts; 18 test prompts in batches of 8 (the last
# one padded).
OVERRIDES = {"decoding_search.top_p": (0.9, 1.0), "decoding_search.top_k": (20,), "decoding_search.limit": 8,
             "eval_batch_size": 8, "metrics.bootstrap_resamples": 100, "metrics.meteor_variant": "exact+stem"}
# Fields that differ between runs of the same evaluation (timings, paths, the mesh itself).
RUN_FIELDS = ("generation_seconds", "mesh", "processes", "workdir")


def eval_config(checkpoint, **overrides):
    return load_config("eval_quickstart", checkpoint=checkpoint, **{**OVERRIDES, **overrides})


def read(workdir):
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    meta = report.pop("meta")
    report.pop("plots", None)  # paths under the workdir
    with open(os.path.join(workdir, "generations.jsonl")) as f:
        generations = f.read()
    with open(os.path.join(workdir, "decoding.json")) as f:
        decoding = json.load(f)
    decoding.pop("search_seconds")  # timings: the rest of the search must match exactly
    for result in decoding["results"]:
        result.pop("seconds")
    kept = json.loads(json.dumps({k: v for k, v in meta.items() if k not in RUN_FIELDS}).replace(workdir, "W"))
    return report, kept, generations, decoding, meta


@pytest.fixture(scope="module")
def one_device(quickstart_sft_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval_1dev"))
    runner.evaluate(eval_config(quickstart_sft_workdir), workdir, devices=jax.devices()[:1])
    return read(workdir)


def assert_same_evaluation(got, want):
    report, meta, generations, decoding, _ = got
    want_report, want_meta, want_generations, want_decoding, _ = want
    assert generations == want_generations
    assert decoding == want_decoding  # every candidate's scores, so every search generation matched too
    assert report == want_report  # means, per-sample scores, CIs, emotion metrics
    assert meta == want_meta


def test_four_devices_with_sharded_params_equal_one_device(quickstart_sft_workdir, one_device, tmp_path):
    config = eval_config(quickstart_sft_workdir)
    config.mesh.data, config.mesh.tensor = 2, 2  # params split by the GPT-2 rules (vocab-sharded logits)
    runner.evaluate(config, str(tmp_path), devices=jax.devices()[:4])
    got = read(str(tmp_path))
    assert got[4]["mesh"] == {"data": 2, "expert": 1, "fsdp": 1, "tensor": 2} and one_device[4]["mesh"]["data"] == 1
    assert_same_evaluation(got, one_device)
    report, _, generations, decoding, _ = one_device
    # Not vacuous: real replies, and the candidates' sampling differs.
    assert report["n_samples"] == 18 and sum(len(json.loads(line)["generated"]) > 0
                                             for line in generations.splitlines()) > 9
    assert len(decoding["results"]) == 2 and len({json.dumps(r["scores"]) for r in decoding["results"]}) > 1


def test_two_processes_of_two_devices_equal_one_device(quickstart_sft_workdir, one_device, tmp_path):
    """`launch/local_multiprocess.sh 2 2 configs/eval_quickstart.py W --config.checkpoint=RUN`."""
    workdir = str(tmp_path / "mp")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PORT=str(20000 + (os.getpid() + 7) % 20000))
    env.pop("XLA_FLAGS", None)  # the script sets each process's device count
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    flags = [f"--config.checkpoint={quickstart_sft_workdir}"] + [
        f"--config.{k}={v}".replace(" ", "") for k, v in OVERRIDES.items()]
    with open(tmp_path / "launch.log", "w") as log:
        rc = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "2", "configs/eval_quickstart.py", workdir,
                             *flags], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=420).returncode
    logs = [open(f"{workdir}.proc{i}.log").read() for i in range(2)]
    assert rc == 0, "\n".join(log[-3000:] for log in logs)
    got = read(workdir)
    assert got[4]["mesh"] == {"data": 4, "expert": 1, "fsdp": 1, "tensor": 1} and got[4]["processes"] == 2
    assert_same_evaluation(got, one_device)
    assert "report " in logs[0] and "report " not in logs[1]  # one writer, one summary


def test_two_processes_stop_when_process_0_cannot_read_decoding_json(quickstart_sft_workdir, tmp_path):
    """Only process 0 reads decoding.json. When that fails, every process exits with an error (before, process 1
    waited forever on the next collective)."""
    workdir = str(tmp_path / "mp_bad")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "decoding.json"), "w") as f:
        json.dump({"chosen_on_split": "val"}, f)  # no "settings"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PORT=str(20000 + (os.getpid() + 11) % 20000))
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    flags = [f"--config.checkpoint={quickstart_sft_workdir}", "--config.decoding_search.enabled=True"]
    with open(tmp_path / "launch.log", "w") as log:
        rc = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "2", "configs/eval_quickstart.py", workdir,
                             *flags], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=300).returncode
    logs = [open(f"{workdir}.proc{i}.log").read() for i in range(2)]
    assert rc != 0, "\n".join(log[-2000:] for log in logs)
    assert "decoding.json: field 'settings' is missing" in logs[0], logs[0][-2000:]
    assert "process 0 could not read the saved decoding settings" in logs[1], logs[1][-2000:]
    assert not os.path.exists(os.path.join(workdir, "report.json"))


def test_eval_batch_must_split_over_the_mesh(quickstart_sft_workdir, tmp_path):
    config = eval_config(quickstart_sft_workdir, eval_batch_size=6)
    with pytest.raises(errors.ConfigError, match="eval_batch_size=6: must be a multiple of"):
        config_validation.validate(config, str(tmp_path), device_count=4, process_count=1)
    config.mesh.data = 3
    with pytest.raises(errors.ConfigError, match="mesh.data=3"):
        config_validation.validate(config, str(tmp_path), device_count=4, process_count=1)
    config.mesh.data = -1  # the runner refuses it too (library callers skip validate)
    with pytest.raises(errors.ConfigError, match="eval_batch_size=6"):
        runner.evaluate(config, str(tmp_path), devices=jax.devices()[:4])


def test_user_errors_of_the_runner_are_config_errors(quickstart_sft_workdir, tmp_path):
    config = eval_config(quickstart_sft_workdir, split="train")
    with pytest.raises(errors.ConfigError, match="config.split='train'"):
        runner.evaluate(config, str(tmp_path))
    with pytest.raises(errors.ConfigError, match="paper_table='tabel5'"):
        runner.paper_table_for("tabel5", "mesc")
    with pytest.raises(errors.ConfigError, match="refusing to search"):
        runner.check_search_split(eval_config(quickstart_sft_workdir, **{"decoding_search.split": "test"})
                                  .decoding_search)
