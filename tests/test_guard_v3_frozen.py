"""The frozen held-out sets of evalsets/guard_v3: their committed hashes, their layout and minimum counts per file,
kind and category, unique ids and texts within the set, and that no training example copies them. Reads only the
files; never runs the guard."""
import collections
import json
import os

import pytest

from conftest import assert_matches_frozen_hashes, training_files_copying

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(REPO, "evalsets", "guard_v3")
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
                    "shaming", "secrecy"}
# Minimum rows per file and kind (the sets hold a few more; see PROTOCOL.md).
MIN_ROWS = {"crisis": 190, "hard_negatives": 180, "harmful_replies": 66, "supportive_replies": 66}
MIN_KIND = {"crisis": {"short": 120, "long": 30, "multi_turn": 30},
            "hard_negatives": {"short": 140, "long": 18, "multi_turn": 20}}
MIN_LONG_WORDS = {"crisis": 160, "hard_negatives": 150}
MIN_WITH_HISTORY = {"harmful_replies": 40, "supportive_replies": 40}


def _rows(name):
    rows = []
    with open(os.path.join(HELDOUT, f"{name}.jsonl"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.strip(), f"{name}.jsonl line {n} is blank"
            row = json.loads(line)
            assert isinstance(row, dict), f"{name}.jsonl line {n}"
            rows.append(row)
    return rows


def _norm(text):
    return " ".join(text.lower().split())


def test_v3_sets_match_committed_hashes():
    assert_matches_frozen_hashes(HELDOUT, FILES)


@pytest.mark.parametrize("name", FILES)
def test_v3_layout_and_minimum_counts(name):
    rows = _rows(name)
    assert len(rows) >= MIN_ROWS[name]
    role = "user" if name in ("crisis", "hard_negatives") else "reply"
    for r in rows:
        assert list(r) == FIELDS[name], r.get("id")
        assert isinstance(r["id"], str) and r["id"].startswith("v3-"), r["id"]
        assert r["role"] == role and isinstance(r["text"], str) and r["text"].strip(), r["id"]
        assert isinstance(r["history"], list), r["id"]
        assert all(isinstance(turn, list) and len(turn) == 2 and turn[0] in ("user", "reply")
                   and isinstance(turn[1], str) and turn[1].strip() for turn in r["history"]), r["id"]
    assert len({r["id"] for r in rows}) == len(rows)
    if name in MIN_KIND:
        kinds = collections.Counter(r["kind"] for r in rows)
        assert set(kinds) == set(MIN_KIND[name])
        for kind, least in MIN_KIND[name].items():
            assert kinds[kind] >= least, (kind, kinds[kind])
        assert all(r["history"] for r in rows if r["kind"] == "multi_turn")
        assert all(not r["history"] for r in rows if r["kind"] != "multi_turn")
        assert all(len(r["text"].split()) > MIN_LONG_WORDS[name] for r in rows if r["kind"] == "long")
    if name in MIN_WITH_HISTORY:
        assert sum(bool(r["history"]) for r in rows) >= MIN_WITH_HISTORY[name]


def test_v3_category_coverage():
    crisis = _rows("crisis")
    primary = collections.Counter(r["categories"][0] for r in crisis)
    assert set(primary) == CRISIS_CATEGORIES and min(primary.values()) >= 10, primary
    assert all(r["categories"] and set(r["categories"]) <= CRISIS_CATEGORIES for r in crisis)
    assert all(len(set(r["categories"])) == len(r["categories"]) for r in crisis)
    harmful = _rows("harmful_replies")
    assert all(len(r["categories"]) == 1 for r in harmful)
    per_category = collections.Counter(r["categories"][0] for r in harmful)
    assert set(per_category) == REPLY_CATEGORIES and min(per_category.values()) >= 11, per_category
    topics = collections.Counter(r["topic"] for r in _rows("hard_negatives"))
    for topic in ("sad", "angry", "dark_humour", "someone_else_past", "medication_question", "benign_means_words"):
        assert topics[topic] >= 15, (topic, topics[topic])
    for topic in ("professional_work", "recovered_past", "parenting_family", "goodbyes_giving_away",
                  "fiction_games", "helping_or_asking"):
        assert topics[topic] >= 5, (topic, topics[topic])


def test_v3_ids_and_texts_unique_within_the_set():
    ids, texts = [], []
    for name in FILES:
        for r in _rows(name):
            ids.append(r["id"])
            texts.append(_norm(r["text"]))
    assert len(set(ids)) == len(ids)
    repeated = [t for t, n in collections.Counter(texts).items() if n > 1]
    assert not repeated, repeated


def test_training_examples_never_copy_v3_texts():
    held = set()
    for name in FILES:
        for r in _rows(name):
            held.add(_norm(r["text"]))
            held |= {_norm(t) for _, t in r["history"]}
    # counts only: pytest shows the asserted value, so the held-out texts never reach the assertion
    copied = {path: len(texts) for path, texts in training_files_copying(held).items()}
    assert not copied, copied  # never show v3 texts
