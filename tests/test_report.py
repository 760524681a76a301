"""report.json / report.md / PNG plots of one workdir, and the comparison command over several workdirs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from therapy_rl.evaluation import compare, decoding_search, metrics, report

REFS = ["How did that make you feel when he left?", "It sounds like you were really scared.",
        "Tell me more about your father.", "We can stop here today.", "What do you think happened then?"]


def _records(n, shift=0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ref = REFS[i % len(REFS)]
        gen = REFS[(i + shift) % len(REFS)] if rng.random() < 0.5 else "I hear you. Go on | please."
        out.append({"reference": ref, "generated": gen, "user_text": f"I feel lost, day {i}.", "problem": "grief",
                    "user_emotion": "sadness", "sample_id": f"mesc-test-{i}",
                    "gold_emotion": "neutral" if i % 6 else "fear",
                    "pred_emotion": ["neutral", "neutral", "fear", None, "anger"][int(rng.integers(5))]})
    return out


def _write_metrics_jsonl(path):
    with open(path, "w") as f:
        for step in range(0, 50, 5):
            f.write(json.dumps({"step": step, "train/loss": 3.0 - step / 40, "val/loss": 3.1 - step / 50,
                                "objective/kl": step / 100, "objective/scores": 1 + step / 25,
                                "reward/quality": 0.5, "reward/emotion": step / 30, "lr": 1e-5}) + "\n")
        f.write('{"step": 50, "train/lo')  # a run killed mid-write


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.fixture(scope="module")
def results():
    return metrics.evaluate_generations(_records(36), train_gold_emotions=["neutral"] * 5 + ["fear"],
                                        meteor_variant=metrics.METEOR_EXACT_STEM)


def test_write_report_files_tables_and_plots(tmp_path, results):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    _write_metrics_jsonl(os.path.join(workdir, "metrics.jsonl"))
    decoding = {"settings": {"top_p": 0.7, "top_k": 10, "temperature": 1.2}, "chosen_on_split": "validation",
                "metric": "rougeL", "objective": 0.1, "n_candidates": 8}
    judged = {"model": "judge-model", "mode": "per_criterion",
              "per_criterion": {"Therapeutic Rapport": {"mean": 3.5, "n": 10}}, "overall": 3.5,
              "counts": {"ok": 10, "parse_failures": 1, "http_failures": 0}, "per_item": []}
    paths = report.write_report(workdir, results, meta={"dataset": "mesc", "split": "test", "name": "sft-run"},
                                decoding=decoding, judge=judged, n_resamples=400, seed=3)
    for key in ("json", "markdown", "metrics", "confusion", "training"):
        assert os.path.exists(paths[key]), key
    for key in ("metrics", "confusion", "training"):
        width, height = _png_size(paths[key])
        assert 400 <= width <= 3000 and 300 <= height <= 3000
        assert os.path.getsize(paths[key]) > 10_000

    saved = json.load(open(paths["json"]))
    for name in results["per_sample"]:
        m = saved["metrics"][name]
        assert m["low"] <= m["mean"] + 1e-12 and m["mean"] <= m["high"] + 1e-12
    assert saved["ci"]["n_resamples"] == 400 and saved["meteor_variant"] == "exact+stem"
    assert saved["decoding"]["chosen_on_split"] == "validation"
    assert saved["plots"]["training"] == "plots/training_curves.png"

    md = open(paths["markdown"]).read()
    base = results["emotion"]["majority_baseline"]
    assert f"always \"{base['label']}\" (majority of references of the evaluated split) | {base['accuracy']:.4f}" in md
    assert "majority of training split references" in md
    assert "METEOR variant: `exact+stem`" in md
    assert "chosen on split **validation**" in md
    for paper_value in ("0.9934", "0.1397", "0.0581", "0.6696"):  # Table 5 rows
        assert paper_value in md
    assert f"**{results['means']['rougeL']:.4f}**" in md  # our row beside the paper's
    assert "| Therapeutic Rapport | 3.500 | 10 |" in md
    assert "| reference \\ generated |" in md and "| none |" in md
    assert "I hear you. Go on \\| please." in md  # sample table, pipes escaped
    assert "![training curves](plots/training_curves.png)" in md


def test_report_without_extras_and_forced_test_decoding(tmp_path, results):
    forced = {"settings": {"top_p": 1.0, "top_k": 0, "temperature": 1.0}, "chosen_on_split": "test",
              "forced_on_test_split": True, "metric": "bleu", "objective": 0.0, "n_candidates": 1}
    paths = report.write_report(str(tmp_path), results, decoding=forced, paper_table="esconv", n_resamples=200)
    md = open(paths["markdown"]).read()
    assert "WARNING: they were chosen on a test split" in md
    assert "Table 6, ESConv" in md and "0.1110" in md
    assert "No LLM-judge scores" in md and "training" not in paths
    paths = report.write_report(str(tmp_path / "b"), results, paper_table=None, n_resamples=200,
                                meta={"decoding_settings": {"top_p": 1.0, "top_k": 0, "temperature": 1.0}})
    assert "settings come from the config" in open(paths["markdown"]).read()


def test_console_summary_prints_majority_baseline(results, capsys):
    print(report.console_summary(results))
    out = capsys.readouterr().out
    base = results["emotion"]["majority_baseline"]
    assert f"vs majority baseline {base['accuracy']:.4f} (always \"{base['label']}\")" in out
    assert "training-split majority baseline" in out and "METEOR variant exact+stem" in out


def test_metrics_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON"):
        report.read_metrics_jsonl(str(path))
    path.write_text('{"step": 1}\n{"train/loss": 2.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: field 'step'"):
        report.read_metrics_jsonl(str(path))
    path.write_text('{"step": 1, "lr": 0.1}\n')
    assert report.plot_training_curves(report.read_metrics_jsonl(str(path)), str(tmp_path / "x.png")) is None


def test_compare_command_pairs_shared_samples(tmp_path):
    dirs = []
    for name, shift, seed, n in (("sft", 0, 1, 30), ("rl", 0, 2, 30), ("other", 1, 3, 12)):
        recs = _records(n, shift=shift, seed=seed)
        if name == "other":
            for r in recs:
                r["sample_id"] = f"esconv-{r['sample_id']}"
        res = metrics.evaluate_generations(recs, meteor_variant=metrics.METEOR_EXACT_STEM)
        workdir = str(tmp_path / name)
        report.write_report(workdir, res, meta={"name": name}, n_resamples=200)
        dirs.append(workdir)
    out = str(tmp_path / "cmp")
    assert compare.main([*dirs, "--out", out, "--n-resamples", "500", "--seed", "1"]) == 0
    saved = json.load(open(os.path.join(out, "compare.json")))
    assert saved["runs"] == ["sft", "rl", "other"]
    rl = saved["paired"]["rl vs sft"]
    assert rl["n_shared_samples"] == 30 and "bleu" in rl["tests"]
    sft_rep, rl_rep = (json.load(open(os.path.join(d, "report.json"))) for d in dirs[:2])
    diff = np.mean(rl_rep["per_sample"]["bleu"]) - np.mean(sft_rep["per_sample"]["bleu"])
    assert rl["tests"]["bleu"]["mean_diff"] == pytest.approx(diff)
    assert saved["paired"]["other vs sft"]["n_shared_samples"] == 0
    md = open(os.path.join(out, "compare.md")).read()
    assert "No paired test: no shared sample ids" in md and "majority baseline" in md
    assert _png_size(os.path.join(out, "compare_metrics.png"))[0] >= 400
    # The module entry point works as a command.
    proc = subprocess.run([sys.executable, "-m", "therapy_rl.evaluation.compare", *dirs[:2], "--out",
                           str(tmp_path / "cmp2"), "--names", "A,B", "--n-resamples", "200"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.load(open(tmp_path / "cmp2" / "compare.json"))["runs"] == ["A", "B"]
    with pytest.raises(FileNotFoundError, match="report.json"):
        compare.run_compare([dirs[0], str(tmp_path / "missing")], out)


def test_decoding_file_feeds_the_report(tmp_path, results):
    grid = decoding_search.decoding_grid((0.7, 1.0), (0,), (1.0,))
    search = decoding_search.search_decoding(lambda s: s, lambda g: {"rougeL": g["top_p"]}, grid, "validation",
                                             log_fn=None)
    decoding_search.save_decoding(str(tmp_path), search)
    paths = report.write_report(str(tmp_path), results, decoding=decoding_search.load_decoding(str(tmp_path)),
                                n_resamples=100)
    assert '"top_p": 1.0' in open(paths["markdown"]).read()
