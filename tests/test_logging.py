"""Run logs people read: curves with one panel per kind, TensorBoard text and hparams, W&B offline."""
import json
import os

from therapy_rl import curves
from therapy_rl.metrics_writer import MetricsWriter

PPO_KEYS = ["objective/scores", "eval/scores", "eval/best_scores", "reward/quality", "reward/emotion",
            "reward/num_chars", "eval/reward/quality", "rollout/length_mean", "objective/kl", "eval/kl",
            "objective/kl_coef", "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg",
            "policy/clipfrac_avg", "rollout/eos_rate", "time/rollout_s", "lr", "eps"]


def test_panels_separate_scales_and_plot_validation():
    panels = dict((title, keys) for title, keys in curves.assign_panels(PPO_KEYS + ["train/loss", "val/loss"]))
    assert "eval/scores" in panels["scores (train and validation)"]
    assert "reward/num_chars" in panels["lengths"] and "reward/num_chars" not in panels["reward components"]
    assert set(panels["reward components"]) == {"reward/quality", "reward/emotion", "eval/reward/quality"}
    assert panels["KL coefficient"] == ["objective/kl_coef"]
    assert "objective/kl_coef" not in panels["KL"] and "eval/kl" in panels["KL"]
    assert {"train/loss", "val/loss", "loss/policy_avg"} <= set(panels["losses"])
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
