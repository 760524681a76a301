"""Reward report: does the reward rank real therapist replies above degenerate ones?

    python tools/reward_report.py --data_dir $THERAPY_RL_DATA [--split val] [--limit N]
        [--tokenizer_dir DIR] [--length_rule range|paper] [--relevance_mode steps|smooth] [--out report.json]

Scores, for every MESC sample of the split (the data room's `read_mesc` + `build_samples`, the paper's turn
rules), the reference therapist reply with its annotated `<therapist_emotion>` tag, the same reply without the
tag, and a fixed set of degenerate replies ("", "!!!!", "ok", "yes yes yes yes", a repeated word, an off-topic
sentence), each given the annotated tag so that only the text differs. It prints each component's mean and
standard deviation per group, the mean total, and how often the reference beats each degenerate reply on the
same sample. Totals are reported before whitening (whitening is a per-batch shift and scale).

Without `--data_dir` (and without $THERAPY_RL_DATA) it runs on the package's bundled sample dialogues.

The policy tokenizer: `--tokenizer_dir` (a saved TherapyTokenizer / HF tokenizer folder, e.g. the SFT run's),
or by default a GPT-2-style byte-level BPE trained in a temporary folder on the train split's texts with
`data.tokenize.train_bpe_tokenizer` (`--vocab_size`, default 8000; a few seconds). Quality and emotion read
policy ids, so any tokenizer with the project's markers works; MiniLM components see the decoded text.

Empathy, sentiment and the safety penalty need the trained heads (`rewards/weights/heads.npz`); when those are
missing the report says so and switches the three off.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np

DEGENERATE_REPLIES = {
    "empty": "",
    "symbols": "!!!!",
    "ok": "ok",
    "yes_x4": "yes yes yes yes",
    "repeated_word": "feel feel feel feel feel feel feel feel",
    "off_topic": "The quarterly earnings report shows that revenue grew by four percent last year.",
}
SHOWN = ("total_raw", "quality", "emotion", "relevance", "sentiment", "empathy", "penalty", "safety", "cosine")


def load_samples(data_dir: Optional[str], split: str, limit: Optional[int]):
    from therapy_rl.data.samples import build_samples
    from therapy_rl.data.sources import read_bundled_sample, read_mesc
    if data_dir:
        dialogues, _ = read_mesc(data_dir, split)
        train, _ = read_mesc(data_dir, "train")
        source = f"MESC {split} ({data_dir})"
    else:
        dialogues, _ = read_bundled_sample(split)
        train, _ = read_bundled_sample("train")
        source = f"bundled sample {split}"
    samples = build_samples(dialogues)
    if limit:
        samples = samples[:limit]
    if not samples:
        raise SystemExit(f"report: no samples in {source}")
    return samples, build_samples(train), source


def policy_tokenizer(tokenizer_dir: Optional[str], train_samples, vocab_size: int, workdir: str):
    from therapy_rl.data.tokenize import load_tokenizer, train_bpe_tokenizer, training_texts
    if tokenizer_dir:
        return load_tokenizer(tokenizer_dir), f"loaded from {tokenizer_dir}"
    texts = training_texts(train_samples)
    tok = train_bpe_tokenizer(texts, vocab_size, os.path.join(workdir, "policy_tokenizer"))
    return tok, f"byte-level BPE, vocab {tok.vocab_size}, trained on {len(texts)} train texts"


def encode_responses(tok, texts: Sequence[str], emotions: Sequence[Optional[str]], length: int):
    """[B,length] ids/mask of `text [<therapist_emotion> E] <eos>` (the text is cut to fit)."""
    from therapy_rl.data import labels
    m = tok.marker_ids
    ids = np.full((len(texts), length), tok.pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, (text, emotion) in enumerate(zip(texts, emotions)):
        tail = ([m[labels.THERAPIST_EMOTION], tok.emotion_id(emotion)] if emotion else []) + [m[labels.EOS]]
        row = tok.encode_text(text)[:length - len(tail)] + tail
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


def build_reward_model(tok, config, reply_max_length: int):
    """A RewardModel with the shipped heads and lexicon, or with heads-dependent parts off when they are missing."""
    from therapy_rl.rewards import combine
    from therapy_rl.rewards.encoder import load_sentence_encoder
    encoder = load_sentence_encoder()
    notes = []
    heads = None
    if config.use_sentiment or config.use_empathy or config.use_safety:
        try:
            from therapy_rl.rewards.heads import load_reward_heads
            heads = load_reward_heads()
        except (FileNotFoundError, ImportError, ValueError) as e:
            notes.append(f"reward heads unavailable ({e}); empathy, sentiment and safety are switched off")
            config = dataclasses.replace(config, use_sentiment=False, use_empathy=False, use_safety=False)
    model = combine.RewardModel.create(config, tok, encoder=encoder, heads=heads,
                                       reply_max_length=reply_max_length)
    return model, notes


def run_report(data_dir: Optional[str] = None, split: str = "val", limit: Optional[int] = None,
               tokenizer_dir: Optional[str] = None, vocab_size: int = 8000, batch_size: int = 64,
               response_length: int = 96, reply_max_length: int = 64, length_rule: str = "range",
               relevance_mode: str = "steps", out: Optional[str] = None, stream=sys.stdout) -> dict:
    from therapy_rl.data import batches
    from therapy_rl.rewards import combine
    from therapy_rl.rewards import components as C

    def say(*parts):
        print(*parts, file=stream, flush=True)

    samples, train_samples, source = load_samples(data_dir, split, limit)
    config = combine.RewardConfig(whiten=False, relevance_mode=relevance_mode,
                                  quality=C.QualityConfig(length_rule=length_rule))
    with tempfile.TemporaryDirectory() as workdir:
        tok, tok_note = policy_tokenizer(tokenizer_dir, train_samples, vocab_size, workdir)
        model, notes = build_reward_model(tok, config, reply_max_length)
    say(f"reward report: {len(samples)} samples from {source}")
    say(f"policy tokenizer: {tok_note}")
    for note in notes:
        say(f"note: {note}")

    users = model.user_features([s.user_text for s in samples], batch_size=batch_size)
    groups = {"reference": ([s.therapist_text for s in samples], [s.therapist_emotion for s in samples]),
              "reference_no_tag": ([s.therapist_text for s in samples], [None] * len(samples))}
    for name, text in DEGENERATE_REPLIES.items():
        groups[name] = ([text] * len(samples), [s.therapist_emotion for s in samples])

    per_row = {"user_embedding": users["user_embedding"], "user_crisis": users["user_crisis"],
               "user_emotion": np.array([s.user_emotion_index for s in samples], np.int32),
               "therapist_emotion": np.array([s.therapist_emotion_index for s in samples], np.int32),
               "valid": np.ones(len(samples), np.int32)}
    scores = {}
    for name, (texts, tags) in groups.items():
        per_comp = {}
        # fixed batches; the last is padded with all-zero rows (valid 0) and empty replies
        for index, fields in enumerate(batches.eval_batches(per_row, batch_size, process_index=0, process_count=1)):
            lo = index * batch_size
            hi = min(lo + batch_size, len(samples))
            pad = batch_size - (hi - lo)
            ids, mask = encode_responses(tok, list(texts[lo:hi]) + [""] * pad, list(tags[lo:hi]) + [None] * pad,
                                         response_length)
            _, comps = model.score(fields, ids, mask, tok.decode)
            for key, value in comps.items():
                per_comp.setdefault(key, []).append(np.asarray(value)[:hi - lo])
        scores[name] = {k: np.concatenate(v) for k, v in per_comp.items()}

    summary = {name: {k: {"mean": float(v.mean()), "std": float(v.std())} for k, v in comps.items()}
               for name, comps in scores.items()}
    shown = [c for c in SHOWN if c in scores["reference"]]
    say("")
    say("mean ± std per group (unweighted components; total_raw = weighted, clipped, + safety, not whitened)")
    width = max(len(g) for g in groups) + 2
    say("group".ljust(width) + "".join(c.rjust(16) for c in shown))
    for name in groups:
        say(name.ljust(width) + "".join(
            f"{summary[name][c]['mean']:7.2f} ±{summary[name][c]['std']:6.2f}".rjust(16) for c in shown))
    say("")
    ref = scores["reference"]["total_raw"]
    ranking = {}
    say("reference vs each other group on the same sample (total_raw):")
    for name in groups:
        if name == "reference":
            continue
        other = scores[name]["total_raw"]
        wins = float(np.mean(ref > other))
        ties = float(np.mean(ref == other))
        ranking[name] = {"reference_wins": wins, "ties": ties, "mean_gap": float(np.mean(ref - other))}
        say(f"  {name:<18} reference higher in {100 * wins:5.1f}% (ties {100 * ties:4.1f}%), "
            f"mean gap {ranking[name]['mean_gap']:+.2f}")
    degenerate_means = {n: summary[n]["total_raw"]["mean"] for n in DEGENERATE_REPLIES}
    ok = all(summary["reference"]["total_raw"]["mean"] > m for m in degenerate_means.values())
    say(f"real replies rank above every degenerate reply on average: {'YES' if ok else 'NO'}")
    result = {"source": source, "samples": len(samples), "tokenizer": tok_note, "notes": notes,
              "config": dataclasses.asdict(model.spec.config), "summary": summary, "ranking": ranking,
              "reference_above_all_degenerate": ok}
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        say(f"wrote {out}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/reward_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.environ.get("THERAPY_RL_DATA"),
                   help="folder with mesc/MESC.csv (default $THERAPY_RL_DATA; none: the bundled sample)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--limit", type=int, default=None, help="score only the first N samples")
    p.add_argument("--tokenizer_dir", default=None, help="policy tokenizer folder (default: train a byte BPE)")
    p.add_argument("--vocab_size", type=int, default=8000, help="vocabulary of the trained byte BPE")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--response_length", type=int, default=96, help="policy tokens per response")
    p.add_argument("--reply_max_length", type=int, default=64, help="MiniLM tokens per reply")
    p.add_argument("--length_rule", default="range", choices=("range", "paper", "none"))
    p.add_argument("--relevance_mode", default="steps", choices=("steps", "smooth"))
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless real replies rank above every degenerate group on average")
    a = p.parse_args(argv)
    result = run_report(data_dir=a.data_dir, split=a.split, limit=a.limit, tokenizer_dir=a.tokenizer_dir,
                        vocab_size=a.vocab_size, batch_size=a.batch_size, response_length=a.response_length,
                        reply_max_length=a.reply_max_length, length_rule=a.length_rule,
                        relevance_mode=a.relevance_mode, out=a.out)
    return 1 if (a.check and not result["reference_above_all_degenerate"]) else 0


if __name__ == "__main__":
    sys.exit(main())
