"""therapy_rl.repro end to end at tiny sizes: every stage writes its outputs, RESULTS.md is generated, and a rerun
skips every finished stage."""
import os
import time

import pytest

from therapy_rl import defaults, repro

DATA = os.environ.get("THERAPY_RL_DATA", "")


def tiny_config():
    rc = defaults.repro_defaults()
    p = rc.pretrain
    p.max_docs_per_source, p.max_val_blocks, p.bpe_vocab_size, p.block_tokens = 8, 4, 600, 64
    p.n_layer, p.n_head, p.n_embd, p.n_positions = 1, 2, 32, 160
    p.batch_size, p.max_steps, p.eval_every_steps, p.log_every_steps = 8, 4, 2, 2  # batches: 8 test devices
    s = rc.sft
    s.max_steps, s.global_batch_size, s.eval_every_steps = 2, 8, 2
    s.max_train_samples, s.max_eval_samples = 16, 8
    pp = rc.ppo
    pp.max_iterations, pp.global_batch_size, pp.minibatch_size = 2, 8, 8
    pp.max_new_tokens, pp.eval_every_iterations, pp.num_eval_prompts = 8, 2, 8
    e = rc.eval
    e.search_limit, e.top_p, e.top_k, e.temperature = 8, (1.0,), (0,), (1.0,)
    e.max_new_tokens, e.eval_batch_size, e.bootstrap_resamples, e.max_esconv_samples = 8, 8, 20, 8
    return rc


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "mesc")), reason="needs $THERAPY_RL_DATA")
def test_repro_pipeline_tiny(tmp_path):
    rc = tiny_config()
    start = time.time()
    ran = repro.run_all(rc, str(tmp_path))
    first = time.time() - start
    assert all(ran.values()), ran
    models = repro.model_runs(rc)
    assert os.path.exists(tmp_path / "pretrain" / "summary.json") and os.path.isdir(tmp_path / "pretrain" / "hf")
    for model in models:
        assert os.path.isdir(tmp_path / model / "best"), model
        for dataset in ("mesc", "esconv"):
            assert os.path.exists(tmp_path / "eval" / f"{model}_{dataset}" / "report.json"), (model, dataset)
    assert os.path.exists(tmp_path / "eval" / "sft_emotion_mesc" / "decoding.json")
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## Pre-training", "## Table 5", "## Table 6", "## Paired bootstrap", "## Emotion accuracy",
                    "## PPO curves", "## The same prompts", "## Wall-clock", "## Run sizes"):
        assert heading in text, heading
    assert "ours: ppo_ours" in text and "paper: RL" in text
    assert any(name.endswith("_curves.png") for name in os.listdir(tmp_path / "figures"))

    start = time.time()
    again = repro.run_all(rc, str(tmp_path))
    assert not any(again.values()), again  # every stage skipped
    print(f"[smoke] first run {first:.0f} s, rerun {time.time() - start:.0f} s")
    # The committed form: figures in a named folder, the written discussion appended verbatim.
    import sys
    sys.path.insert(0, repro.REPO)
    from tools import repro_results

    discussion = tmp_path / "discussion.md"
    discussion.write_text("## Discussion\n\nWritten by hand.\n")
    out = tmp_path / "copy" / "RESULTS.md"
    out.parent.mkdir()
    repro_results.write_results(str(tmp_path), str(out), "results_figures", str(discussion))
    text = out.read_text()
    assert text.rstrip().endswith("Written by hand.") and "](results_figures/ppo_ours_curves.png)" in text
    assert os.path.exists(tmp_path / "copy" / "results_figures" / "ppo_ours_curves.png")
