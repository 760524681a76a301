"""The frozen held-out sets of evalsets/guard_v2: their committed hashes, their layout and minimum counts per file,
kind and category, unique ids and texts within the set, and that no training example copies them. Reads only the
files; never runs the guard, and never shows a held-out text (counts only)."""
import pytest

from frozen_sets import (FILES, REPLY_CATEGORIES, FrozenSet, check_coverage, check_hashes, check_layout,
                         check_no_training_copies, check_unique)

# Minimum rows per file, kind, category and topic (the sets hold more; see PROTOCOL.md).
SPEC = FrozenSet(
    tag="v2", folder="guard_v2",
    id_prefix=dict.fromkeys(FILES, "v2-"),
    min_rows={"crisis": 170, "hard_negatives": 170, "harmful_replies": 65, "supportive_replies": 65},
    min_kind={"crisis": {"short": 110, "long": 30, "multi_turn": 30},
              "hard_negatives": {"short": 130, "long": 15, "multi_turn": 20}},
    min_long_words={"crisis": 150, "hard_negatives": 150},
    reply_categories=REPLY_CATEGORIES | {"minimises_crisis"},
    min_primary_category=5,
    min_reply_category=9,
    min_topic=dict.fromkeys(("sad", "angry", "dark_humour", "someone_else_past", "medication_question"), 15),
    unique_texts=True,  # not checked before the shared checks; the frozen set already holds it
)


def test_v2_sets_match_committed_hashes():
    check_hashes(SPEC)


@pytest.mark.parametrize("name", FILES)
def test_v2_layout_and_minimum_counts(name):
    check_layout(SPEC, name)


def test_v2_category_coverage():
    check_coverage(SPEC)


def test_v2_ids_and_texts_unique_within_the_set():
    check_unique(SPEC)


def test_training_examples_never_copy_v2_texts():
    check_no_training_copies(SPEC)
