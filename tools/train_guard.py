"""Train guard v2 (`therapy_rl/guard.py`): MiniLM's top layers fine-tuned through LoRA adapters, two heads, the
thresholds chosen on development data; score a frozen held-out set once.

    python tools/train_guard.py --data_dir $THERAPY_RL_DATA                      # train -> rewards/weights/guard.npz
    python tools/train_guard.py --eval_heldout evalsets/guard_v2                 # score a frozen set ONCE

Training data (REWARDS.md, "Guard"):
- written examples: the plain-sentence files of PLAIN_EXAMPLES (round 2's v2, round 3's v3a/v3b, round 6's
  v4c/v4d), `tools/guard_examples_user.json` and `guard_examples_reply.json` (round-1 patterns, sampled into
  variants), issue 11's own texts;
- the spent held-out sets of SPENT_SETS (guard_v1 to guard_v5, each scored once) and the earlier hand-written sets
  of tests/test_safety.py; half of each (stable hash of the row) trains, half is development data;
- datasets: sdcnl and reddit_cssrs (crisis positives, noisy, low weight), depression_severity, GoEmotions,
  EmpatheticDialogues, ESConv, CounselChat, AnnoMI, MESC (negatives; supporter turns for replies);
- long messages built from dataset sentences with a written message inside (windows labelled by span).
Every text is cut into the guard's windows exactly as `guard.Guard` reads it. The frozen lower layers' states of
each window are computed once and cached under --cache_dir (never the repo); training runs the adapted top layers.
Only the folder given to --eval_heldout is read as a held-out set, and only by that command.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS_DIR)

from therapy_rl import guard as G  # noqa: E402
from therapy_rl.rewards import encoder as encoder_lib  # noqa: E402
from therapy_rl.rewards import safety as S  # noqa: E402

from tools import crisis_evaluation as E  # noqa: E402
from tools import reward_datasets as D  # noqa: E402

REPO = os.path.dirname(TOOLS_DIR)
USER_EXAMPLES = os.path.join(TOOLS_DIR, "guard_examples_user.json")
REPLY_EXAMPLES = os.path.join(TOOLS_DIR, "guard_examples_reply.json")
# Plain-sentence example files (tag -> path): round 2's, and round 3's two writers with different voices.
PLAIN_EXAMPLES = {"v2": os.path.join(TOOLS_DIR, "guard_examples_v2.json"),
                  "v3a": os.path.join(TOOLS_DIR, "guard_examples_v3a.json"),
                  "v3b": os.path.join(TOOLS_DIR, "guard_examples_v3b.json"),
                  "v4c": os.path.join(TOOLS_DIR, "guard_examples_v4c.json"),
                  "v4d": os.path.join(TOOLS_DIR, "guard_examples_v4d.json"),
                  "v5e": os.path.join(TOOLS_DIR, "guard_examples_v5e.json"),
                  "v5f": os.path.join(TOOLS_DIR, "guard_examples_v5f.json"),
                  "v6g": os.path.join(TOOLS_DIR, "guard_examples_v6g.json"),
                  "v6h": os.path.join(TOOLS_DIR, "guard_examples_v6h.json")}
# Sources written for the guard (message source prefixes); everything else comes from datasets.
# plain example files and spent held-out sets
SET_AND_PLAIN_PREFIXES = ("v2_", "v3a_", "v3b_", "v4c_", "v4d_", "v5e_", "v5f_", "v6g_", "v6h_", "v1_", "s2_", "s3_",
                          "s4_", "s5_")
WRITTEN_PREFIXES = SET_AND_PLAIN_PREFIXES + ("r1_", "previous_")
PLAIN_TAGS = ("v2", "v3a", "v3b", "v4c", "v4d", "v5e", "v5f", "v6g", "v6h")
# Categories of the written sets that the guard's heads know under another name.
CATEGORY_ALIASES = {"minimises_crisis": "encourages_self_harm", "suicidal_ideation_goodbye": "suicidal_ideation"}
# Held-out sets already scored (tag -> folder): spent, so training and development data since.
SPENT_SETS = {"v1": os.path.join(REPO, "evalsets", "guard_v1"), "s2": os.path.join(REPO, "evalsets", "guard_v2"),
              "s3": os.path.join(REPO, "evalsets", "guard_v3"), "s4": os.path.join(REPO, "evalsets", "guard_v4"),
              "s5": os.path.join(REPO, "evalsets", "guard_v5")}
METRICS_FILE = os.path.join(REPO, "therapy_rl", "rewards", "weights", "guard_metrics.json")
K_FOLDS = 5  # round-1 pattern folds; fold0 is development data
CRISIS_TEXT = re.compile(r"suicid|kill(ed|ing)? (my|him|her|them)sel(f|ves)|want(ed)? to die|self.?harm|overdos|"
                         r"end(ing)? (my|it all)|cut(ting)? myself|take my (own )?life|kms", re.IGNORECASE)
# Dataset texts about abuse, violence to a person or a child in danger are never used as negatives either (they
# would teach the child-danger and harm-to-others categories the opposite of the written examples).
NOT_NEGATIVE_TEXT = re.compile(r"\b(abus\w*|molest\w*|rap(e|ed|ing)|groom\w*|(beat|beats|beating|hit|hits|hitting|"
                               r"punch\w*|kick\w*|chok\w*|strangl\w*|touch\w*|hurt\w*|stab\w*|shoot\w*|kill\w*|"
                               r"murder\w*|poison\w*) (me|us|my|him|her|them|you|everyone|people)\b)", re.IGNORECASE)
HARD_WORDS = ("kill", "killing", "die", "dying", "dead", "death", "shoot", "shot", "gun", "cut", "cutting", "jump",
              "bridge", "roof", "pills", "tablets", "overdose", "hang", "hanging", "end", "knife", "blood", "hurt",
              "goodbye", "murder", "stab", "poison", "rope", "suicide", "suicidal", "alive", "disappear", "burden")
HARD_WORD_TEXT = re.compile(r"\b(" + "|".join(HARD_WORDS) + r")\b", re.IGNORECASE)
ISSUE_WEIGHT = 3.0
# Development threshold rule: the largest recall with false alarms within these on development data.
MAX_DEV_FALSE_ALARMS = 0.04  # hand-written hard negatives (target 0.05, kept under it for the unseen set)
MAX_DEV_ORDINARY_FLAGS = 0.02  # dataset text (GoEmotions, ED, ESConv, MESC, therapist replies)
# An idiom ("killing me") raises the crisis threshold but never past this: on guard_v3, four crisis messages with
# head probability >= 0.999 were vetoed by an idiom threshold of 2.0 (round 6 onwards).
MAX_IDIOM_THRESHOLD = 0.99
# Sad, low-mood, venting and pain messages (the development negatives whose source names these topics): their own
# false-alarm bound, twice shipped guard v2's 4.0% on the round-6 development set. Round 6 under the overall bound
# alone flagged 12% of them (and "Nobody at work listens to me." in tests/test_api.py); a crisis message in reply to
# sadness is the guard's most visible mistake in chat.
MAX_DEV_SAD_FALSE_ALARMS = 0.08
SAD_SOURCE = re.compile(r"sad|low_mood|venting|physical_pain")
# Long user negatives (over guard.LONG_TOKENS tokens, written and dataset text) get the issue's own 5% (round 7
# onwards): a long message's score is a max over 3+ windows, and round 7's first thresholds flagged a plain diary
# of a day (tests/test_guard.py) at p 0.91. The long messages' threshold is chosen under it (`_choose_long`).
MAX_DEV_LONG_FALSE_ALARMS = 0.05


# ============================================================================ written examples


def _split_top(body: str) -> list[str]:
    return S._split_top_level(body)  # noqa: SLF001  (the lexicon's own brace parser)


def sample_pattern(pattern: str, macros: dict, rng: np.random.Generator, count: int) -> list[str]:
    """Up to `count` distinct random expansions of a `{a|b}` / $MACRO pattern (no full expansion)."""
    text = pattern
    for _ in range(10):
        if "$" not in text:
            break
        text = re.sub(r"\$([A-Z_]+)", lambda m: macros[m.group(1)], text)

    def once(p: str) -> str:
        start = p.find("{")
        if start < 0:
            return p
        depth = 0
        for end in range(start, len(p)):
            depth += {"{": 1, "}": -1}.get(p[end], 0)
            if depth == 0:
                break
        alternatives = _split_top(p[start + 1:end])
        return p[:start] + once(alternatives[rng.integers(len(alternatives))]) + once(p[end + 1:])

    out: dict[str, None] = {}
    for _ in range(count * 6):
        s = " ".join(once(text).split())
        s = re.sub(r"\s+([,.!?:])", r"\1", s).strip(" ,")
        if s:
            out[s] = None
        if len(out) >= count:
            break
    return list(out)


def punctuate(text: str, rng: np.random.Generator) -> str:
    """Written patterns carry no final punctuation while dataset text does; without this the head learns that a
    final period means 'not a crisis'. Adds '.', '!', '...' or '?' (questions) to most texts, sometimes a space."""
    roll = rng.random()
    if roll < 0.3 or text[-1] in ".!?":
        return text
    if text.split()[0] in ("how", "what", "what's", "which", "is", "can", "could", "would", "will", "do", "does",
                           "are", "should", "where", "why", "have", "did"):
        return text + "?"
    return text + (".", ".", ".", "!", "...", " .")[int(rng.integers(6))]


def _split_of(group: str, seed: int) -> str:
    """'fold<k>': whole patterns go to one of K_FOLDS cross-validation folds (a stable hash of group and seed)."""
    h = int(hashlib.sha256(f"{seed}|{group}".encode()).hexdigest()[:8], 16)
    return f"fold{h % K_FOLDS}"


@dataclasses.dataclass
class Message:
    """One written or dataset message (text level; windows come later)."""

    text: str
    label: int  # 1 = crisis / harmful
    role: str  # user | reply
    source: str
    split: str  # train | dev
    categories: tuple[str, ...] = ()
    history: tuple[str, ...] = ()  # earlier user turns (user role) or the answered user message (reply role)


def written_messages(seed: int, variants: int) -> list[Message]:
    out = _written_messages(seed, variants)
    rng = np.random.default_rng(seed + 1)
    for m in out:
        m.text = punctuate(m.text, rng)
        m.history = tuple(punctuate(h, rng) for h in m.history)
    return out


def _pattern_messages(groups: dict, key: str, label: int, role: str, source: str, macros: dict,
                      rng: np.random.Generator, seed: int, variants: int) -> list[Message]:
    """Expansions of each pattern of each group (a category for positives, which it labels; a topic for negatives)."""
    out: list[Message] = []
    for group, patterns in groups.items():
        for i, p in enumerate(patterns):
            split = _split_of(f"{key}/{group}/{i}", seed)
            cats = (group,) if label else ()
            out += [Message(t, label, role, f"{source}:{group}", split, cats)
                    for t in sample_pattern(p, macros, rng, variants)]
    return out


def _written_messages(seed: int, variants: int) -> list[Message]:
    rng = np.random.default_rng(seed)
    out: list[Message] = []
    with open(USER_EXAMPLES, encoding="utf-8") as f:
        spec = json.load(f)
    macros = spec["macros"]
    out += _pattern_messages(spec["user_crisis"], "user_crisis", 1, "user", "written_crisis", macros, rng, seed, variants)
    out += _pattern_messages(spec["user_negative"], "user_negative", 0, "user", "written_negative", macros, rng, seed,
                             variants)
    for i, item in enumerate(spec["user_multi_turn"]):
        split = _split_of(f"user_multi/{i}", seed)
        for _ in range(max(2, variants // 2)):
            history = tuple(sample_pattern(h, macros, rng, 1)[0] for h in item["history"])
            text = sample_pattern(item["text"], macros, rng, 1)[0]
            label = int(item["crisis"])
            out.append(Message(text, label, "user", "written_multi_turn", split, tuple(item.get("categories", ())),
                               history))
    for cat, text in spec["user_crisis_issue_11"]["examples"]:
        for variant in (text, text.rstrip(".")):
            out.append(Message(variant, 1, "user", f"written_issue11:{cat}", _split_of(f"issue/{text}", seed), (cat,)))
    with open(REPLY_EXAMPLES, encoding="utf-8") as f:
        spec = json.load(f)
    macros = spec["macros"]
    for text in spec["reply_supportive_issue_11"]["examples"]:
        for variant in (text, text.rstrip(".?") + "."):
            out.append(Message(variant, 0, "reply", "written_issue11:supportive", _split_of(f"issue/{text}", seed)))
    for cat, text in spec["reply_harmful_issue_11"]["examples"]:
        for variant in (text, text.rstrip(".")):
            out.append(Message(variant, 1, "reply", f"written_issue11:{cat}", _split_of(f"issue/{text}", seed), (cat,)))
    out += _pattern_messages(spec["reply_harmful"], "reply_harmful", 1, "reply", "written_harmful", macros, rng, seed,
                             variants)
    out += _pattern_messages(spec["reply_supportive"], "reply_supportive", 0, "reply", "written_supportive", macros, rng,
                             seed, variants)
    for i, item in enumerate(spec["reply_pairs"]):
        split = _split_of(f"reply_pairs/{i}", seed)
        for _ in range(max(2, variants // 2)):
            user = sample_pattern(item["user"], macros, rng, 1)[0]
            reply = sample_pattern(item["reply"], macros, rng, 1)[0]
            out.append(Message(reply, int(item["harmful"]), "reply", "written_pair", split,
                               tuple(item.get("categories", ())), (user,)))
    return out


# ============================================================================ datasets


def _read_csv(path: str, required: Sequence[str]) -> list[dict]:
    return [row for _, row in D.read_csv_dicts(path, required)]


def _stable_split(key: str, seed: int, dev: float = 0.15) -> str:
    h = int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()[:8], 16)
    return "dev" if h / 0xFFFFFFFF < dev else "train"


def _sample(items: list, count: int, rng: np.random.Generator) -> list:
    if len(items) <= count:
        return list(items)
    return [items[i] for i in sorted(rng.permutation(len(items))[:count])]


def _clean(text: str) -> str:
    return " ".join(str(text).replace("\u00a0", " ").split())


def dataset_messages(data_dir: str, seed: int, sizes: dict) -> list[Message]:
    """Dataset texts as messages. Crisis-talk is filtered out of every negative source."""
    rng = np.random.default_rng(seed + 11)
    out: list[Message] = []

    def add(texts, label, role, source, split, categories=(), history=()):
        for t in texts:
            t = _clean(t)
            if not t or (label == 0 and (CRISIS_TEXT.search(t) or NOT_NEGATIVE_TEXT.search(t))):
                continue
            out.append(Message(t, label, role, source, split, categories, history))

    # sdcnl: r/SuicideWatch posts (positives) and r/depression posts (low-weight negatives)
    sd = D.load_sdcnl(data_dir, "training-set.csv")
    for p in sd:
        split = _stable_split(p["post"], seed)
        if p["label"] == 1:
            add([p["post"]], 1, "user", "sdcnl_suicidewatch", split, ("suicidal_ideation",))
            if len(p["title"].split()) >= 4:
                add([p["title"]], 1, "user", "sdcnl_suicidewatch_title", split, ("suicidal_ideation",))
        else:
            add([p["post"]], 0, "user", "sdcnl_depression", split)
    # Reddit C-SSRS: posts of Ideation / Behavior / Attempt users (user-level labels: noisy positives)
    for u in D.load_cssrs(data_dir, sizes["cssrs_posts_per_user"]):
        if u["level"] not in ("Ideation", "Behavior", "Attempt"):
            continue
        split = _stable_split(u["user"], seed)
        add([p for p in u["posts"] if len(p.split()) >= 5], 1, "user", f"cssrs_{u['level'].lower()}", split,
            ("suicidal_ideation",))
    # depression severity: minimum / mild posts (stress and low mood, not crisis)
    rows = _read_csv(os.path.join(data_dir, "depression_severity", "Reddit_depression_dataset.csv"), ("text", "label"))
    texts = sorted({r["text"] for r in rows if r["label"] in ("minimum", "mild")})
    for t in _sample(texts, sizes["depression_severity"], rng):
        add([t], 0, "user", "depression_severity_low", _stable_split(t, seed))
    # GoEmotions (official train / dev)
    for split, name in (("train", "train"), ("dev", "dev")):
        texts = [t for t, _ in D.load_goemotions(data_dir, name)]
        add(_sample(texts, sizes[f"goemotions_{split}"], rng), 0, "user", "goemotions", split)
    # EmpatheticDialogues speaker turns and situations; listener turns as replies
    ed = D.load_empathetic_dialogues(data_dir, seed)
    add(_sample(ed["train"], sizes["ed_train"], rng), 0, "user", "empatheticdialogues", "train")
    add(_sample(ed["val"], sizes["ed_dev"], rng), 0, "user", "empatheticdialogues", "dev")
    for split, pairs in _ed_listener_pairs(data_dir, seed).items():
        for user, reply in _sample(pairs, sizes[f"ed_listener_{split}"], rng):
            add([reply], 0, "reply", "empatheticdialogues_listener", split, (), (user,))
    # ESConv seekers (user) and supporters (reply, with the seeker turn they answer)
    from therapy_rl.data.sources import read_esconv

    for split, name in (("train", "train.txt"), ("dev", "valid.txt")):
        dialogues, _ = read_esconv(os.path.join(data_dir, "esconv", name), strict=False)
        seekers, pairs = [], []
        for d in dialogues:
            last_user = None
            for u in d.utterances:
                if u.speaker == "client":
                    seekers.append(u.text)
                    last_user = u.text
                elif last_user is not None:
                    pairs.append((last_user, u.text))
        add(_sample(seekers, sizes[f"esconv_user_{split}"], rng), 0, "user", "esconv_seeker", split)
        for user, reply in _sample(pairs, sizes[f"esconv_reply_{split}"], rng):
            if not CRISIS_TEXT.search(user):
                add([reply], 0, "reply", "esconv_supporter", split, (), (user,))
    # CounselChat: questions (user) and therapists' answers (reply)
    rows = _read_csv(os.path.join(data_dir, "counsel_chat", "20200325_counsel_chat.csv"),
                     ("questionID", "questionText", "answerText", "split"))
    questions = {}
    for r in rows:
        split = "dev" if r["split"] in ("val", "test") else "train"
        questions.setdefault(r["questionID"], (split, _clean(r["questionText"])))
    for split in ("train", "dev"):
        qs = [q for s, q in questions.values() if s == split and q]
        add(_sample(qs, sizes[f"counselchat_q_{split}"], rng), 0, "user", "counselchat_question", split)
        answers = [(_clean(r["questionText"]), r["answerText"]) for r in rows
                   if ("dev" if r["split"] in ("val", "test") else "train") == split and r["answerText"].strip()]
        for q, a in _sample(answers, sizes[f"counselchat_a_{split}"], rng):
            add([a], 0, "reply", "counselchat_answer", split, (), (q,))
    # AnnoMI: clients (user) and therapists (reply), split by transcript
    rows = _read_csv(os.path.join(data_dir, "annomi", "AnnoMI-simple.csv"),
                     ("transcript_id", "interlocutor", "utterance_text"))
    clients = {"train": [], "dev": []}
    therapists = {"train": [], "dev": []}
    last = {}
    for r in rows:
        split = _stable_split("annomi" + r["transcript_id"], seed, 0.2)
        text = _clean(r["utterance_text"])
        if len(text.split()) < 3:
            continue
        if r["interlocutor"] == "client":
            clients[split].append(text)
            last[r["transcript_id"]] = text
        else:
            therapists[split].append((last.get(r["transcript_id"], ""), text))
    for split in ("train", "dev"):
        add(_sample(clients[split], sizes[f"annomi_{split}"], rng), 0, "user", "annomi_client", split)
        for user, reply in _sample(therapists[split], sizes[f"annomi_{split}"], rng):
            add([reply], 0, "reply", "annomi_therapist", split, (), (user,) if user else ())
    # MESC clients (official train / val)
    pools = {"train": [], "dev": []}
    for split, name in (("train", "train"), ("dev", "val")):
        texts = [t for t, _ in D.load_mesc_clients(data_dir, name)]
        add(_sample(texts, sizes[f"mesc_{split}"], rng), 0, "user", "mesc_client", split)
        pools[split] += texts
    # every ordinary text that uses a crisis word in passing ("this exam is killing me"): hard negatives
    for split, name in (("train", "train"), ("dev", "dev")):
        pools[split] += [t for t, _ in D.load_goemotions(data_dir, name)]
    pools["train"] += ed["train"]
    pools["dev"] += ed["val"]
    for split in ("train", "dev"):
        hard = sorted({_clean(t) for t in pools[split] if HARD_WORD_TEXT.search(t) and not CRISIS_TEXT.search(t)})
        add(_sample(hard, sizes[f"hard_words_{split}"], rng), 0, "user", "dataset_hard_words", split)
    return out


def _ed_listener_pairs(data_dir: str, seed: int) -> dict[str, list[tuple[str, str]]]:
    folder = os.path.join(data_dir, "empatheticdialogues_intents", "empatheticdialogues_annotated")
    pairs = {"train": [], "dev": []}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".csv"):
            continue
        last = {}
        for row in _read_csv(os.path.join(folder, name), ("Dialog_ID", "Type", "Actor", "Text")):
            text = _clean(row["Text"])
            if row["Actor"] == "speaker":
                last[row["Dialog_ID"]] = text
            elif row["Actor"] == "listener" and row["Dialog_ID"] in last and len(text.split()) >= 4:
                pairs[_stable_split("ed" + row["Dialog_ID"], seed, 0.1)].append((last[row["Dialog_ID"]], text))
    return pairs


def mined_sentences(lexicon: S.SafetyLexicon, encoder, messages: list[Message]) -> list[Message]:
    """Short positives: r/SuicideWatch sentences with a strong crisis-lexicon hit."""
    out = []
    for split in ("train", "dev"):
        posts = [{"post": m.text} for m in messages if m.source == "sdcnl_suicidewatch" and m.split == split]
        for s in D.mined_crisis_sentences(lexicon, encoder, posts):
            out.append(Message(_clean(s), 1, "user", "sdcnl_mined_sentence", split, ("suicidal_ideation",)))
    return out



class Tokens:
    """Content ids of texts (no truncation), memoised."""

    def __init__(self, tokenizer):
        self.tokenizer, self.memo = tokenizer, {}

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        for lo in range(0, len(todo), 2048):
            chunk = todo[lo:lo + 2048]
            for t, enc in zip(chunk, self.tokenizer.encode_batch(chunk)):
                self.memo[t] = enc.ids[1:-1]
        return [self.memo[t] for t in texts]



def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def verify_hashes(folder: str) -> None:
    with open(os.path.join(folder, "SHA256SUMS"), encoding="utf-8") as f:
        for line in f:
            digest, name = line.split()
            with open(os.path.join(folder, name), "rb") as g:
                if hashlib.sha256(g.read()).hexdigest() != digest:
                    raise SystemExit(f"{folder}/{name}: SHA-256 does not match SHA256SUMS; the frozen set was changed")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]



def previous_sets() -> dict[str, tuple[list[str], list[str]]]:
    """The hand-written sets of tests/test_safety.py and lexicon/dev_probes.json (never guard training data)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_safety_sets", os.path.join(REPO, "tests", "test_safety.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = {"A": (mod.HELDOUT_CRISIS, mod.HELDOUT_HARD_NEGATIVES), "B": (mod.HELDOUT_B_CRISIS, mod.HELDOUT_B_HARD_NEGATIVES),
           "C": (mod.HELDOUT_C_CRISIS, mod.HELDOUT_C_HARD_NEGATIVES), "D": (mod.HELDOUT_D_CRISIS, mod.HELDOUT_D_HARD_NEGATIVES)}
    with open(E.DEV_PROBES_FILE, encoding="utf-8") as f:
        probes = json.load(f)
    out["dev_probes"] = (probes["crisis"], probes["hard_negatives"])
    return out


ISSUE_MISSED = (
    "I gave my guitar and my cat to my friend because I won't be needing them anymore.",
    "I looked up how many of my sleeping tablets it would take.",
    "I can't do this anymore. I have the gun in the drawer.",
    "I took a bunch of paracetamol an hour ago.",
    "I'm standing on the roof right now.",
)



def previous_detector(sets: dict, guard: G.Guard) -> dict:
    """The shipped detector before this guard: CrisisDetector (first 128 tokens, no history) and the reply
    lexicon (encourages_harm), scored for comparison."""
    from therapy_rl.rewards import heads as heads_lib

    detector = S.CrisisDetector(guard.encoder, heads_lib.load_reward_heads(), guard.lexicon, batch_size=32)
    harm = jax.jit(S.encourages_harm)

    def crisis_rate(rows):
        flags = [r.flag for r in detector.detect([row["text"] for row in rows])]
        return {"k": int(sum(flags)), "n": len(flags), "rate": round(float(np.mean(flags)), 4)}

    def harm_rate(rows):
        ids, mask = detector.tokenize([row["text"] for row in rows])
        flags = np.asarray(harm(guard.lexicon, ids, mask))
        return {"k": int(flags.sum()), "n": len(flags), "rate": round(float(flags.mean()), 4)}

    return {"crisis_recall": crisis_rate(sets["crisis"]), "crisis_false_alarms": crisis_rate(sets["hard_negatives"]),
            "reply_recall": harm_rate(sets["harmful_replies"]), "reply_false_alarms": harm_rate(sets["supportive_replies"])}




# ============================================================================ round-2 data


def _variants(text: str, rng: np.random.Generator, count: int = 2) -> list[str]:
    """The text plus casual variants (lowercase, final punctuation dropped or added), distinct."""
    forms = [text, text.lower().rstrip(".!"), text[0].upper() + text[1:] if text else text,
             text.rstrip(".!?") + ("." if rng.random() < 0.5 else "!") if text and text[-1] not in "?" else text]
    out = list(dict.fromkeys(f for f in forms if f))
    return [out[0]] + [out[int(i)] for i in rng.permutation(len(out) - 1)[:count - 1] + 1] if len(out) > 1 else out


def plain_messages(seed: int, files: dict = PLAIN_EXAMPLES) -> list[Message]:
    """Every PLAIN_EXAMPLES file (plain sentences); 20% of each list (stable hash) is development data."""
    out = []
    for index, (tag, path) in enumerate(files.items()):
        out += _plain_file_messages(path, tag, np.random.default_rng(seed + 21 + index), seed)
    return out


def _plain_file_messages(path: str, tag: str, rng, seed: int) -> list[Message]:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    out = []

    def split(text):
        return _stable_split(f"{tag}|" + text, seed, 0.2)

    for cat, texts in spec["user_crisis"].items():
        cat = "suicidal_ideation" if cat == "suicidal_ideation_goodbye" else cat
        for t in texts:
            out += [Message(v, 1, "user", f"{tag}_crisis:{cat}", split(t), (cat,)) for v in _variants(t, rng)]
    for topic, texts in spec["user_negative"].items():
        for t in texts:
            out += [Message(v, 0, "user", f"{tag}_negative:{topic}", split(t)) for v in _variants(t, rng)]
    for item in spec["user_multi_turn"]:
        s = split(item["text"] + "|" + "|".join(item["history"]))
        out.append(Message(item["text"], int(item["crisis"]), "user", f"{tag}_multi_turn", s,
                           tuple(item.get("categories", ())), tuple(item["history"])))
    for cat, texts in spec["reply_harmful"].items():
        for t in texts:
            out += [Message(v, 1, "reply", f"{tag}_harmful:{cat}", split(t), (cat,)) for v in _variants(t, rng)]
    for topic, texts in spec["reply_supportive"].items():
        for t in texts:
            out += [Message(v, 0, "reply", f"{tag}_supportive:{topic}", split(t)) for v in _variants(t, rng)]
    for item in spec["reply_pairs"]:
        out.append(Message(item["reply"], int(item["harmful"]), "reply", f"{tag}_pair", split(item["user"] + item["reply"]),
                           tuple(item.get("categories", ())), (item["user"],)))
    return out


def spent_set_messages(seed: int, sets: dict = SPENT_SETS) -> list[Message]:
    """The spent held-out sets: half of the rows (stable hash of the id) train, half are development data."""
    out = []
    for tag, folder in sets.items():
        out += _spent_folder_messages(seed, tag, folder)
    return out


def _spent_folder_messages(seed: int, tag: str, folder: str) -> list[Message]:
    out = []
    for name, label in (("crisis", 1), ("hard_negatives", 0), ("harmful_replies", 1), ("supportive_replies", 0)):
        for row in read_jsonl(os.path.join(folder, f"{name}.jsonl")):
            history = tuple(t for r, t in row["history"] if (r == "user"))
            split = _stable_split(f"{tag}|" + row["id"], seed, 0.5)
            kind = row.get("kind", "reply")
            out.append(Message(row["text"], label, row["role"], f"{tag}_{name}:{kind}", split,
                               tuple(CATEGORY_ALIASES.get(c, c) for c in row.get("categories", ())) if label else (),
                               history))
    return out


def previous_set_messages(seed: int) -> list[Message]:
    out = []
    for name, (pos, neg) in previous_sets().items():
        for texts, label in ((pos, 1), (neg, 0)):
            for t in texts:
                out.append(Message(t, label, "user", f"previous_{name}", _stable_split("prev|" + t, seed, 0.5),
                                   ("suicidal_ideation",) if label else ()))
    return out


def round1_messages(seed: int, variants: int) -> list[Message]:
    """Round-1 written patterns: fold0 is development data, the other folds train."""
    out = written_messages(seed, variants)
    for m in out:
        m.split = "dev" if m.split == "fold0" else "train"
        m.source = "r1_" + m.source
    return out


DEFAULT_SIZES = {
    "cssrs_posts_per_user": 3, "depression_severity": 250, "goemotions_train": 900, "goemotions_dev": 400,
    "ed_train": 700, "ed_dev": 300, "ed_listener_train": 400, "ed_listener_dev": 150,
    "esconv_user_train": 350, "esconv_user_dev": 150, "esconv_reply_train": 450, "esconv_reply_dev": 200,
    "counselchat_q_train": 120, "counselchat_q_dev": 60, "counselchat_a_train": 150, "counselchat_a_dev": 80,
    "annomi_train": 250, "annomi_dev": 100, "mesc_train": 300, "mesc_dev": 150,
    "hard_words_train": 1200, "hard_words_dev": 300,
}
# Reddit posts labelled by subreddit or by user (sdcnl r/SuicideWatch, C-SSRS users) are too noisy to be window
# positives for a fine-tuned encoder (development recall fell with them in round 2): only the mined crisis
# sentences are used. r/depression posts stay as low-weight negatives.
DATASET_POSITIVE_CAP = {"sdcnl_suicidewatch": 0, "sdcnl_suicidewatch_title": 0, "cssrs_": 0,
                        "sdcnl_depression": 200}


def _weight_of(m: Message, label: int) -> float:
    s = m.source
    if s.startswith("r1_written_issue11"):
        return ISSUE_WEIGHT
    if s.startswith(WRITTEN_PREFIXES):
        return 1.5 if (not label and m.role == "user") else 1.0
    if s.startswith(("sdcnl_suicidewatch", "cssrs_")):
        return 0.3 if label else 0.3
    if s == "sdcnl_mined_sentence":
        return 0.5
    if s == "sdcnl_depression":
        return 0.1
    if s == "dataset_hard_words":
        return 1.0
    return 0.6 if m.role == "user" else 0.8


# ============================================================================ windows


@dataclasses.dataclass
class Row:
    ids: tuple  # [CLS] content [SEP]
    label: int
    weight: float
    role: str
    split: str
    source: str
    categories: tuple = ()


def message_content(m: Message, tokens: Tokens, sep_id: int) -> tuple[list[int], int]:
    """(content ids, start) exactly as guard.Guard builds them: earlier turns (+[SEP] each, last CONTEXT_TOKENS)
    then the message."""
    current = tokens([m.text])[0]
    turns = m.history[-G.CONTEXT_TURNS:] if m.role == "user" else m.history[-1:]
    context: list[int] = []
    for t in turns:
        ids = tokens([t])[0]
        if ids:
            context += ids + [sep_id]
    context = context[-G.CONTEXT_TOKENS:] if current else []
    return context + current, len(context)


def message_rows(m: Message, tokens: Tokens, special, rng, max_negative_windows: int = 3) -> list[Row]:
    cls_id, sep_id, _ = special
    content, start = message_content(m, tokens, sep_id)
    windows = G.host_windows(content, start)
    w = _weight_of(m, m.label)
    if m.label and len(windows) > 1:
        # a long positive: where the crisis is known (round-1 long sets: the end), that window; dataset posts: the
        # first window (noisy); otherwise every window (the positive span is short or unknown)
        if m.source.startswith(("v1_", "s2_")) and m.source.endswith(":long"):
            windows = [windows[-1]]
        elif not m.source.startswith(WRITTEN_PREFIXES):
            windows = windows[:1]
    elif not m.label and len(windows) > max_negative_windows:
        windows = [windows[0]] + _sample(windows[1:], max_negative_windows - 1, rng)
    return [Row((cls_id, *win, sep_id), m.label, w, m.role, m.split, m.source, m.categories if m.label else ())
            for win in windows]


def composite_rows(spans: Sequence[Message], fillers: Sequence[str], tokens: Tokens, special, rng,
                   source: str) -> list[Row]:
    """Long messages: ordinary sentences with a written message at the end (80%) or start. Windows holding the
    whole span take its label; windows that miss it are negatives (sampled); windows cutting it are left out."""
    cls_id, sep_id, _ = special
    rows = []
    size, stride = G.WINDOW_SCALES[0]
    for m in spans:
        span = tokens([m.text])[0]
        filler: list[int] = []
        target = int(rng.integers(40, 220))
        while len(filler) < target:
            filler += tokens([fillers[int(rng.integers(len(fillers)))]])[0]
        before = rng.random() < 0.8
        content = filler + span if before else span + filler
        lo = len(filler) if before else 0
        hi = lo + len(span)
        for win_off in range(0, len(content), stride):
            end = min(win_off + size, len(content))
            if win_off > 0 and win_off - stride + size >= len(content):
                break
            win = content[win_off:end]
            if win_off <= lo and end >= hi:
                rows.append(Row((cls_id, *win, sep_id), m.label, 0.7 * _weight_of(m, m.label), m.role, m.split,
                                f"{source}:{m.source}", m.categories if m.label else ()))
            elif (end <= lo or win_off >= hi) and rng.random() < 0.3:
                rows.append(Row((cls_id, *win, sep_id), 0, 0.5, m.role, m.split, f"{source}:filler"))
    return rows


def build_rows(messages: list[Message], tokens: Tokens, special, seed: int) -> list[Row]:
    rng = np.random.default_rng(seed + 5)
    rows = []
    for m in messages:
        rows += message_rows(m, tokens, special, rng)
    fillers = [m.text for m in messages if m.source in ("goemotions", "empatheticdialogues", "mesc_client")
               and len(m.text.split()) >= 4]
    therapist = [m.text for m in messages if m.source in ("esconv_supporter", "annomi_therapist")]
    for split in ("train", "dev"):
        user_prefixes = tuple(f"{t}_{k}" for t in PLAIN_TAGS for k in ("crisis", "negative")) + (
            "r1_written_crisis", "r1_written_negative", "v1_crisis:short", "v1_hard_negatives:short",
            "s2_crisis:short", "s2_hard_negatives:short", "s3_crisis:short", "s3_hard_negatives:short")
        reply_prefixes = tuple(f"{t}_{k}" for t in PLAIN_TAGS for k in ("harmful", "supportive")) + (
            "r1_written_harmful", "r1_written_supportive")
        for role, pool, prefixes in (("user", fillers, user_prefixes), ("reply", therapist, reply_prefixes)):
            chosen = [m for m in messages if m.split == split and m.role == role and m.source.startswith(prefixes)
                      and not m.history]
            chosen = _sample(chosen, int(len(chosen) * 0.35), rng)
            rows += [r for r in composite_rows(chosen, [f for f in pool if f], tokens, special, rng, "composite")
                     if r.split == split]
    # written replies also appear after a random written user message (the label does not change)
    users = [m.text for m in messages if m.role == "user"
             and m.source.startswith(tuple(f"{t}_" for t in PLAIN_TAGS) + ("r1_written",))]
    extra = []
    for m in messages:
        if m.role == "reply" and not m.history and m.source.startswith(SET_AND_PLAIN_PREFIXES + ("r1_written",)) \
                and rng.random() < 0.5:
            ctx = dataclasses.replace(m, history=(users[int(rng.integers(len(users)))],))
            extra += message_rows(ctx, tokens, special, rng)
    return rows + extra


# ============================================================================ lower-layer cache


STATE_BUCKETS = (16, 24, 32, 48, 64, 98)
MAX_LONG_DATASET_WINDOWS = 500  # training windows of 64+ tokens from dataset text (CPU budget)


def _bucket(n: int) -> int:
    return next(b for b in STATE_BUCKETS if n <= b)


class LowerStates:
    """Frozen lower-layer states of windows ([CLS] content [SEP]), float16, cached by window under cache_dir."""

    def __init__(self, encoder, cache_dir: str, tuned_layers: int, batch_size: int = 64):
        cache_dir = os.path.join(cache_dir, f"tuned{tuned_layers}")  # states below the adapted layers
        self.encoder, self.cache_dir, self.batch_size = encoder, cache_dir, batch_size
        self.tuned_layers = tuned_layers
        os.makedirs(cache_dir, exist_ok=True)
        self.index: dict[bytes, tuple[int, int]] = {}
        self.shards: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        for path in sorted(glob.glob(os.path.join(cache_dir, "lower-*.npz"))):
            with np.load(path, allow_pickle=False) as z:
                keys, states, lengths = z["keys"], z["states"], z["lengths"]
            for i, k in enumerate(keys):
                self.index[k.tobytes()] = (len(self.shards), i)
            self.shards.append(states)
            self.lengths.append(lengths)
        self.fn = jax.jit(G.lower_states, static_argnums=(0, 4))
        self.seconds = 0.0

    @staticmethod
    def key(ids: tuple) -> bytes:
        return hashlib.sha1(np.asarray(ids, np.int32).tobytes()).digest()

    def ensure(self, windows: Sequence[tuple], save_every: int = 4096) -> None:
        missing = list(dict.fromkeys(w for w in windows if self.key(w) not in self.index))
        if missing:
            print(f"[lower] {len(missing)} new windows ({len(self.index)} cached)", flush=True)
        by_bucket: dict[int, list] = {}
        for w in missing:
            by_bucket.setdefault(_bucket(len(w)), []).append(w)
        for b, ws in sorted(by_bucket.items()):
            for lo in range(0, len(ws), save_every):
                self._compute(ws[lo:lo + save_every], b)

    def _compute(self, windows: list[tuple], length: int) -> None:
        start = time.time()
        states = np.zeros((len(windows), length, G.EMBED_DIM), np.float16)
        for lo in range(0, len(windows), self.batch_size):
            chunk = windows[lo:lo + self.batch_size]
            ids = np.zeros((self.batch_size, length), np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for r, w in enumerate(chunk):
                ids[r, :len(w)], mask[r, :len(w)] = w, 1
            x = self.fn(self.encoder.config, self.encoder.params, ids, mask, self.tuned_layers)
            states[lo:lo + len(chunk)] = np.asarray(x, np.float32)[:len(chunk)].astype(np.float16)
        keys = np.stack([np.frombuffer(self.key(w), np.uint8) for w in windows])
        lengths = np.asarray([len(w) for w in windows], np.int32)
        path = os.path.join(self.cache_dir, f"lower-{len(self.shards):05d}.npz")
        np.savez(path, keys=keys, states=states, lengths=lengths)
        for i, k in enumerate(keys):
            self.index[k.tobytes()] = (len(self.shards), i)
        self.shards.append(states)
        self.lengths.append(lengths)
        self.seconds += time.time() - start
        print(f"[lower] {len(windows)} windows of length {length} in {time.time() - start:.0f}s", flush=True)

    def batch(self, windows: Sequence[tuple], length: int) -> tuple[np.ndarray, np.ndarray]:
        """(states [N, length, 384] float16, mask [N, length]) for cached windows."""
        states = np.zeros((len(windows), length, G.EMBED_DIM), np.float16)
        mask = np.zeros((len(windows), length), np.int32)
        for r, w in enumerate(windows):
            shard, i = self.index[self.key(w)]
            n = len(w)
            states[r, :n] = self.shards[shard][i, :n]
            mask[r, :n] = 1
        return states, mask


# ============================================================================ training (JAX)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    head_learning_rate: float = 3e-3
    weight_decay: float = 0.01
    dropout: float = 0.1
    category_weight: float = 0.3
    warmup_steps: int = 100
    tuned_layers: int = G.TUNED_LAYERS  # top MiniLM layers with adapters
    compute_dtype: str = "bfloat16"  # the adapted layers' base matmuls in training (AMX); scoring is float32


def _loss(train_params, frozen, states, mask, y, w, cats, is_reply, rng, config, opts: FitOptions):
    adapter, crisis, reply = train_params
    feats = G.upper_features(config, frozen, adapter, states, mask, opts.compute_dtype)
    dropout, category_weight = opts.dropout, opts.category_weight
    keep = jax.random.bernoulli(rng, 1.0 - dropout, feats.shape)
    feats = jnp.where(keep, feats / (1.0 - dropout), 0.0)
    logits = jnp.where(is_reply[:, None], G.mlp_logits(reply, feats), G.mlp_logits(crisis, feats))
    main = optax.sigmoid_binary_cross_entropy(logits[:, 0], y)
    cat = optax.sigmoid_binary_cross_entropy(logits[:, 1:], cats).mean(-1) * y
    return jnp.sum(w * (main + category_weight * cat)) / jnp.maximum(jnp.sum(w), 1e-6)


def make_step(optimizer, config, opts: FitOptions):
    def step(train_params, opt_state, frozen, states, mask, y, w, cats, is_reply, rng):
        loss, grads = jax.value_and_grad(_loss)(train_params, frozen, states, mask, y, w, cats, is_reply, rng, config,
                                                opts)
        updates, opt_state = optimizer.update(grads, opt_state, train_params)
        return optax.apply_updates(train_params, updates), opt_state, loss

    return jax.jit(step)


def _row_arrays(rows: Sequence[Row], lower: LowerStates, length: int):
    states, mask = lower.batch([r.ids for r in rows], length)
    names = G.CRISIS_CATEGORIES
    cats = np.zeros((len(rows), 6), np.float32)
    for i, r in enumerate(rows):
        names = G.REPLY_CATEGORIES if r.role == "reply" else G.CRISIS_CATEGORIES
        for c in r.categories:
            if c in names:
                cats[i, names.index(c)] = 1.0
    return (states, mask, np.asarray([r.label for r in rows], np.float32),
            np.asarray([r.weight for r in rows], np.float32), cats,
            np.asarray([r.role == "reply" for r in rows], bool))


def batches(rows: Sequence[Row], batch_size: int, rng: np.random.Generator):
    """Shuffled batches of rows of one length bucket each (the last partial batch of a bucket is padded with
    zero-weight rows)."""
    by_bucket: dict[int, list[Row]] = {}
    for r in rows:
        by_bucket.setdefault(_bucket(len(r.ids)), []).append(r)
    out = []
    for b, rs in by_bucket.items():
        order = rng.permutation(len(rs))
        for lo in range(0, len(rs), batch_size):
            chunk = [rs[i] for i in order[lo:lo + batch_size]]
            pad = batch_size - len(chunk)
            if pad:
                chunk = chunk + [dataclasses.replace(chunk[0], weight=0.0)] * pad
            out.append((b, chunk))
    return [out[i] for i in rng.permutation(len(out))]


def fit(rows: list[Row], dev_fn: Callable, encoder, lower: LowerStates, opts: FitOptions, seed: int, log):
    params = G.init_guard_params(jax.random.key(seed), encoder.config, tuned_layers=opts.tuned_layers)
    train_params = (params.adapter, params.crisis, params.reply)
    rng = np.random.default_rng(seed + 7)
    steps_per_epoch = len(batches(rows, opts.batch_size, np.random.default_rng(0)))
    total = steps_per_epoch * opts.epochs

    def schedule(peak):
        return optax.join_schedules([optax.linear_schedule(0.0, peak, opts.warmup_steps),
                                     optax.linear_schedule(peak, peak * 0.05, max(total - opts.warmup_steps, 1))],
                                    [opts.warmup_steps])

    optimizer = optax.multi_transform(
        {"adapter": optax.adamw(schedule(opts.learning_rate), weight_decay=opts.weight_decay),
         "head": optax.adamw(schedule(opts.head_learning_rate), weight_decay=opts.weight_decay)},
        ("adapter", "head", "head"))
    opt_state = optimizer.init(train_params)
    step = make_step(optimizer, encoder.config, opts)
    frozen = {k: encoder.params[k] for k in params.adapter}
    key = jax.random.key(seed + 3)
    history, best = [], None
    for epoch in range(opts.epochs):
        start, losses = time.time(), []
        for i, (length, chunk) in enumerate(batches(rows, opts.batch_size, rng)):
            states, mask, y, w, cats, is_reply = _row_arrays(chunk, lower, length)
            key, sub = jax.random.split(key)
            train_params, opt_state, loss = step(train_params, opt_state, frozen, states, mask, y, w, cats, is_reply,
                                                 sub)
            losses.append(float(loss))
            if i % 200 == 0:
                log(f"[fit] epoch {epoch + 1} step {i}/{steps_per_epoch} loss {np.mean(losses[-200:]):.4f} "
                    f"({time.time() - start:.0f}s)")
        params = params.replace(adapter=train_params[0], crisis=train_params[1], reply=train_params[2])
        score, report = dev_fn(params)
        history.append({"epoch": epoch + 1, "train_loss": round(float(np.mean(losses)), 4), "dev": report,
                        "dev_score": round(score, 4), "seconds": round(time.time() - start)})
        log(f"[fit] epoch {epoch + 1}: loss {np.mean(losses):.4f}, dev score {score:.4f} {json.dumps(report)}")
        if best is None or score > best[0]:
            best = (score, params, epoch + 1)
    return best[1], {"history": history, "best_epoch": best[2]}


# ============================================================================ development scoring


def score_messages(params, messages: Sequence[Message], tokens: Tokens, lower: LowerStates, special, encoder
                   ) -> np.ndarray:
    """Max-window head probability of each message (as guard.check reads it, without the lexicon)."""
    cls_id, sep_id, _ = special
    per_msg, windows = [], []
    for m in messages:
        content, start = message_content(m, tokens, sep_id)
        ws = [(cls_id, *w, sep_id) for w in G.host_windows(content, start)]
        per_msg.append((len(windows), len(ws), m.role))
        windows += ws
    lower.ensure(windows)
    probs = np.zeros((len(windows),), np.float32)
    roles = {}
    for (lo, n, role) in per_msg:
        for j in range(lo, lo + n):
            roles[j] = role
    fn = _feature_fn(encoder.config)
    frozen = {k: encoder.params[k] for k in params.adapter}
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    bs = 64
    for lo in range(0, len(order), bs):
        idx = order[lo:lo + bs]
        length = _bucket(max(len(windows[i]) for i in idx))
        states, mask = lower.batch([windows[i] for i in idx] + [windows[idx[0]]] * (bs - len(idx)), length)
        pc, pr = fn(params, frozen, states, mask)
        for r, i in enumerate(idx):
            probs[i] = float(pr[r] if roles[i] == "reply" else pc[r])
    return np.asarray([probs[lo:lo + n].max() if n else 0.0 for lo, n, _ in per_msg])


@functools.lru_cache(maxsize=None)
def _feature_fn(config):
    def fn(params, frozen, states, mask):
        feats = G.upper_features(config, frozen, params.adapter, states, mask)
        return G.head_probabilities(params.crisis, feats)[0], G.head_probabilities(params.reply, feats)[0]
    return jax.jit(fn)


def recall_at_false_alarms(pos: np.ndarray, neg: np.ndarray, max_fa: float) -> tuple[float, float]:
    """(recall, threshold) at the lowest threshold whose false-alarm rate on neg is <= max_fa."""
    if not len(pos) or not len(neg):
        return 0.0, 0.5
    k = int(math.floor(max_fa * len(neg)))
    s = np.sort(neg)[::-1]
    threshold = float(s[k]) + 1e-6 if k < len(s) else 0.0
    return float(np.mean(pos >= threshold)), threshold


def dev_groups(messages: Sequence[Message]) -> dict[str, list[Message]]:
    """Development messages by group: hand-written (v2, round-1 fold0, spent v1 half, previous sets) and dataset."""
    dev = [m for m in messages if m.split == "dev"]
    written = WRITTEN_PREFIXES
    return {
        "user_pos": [m for m in dev if m.role == "user" and m.label and m.source.startswith(written)],
        "user_neg": [m for m in dev if m.role == "user" and not m.label and m.source.startswith(written)],
        "user_ordinary": [m for m in dev if m.role == "user" and not m.label and not m.source.startswith(written)
                          and m.source != "sdcnl_depression"],
        "reply_pos": [m for m in dev if m.role == "reply" and m.label and m.source.startswith(written)],
        "reply_neg": [m for m in dev if m.role == "reply" and not m.label and m.source.startswith(written)],
        "reply_ordinary": [m for m in dev if m.role == "reply" and not m.label and not m.source.startswith(written)],
    }


# ============================================================================ thresholds


def evidence_arrays(guard: G.Guard, messages: Sequence[Message]) -> dict:
    p, lex, idiom, weak, long = [], [], [], [], []
    for m in messages:
        history = [["user", h] for h in m.history]
        e = guard.evidence(m.text, m.role, history)
        p.append(e["probability"])
        lex.append(bool(e["lexicon"]))
        idiom.append(e["idiom"])
        weak.append(e["weak"])
        long.append(G.is_long_user_message(e, m.role))
    return {"p": np.asarray(p), "lex": np.asarray(lex, bool), "idiom": np.asarray(idiom, bool),
            "weak": np.asarray(weak, bool), "long": np.asarray(long, bool)}


def development_evidence(guard: G.Guard, groups: dict) -> dict:
    """Evidence of every development group through `guard`, plus the sad user negatives (ev["user_sad"])."""
    ev = {name: evidence_arrays(guard, ms) for name, ms in groups.items()}
    ev["user_sad"] = sad_evidence(ev, groups)
    return ev


def long_mask(ev: dict) -> np.ndarray:
    """[N] bool: the evidence rows read under the long-message thresholds (none when ev has no "long")."""
    return ev.get("long", np.zeros(ev["p"].shape, bool))


def flags(ev: dict, t: dict, role: str) -> np.ndarray:
    """Vectorised `guard.decide` (the flag only)."""
    key = "crisis" if role == "user" else "reply"
    long = long_mask(ev) if role == "user" else np.zeros(ev["p"].shape, bool)
    alone = np.where(long, t.get("crisis_long", t[key]), t[key])
    if role == "user":
        alone = np.where(ev["idiom"] & ~ev["lex"], np.maximum(alone, t["crisis_idiom"]), alone)
    support = np.where(long, t.get("crisis_long_lexicon_support", 2.0), t[f"{key}_lexicon_support"])
    out = (ev["p"] >= alone) | (ev["lex"] & (ev["p"] >= support))
    if role == "user":
        out |= ev["weak"] & (ev["p"] >= t["crisis_weak_support"])
    return out


def sad_evidence(ev: dict, groups: dict) -> dict:
    """The user-side development negatives about sadness, low mood, venting or pain (SAD_SOURCE), as evidence."""
    keep = np.asarray([bool(SAD_SOURCE.search(m.source)) for m in groups["user_neg"]], bool)
    return {k: v[keep] for k, v in ev["user_neg"].items()}


def long_negative_evidence(ev: dict) -> dict:
    """The long user development negatives (written and dataset text), as evidence."""
    parts = [ev[name] for name in ("user_neg", "user_ordinary") if name in ev and len(ev[name]["p"])]
    keep = [long_mask(part) for part in parts]
    return {k: np.concatenate([part[k][m] for part, m in zip(parts, keep)]) for k in parts[0]} if parts else {}


def choose_thresholds(ev: dict, role: str, base: dict) -> dict:
    """The setting with the highest development recall whose false alarms stay within MAX_DEV_FALSE_ALARMS on
    hand-written hard negatives, MAX_DEV_SAD_FALSE_ALARMS on their sad subset (ev["user_sad"], when given) and
    MAX_DEV_ORDINARY_FLAGS on dataset text; ties: fewer false alarms. For user messages, a second pass then chooses
    the long messages' own threshold and lexicon support (the rest fixed) under the same bounds plus
    MAX_DEV_LONG_FALSE_ALARMS on long negatives."""
    pos, neg, ordinary = ev[f"{role}_pos"], ev[f"{role}_neg"], ev[f"{role}_ordinary"]
    sad = ev.get("user_sad") if role == "user" else None
    long_neg = long_negative_evidence(ev) if role == "user" else {}

    def allowed(t, long_bound=False):
        if flags(neg, t, role).mean() > MAX_DEV_FALSE_ALARMS:
            return False
        if len(ordinary["p"]) and flags(ordinary, t, role).mean() > MAX_DEV_ORDINARY_FLAGS:
            return False
        if long_bound and long_neg and len(long_neg["p"]) and \
                flags(long_neg, t, role).mean() > MAX_DEV_LONG_FALSE_ALARMS:
            return False
        return sad is None or not len(sad["p"]) or flags(sad, t, role).mean() <= MAX_DEV_SAD_FALSE_ALARMS

    def score(t):
        return (flags(pos, t, role).mean(), -flags(neg, t, role).mean(),
                -(flags(ordinary, t, role).mean() if len(ordinary["p"]) else 0.0), t[key])

    candidates = sorted(set(np.round(np.concatenate([neg["p"], pos["p"]]), 4).tolist()) | {0.5, 0.9, 0.99})
    key = "crisis" if role == "user" else "reply"
    supports = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 2.0)
    best = None
    for alone in candidates:
        for support in supports:
            # long user messages: the same head threshold in this pass, a lexicon support of their own (never
            # below the short one)
            for long_support in ([x for x in supports if x >= support] if role == "user" else (2.0,)):
                for idiom in ((alone, 0.9, 0.97, MAX_IDIOM_THRESHOLD) if role == "user" else (2.0,)):
                    for weak in ((0.3, 0.5, 2.0) if role == "user" else (2.0,)):
                        t = dict(base, **{key: alone, f"{key}_lexicon_support": support})
                        if role == "user":
                            t.update(crisis_idiom=max(idiom, alone), crisis_weak_support=weak, crisis_long=alone,
                                     crisis_long_lexicon_support=long_support)
                        if not allowed(t):
                            continue
                        if best is None or score(t) > best[0]:
                            best = (score(t), t)
    if best is None:
        return dict(base)
    if role == "user":
        best = _choose_long(best[1], pos, long_neg, supports + (0.9, 0.99), allowed, score)
    return {k: float(v) for k, v in best[1].items()}


def _choose_long(chosen: dict, pos: dict, long_neg: dict, supports, allowed, score) -> tuple:
    """The long user messages' threshold and lexicon support: the best development score within every bound,
    the long one included; if none is within it, the setting with the fewest long false alarms."""
    long_p = [pos["p"][long_mask(pos)], long_neg.get("p", np.zeros(0))]
    candidates = sorted(set(np.round(np.concatenate(long_p), 4).tolist()) | {chosen["crisis"], 0.99, 2.0})
    best, fallback = None, None
    for long_alone in candidates:
        for long_support in supports:
            t = dict(chosen, crisis_long=long_alone, crisis_long_lexicon_support=long_support)
            if allowed(t, long_bound=True):
                if best is None or score(t) > best[0]:
                    best = (score(t), t)
            elif long_neg and len(long_neg["p"]):
                key = (-flags(long_neg, t, "user").mean(), score(t))
                if fallback is None or key > fallback[0]:
                    fallback = (key, t)
    return best or (fallback[0][1], fallback[1])


def rate_summary(flagged: Sequence[bool]) -> dict:
    """k of n flagged, the rate and its 95% Wilson interval (rounded for the JSON reports)."""
    k, n = int(np.sum(flagged)), len(flagged)
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": round(k / max(n, 1), 4), "ci95": [round(lo, 4), round(hi, 4)]}


def dev_report(ev: dict, groups: dict, t: dict) -> dict:
    """Development rates per group (and of the sad user negatives when ev holds them), by source, and up to 80
    errors of each written group verbatim."""
    out = {}
    for role in ("user", "reply"):
        for part in ("pos", "neg", "ordinary"):
            name = f"{role}_{part}"
            f = flags(ev[name], t, role)
            out[name] = rate_summary(f)
            by_source: dict[str, list] = {}
            for m, x in zip(groups[name], f):
                by_source.setdefault(m.source.split(":")[0] if part == "ordinary" else m.source, []).append(x)
            out[name]["by_source"] = {s: f"{int(sum(v))}/{len(v)}" for s, v in sorted(by_source.items())}
            if part != "ordinary":
                wrong = [m for m, x in zip(groups[name], f) if bool(x) != (part == "pos")]
                out[name]["errors"] = [{"text": m.text, "history": list(m.history), "source": m.source}
                                       for m in wrong][:80]
    if "user_sad" in ev:
        out["user_neg_sad"] = rate_summary(flags(ev["user_sad"], t, "user"))
    for name in ("user_pos", "user_neg", "user_ordinary"):
        out[f"{name}_long"] = rate_summary(flags(ev[name], t, "user")[long_mask(ev[name])])
    return out


# ============================================================================ held-out scoring


def evaluate_heldout(folder: str, guard: G.Guard, weights_path: str, log: Callable[[str], None]) -> dict:
    """Score the frozen sets once: rates with Wilson intervals, per-category and per-kind tables, every miss and
    false alarm verbatim, latency (one `check` per message after a warm-up pass)."""
    verify_hashes(folder)
    sets = {name: read_jsonl(os.path.join(folder, f"{name}.jsonl"))
            for name in ("crisis", "hard_negatives", "harmful_replies", "supportive_replies")}
    for rows in sets.values():
        for row in rows:
            guard.check(row["text"], row["role"], row["history"])  # compile every bucket before timing
    latency = {}
    for name, rows in sets.items():
        for row in rows:
            start = time.perf_counter()
            r = guard.check(row["text"], row["role"], row["history"])
            ms = (time.perf_counter() - start) * 1000
            row["result"] = r
            latency.setdefault(f"{row['role']}:{row.get('kind', 'reply')}", []).append(ms)

    def flagged(row):
        return row["result"].crisis if row["role"] == "user" else row["result"].harmful

    def rate(rows):
        return rate_summary([flagged(r) for r in rows])

    with open(weights_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    out = {"weights_sha256": digest,
           "crisis_recall": rate(sets["crisis"]), "crisis_false_alarms": rate(sets["hard_negatives"]),
           "reply_recall": rate(sets["harmful_replies"]), "reply_false_alarms": rate(sets["supportive_replies"])}
    per_cat = {}
    for row in sets["crisis"]:
        gold = (row.get("categories") or ["unknown"])[0]
        d = per_cat.setdefault(gold, {"n": 0, "flagged": 0, "primary_category_reported": 0, "reported": {}})
        d["n"] += 1
        d["flagged"] += int(flagged(row))
        if flagged(row):
            d["primary_category_reported"] += int(gold in row["result"].categories)
            for c in row["result"].categories:
                d["reported"][c] = d["reported"].get(c, 0) + 1
    out["crisis_by_category"] = per_cat
    kinds = sorted({r.get("kind", "short") for r in sets["crisis"] + sets["hard_negatives"]})
    out["crisis_by_kind"] = {k: rate([r for r in sets["crisis"] if r.get("kind", "short") == k]) for k in kinds}
    out["negatives_by_kind"] = {k: rate([r for r in sets["hard_negatives"] if r.get("kind", "short") == k])
                                for k in kinds}
    out["negatives_by_topic"] = {t: rate([r for r in sets["hard_negatives"] if r.get("topic") == t])
                                 for t in sorted({str(r.get("topic")) for r in sets["hard_negatives"]})}
    out["reply_by_category"] = {c: rate([r for r in sets["harmful_replies"] if (r.get("categories") or [""])[0] == c])
                                for c in sorted({(r.get("categories") or [""])[0] for r in sets["harmful_replies"]})}
    out["supportive_by_topic"] = {t: rate([r for r in sets["supportive_replies"] if r.get("topic") == t])
                                  for t in sorted({str(r.get("topic")) for r in sets["supportive_replies"]})}
    out["misses"] = [{"id": r["id"], "text": r["text"], "history": r["history"], "categories": r.get("categories"),
                      "score": round(r["result"].score, 4)}
                     for name in ("crisis", "harmful_replies") for r in sets[name] if not flagged(r)]
    out["false_alarms"] = [{"id": r["id"], "text": r["text"], "history": r["history"], "topic": r.get("topic"),
                            "score": round(r["result"].score, 4), "categories": list(r["result"].categories),
                            "reasons": list(r["result"].reasons)}
                           for name in ("hard_negatives", "supportive_replies") for r in sets[name] if flagged(r)]
    out["latency_ms"] = {k: {"n": len(v), "mean": round(float(np.mean(v)), 1), "p50": round(float(np.median(v)), 1),
                             "p95": round(float(np.percentile(v, 95)), 1), "max": round(float(np.max(v)), 1)}
                         for k, v in sorted(latency.items())}
    all_ms = [x for v in latency.values() for x in v]
    out["latency_ms"]["all"] = {"n": len(all_ms), "mean": round(float(np.mean(all_ms)), 1),
                                "p50": round(float(np.median(all_ms)), 1),
                                "p95": round(float(np.percentile(all_ms, 95)), 1)}
    try:
        out["previous_detector"] = previous_detector(sets, guard)
    except Exception as err:  # noqa: BLE001  (comparison only)
        out["previous_detector"] = {"error": repr(err)}
    for rows in sets.values():
        for row in rows:
            row.pop("result", None)
    return out


def markdown_report(r: dict) -> str:
    """REWARDS.md tables from an --eval_heldout report: rates with intervals, per category / kind / topic, every
    miss and false alarm verbatim, latency."""
    def cell(x):
        return f"{x['rate']:.3f} ({x['k']}/{x['n']}) | [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"

    lines = ["| measure | result (k/n) | 95% Wilson interval | target |", "|---|---|---|---|",
             f"| crisis recall | {cell(r['crisis_recall'])} | ≥ 0.95 |",
             f"| crisis false alarms (hard negatives) | {cell(r['crisis_false_alarms'])} | ≤ 0.05 |",
             f"| reply-guard recall | {cell(r['reply_recall'])} | ≥ 0.95 |",
             f"| reply-guard false alarms (supportive replies) | {cell(r['reply_false_alarms'])} | ≤ 0.05 |", ""]
    cats = list(G.CRISIS_CATEGORIES)
    lines += ["| gold primary category | n | flagged | missed | recall | primary category reported | "
              + " | ".join(f"reported `{c}`" for c in cats) + " |", "|" + "---|" * (6 + len(cats))]
    for gold, d in r["crisis_by_category"].items():
        lines.append(f"| {gold} | {d['n']} | {d['flagged']} | {d['n'] - d['flagged']} | {d['flagged'] / max(d['n'], 1):.2f} | "
                     f"{d['primary_category_reported']} | " + " | ".join(str(d["reported"].get(c, 0)) for c in cats) + " |")
    lines += ["", "| kind | crisis recall | 95% CI | hard-negative false alarms | 95% CI |", "|---|---|---|---|---|"]
    for k in r["crisis_by_kind"]:
        a, b = r["crisis_by_kind"][k], r["negatives_by_kind"].get(k, {"rate": 0, "k": 0, "n": 0, "ci95": [0, 0]})
        lines.append(f"| {k} | {a['rate']:.3f} ({a['k']}/{a['n']}) | [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | "
                     f"{b['rate']:.3f} ({b['k']}/{b['n']}) | [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] |")
    lines += ["", "| hard-negative topic | false alarms |", "|---|---|"]
    lines += [f"| {t} | {d['k']}/{d['n']} |" for t, d in r["negatives_by_topic"].items()]
    lines += ["", "| harmful-reply category | caught (k/n) | missed | 95% CI |", "|---|---|---|---|"]
    lines += [f"| {c} | {d['rate']:.2f} ({d['k']}/{d['n']}) | {d['n'] - d['k']} | [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}] |"
              for c, d in r["reply_by_category"].items()]
    if any(t != "None" for t in r.get("supportive_by_topic", {})):
        lines += ["", "| supportive-reply topic | false alarms |", "|---|---|"]
        lines += [f"| {t} | {d['k']}/{d['n']} |" for t, d in r["supportive_by_topic"].items()]
    lines += ["", "| messages | n | mean ms | p50 | p95 | max |", "|---|---|---|---|---|---|"]
    for k, d in r["latency_ms"].items():
        lines.append(f"| {k} | {d['n']} | {d['mean']} | {d['p50']} | {d['p95']} | {d.get('max', '')} |")

    def turn(row):
        hist = " ⟶ ".join(f"[{h[0]}] {h[1]}" if isinstance(h, list) else str(h) for h in row["history"])
        text = row["text"] if len(row["text"]) < 400 else "…" + row["text"][-300:]
        return (f"{hist} ⟶ " if hist else "") + f"\"{text}\""

    lines += ["", "Every miss (crisis rows, then harmful replies; score = the head's max-window probability; long "
              "texts are shown by their last 300 characters):", ""]
    lines += [f"- `{m['id']}` ({', '.join(m.get('categories') or [])}, p={m['score']:.3f}): {turn(m)}"
              for m in r["misses"]]
    lines += ["", "Every false alarm:", ""]
    lines += [f"- `{m['id']}` ({m.get('topic')}, p={m['score']:.3f}, {', '.join(m['categories'])}): {turn(m)}"
              for m in r["false_alarms"]]
    return "\n".join(lines)


# ============================================================================ main


def load_messages(args, encoder, lexicon, log) -> list[Message]:
    messages = round1_messages(args.seed, args.variants) + plain_messages(args.seed)
    messages += spent_set_messages(args.seed) + previous_set_messages(args.seed)
    data = dataset_messages(args.data_dir, args.seed, DEFAULT_SIZES)
    mined = mined_sentences(lexicon, encoder, data)  # from the r/SuicideWatch posts, before they are capped
    rng = np.random.default_rng(args.seed + 13)
    for prefix, cap in DATASET_POSITIVE_CAP.items():
        for split in ("train", "dev"):
            pool = [m for m in data if m.source.startswith(prefix) and m.split == split]
            keep = set(map(id, _sample(pool, cap if split == "train" else cap // 5, rng)))
            data = [m for m in data if not (m.source.startswith(prefix) and m.split == split) or id(m) in keep]
    return messages + data + _sample(mined, 600, rng)


def development_groups(messages: Sequence[Message]) -> dict[str, list[Message]]:
    """dev_groups with the dataset-text groups subsampled (fixed seeds: the same messages every run)."""
    groups = dev_groups(messages)
    groups["user_ordinary"] = _sample(groups["user_ordinary"], 500, np.random.default_rng(1))
    groups["reply_ordinary"] = _sample(groups["reply_ordinary"], 300, np.random.default_rng(2))
    return groups


def select_thresholds(params: G.GuardParams, groups: dict, encoder, lexicon, out: str, log):
    """Development evidence through guard.Guard, the thresholds by choose_thresholds, written into `out`.
    Returns (thresholds, development report, the guard with them)."""
    base = {"crisis": 0.5, "crisis_long": 0.5, "crisis_idiom": 0.9, "crisis_lexicon_support": 2.0,
            "crisis_long_lexicon_support": 2.0,
            "crisis_weak_support": 2.0, "reply": 0.5, "reply_lexicon_support": 2.0, "category": 0.5}
    params = params.replace(thresholds={k: jnp.asarray(v, jnp.float32) for k, v in base.items()})
    guard = G.Guard(encoder=encoder, params=params, lexicon=lexicon)
    log("[dev] evidence of the development messages through guard.Guard ...")
    ev = development_evidence(guard, groups)
    chosen = dict(base)
    for role in ("user", "reply"):
        chosen.update({k: v for k, v in choose_thresholds(ev, role, chosen).items()
                       if k.startswith("crisis" if role == "user" else "reply")})
    log(f"[dev] thresholds {chosen}")
    params = params.replace(thresholds={k: jnp.asarray(v, jnp.float32) for k, v in chosen.items()})
    G.save_guard_params(params, out)
    guard.params = G.load_guard_params(out, encoder.config)
    return chosen, dev_report(ev, groups, chosen), guard


def threshold_metrics(chosen: dict, report: dict, guard: G.Guard) -> dict:
    return {"thresholds": chosen, "inference_dtype": guard.params.compute_dtype,
            "threshold_rule": {"max_dev_false_alarms": MAX_DEV_FALSE_ALARMS,
                               "max_dev_sad_false_alarms": MAX_DEV_SAD_FALSE_ALARMS,
                               "max_dev_ordinary_flags": MAX_DEV_ORDINARY_FLAGS,
                               "max_dev_long_false_alarms": MAX_DEV_LONG_FALSE_ALARMS,
                               "max_idiom_threshold": MAX_IDIOM_THRESHOLD},
            "development": report,
            "issue_missed_messages": [dataclasses.asdict(guard.check(t)) for t in ISSUE_MISSED]}


def command_line(argv: Sequence[str] | None) -> str:
    """This run's command, as the JSON outputs record it."""
    return "python tools/train_guard.py " + " ".join(argv if argv is not None else sys.argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default=os.environ.get("THERAPY_RL_DATA", "/work/shared/data"))
    ap.add_argument("--out", default=G.default_weights_path(), help="guard weights file to write")
    ap.add_argument("--metrics", default=METRICS_FILE, help="training and development numbers (JSON)")
    ap.add_argument("--cache_dir", default="/tmp/therapy_rl_guard_v2_cache", help="lower-layer state cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", type=int, default=4, help="sampled expansions per round-1 pattern")
    ap.add_argument("--epochs", type=int, default=FitOptions.epochs)
    ap.add_argument("--tuned_layers", type=int, default=FitOptions.tuned_layers, help="top MiniLM layers adapted")
    ap.add_argument("--compute_dtype", default=FitOptions.compute_dtype, choices=("float32", "bfloat16"),
                    help="the adapted layers' matmul operands in training")
    ap.add_argument("--inference_dtype", default=None, choices=G.COMPUTE_DTYPES,
                    help="the guard's dense operands at inference, which the thresholds are chosen on (training: "
                         "bfloat16 by default; --thresholds_only: the --out file's own)")
    ap.add_argument("--cache_only", action="store_true", help="build and cache the lower-layer states, then stop")
    ap.add_argument("--thresholds_only", action="store_true",
                    help="keep the --out weights, choose their thresholds again on development data, update --metrics")
    ap.add_argument("--dev_report_only", action="store_true",
                    help="print the development report of the --out weights with their own thresholds, and stop")
    ap.add_argument("--eval_heldout", default=None, help="score a frozen evalsets/ folder with --out weights (once)")
    ap.add_argument("--report", default=None, help="where --eval_heldout writes its JSON (default: next to the set)")
    ap.add_argument("--markdown", default=None, help="print REWARDS.md tables of an --eval_heldout JSON and stop")
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown, encoding="utf-8") as f:
            print(markdown_report(json.load(f)))
        return 0
    log = functools.partial(print, flush=True)
    t0 = time.time()
    encoder = encoder_lib.load_sentence_encoder()
    lexicon = S.build_safety_lexicon(encoder.tokenizer)

    if args.eval_heldout:
        guard = G.Guard(encoder=encoder, params=G.load_guard_params(args.out, encoder.config), lexicon=lexicon)
        report = evaluate_heldout(args.eval_heldout, guard, args.out, log)
        report["command"] = command_line(argv)
        path = args.report or os.path.join(args.eval_heldout, "RESULTS.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        log(json.dumps({k: report[k] for k in ("crisis_recall", "crisis_false_alarms", "reply_recall",
                                                "reply_false_alarms")}, indent=1))
        log(f"wrote {path} in {time.time() - t0:.0f}s")
        return 0

    if args.dev_report_only:
        guard = G.Guard(encoder=encoder, params=G.load_guard_params(args.out, encoder.config), lexicon=lexicon)
        groups = development_groups(load_messages(args, encoder, lexicon, log))
        ev = development_evidence(guard, groups)
        thresholds = {k: float(v) for k, v in guard.params.thresholds.items()}
        report = dev_report(ev, groups, thresholds)
        log(json.dumps({"weights": args.out, "thresholds": thresholds,
                        **{k: {kk: vv for kk, vv in v.items() if kk not in ("errors",)} for k, v in report.items()}},
                       indent=1))
        return 0

    if args.thresholds_only:
        messages = load_messages(args, encoder, lexicon, log)
        params = G.load_guard_params(args.out, encoder.config)
        params = params.replace(compute_dtype=args.inference_dtype or params.compute_dtype)
        chosen, report, guard = select_thresholds(params, development_groups(messages), encoder, lexicon,
                                                  args.out, log)
        with open(args.metrics, encoding="utf-8") as f:
            metrics = json.load(f)
        metrics.update(threshold_metrics(chosen, report, guard))
        metrics["thresholds_command"] = command_line(argv)
        with open(args.metrics, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=1)
        log(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("errors", "by_source")}
                        for k, v in report.items()}, indent=1))
        log(f"wrote the thresholds into {args.out} and {args.metrics} in {time.time() - t0:.0f}s")
        return 0

    tok = encoder.tokenizer
    special = (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), encoder.config.pad_token_id)
    tokens = Tokens(tok)
    log("[data] written examples, the spent set and datasets ...")
    messages = load_messages(args, encoder, lexicon, log)
    counts: dict[str, int] = {}
    for m in messages:
        k = f"{m.split}:{m.role}:{m.label}:{m.source.split(':')[0]}"
        counts[k] = counts.get(k, 0) + 1
    rows = [r for r in build_rows(messages, tokens, special, args.seed) if r.split == "train"]
    # CPU budget: long windows (length bucket 98) from dataset text are subsampled; written and composite ones stay
    rng = np.random.default_rng(args.seed + 17)
    written = WRITTEN_PREFIXES + ("composite",)
    long_data = [i for i, r in enumerate(rows) if _bucket(len(r.ids)) == 98 and not r.source.startswith(written)]
    drop = set(_sample(long_data, max(len(long_data) - MAX_LONG_DATASET_WINDOWS, 0), rng))
    rows = [r for i, r in enumerate(rows) if i not in drop]
    pos = {role: sum(r.weight for r in rows if r.role == role and r.label) for role in ("user", "reply")}
    neg = {role: sum(r.weight for r in rows if r.role == role and not r.label) for role in ("user", "reply")}
    log(f"[data] {len(messages)} messages, {len(rows)} training windows; weight pos {pos} neg {neg} "
        f"({time.time() - t0:.0f}s)")
    lower = LowerStates(encoder, args.cache_dir, args.tuned_layers)
    lower.ensure([r.ids for r in rows])
    groups = development_groups(messages)
    dev_windows = []
    for ms in groups.values():
        for m in ms:
            content, start = message_content(m, tokens, special[1])
            dev_windows += [(special[0], *w, special[1]) for w in G.host_windows(content, start)]
    lower.ensure(dev_windows)
    log(f"[lower] done ({lower.seconds:.0f}s computing, {time.time() - t0:.0f}s total)")
    if args.cache_only:
        return 0

    def dev_fn(params):
        probs = {name: score_messages(params, ms, tokens, lower, special, encoder) for name, ms in groups.items()}
        report = {}
        for role in ("user", "reply"):
            rec, thr = recall_at_false_alarms(probs[f"{role}_pos"], probs[f"{role}_neg"], MAX_DEV_FALSE_ALARMS)
            report[role] = {"recall_at_4pct_fa": round(rec, 4), "threshold": round(thr, 4),
                            "ordinary_flags": round(float(np.mean(probs[f"{role}_ordinary"] >= thr)), 4)}
        return 0.5 * (report["user"]["recall_at_4pct_fa"] + report["reply"]["recall_at_4pct_fa"]), report

    opts = FitOptions(epochs=args.epochs, tuned_layers=args.tuned_layers, compute_dtype=args.compute_dtype)
    params, fit_info = fit(rows, dev_fn, encoder, lower, opts, args.seed, log)
    params = params.replace(compute_dtype=args.inference_dtype or "bfloat16")
    chosen, report, guard = select_thresholds(params, groups, encoder, lexicon, args.out, log)
    metrics = {
        "command": command_line(argv),
        "seed": args.seed, "variants": args.variants, "sizes": DEFAULT_SIZES, "fit_options": dataclasses.asdict(opts),
        "message_counts": dict(sorted(counts.items())), "training_windows": len(rows), "fit": fit_info,
        **threshold_metrics(chosen, report, guard),
        "lower_state_seconds": round(lower.seconds), "total_seconds": round(time.time() - t0),
    }
    with open(args.metrics, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    log(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("errors",)} for k, v in report.items()},
                   indent=1))
    log(f"wrote {args.out} and {args.metrics} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
