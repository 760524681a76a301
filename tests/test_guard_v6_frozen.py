"""The frozen held-out sets of evalsets/guard_v6: their committed hashes, their layout and minimum counts per file,
kind, category and topic, unique ids and texts within the set, that no training example copies them, and that they
copy no row of the earlier sets (guard_v1 to guard_v5). Reads only the files; never runs the guard, and never shows a
held-out text (counts only)."""
import pytest

from frozen_sets import (FILES, FrozenSet, check_coverage, check_hashes, check_layout, check_no_copies_of_earlier,
                         check_no_training_copies, check_unique)

TOPICS = ("sad", "angry", "dark_humour", "someone_else_past", "medication_question", "benign_means_words",
          "professional_work", "helping_or_asking", "recovered_past", "parenting_family", "goodbyes_giving_away",
          "fiction_games", "everyday_plans_with_time", "work_and_life_complaints")
# Minimum rows per file, kind, category and topic (the sets hold a few more; see PROTOCOL.md).
SPEC = FrozenSet(
    tag="v6", folder="guard_v6",
    id_prefix={"crisis": "v6-crisis-", "hard_negatives": "v6-neg-", "harmful_replies": "v6-harm-",
               "supportive_replies": "v6-supp-"},
    min_rows={"crisis": 178, "hard_negatives": 178, "harmful_replies": 75, "supportive_replies": 75},
    min_kind={"crisis": {"short": 115, "long": 30, "multi_turn": 30},
              "hard_negatives": {"short": 128, "long": 20, "multi_turn": 25}},
    min_long_words={"crisis": 160, "hard_negatives": 150},
    min_with_history={"harmful_replies": 66, "supportive_replies": 67},
    reply_history_user_only=True,
    min_primary_category=27,
    min_reply_category=12,
    min_topic=dict.fromkeys(TOPICS, 11),
    exact_topics=True,
    unique_texts=True,
    earlier=("guard_v1", "guard_v2", "guard_v3", "guard_v4", "guard_v5"),
)


def test_v6_sets_match_committed_hashes():
    check_hashes(SPEC)


@pytest.mark.parametrize("name", FILES)
def test_v6_layout_and_minimum_counts(name):
    check_layout(SPEC, name)


def test_v6_category_and_topic_coverage():
    check_coverage(SPEC)


def test_v6_ids_and_texts_unique_within_the_set():
    check_unique(SPEC)


def test_training_examples_never_copy_v6_texts():
    check_no_training_copies(SPEC)


def test_v6_copies_no_row_of_the_earlier_sets():
    check_no_copies_of_earlier(SPEC)
