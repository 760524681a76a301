"""Run logs people read: curves with one panel per kind, TensorBoard text and hparams, W&B offline."""
import json
import os

from therapy_rl import curves
from therapy_rl.metrics_writer import MetricsWriter

PPO_KEYS = ["objective/scores", "eval/scores", "eval/best_scores", "reward/quality", "reward/emotion",
            "reward/num_chars", "eval/reward/quality", "rollout/length_mean", "objective/kl", "eval/kl",
            "objective/kl_coef", "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg",
            "policy/clipfrac_avg", "rollout/eos_rate", "time/rollout_s", "lr", "eps", "value/mean", "value/var",
            "value/vpred_avg", "value/clipfrac_avg", "returns/mean"]


def test_panels_separate_scales_and_plot_validation():
    panels = dict((title, keys) for title, keys in curves.assign_panels(PPO_KEYS + ["train/loss", "val/loss"]))
    assert "eval/scores" in panels["scores (train and validation)"]
    assert "reward/num_chars" in panels["lengths"] and "reward/num_chars" not in panels["reward components"]
    assert set(panels["reward components"]) == {"reward/quality", "reward/emotion", "eval/reward/quality"}
    diagnostics = dict(curves.assign_panels(["reward/user_crisis", "eval/reward/tag_valid", "reward/safety"]))
    assert diagnostics["reward diagnostics"] == ["eval/reward/tag_valid", "reward/user_crisis"]
    assert panels["KL coefficient"] == ["objective/kl_coef"]
    assert "objective/kl_coef" not in panels["KL"] and "eval/kl" in panels["KL"]
    assert {"train/loss", "val/loss", "loss/policy_avg"} <= set(panels["losses"])
    assert panels["values"] == ["returns/mean", "value/mean", "value/vpred_avg"]  # PPO's value function: not val/
    assert "value/clipfrac_avg" in panels["rates"]
    plotted = {k for keys in panels.values() for k in keys}
    assert not plotted & {"time/rollout_s", "lr", "eps"}
    assert sum(len(keys) for keys in panels.values()) == len(plotted)  # each key in one panel only


def test_writer_logs_text_hparams_curves_and_wandb_offline(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir = str(tmp_path / "run")
    writer = MetricsWriter(workdir, total_steps=3, enable_progress_bar=False,
                           wandb_settings={"enabled": True, "mode": "offline", "project": "t"},
                           config={"learning_rate": 1e-4, "model": {"n_layer": 2}})
    writer.write_config({"learning_rate": 1e-4, "model": {"n_layer": 2}}, ("eval/scores",))
    for step in (1, 2, 3):
        writer.write(step, {"objective/scores": -step, "reward/num_chars": 600.0 + step, "objective/kl": 0.1})
    writer.write(3, {"eval/scores": -1.5})
    writer.write_texts(3, {"samples/replies": "user: hi\n\nreply: hello"})
    writer.close()

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 3]
    assert os.path.getsize(os.path.join(workdir, "training_curves.png")) > 1000

    events = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"tensors": 0}).Reload()
    tags = events.Tags()
    assert "objective/scores" in tags["scalars"] and "eval/scores" in tags["scalars"]
    text_tags = set(tags["tensors"])
    assert any(t.startswith("samples/replies") for t in text_tags), text_tags
    assert any(t.startswith("config") for t in text_tags), text_tags
    assert events.PluginTagToContent("hparams")  # the experiment, session start and end summaries
    wandb_dir = os.path.join(workdir, "wandb")
    assert os.path.isdir(wandb_dir) and any(name.startswith("offline-run") for name in os.listdir(wandb_dir))


def _text_steps(workdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"tensors": 0}).Reload()
    names = [t for t in events.Tags()["tensors"] if t.startswith(tag)]
    assert names, events.Tags()["tensors"]
    return events, sorted({e.step for name in names for e in events.Tensors(name)})


def test_sft_and_ppo_write_sample_replies_and_config_at_each_eval(quickstart_sft_workdir, tmp_path):
    """Training loops put the config (hparams + text) and the sample replies of every eval in TensorBoard."""
    from conftest import load_config
    from therapy_rl import sft
    from therapy_rl.ppo import trainer

    sft_dir = str(tmp_path / "sft")
    sft.train_and_evaluate(load_config("quickstart", max_steps=4, eval_every_steps=2, checkpoint_every_steps=4,
                                       num_sample_replies=2, progress_bar=False), sft_dir)
    events, steps = _text_steps(sft_dir, "sample_replies")
    assert steps == [2, 4]
    text = events.Tensors([t for t in events.Tags()["tensors"] if t.startswith("sample_replies")][0])[0]
    assert b"[model" in text.tensor_proto.string_val[0]
    assert events.PluginTagToContent("hparams")
    _text_steps(sft_dir, "config")

    ppo_dir = str(tmp_path / "ppo")
    trainer.train_and_evaluate(load_config("quickstart_ppo", init_from=quickstart_sft_workdir, max_iterations=2,
                                           eval_every_iterations=1, checkpoint_every_iterations=2,
                                           num_sample_replies=2, progress_bar=False), ppo_dir)
    _, steps = _text_steps(ppo_dir, "sample_replies")
    assert steps == ([0, 1, 2] if load_config("quickstart_ppo").eval_at_start else [1, 2])
