"""The frozen held-out sets of evalsets/guard_v4: their committed hashes, their layout and minimum counts per file,
kind, category and topic, unique ids and texts within the set, that no training example copies them, and that they
copy no row of the earlier sets (guard_v1 to guard_v3). Reads only the files; never runs the guard, and never shows a
held-out text in its output (counts only)."""
import collections
import json
import os

import pytest

from conftest import assert_matches_frozen_hashes, training_files_copying

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALSETS = os.path.join(REPO, "evalsets")
HELDOUT = os.path.join(EVALSETS, "guard_v4")
EARLIER = ("guard_v1", "guard_v2", "guard_v3")
FILES = ("crisis", "hard_negatives", "harmful_replies", "supportive_replies")
FIELDS = {
    "crisis": ["id", "role", "text", "history", "kind", "categories"],
    "hard_negatives": ["id", "role", "text", "history", "kind", "topic"],
    "harmful_replies": ["id", "role", "text", "history", "categories"],
    "supportive_replies": ["id", "role", "text", "history"],
}
ID_PREFIX = {"crisis": "v4-crisis-", "hard_negatives": "v4-neg-", "harmful_replies": "v4-harm-",
             "supportive_replies": "v4-supp-"}
CRISIS_CATEGORIES = {"suicidal_ideation", "plan_or_means", "act_in_progress", "self_harm", "harm_to_others",
                     "child_abuse_or_danger"}
REPLY_CATEGORIES = {"encourages_self_harm", "encourages_harm_to_others", "means_or_method", "medication_change",
                    "shaming", "secrecy"}
TOPICS = {"sad", "angry", "dark_humour", "someone_else_past", "medication_question", "benign_means_words",
          "professional_work", "helping_or_asking", "recovered_past", "parenting_family", "goodbyes_giving_away",
          "fiction_games"}
# Minimum rows per file and kind (the sets hold a few more; see PROTOCOL.md).
MIN_ROWS = {"crisis": 170, "hard_negatives": 170, "harmful_replies": 72, "supportive_replies": 72}
MIN_KIND = {"crisis": {"short": 110, "long": 30, "multi_turn": 30},
            "hard_negatives": {"short": 125, "long": 20, "multi_turn": 25}}
MIN_LONG_WORDS = {"crisis": 160, "hard_negatives": 150}
MIN_WITH_HISTORY = {"harmful_replies": 60, "supportive_replies": 60}
MIN_PRIMARY_CATEGORY = 15
MIN_REPLY_CATEGORY = 12
MIN_TOPIC = 8
MIN_COPY_CHARS = 25  # a held-out string longer than this must not appear in an earlier set


def _rows(name, folder=HELDOUT):
    rows = []
    with open(os.path.join(folder, f"{name}.jsonl"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.strip(), f"{name}.jsonl line {n} is blank"
            row = json.loads(line)
            assert isinstance(row, dict), f"{name}.jsonl line {n}"
            rows.append(row)
    return rows


def _norm(text):
    return " ".join(text.lower().split())


def _held_strings():
    held = set()
    for name in FILES:
        for r in _rows(name):
            held.add(_norm(r["text"]))
            held |= {_norm(t) for _, t in r["history"]}
    return held


def test_v4_sets_match_committed_hashes():
    assert_matches_frozen_hashes(HELDOUT, FILES)


@pytest.mark.parametrize("name", FILES)
def test_v4_layout_and_minimum_counts(name):
    rows = _rows(name)
    assert len(rows) >= MIN_ROWS[name], len(rows)
    role = "user" if name in ("crisis", "hard_negatives") else "reply"
    for r in rows:
        assert list(r) == FIELDS[name], r.get("id")
        assert isinstance(r["id"], str) and r["id"].startswith(ID_PREFIX[name]), r["id"]
        assert r["role"] == role and isinstance(r["text"], str) and r["text"].strip(), r["id"]
        assert isinstance(r["history"], list), r["id"]
        assert all(isinstance(turn, list) and len(turn) == 2 and turn[0] in ("user", "reply")
                   and isinstance(turn[1], str) and turn[1].strip() for turn in r["history"]), r["id"]
    assert len({r["id"] for r in rows}) == len(rows)
    if name in MIN_KIND:
        kinds = collections.Counter(r["kind"] for r in rows)
        assert set(kinds) == set(MIN_KIND[name]), kinds
        for kind, least in MIN_KIND[name].items():
            assert kinds[kind] >= least, (kind, kinds[kind])
        assert all(r["history"] for r in rows if r["kind"] == "multi_turn")
        assert all(not r["history"] for r in rows if r["kind"] != "multi_turn")
        assert all(len(r["text"].split()) > MIN_LONG_WORDS[name] for r in rows if r["kind"] == "long")
    if name in MIN_WITH_HISTORY:
        assert sum(bool(r["history"]) for r in rows) >= MIN_WITH_HISTORY[name]
        assert all(turn[0] == "user" for r in rows for turn in r["history"])


def test_v4_category_and_topic_coverage():
    crisis = _rows("crisis")
    assert all(isinstance(r["categories"], list) and r["categories"] for r in crisis)
    assert all(set(r["categories"]) <= CRISIS_CATEGORIES for r in crisis)
    assert all(len(set(r["categories"])) == len(r["categories"]) for r in crisis)
    primary = collections.Counter(r["categories"][0] for r in crisis)
    assert set(primary) == CRISIS_CATEGORIES and min(primary.values()) >= MIN_PRIMARY_CATEGORY, primary
    harmful = _rows("harmful_replies")
    assert all(isinstance(r["categories"], list) and len(r["categories"]) == 1 for r in harmful)
    per_category = collections.Counter(r["categories"][0] for r in harmful)
    assert set(per_category) == REPLY_CATEGORIES and min(per_category.values()) >= MIN_REPLY_CATEGORY, per_category
    topics = collections.Counter(r["topic"] for r in _rows("hard_negatives"))
    assert set(topics) == TOPICS, topics
    assert min(topics.values()) >= MIN_TOPIC, topics


def test_v4_ids_and_texts_unique_within_the_set():
    ids, texts = [], []
    for name in FILES:
        for r in _rows(name):
            ids.append(r["id"])
            texts.append(_norm(r["text"]))
    assert len(set(ids)) == len(ids)
    repeated = collections.Counter(texts)
    assert all(n == 1 for n in repeated.values()), sum(n > 1 for n in repeated.values())  # counts only


def test_training_examples_never_copy_v4_texts():
    # counts only: pytest shows the asserted value, so the held-out texts never reach the assertion
    copied = {path: len(texts) for path, texts in training_files_copying(_held_strings()).items()}
    assert not copied, copied  # never show v4 texts


def test_v4_copies_no_row_of_the_earlier_sets():
    earlier = []
    for folder in EARLIER:
        path = os.path.join(EVALSETS, folder)
        for name in FILES:
            if not os.path.exists(os.path.join(path, f"{name}.jsonl")):
                continue
            for r in _rows(name, path):
                earlier.append(_norm(r["text"]))
                earlier.extend(_norm(t) for _, t in r["history"])
    assert earlier, "no earlier set found"
    corpus = "\n".join(earlier)
    copied = [s for s in _held_strings() if len(s) > MIN_COPY_CHARS and s in corpus]
    assert not copied, len(copied)  # counts only: never show v4 texts
