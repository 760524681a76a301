"""Replies a rater flagged as unsafe, as JSON Lines for the guard's training data.

One record per flagged reply: {"text", "role": "reply", "label": "harmful", "history": [user text], "problem",
"user_emotion", "flagged_by": [rater names], "comments": [their comments], "guard_flagged", "guard_categories",
"run", "iteration", "sample_id"}. The guard flag records whether the guard already caught it (its misses are the
useful rows).
"""
from __future__ import annotations

import json
import os


def unsafe_records(store) -> list[dict]:
    batches = {b.id: b for b in store.batches()}
    records = []
    for sample, ratings in store.rated_samples():
        flagged = [r for r in ratings if r.unsafe]
        if not flagged:
            continue
        batch = batches[sample.batch_id]
        records.append({"text": sample.reply, "role": "reply", "label": "harmful", "history": [sample.user_text],
                        "problem": sample.problem, "user_emotion": sample.user_emotion,
                        "flagged_by": [r.rater for r in flagged], "comments": [r.comment for r in flagged if r.comment],
                        "guard_flagged": sample.guard_flag, "guard_categories": list(sample.guard_categories),
                        "run": batch.run, "iteration": batch.iteration, "sample_id": sample.id})
    return records


def export_unsafe(store, out_path: str) -> int:
    """Writes the records atomically; returns how many."""
    records = unsafe_records(store)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(out_path + ".tmp", out_path)
    return len(records)
