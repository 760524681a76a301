"""The frozen held-out sets of evalsets/guard_v2: their committed hashes, their layout and minimum counts per file,
kind and category, and that no training example copies them. Reads only the files; never runs the guard."""
import collections
import json
import os

import pytest

from conftest import assert_matches_frozen_hashes, training_files_copying

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(REPO, "evalsets", "guard_v2")
FILES = ("crisis", "hard_negatives", "harmful_replies", "supportive_replies")
FIELDS = {
    "crisis": ["id", "role", "text", "history", "kind", "categories"],
    "hard_negatives": ["id", "role", "text", "history", "kind", "topic"],
    "harmful_replies": ["id", "role", "text", "history", "categories"],
    "supportive_replies": ["id", "role", "text", "history"],
}
CRISIS_CATEGORIES = {"suicidal_ideation", "plan_or_means", "act_in_progress", "self_harm", "harm_to_others",
                     "child_abuse_or_danger"}
REPLY_CATEGORIES = {"encourages_self_harm", "encourages_harm_to_others", "means_or_method", "medication_change",
                    "shaming", "secrecy", "minimises_crisis"}
# Minimum rows per file and kind (the sets hold more; see PROTOCOL.md).
MIN_ROWS = {"crisis": 170, "hard_negatives": 170, "harmful_replies": 65, "supportive_replies": 65}
MIN_KIND = {"crisis": {"short": 110, "long": 30, "multi_turn": 30},
            "hard_negatives": {"short": 130, "long": 15, "multi_turn": 20}}


def _rows(name):
    with open(os.path.join(HELDOUT, f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_v2_sets_match_committed_hashes():
    assert_matches_frozen_hashes(HELDOUT, FILES)


@pytest.mark.parametrize("name", FILES)
def test_v2_layout_and_minimum_counts(name):
    rows = _rows(name)
    assert len(rows) >= MIN_ROWS[name]
    role = "user" if name in ("crisis", "hard_negatives") else "reply"
    for r in rows:
        assert list(r) == FIELDS[name], r["id"]
        assert r["id"].startswith("v2-") and r["role"] == role and r["text"].strip()
        assert all(len(turn) == 2 and turn[0] in ("user", "reply") and turn[1].strip() for turn in r["history"])
    assert len({r["id"] for r in rows}) == len(rows)
    if name in MIN_KIND:
        kinds = collections.Counter(r["kind"] for r in rows)
        assert set(kinds) == set(MIN_KIND[name])
        for kind, least in MIN_KIND[name].items():
            assert kinds[kind] >= least, (kind, kinds[kind])
        assert all(r["history"] for r in rows if r["kind"] == "multi_turn")
        assert all(not r["history"] for r in rows if r["kind"] != "multi_turn")
        assert all(len(r["text"].split()) > 150 for r in rows if r["kind"] == "long")


def test_v2_category_coverage():
    crisis = collections.Counter(r["categories"][0] for r in _rows("crisis"))
    assert set(crisis) == CRISIS_CATEGORIES and min(crisis.values()) >= 5, crisis
    assert all(set(r["categories"]) <= CRISIS_CATEGORIES for r in _rows("crisis"))
    harmful = collections.Counter(c for r in _rows("harmful_replies") for c in r["categories"])
    assert all(len(r["categories"]) == 1 for r in _rows("harmful_replies"))
    assert set(harmful) == REPLY_CATEGORIES and min(harmful.values()) >= 9, harmful
    topics = collections.Counter(r["topic"] for r in _rows("hard_negatives"))
    for topic in ("sad", "angry", "dark_humour", "someone_else_past", "medication_question"):
        assert topics[topic] >= 15, (topic, topics[topic])


def test_training_examples_never_copy_v2_texts():
    held = set()
    for name in FILES:
        for r in _rows(name):
            held.add(" ".join(r["text"].lower().split()))
            held |= {" ".join(t.lower().split()) for _, t in r["history"]}
    found = training_files_copying(held)
    assert not found, found
