"""Evaluation mode end to end on a tiny quickstart SFT run: CLI, files, metric wiring, decoding search on
validation only and its reuse, judge wiring against a local endpoint, checkpoint loading, emotion classifier."""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from therapy_rl import defaults
from therapy_rl.data import labels, pipeline, tokenize
from therapy_rl.evaluation import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eval_config(checkpoint: str, **search):
    """configs/eval_quickstart.py with a 2-setting grid."""
    from conftest import load_config

    config = load_config("eval_quickstart", checkpoint=checkpoint, **{
        "decoding_search.top_p": (0.9, 1.0), "decoding_search.top_k": (0,), "metrics.bootstrap_resamples": 200,
        "metrics.meteor_variant": "exact+stem"})  # loading WordNet costs ~10 s per process (tested in metrics)
    for key, value in search.items():
        config.decoding_search[key] = value
    return config


@pytest.fixture(scope="module")
def sft_run(quickstart_sft_workdir):
    return quickstart_sft_workdir


@pytest.fixture(scope="module")
def cli_eval(sft_run, tmp_path_factory):
    """The eval mode through the real entry point, with a validation decoding search."""
    workdir = str(tmp_path_factory.mktemp("eval_qs"))
    cmd = [sys.executable, "-m", "therapy_rl.main", "--config", os.path.join(REPO, "configs", "eval_quickstart.py"),
           "--workdir", workdir, f"--config.checkpoint={sft_run}", "--config.decoding_search.top_p=(0.9,1.0)",
           "--config.decoding_search.top_k=(0,)", "--config.metrics.bootstrap_resamples=200",
           "--config.metrics.meteor_variant=exact+stem"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc.stdout


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_cli_writes_report_plots_generations_and_val_decoding(cli_eval, sft_run):
    workdir, stdout = cli_eval
    for name in ("report.json", "report.md", "generations.jsonl", "decoding.json", "plots/metrics_ci.png",
                 "plots/emotion_confusion.png", "plots/training_curves.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    with open(os.path.join(workdir, "decoding.json")) as f:
        decoding = json.load(f)
    assert decoding["chosen_on_split"] == "val" and not decoding["forced_on_test_split"]
    assert decoding["n_candidates"] == 2
    assert decoding["compiled_samplers"] == 2  # top_p 0.9 filters, 1.0 does not: two plans (knobs are traced)
    assert decoding["search_seconds"] >= 0.99 * sum(r["seconds"] for r in decoding["results"]) > 0
    best = max(decoding["results"], key=lambda r: r["scores"]["rougeL"])
    assert decoding["settings"] == best["settings"]
    assert report["decoding"]["chosen_on_split"] == "val"
    assert report["meta"]["decoding_settings"]["top_p"] == decoding["settings"]["top_p"]

    # One generation per test sample, in the order and with the texts of the data room's own samples.
    from conftest import load_config

    data_cfg = load_config("quickstart").data
    test_samples = pipeline.load_samples(data_cfg, ("test",))["test"]
    rows = read_jsonl(os.path.join(workdir, "generations.jsonl"))
    assert len(rows) == len(test_samples) == report["n_samples"]
    assert [r["sample_id"] for r in rows] == [f"{s.dialogue_id}:{s.turn_index}" for s in test_samples]
    assert [r["reference"] for r in rows] == [s.therapist_text for s in test_samples]
    assert [r["emotions"]["gold"] for r in rows] == [s.therapist_emotion for s in test_samples]

    # Emotion accuracy beside the majority baseline, computed here from the rows.
    gold = [r["emotions"]["gold"] for r in rows]
    accuracy = np.mean([r["emotions"]["predicted"] == g for r, g in zip(rows, gold)])
    majority = max(set(gold), key=gold.count)
    baseline = gold.count(majority) / len(gold)
    assert report["emotion"]["accuracy"] == pytest.approx(accuracy)
    md = open(os.path.join(workdir, "report.md")).read()
    assert f"| **this model** | **{accuracy:.4f}**" in md
    assert f'| always "{majority}" (majority of references of the evaluated split) | {baseline:.4f}' in md
    assert f"vs majority baseline {baseline:.4f}" in stdout
    assert "chosen on split **val**" in md
    assert "emotion source: **tag**" in md


def test_metrics_match_direct_library_calls(cli_eval):
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score import rouge_scorer

    workdir, _ = cli_eval
    rows = read_jsonl(os.path.join(workdir, "generations.jsonl"))
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    bleu, r1, rl = [], [], []
    for row in rows:
        ref, gen = row["reference"], row["generated"]
        if not ref.split() or not gen.split():
            bleu.append(0.0), r1.append(0.0), rl.append(0.0)
            continue
        bleu.append(sentence_bleu([ref.split()], gen.split(), smoothing_function=SmoothingFunction().method1))
        scores = scorer.score(ref, gen)
        r1.append(scores["rouge1"].fmeasure)
        rl.append(scores["rougeL"].fmeasure)
    assert report["means"]["bleu"] == pytest.approx(np.mean(bleu), abs=1e-12)
    assert report["means"]["rouge1"] == pytest.approx(np.mean(r1), abs=1e-12)
    assert report["means"]["rougeL"] == pytest.approx(np.mean(rl), abs=1e-12)
    assert report["metrics"]["rouge1"]["low"] <= report["means"]["rouge1"] <= report["metrics"]["rouge1"]["high"]


class JudgeEndpoint:
    """A local OpenAI-compatible endpoint answering every judgment with score 4."""

    def __init__(self):
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests += 1
                body = json.dumps({"choices": [{"message": {"role": "assistant",
                                                            "content": '{"score": 4, "reason": "ok"}'}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_second_eval_reuses_decoding_json_and_judges(cli_eval, sft_run):
    workdir, _ = cli_eval
    decoding_path = os.path.join(workdir, "decoding.json")
    before, mtime = open(decoding_path).read(), os.stat(decoding_path).st_mtime_ns
    first_rows = read_jsonl(os.path.join(workdir, "generations.jsonl"))
    endpoint = JudgeEndpoint()
    try:
        config = eval_config(sft_run)  # search enabled, but decoding.json exists: reused, not searched again
        config.judge.enabled = True
        config.judge.base_url = endpoint.base_url
        config.judge.model = "local-judge"
        config.judge.api_key_env = ""
        config.judge.limit = 2
        config.judge.max_retries = 0
        out = runner.evaluate(config, workdir)
    finally:
        endpoint.close()
    assert open(decoding_path).read() == before and os.stat(decoding_path).st_mtime_ns == mtime  # not searched again
    assert "reused" in out["meta"]["decoding_source"]
    # Same seed and the same saved settings: the same replies.
    assert [r["generated"] for r in read_jsonl(os.path.join(workdir, "generations.jsonl"))] == \
        [r["generated"] for r in first_rows]
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert report["decoding"]["chosen_on_split"] == "val"
    assert endpoint.requests == 2 * 6  # 2 replies x 6 criteria
    assert report["judge"]["overall"] == pytest.approx(4.0)
    assert report["judge"]["counts"]["ok"] == 12


def test_search_on_test_split_is_refused(sft_run, tmp_path):
    config = eval_config(sft_run, split="test")
    with pytest.raises(ValueError, match="refusing to search decoding settings on split 'test'"):
        runner.evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "decoding.json")


def test_forced_test_search_is_flagged(sft_run, tmp_path):
    config = eval_config(sft_run, split="test", allow_test_split=True, limit=4)
    config.decoding_search.top_p = (1.0,)
    config.data.max_eval_samples = 4
    runner.evaluate(config, str(tmp_path))
    with open(tmp_path / "decoding.json") as f:
        assert json.load(f)["chosen_on_split"] == "test"
    md = (tmp_path / "report.md").read_text()
    assert "chosen on split **test**" in md and "WARNING" in md
    assert "chosen on the evaluated split (test)" in md
    assert len(read_jsonl(tmp_path / "generations.jsonl")) == 4


def test_reply_fields_from_token_ids(sft_run):
    from therapy_rl import run_files

    tok = tokenize.load_tokenizer(run_files.tokenizer_dir(sft_run))
    m = tok.marker_ids
    text_ids = tok.encode_text(" I hear you.")
    neutral = tok.emotion_token_ids[labels.EMOTIONS.index("neutral")]
    tagged = [m[labels.THERAPIST], *text_ids, m[labels.THERAPIST_EMOTION], neutral, m[labels.EOS], tok.pad_id]
    fields = runner.reply_fields(tok, tagged)
    assert fields["generated"] == "I hear you."
    assert fields["pred_emotion"] == fields["tag_emotion"] == "neutral" and fields["has_emotion_tag"]
    untagged = runner.reply_fields(tok, [*text_ids, m[labels.EOS], m[labels.THERAPIST_EMOTION], neutral])
    assert untagged["pred_emotion"] is None and not untagged["has_emotion_tag"]  # a tag after EOS does not count
    word = tok.encode_text(" hello")[0]
    invalid = runner.reply_fields(tok, [*text_ids, m[labels.THERAPIST_EMOTION], word, m[labels.EOS]])
    assert invalid["has_emotion_tag"] and invalid["tag_emotion"] is None
    assert invalid["pred_emotion"] == tok.decode([word]).strip()


def test_resolve_data_config():
    run = {**defaults.data_defaults().to_dict(), "source": "mesc", "data_dir": "/data/mesc", "max_eval_samples": 50,
           "max_prompt_tokens": 80}
    same = runner.resolve_data_config(defaults.eval_defaults().data, run)
    assert same.source == "mesc" and same.data_dir == "/data/mesc" and same.max_prompt_tokens == 80
    assert same.max_eval_samples == 0  # the eval's own, not the run's speed setting
    cross = defaults.eval_defaults().data
    cross.source = "esconv"
    resolved = runner.resolve_data_config(cross, run)
    assert resolved.source == "esconv" and resolved.data_dir == ""
    bad = defaults.eval_defaults().data
    bad.include_therapist_emotion = False
    with pytest.raises(ValueError, match="include_therapist_emotion"):
        runner.resolve_data_config(bad, run)


def test_load_params_matches_saved_checkpoints(sft_run):
    from conftest import restore_checkpoint_as_numpy
    import jax

    from therapy_rl import errors, run as run_lib

    best = run_lib.open_run(sft_run, "best")
    last = run_lib.open_run(os.path.join(sft_run, "checkpoints"), "best")  # a whole TrainState
    assert best.workdir == last.workdir == os.path.abspath(sft_run)
    for opened in (best, last):
        loaded = opened.read_params()
        saved = restore_checkpoint_as_numpy(opened.state_dir)["params"]
        flat_loaded = jax.tree_util.tree_leaves_with_path(loaded)
        flat_saved = jax.tree_util.tree_leaves_with_path(saved)
        assert [p for p, _ in flat_loaded] == [p for p, _ in flat_saved]
        for (_, a), (_, b) in zip(flat_loaded, flat_saved):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(errors.MissingFileError, match="no such step"):
        run_lib.open_run(sft_run, 999)


def test_emotion_classifier_source(tmp_path):
    import jax

    heads_lib = pytest.importorskip("therapy_rl.rewards.heads")
    encoder_lib = pytest.importorskip("therapy_rl.rewards.encoder")
    heads = heads_lib.init_reward_heads(jax.random.key(3))
    heads_lib.save_reward_heads(heads, str(tmp_path / "heads.npz"))
    texts = ["I am so sorry you are going through this.", "That sounds wonderful!", "Tell me more."]
    records = [{"generated": t, "pred_emotion": None} for t in texts]
    info = runner.apply_emotion_source(records, "auto", trained_with_tags=False, heads_dir=str(tmp_path))
    assert info["emotion_source"] == "classifier" and info["emotion_classifier"]["used"]
    # Reference: the emotion head (relu MLP) in NumPy on the encoder's embeddings.
    emb = np.asarray(encoder_lib.load_sentence_encoder().embed(texts), np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in heads.emotion.items()}
    logits = np.maximum(emb @ p["w_hidden"] + p["b_hidden"], 0.0) @ p["w_out"] + p["b_out"]
    expected = [labels.EMOTIONS[i] for i in logits.argmax(-1)]
    assert [r["pred_emotion"] for r in records] == expected
    # Missing weights: skipped with a message, emotions stay the tags'.
    records = [{"generated": t, "pred_emotion": "neutral"} for t in texts]
    info = runner.apply_emotion_source(records, "classifier", trained_with_tags=True,
                                       heads_dir=str(tmp_path / "absent"))
    assert info["emotion_source"] == "tag" and "FileNotFoundError" in info["emotion_classifier"]["skipped_because"]
    assert all(r["pred_emotion"] == "neutral" for r in records)
    assert runner.apply_emotion_source(records, "auto", trained_with_tags=True, heads_dir="")["emotion_source"] == "tag"
