"""The frozen held-out sets of evalsets/guard_v3: their committed hashes, their layout and minimum counts per file,
kind and category, unique ids and texts within the set, and that no training example copies them. Reads only the
files; never runs the guard, and never shows a held-out text (counts only)."""
import pytest

from frozen_sets import (FILES, FrozenSet, check_coverage, check_hashes, check_layout, check_no_training_copies,
                         check_unique)

# Minimum rows per file, kind, category and topic (the sets hold a few more; see PROTOCOL.md).
SPEC = FrozenSet(
    tag="v3", folder="guard_v3",
    id_prefix=dict.fromkeys(FILES, "v3-"),
    min_rows={"crisis": 190, "hard_negatives": 180, "harmful_replies": 66, "supportive_replies": 66},
    min_kind={"crisis": {"short": 120, "long": 30, "multi_turn": 30},
              "hard_negatives": {"short": 140, "long": 18, "multi_turn": 20}},
    min_long_words={"crisis": 160, "hard_negatives": 150},
    min_with_history={"harmful_replies": 40, "supportive_replies": 40},
    min_primary_category=10,
    min_reply_category=11,
    min_topic={**dict.fromkeys(("sad", "angry", "dark_humour", "someone_else_past", "medication_question",
                                "benign_means_words"), 15),
               **dict.fromkeys(("professional_work", "recovered_past", "parenting_family", "goodbyes_giving_away",
                                "fiction_games", "helping_or_asking"), 5)},
    unique_texts=True,
)


def test_v3_sets_match_committed_hashes():
    check_hashes(SPEC)


@pytest.mark.parametrize("name", FILES)
def test_v3_layout_and_minimum_counts(name):
    check_layout(SPEC, name)


def test_v3_category_coverage():
    check_coverage(SPEC)


def test_v3_ids_and_texts_unique_within_the_set():
    check_unique(SPEC)


def test_training_examples_never_copy_v3_texts():
    check_no_training_copies(SPEC)
