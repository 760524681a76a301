"""Reading and splitting the datasets the reward and guard heads train on (offline; never imported by training).

Each folder of `--data_dir` documents its source in SOURCE.md: epitome/ (empathy), sst2/ (sentiment),
goemotions/ + mesc/ (emotion), sdcnl/ + goemotions/ (crisis), reddit_cssrs/ (user-level crisis check),
empatheticdialogues_intents/ (ordinary negatives). Every choice (dedup, splits, label mapping, subsampling) is
documented in REWARDS.md. A malformed file raises `DatasetError` naming the file, line and field.
"""
from __future__ import annotations

import ast
import csv
import json
import os
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from therapy_rl.data.labels import EMOTION_TO_INDEX, EMOTIONS
from therapy_rl.rewards import heads as H
from therapy_rl.rewards import safety as S

csv.field_size_limit(1 << 27)

GOEMOTIONS_DROPPED = ("surprise",)  # Ekman class with no MESC counterpart
CSSRS_LEVELS = ("Supportive", "Indicator", "Ideation", "Behavior", "Attempt")


class DatasetError(ValueError):
    """A dataset file is missing or malformed (names file, line and field)."""


# ============================================================================ readers


def _require(path: str) -> str:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing (see the folder's SOURCE.md)")
    return path


def read_csv_dicts(path: str, required: Sequence[str]) -> list[tuple[int, dict]]:
    with open(_require(path), encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}:1: header lacks field(s) {missing}")
        return [(reader.line_num, row) for row in reader]


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split())


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)


def split_groups(group_ids: Sequence, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """0/1/2 (train/val/test) per example; whole groups go to one split, groups shuffled with `seed`."""
    unique = sorted(set(group_ids), key=str)
    order = np.random.default_rng(seed).permutation(len(unique))
    cut1 = int(round(fractions[0] * len(unique)))
    cut2 = int(round((fractions[0] + fractions[1]) * len(unique)))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[unique[i]] = 0 if rank < cut1 else (1 if rank < cut2 else 2)
    return np.asarray([split_of[g] for g in group_ids], np.int32)


def load_epitome(data_dir: str, seed: int) -> dict:
    """One example per unique (seeker post id, reply id); soft 3x3 targets average duplicate rows' labels.
    Examples sharing a seeker post, a reply id or the same normalised reply/seeker text form one group, and
    groups are split 80/10/10, so no reply or seeker post appears in two splits."""
    files = {"emotional_reactions": "emotional-reactions-reddit.csv", "interpretations": "interpretations-reddit.csv",
             "explorations": "explorations-reddit.csv"}
    pairs: dict[tuple[str, str], dict] = {}
    for d, mech in enumerate(H.EMPATHY_MECHANISMS):
        path = os.path.join(data_dir, "epitome", files[mech])
        for line, row in read_csv_dicts(path, ("sp_id", "rp_id", "seeker_post", "response_post", "level")):
            try:
                level = int(row["level"])
            except ValueError:
                raise DatasetError(f"{path}:{line}: field 'level' is {row['level']!r}, expected 0/1/2") from None
            if level not in (0, 1, 2):
                raise DatasetError(f"{path}:{line}: field 'level' is {level}, expected 0/1/2")
            if not row["response_post"].strip():
                raise DatasetError(f"{path}:{line}: field 'response_post' is empty")
            key = (row["sp_id"], row["rp_id"])
            ex = pairs.setdefault(key, {"seeker": row["seeker_post"], "reply": row["response_post"],
                                        "counts": np.zeros((3, 3), np.float32)})
            ex["counts"][d, level] += 1
    uf = _UnionFind()
    keys = list(pairs)
    for sp, rp in keys:
        ex = pairs[(sp, rp)]
        node = ("pair", sp, rp)
        for other in (("sp", sp), ("rp", rp), ("reply", normalise_text(ex["reply"])),
                      ("seeker", normalise_text(ex["seeker"]))):
            uf.union(node, other)
    groups = [uf.find(("pair", sp, rp)) for sp, rp in keys]
    split = split_groups(groups, (0.8, 0.1, 0.1), seed)
    counts = np.stack([pairs[k]["counts"] for k in keys])
    if np.any(counts.sum(-1) == 0):
        bad = keys[int(np.argmax(np.any(counts.sum(-1) == 0, axis=-1)))]
        raise DatasetError(f"{data_dir}/epitome: pair {bad} lacks a label in some mechanism file")
    target = counts / counts.sum(-1, keepdims=True)
    return {"texts": [pairs[k]["reply"] for k in keys], "target": target.astype(np.float32), "split": split,
            "rows_read": int(sum(c.sum() for c in counts) / 3), "unique_pairs": len(keys),
            "conflicting_pairs": int(np.sum(np.any((counts > 0).sum(-1) > 1, axis=-1))),
            "groups": len(set(groups))}


def _read_tsv(path: str, text_col: int, label_col: int, header: bool) -> list[tuple[str, int]]:
    out = []
    with open(_require(path), encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if header and line_no == 1:
                continue
            cells = line.rstrip("\n").split("\t")
            if len(cells) < 2:
                raise DatasetError(f"{path}:{line_no}: expected 2 tab-separated fields, got {len(cells)}")
            try:
                label = int(cells[label_col])
            except ValueError:
                raise DatasetError(f"{path}:{line_no}: field 'label' is {cells[label_col]!r}") from None
            out.append((cells[text_col].strip(), label))
    return out


def load_sst2(data_dir: str, max_train: int, seed: int) -> dict:
    """Train: a seeded subsample of GLUE train (phrases) minus any sentence also in dev/test; val (early
    stopping) = GLUE dev; held-out = the labelled SST-2 test copy (SOURCE.md)."""
    d = os.path.join(data_dir, "sst2")
    train = _read_tsv(os.path.join(d, "train_full.tsv"), 0, 1, True)
    dev = _read_tsv(os.path.join(d, "dev.tsv"), 0, 1, True)
    test = _read_tsv(os.path.join(d, "test.tsv"), 1, 0, True)
    held = {normalise_text(t) for t, _ in dev + test}
    train = [(t, y) for t, y in train if t and normalise_text(t) not in held]
    idx = np.random.default_rng(seed).permutation(len(train))[:max_train]
    train = [train[i] for i in sorted(idx)]
    return {"train": train, "val": dev, "test": test, "train_pool": len(idx)}


def _goemotions_to_mesc(data_dir: str) -> tuple[list[str], dict[int, str]]:
    d = os.path.join(data_dir, "goemotions")
    names = [l.strip() for l in open(_require(os.path.join(d, "emotions.txt")), encoding="utf-8") if l.strip()]
    with open(_require(os.path.join(d, "ekman_mapping.json")), encoding="utf-8") as f:
        ekman = json.load(f)
    fine_to_mesc: dict[int, str] = {}
    for coarse, fines in ekman.items():
        for fine in fines:
            if fine not in names:
                raise DatasetError(f"{d}/ekman_mapping.json: field '{coarse}' names unknown emotion {fine!r}")
            if coarse not in GOEMOTIONS_DROPPED:
                if coarse not in EMOTION_TO_INDEX:
                    raise DatasetError(f"{d}/ekman_mapping.json: Ekman class {coarse!r} is not a MESC label")
                fine_to_mesc[names.index(fine)] = coarse
    fine_to_mesc[names.index("neutral")] = "neutral"
    return names, fine_to_mesc


def load_goemotions(data_dir: str, split: str) -> list[tuple[str, np.ndarray]]:
    """(text, soft 7-way target) for examples with at least one label that maps to a MESC emotion; the target
    is uniform over the distinct mapped classes (Ekman 'surprise' labels are dropped)."""
    names, fine_to_mesc = _goemotions_to_mesc(data_dir)
    path = os.path.join(data_dir, "goemotions", f"{split}.tsv")
    out = []
    with open(_require(path), encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            cells = line.rstrip("\n").split("\t")
            if len(cells) != 3:
                raise DatasetError(f"{path}:{line_no}: expected 3 tab-separated fields, got {len(cells)}")
            try:
                ids = [int(x) for x in cells[1].split(",")]
            except ValueError:
                raise DatasetError(f"{path}:{line_no}: field 'labels' is {cells[1]!r}") from None
            if any(i < 0 or i >= len(names) for i in ids):
                raise DatasetError(f"{path}:{line_no}: field 'labels' has an id outside emotions.txt")
            classes = sorted({EMOTION_TO_INDEX[fine_to_mesc[i]] for i in ids if i in fine_to_mesc})
            if not classes:
                continue
            target = np.zeros(len(EMOTIONS), np.float32)
            target[classes] = 1.0 / len(classes)
            out.append((cells[0], target))
    return out


def goemotions_splits(data_dir: str, max_train: int, seed: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """GoEmotions train (seeded subsample of `max_train`), dev and test, as used by the emotion AND crisis heads."""
    go = {k: load_goemotions(data_dir, k) for k in ("train", "dev", "test")}
    keep = np.random.default_rng(seed + 1).permutation(len(go["train"]))[:max_train]
    go["train"] = [go["train"][i] for i in sorted(keep)]
    return go


def load_mesc_clients(data_dir: str, split: str) -> list[tuple[str, int]]:
    from therapy_rl.data.sources import read_mesc

    dialogues, _ = read_mesc(data_dir, split)
    return [(u.text, EMOTION_TO_INDEX[u.emotion]) for d in dialogues for u in d.utterances if u.speaker == "client"]


def load_sdcnl(data_dir: str, split_file: str) -> list[dict]:
    path = os.path.join(data_dir, "sdcnl", split_file)
    out = []
    for line, row in read_csv_dicts(path, ("title", "selftext", "is_suicide")):
        if row["is_suicide"] not in ("0", "1"):
            raise DatasetError(f"{path}:{line}: field 'is_suicide' is {row['is_suicide']!r}, expected 0/1")
        title, body = row["title"].strip(), row["selftext"].strip()
        out.append({"title": title, "post": f"{title}. {body}".strip(), "label": int(row["is_suicide"])})
    return out


ED_CRISIS_TEXT = re.compile(r"suicid|kill(ed|ing)? (my|him|her|them)sel(f|ves)|want(ed)? to die", re.IGNORECASE)


def load_empathetic_dialogues(data_dir: str, seed: int) -> dict[str, list[str]]:
    """EmpatheticDialogues speaker turns and situations (first-person everyday emotional talk), split 80/10/10 by
    dialogue. Texts that talk about suicide (a handful, about other people) are left out of these negatives."""
    folder = os.path.join(data_dir, "empatheticdialogues_intents", "empatheticdialogues_annotated")
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: missing (see empatheticdialogues_intents/SOURCE.md)")
    texts: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".csv"):
            continue
        for line, row in read_csv_dicts(os.path.join(folder, name), ("Dialog_ID", "Type", "Actor", "Text")):
            if row["Actor"] == "listener":
                continue
            text = " ".join(row["Text"].split())
            if text and not ED_CRISIS_TEXT.search(text):
                texts.setdefault(text, row["Dialog_ID"])
    items = sorted(texts.items())
    split = split_groups([d for _, d in items], (0.8, 0.1, 0.1), seed)
    return {name: [t for (t, _), s in zip(items, split) if s == i] for i, name in enumerate(("train", "val", "test"))}


def load_cssrs(data_dir: str, max_posts_per_user: int) -> list[dict]:
    """Users with their (first `max_posts_per_user`) posts; truncated cells are split on the item separator."""
    path = os.path.join(data_dir, "reddit_cssrs", "500_Reddit_users_posts_labels.csv")
    users = []
    for line, row in read_csv_dicts(path, ("User", "Post", "Label")):
        if row["Label"] not in CSSRS_LEVELS:
            raise DatasetError(f"{path}:{line}: field 'Label' is {row['Label']!r}, expected one of {CSSRS_LEVELS}")
        try:
            posts = ast.literal_eval(row["Post"])
            if not isinstance(posts, list):
                raise ValueError
        except (ValueError, SyntaxError):
            body = row["Post"].strip().lstrip("[").strip("'\"")
            posts = [p for p in re.split(r"""['"], ['"]""", body) if p.strip()]
        posts = [str(p).replace("&gt;", ">").strip() for p in posts if str(p).strip()]
        users.append({"user": row["User"], "level": row["Label"], "posts": posts[:max_posts_per_user]})
    return users


# ============================================================================ derived sets


def empathetic_dialogues_splits(data_dir: str, sizes: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    """Seeded subsamples of the EmpatheticDialogues splits (train/val/test)."""
    ed = load_empathetic_dialogues(data_dir, seed)
    rng = np.random.default_rng(seed + 3)
    out = {}
    for split in ("train", "val", "test"):
        keep = np.sort(rng.permutation(len(ed[split]))[: sizes[split]])
        out[split] = [ed[split][i] for i in keep]
    return out


SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str, min_words: int = 3, max_words: int = 60) -> list[str]:
    return [s.strip() for s in SENTENCE_SPLIT.split(text) if min_words <= len(s.split()) <= max_words]


def strong_lexicon_hits(lexicon: S.SafetyLexicon, encoder, texts: Sequence[str], length: int = 64,
                        batch: int = 256) -> np.ndarray:
    """[N] bool: the text has an (unvetoed) crisis_strong lexicon hit."""
    fn = jax.jit(lambda lex, ids, mask: jnp.any(S.category_hits(lex, "crisis_strong", ids, mask), axis=-1))
    out = []
    for i in range(0, len(texts), batch):
        chunk = list(texts[i : i + batch])
        ids, mask = encoder.tokenize(chunk + [""] * (batch - len(chunk)), length)
        out.append(np.asarray(fn(lexicon, ids, mask))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros(0, bool)


def mined_crisis_sentences(lexicon, encoder, posts: Sequence[dict]) -> list[str]:
    """Sentences of r/SuicideWatch and r/depression posts with a strong crisis-lexicon hit: short, chat-like
    positives ("I just want to die."), so the head also learns paraphrases of what the lexicon lists."""
    sentences = list(dict.fromkeys(s for p in posts for s in split_sentences(p["post"])))
    hits = strong_lexicon_hits(lexicon, encoder, sentences)
    return [s for s, h in zip(sentences, hits) if h]


