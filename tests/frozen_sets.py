"""Shared by the tests/test_guard_v*_frozen.py files: a FrozenSet spec describes one frozen held-out set under
evalsets/, and the check_* functions check it. They read only the files, never run the guard, and never show a
held-out text: every failure message holds counts, ids or file names only."""
import collections
import dataclasses
import json
import os

from conftest import REPO_ROOT, assert_matches_frozen_hashes, training_files_copying

EVALSETS = os.path.join(REPO_ROOT, "evalsets")
FILES = ("crisis", "hard_negatives", "harmful_replies", "supportive_replies")
USER_FILES = ("crisis", "hard_negatives")  # role "user"; the other files hold replies (role "reply")
FIELDS = {
    "crisis": ("id", "role", "text", "history", "kind", "categories"),
    "hard_negatives": ("id", "role", "text", "history", "kind", "topic"),
    "harmful_replies": ("id", "role", "text", "history", "categories"),
    "supportive_replies": ("id", "role", "text", "history"),
}
CRISIS_CATEGORIES = frozenset({"suicidal_ideation", "plan_or_means", "act_in_progress", "self_harm",
                               "harm_to_others", "child_abuse_or_danger"})
REPLY_CATEGORIES = frozenset({"encourages_self_harm", "encourages_harm_to_others", "means_or_method",
                              "medication_change", "shaming", "secrecy"})
MIN_COPY_CHARS = 25  # a held-out string longer than this must not appear in an earlier set
SHOWN_IDS = 10  # a failure message names at most this many row ids


@dataclasses.dataclass(frozen=True)
class FrozenSet:
    """One frozen held-out set, evalsets/<folder>; the minimums are per file unless said otherwise."""
    tag: str  # "v4": the short name of the set, in messages
    folder: str  # "guard_v4", under evalsets/
    id_prefix: dict  # file -> prefix every id in it starts with
    min_rows: dict  # file -> rows
    min_kind: dict  # file -> {kind: rows}; the file's kinds are exactly these
    min_long_words: dict  # file -> a "long" row has more words than this
    min_primary_category: int  # crisis rows per primary (first) category
    min_reply_category: int  # harmful replies per category
    min_topic: dict  # hard-negative topic -> rows
    exact_topics: bool = False  # the hard negatives hold exactly the topics of min_topic
    reply_categories: frozenset = REPLY_CATEGORIES
    crisis_categories: frozenset = CRISIS_CATEGORIES
    min_with_history: dict = dataclasses.field(default_factory=dict)  # file -> rows with a history
    reply_history_user_only: bool = False  # every history turn before a reply is the user's
    unique_texts: bool = False  # no two rows of the set share a (normalised) text
    earlier: tuple = ()  # folders under evalsets/ whose strings the set must not copy
    fields: dict = dataclasses.field(default_factory=lambda: dict(FIELDS))  # file -> its keys, in order

    @property
    def path(self):
        return os.path.join(EVALSETS, self.folder)


def _norm(text):
    return " ".join(text.lower().split())


def _ids(rows):
    """A count-only summary of failing rows: how many, and the first few ids."""
    return f"{len(rows)} row(s), ids {[r.get('id') for r in rows[:SHOWN_IDS]]}"


def read_rows(folder, name):
    """The rows of evalsets/<folder>/<name>.jsonl: one JSON object a line, no blank line."""
    rows = []
    with open(os.path.join(EVALSETS, folder, f"{name}.jsonl"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            where = f"{folder}/{name}.jsonl line {n}"
            if not line.strip():
                raise AssertionError(f"{where} is blank")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AssertionError(f"{where} is not valid JSON (column {e.colno})") from None
            if not isinstance(row, dict):
                raise AssertionError(f"{where} is not a JSON object")
            rows.append(row)
    return rows


def held_strings(spec):
    """Every normalised text and history turn of the set."""
    held = set()
    for name in FILES:
        for r in read_rows(spec.folder, name):
            held.add(_norm(r["text"]))
            held |= {_norm(t) for _, t in r["history"]}
    return held


def check_hashes(spec):
    assert_matches_frozen_hashes(spec.path, FILES)


def _turn_ok(turn):
    return (isinstance(turn, list) and len(turn) == 2 and turn[0] in ("user", "reply") and isinstance(turn[1], str)
            and bool(turn[1].strip()))


def check_layout(spec, name):
    """One file: its minimum rows, keys, ids, role, texts, history turns, kinds and histories."""
    rows = read_rows(spec.folder, name)
    where = f"{spec.folder}/{name}.jsonl"
    assert len(rows) >= spec.min_rows[name], f"{where}: {len(rows)} rows, fewer than {spec.min_rows[name]}"
    fields = list(spec.fields[name])
    bad = [r for r in rows if list(r) != fields]
    assert not bad, f"{where}: keys other than {fields}: {_ids(bad)}"
    bad = [r for r in rows if not (isinstance(r["id"], str) and r["id"].startswith(spec.id_prefix[name]))]
    assert not bad, f"{where}: ids not starting with {spec.id_prefix[name]!r}: {_ids(bad)}"
    role = "user" if name in USER_FILES else "reply"
    bad = [r for r in rows if not (r["role"] == role and isinstance(r["text"], str) and r["text"].strip())]
    assert not bad, f"{where}: role not {role!r} or text empty: {_ids(bad)}"
    bad = [r for r in rows if not (isinstance(r["history"], list) and all(map(_turn_ok, r["history"])))]
    assert not bad, f"{where}: history not a list of [user|reply, non-empty text] turns: {_ids(bad)}"
    repeated = sum(n > 1 for n in collections.Counter(r["id"] for r in rows).values())
    assert not repeated, f"{where}: {repeated} id(s) repeated"
    if name in spec.min_kind:
        kinds = collections.Counter(r["kind"] for r in rows)
        assert set(kinds) == set(spec.min_kind[name]), f"{where}: kinds {dict(kinds)}"
        few = {kind: kinds[kind] for kind, least in spec.min_kind[name].items() if kinds[kind] < least}
        assert not few, f"{where}: too few rows of kind {few} (minimums {spec.min_kind[name]})"
        bad = [r for r in rows if bool(r["history"]) != (r["kind"] == "multi_turn")]
        assert not bad, f"{where}: a history on a row not multi_turn, or none on a multi_turn row: {_ids(bad)}"
        least = spec.min_long_words[name]
        bad = [r for r in rows if r["kind"] == "long" and not len(r["text"].split()) > least]
        assert not bad, f"{where}: long rows of {least} words or fewer: {_ids(bad)}"
    if name in spec.min_with_history:
        with_history = sum(bool(r["history"]) for r in rows)
        assert with_history >= spec.min_with_history[name], \
            f"{where}: {with_history} rows with a history, fewer than {spec.min_with_history[name]}"
    if spec.reply_history_user_only and name not in USER_FILES:
        bad = [r for r in rows if any(turn[0] != "user" for turn in r["history"])]
        assert not bad, f"{where}: history turns not the user's: {_ids(bad)}"


def check_coverage(spec):
    """Crisis categories, harmful-reply categories and hard-negative topics, each with its minimum rows."""
    crisis = read_rows(spec.folder, "crisis")
    bad = [r for r in crisis if not (isinstance(r["categories"], list) and r["categories"]
                                     and set(r["categories"]) <= spec.crisis_categories
                                     and len(set(r["categories"])) == len(r["categories"]))]
    assert not bad, f"{spec.folder}/crisis.jsonl: categories empty, unknown or repeated: {_ids(bad)}"
    primary = collections.Counter(r["categories"][0] for r in crisis)
    assert set(primary) == spec.crisis_categories and min(primary.values()) >= spec.min_primary_category, \
        f"{spec.folder}/crisis.jsonl: rows per primary category {dict(primary)} (minimum {spec.min_primary_category})"
    harmful = read_rows(spec.folder, "harmful_replies")
    bad = [r for r in harmful if not (isinstance(r["categories"], list) and len(r["categories"]) == 1)]
    assert not bad, f"{spec.folder}/harmful_replies.jsonl: not exactly one category: {_ids(bad)}"
    per_category = collections.Counter(r["categories"][0] for r in harmful)
    assert set(per_category) == spec.reply_categories and min(per_category.values()) >= spec.min_reply_category, \
        f"{spec.folder}/harmful_replies.jsonl: rows per category {dict(per_category)} " \
        f"(minimum {spec.min_reply_category})"
    topics = collections.Counter(r["topic"] for r in read_rows(spec.folder, "hard_negatives"))
    if spec.exact_topics:
        assert set(topics) == set(spec.min_topic), f"{spec.folder}/hard_negatives.jsonl: topics {dict(topics)}"
    few = {topic: topics[topic] for topic, least in spec.min_topic.items() if topics[topic] < least}
    assert not few, f"{spec.folder}/hard_negatives.jsonl: too few rows of topic {few} (minimums {spec.min_topic})"


def check_unique(spec):
    """No id repeated across the set's files, nor (with unique_texts) a normalised text."""
    rows = [r for name in FILES for r in read_rows(spec.folder, name)]
    repeated = sum(n > 1 for n in collections.Counter(r["id"] for r in rows).values())
    assert not repeated, f"{spec.folder}: {repeated} id(s) repeated across the files"
    if spec.unique_texts:
        repeated = sum(n > 1 for n in collections.Counter(_norm(r["text"]) for r in rows).values())
        assert not repeated, f"{spec.folder}: {repeated} text(s) repeated"  # counts only


def check_no_training_copies(spec):
    """No tools/guard_examples_*.json training file holds a held-out string (conftest.training_files_copying)."""
    copied = {os.path.relpath(path, REPO_ROOT): len(texts)
              for path, texts in training_files_copying(held_strings(spec)).items()}
    assert not copied, f"training files copying {spec.tag} strings (counts): {copied}"


def check_no_copies_of_earlier(spec):
    """No held-out string longer than MIN_COPY_CHARS appears in a text or history turn of the earlier sets."""
    earlier = []
    for folder in spec.earlier:
        for name in FILES:
            if os.path.exists(os.path.join(EVALSETS, folder, f"{name}.jsonl")):
                for r in read_rows(folder, name):
                    earlier.append(_norm(r["text"]))
                    earlier.extend(_norm(t) for _, t in r["history"])
    assert earlier, f"no earlier set found among {spec.earlier}"
    corpus = "\n".join(earlier)
    copied = sum(len(s) > MIN_COPY_CHARS and s in corpus for s in held_strings(spec))
    assert not copied, f"{copied} {spec.tag} string(s) copy an earlier set ({', '.join(spec.earlier)})"
