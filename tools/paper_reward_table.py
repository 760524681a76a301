"""Each reward piece as the paper's code computes it beside the project's, measured on real and degenerate replies.

    python tools/paper_reward_table.py [--data_dir $THERAPY_RL_DATA] [--split val] [--limit N] [--out table.json]

Rows scored (MESC `--split`, the paper's turn rules):
- `reference`: every therapist reply with its annotated `<therapist_emotion>` tag;
- `joy_tag`: the same replies tagged `joy` (where the two emotion tables differ: joy against a negative label);
- `degenerate`: a fixed set of bad replies (tools/reward_report.DEGENERATE_REPLIES plus the issue's examples), each
  on the first 32 samples with the annotated tag.

Two reward models score every row with the same heads and no safety term: "paper" = the paper's code
(quality.formula=paper_code, emotion conflict -5 absolute, relevance on cleaned texts) and "ours" = the project's
defaults (token-level quality with the "range" length rule, additive conflict, raw texts). For each piece and
group it prints the two means, the share of rows where the two give the same value, and their Pearson
correlation; a markdown table of the same numbers goes into REWARDS.md ("The paper's code and ours").
Reward normalisation (token-level vs per-reply whitening) is measured in tests/test_ppo_core.py and the issue.
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

EXTRA_DEGENERATE = {
    "i_know_x4": "I know. I know. I know. I know.",
    "thanks": "Thanks.",
    "long_ramble": ("Well, you know, I think that what you are saying is that you feel like nobody really listens "
                    "to you at home, and that makes you angry, and then you feel guilty about being angry."),
    "repeat_question": "How does that make you feel? How does that make you feel? How does that make you feel?",
}
PIECES = ("quality", "emotion", "relevance", "total_raw")


def _stats(a: np.ndarray, b: np.ndarray) -> dict:
    same = float(np.mean(np.abs(a - b) < 1e-5))
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    return {"paper_mean": float(a.mean()), "ours_mean": float(b.mean()), "same": same, "corr": corr, "n": len(a)}


def measure(data_dir: Optional[str], split: str = "val", limit: Optional[int] = None, batch_size: int = 64,
            degenerate_samples: int = 32, stream=sys.stdout) -> dict:
    from tools import reward_report as rr
    from therapy_rl.rewards import combine
    from therapy_rl.rewards import components as C

    samples, train_samples, source = rr.load_samples(data_dir, split, limit)
    base = dict(whiten=False, use_safety=False)
    configs = {
        "paper": combine.RewardConfig(**base, relevance_text="paper_clean",
                                      quality=C.QualityConfig(formula="paper_code", length_rule="paper"),
                                      emotion_scores=C.EmotionScores(conflict_absolute=True)),
        "ours": combine.RewardConfig(**base),
        "ours_paper_length": combine.RewardConfig(**base, quality=C.QualityConfig(length_rule="paper")),
    }
    rows = [(i, s.therapist_text, s.therapist_emotion, "reference") for i, s in enumerate(samples)]
    rows += [(i, s.therapist_text, "joy", "joy_tag") for i, s in enumerate(samples)]  # (sample, text, tag, group)
    bad = {**rr.DEGENERATE_REPLIES, **EXTRA_DEGENERATE}
    for text in bad.values():
        rows += [(i, text, samples[i].therapist_emotion, "degenerate")
                 for i in range(min(degenerate_samples, len(samples)))]
    idx = np.array([r[0] for r in rows])
    group = np.array([r[3] for r in rows])
    with tempfile.TemporaryDirectory() as workdir:
        tok, _ = rr.policy_tokenizer(None, train_samples, 8000, workdir)
    scores = {}
    for name, config in configs.items():
        model, notes = rr.build_reward_model(tok, config, reply_max_length=64)
        users = model.user_features([s.user_text for s in samples], batch_size=batch_size)
        per = {}
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo:lo + batch_size]
            pad = batch_size - len(chunk)
            ii = np.concatenate([idx[lo:lo + len(chunk)], np.zeros(pad, int)])
            fields = {"user_embedding": users["user_embedding"][ii], "user_crisis": users["user_crisis"][ii],
                      "user_emotion": np.array([samples[i].user_emotion_index for i in ii], np.int32),
                      "therapist_emotion": np.array([samples[i].therapist_emotion_index for i in ii], np.int32),
                      "valid": np.array([1] * len(chunk) + [0] * pad, np.int32)}
            ids, mask = rr.encode_responses(tok, [r[1] for r in chunk] + [""] * pad,
                                            [r[2] for r in chunk] + [None] * pad, 96)
            _, comps = model.score(fields, ids, mask, tok.decode)
            for key in PIECES:
                per.setdefault(key, []).append(np.asarray(comps[key])[:len(chunk)])
        scores[name] = {k: np.concatenate(v) for k, v in per.items()}
        for note in notes:
            print(f"note ({name}): {note}", file=stream)

    table = {}
    for g in ("reference", "joy_tag", "degenerate", "all"):
        sel = np.ones(len(rows), bool) if g == "all" else group == g
        for piece in PIECES:
            table[f"{piece}/{g}"] = _stats(scores["paper"][piece][sel], scores["ours"][piece][sel])
        table[f"quality(length_rule=paper)/{g}"] = _stats(scores["paper"]["quality"][sel],
                                                          scores["ours_paper_length"]["quality"][sel])
    ref = group == "reference"
    long_share = float(np.mean([len(s.therapist_text.strip()) >= 100 for s in samples]))
    out = {"source": source, "samples": len(samples), "rows": len(rows), "table": table,
           "reference_replies_100_chars_or_more": long_share,
           "i_know_x4": {k: float(scores[k]["quality"][group == "degenerate"][
               [r[1] for r in rows if r[3] == "degenerate"].index(EXTRA_DEGENERATE["i_know_x4"])]) for k in configs},
           "reference_count": int(ref.sum())}
    print(f"{source}: {len(samples)} samples, {len(rows)} rows "
          f"({int(ref.sum())} reference, {int((group == 'joy_tag').sum())} joy-tagged, "
          f"{int((group == 'degenerate').sum())} degenerate)", file=stream)
    print(render_markdown(out), file=stream)
    return out


def render_markdown(out: dict) -> str:
    lines = ["| piece / rows | paper's code mean | ours mean | same value | correlation |",
             "|---|---|---|---|---|"]
    for key, s in out["table"].items():
        corr = "n/a" if s["corr"] != s["corr"] else f"{s['corr']:.3f}"
        lines.append(f"| {key} (n={s['n']}) | {s['paper_mean']:.3f} | {s['ours_mean']:.3f} | "
                     f"{100 * s['same']:.1f}% | {corr} |")
    lines.append("")
    lines.append(f"reference replies of 100+ characters (the paper's code gives them -10): "
                 f"{100 * out['reference_replies_100_chars_or_more']:.1f}%; "
                 f"\"I know. I know. I know. I know.\" quality: " +
                 ", ".join(f"{k} {v:.2f}" for k, v in out["i_know_x4"].items()))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tools` as a package
    p = argparse.ArgumentParser(prog="python tools/paper_reward_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.environ.get("THERAPY_RL_DATA"))
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    out = measure(args.data_dir, args.split, args.limit)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
