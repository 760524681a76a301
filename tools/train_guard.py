"""Train the guard heads of `therapy_rl/guard.py`, pick thresholds on development data, score held-out sets.

    python tools/train_guard.py --data_dir $THERAPY_RL_DATA                 # train -> rewards/weights/guard.npz
    python tools/train_guard.py --eval_heldout evalsets/guard_v1            # score the frozen sets ONCE

Training data (REWARDS.md, "Guard"):
- the project's own written examples, `tools/guard_examples_user.json` and `guard_examples_reply.json`
  (patterns expanded and sampled; whole patterns go to train or dev);
- datasets: sdcnl and reddit_cssrs (crisis positives, noisy), depression_severity, GoEmotions, EmpatheticDialogues,
  ESConv, CounselChat, AnnoMI, MESC (negatives: ordinary, sad and therapy text; supporter turns for replies);
- long messages built from dataset sentences with a written message at the end (windows labelled by span).
Every text is cut into the guard's windows; window embeddings are cached under --cache_dir (never the repo).
Thresholds are chosen by 5-fold cross-validation over whole written patterns (plus the earlier hand-written sets of
tests/test_safety.py and dataset dev text), with the rule in `choose_thresholds`. evalsets/ is read only by
--eval_heldout.
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

from therapy_rl import guard as G  # noqa: E402
from therapy_rl.rewards import encoder as encoder_lib  # noqa: E402
from therapy_rl.rewards import safety as S  # noqa: E402
from therapy_rl.rewards import train_heads as TH  # noqa: E402

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS_DIR)
USER_EXAMPLES = os.path.join(TOOLS_DIR, "guard_examples_user.json")
REPLY_EXAMPLES = os.path.join(TOOLS_DIR, "guard_examples_reply.json")
METRICS_FILE = os.path.join(REPO, "therapy_rl", "rewards", "weights", "guard_metrics.json")
K_FOLDS = 5  # written patterns: out-of-fold predictions choose the thresholds
# Texts about suicide or self-harm are never used as dataset negatives.
CRISIS_TEXT = re.compile(r"suicid|kill(ed|ing)? (my|him|her|them)sel(f|ves)|want(ed)? to die|self.?harm|overdos|"
                         r"end(ing)? (my|it all)|cut(ting)? myself|take my (own )?life|kms", re.IGNORECASE)
# Dataset negatives weigh this many times the written negatives (per split); windows with these words count more.
DATASET_NEGATIVE_SHARE = 0.4
WRITTEN_NEGATIVE_WEIGHT = 3.0  # per written negative user window (a written positive weighs 1)
REPLY_DATASET_NEGATIVE_SHARE = 1.5
ISSUE_WEIGHT = 5.0  # real misses reported in issue 11 count more than one templated variant
HARD_NEGATIVE_FACTOR = 4.0
HARD_WORDS = ("kill", "killing", "die", "dying", "dead", "death", "shoot", "shot", "gun", "cut", "cutting", "jump",
              "bridge", "roof", "pills", "tablets", "overdose", "hang", "hanging", "end", "knife", "blood", "hurt",
              "goodbye", "murder", "stab", "poison", "rope", "suicide", "suicidal", "alive", "disappear", "burden")
HARD_WORD_TEXT = re.compile(r"\b(" + "|".join(HARD_WORDS) + r")\b", re.IGNORECASE)
# Threshold rule targets (development data only).
MAX_DEV_FALSE_ALARMS = 0.05  # hand-written hard negatives (the held-out target)
MAX_DEV_ORDINARY_FLAGS = 0.02  # dataset text (GoEmotions, ED, ESConv, MESC, therapist replies)


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


def _written_messages(seed: int, variants: int) -> list[Message]:
    rng = np.random.default_rng(seed)
    out: list[Message] = []
    with open(USER_EXAMPLES, encoding="utf-8") as f:
        spec = json.load(f)
    macros = spec["macros"]
    for cat, patterns in spec["user_crisis"].items():
        for i, p in enumerate(patterns):
            split = _split_of(f"user_crisis/{cat}/{i}", seed)
            out += [Message(t, 1, "user", f"written_crisis:{cat}", split, (cat,)) for t in sample_pattern(p, macros, rng, variants)]
    for topic, patterns in spec["user_negative"].items():
        for i, p in enumerate(patterns):
            split = _split_of(f"user_negative/{topic}/{i}", seed)
            out += [Message(t, 0, "user", f"written_negative:{topic}", split) for t in sample_pattern(p, macros, rng, variants)]
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
    for cat, patterns in spec["reply_harmful"].items():
        for i, p in enumerate(patterns):
            split = _split_of(f"reply_harmful/{cat}/{i}", seed)
            out += [Message(t, 1, "reply", f"written_harmful:{cat}", split, (cat,)) for t in sample_pattern(p, macros, rng, variants)]
    for topic, patterns in spec["reply_supportive"].items():
        for i, p in enumerate(patterns):
            split = _split_of(f"reply_supportive/{topic}/{i}", seed)
            out += [Message(t, 0, "reply", f"written_supportive:{topic}", split) for t in sample_pattern(p, macros, rng, variants)]
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
    return [row for _, row in TH._read_csv_dicts(path, required)]  # noqa: SLF001


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
            if not t or (label == 0 and CRISIS_TEXT.search(t)):
                continue
            out.append(Message(t, label, role, source, split, categories, history))

    # sdcnl: r/SuicideWatch posts (positives) and r/depression posts (low-weight negatives)
    sd = TH.load_sdcnl(data_dir, "training-set.csv")
    for p in sd:
        split = _stable_split(p["post"], seed)
        if p["label"] == 1:
            add([p["post"]], 1, "user", "sdcnl_suicidewatch", split, ("suicidal_ideation",))
            if len(p["title"].split()) >= 4:
                add([p["title"]], 1, "user", "sdcnl_suicidewatch_title", split, ("suicidal_ideation",))
        else:
            out.append(Message(_clean(p["post"]), 0, "user", "sdcnl_depression", split))
    # Reddit C-SSRS: posts of Ideation / Behavior / Attempt users (user-level labels: noisy positives)
    for u in TH.load_cssrs(data_dir, sizes["cssrs_posts_per_user"]):
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
        texts = [t for t, _ in TH.load_goemotions(data_dir, name)]
        add(_sample(texts, sizes[f"goemotions_{split}"], rng), 0, "user", "goemotions", split)
    # EmpatheticDialogues speaker turns and situations; listener turns as replies
    ed = TH.load_empathetic_dialogues(data_dir, seed)
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
        texts = [t for t, _ in TH.load_mesc_clients(data_dir, name)]
        add(_sample(texts, sizes[f"mesc_{split}"], rng), 0, "user", "mesc_client", split)
        pools[split] += texts
    # every ordinary text that uses a crisis word in passing ("this exam is killing me"): hard negatives
    for split, name in (("train", "train"), ("dev", "dev")):
        pools[split] += [t for t, _ in TH.load_goemotions(data_dir, name)]
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
        for s in TH.mined_crisis_sentences(lexicon, encoder, posts):
            out.append(Message(_clean(s), 1, "user", "sdcnl_mined_sentence", split, ("suicidal_ideation",)))
    return out


# ============================================================================ windows and embeddings


@dataclasses.dataclass
class WindowRow:
    window: tuple  # content ids
    label: int
    weight: float
    source: str
    split: str
    categories: tuple[str, ...] = ()
    user_window: tuple | None = None  # reply head: the answered user message's first window


class WindowEmbedder:
    """Embeds content-id windows ([CLS] w [SEP]) with the project encoder; cached by window under cache_dir."""

    BUCKETS = (16, 32, 64, 128)

    def __init__(self, encoder: encoder_lib.SentenceEncoder, cache_dir: str, batch_size: int = 64):
        self.encoder, self.cache_dir, self.batch_size = encoder, cache_dir, batch_size
        tok = encoder.tokenizer
        self.cls_id, self.sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        os.makedirs(cache_dir, exist_ok=True)
        self.index: dict[bytes, tuple[int, int]] = {}
        self.shards: list[np.ndarray] = []
        for path in sorted(glob.glob(os.path.join(cache_dir, "shard-*.npz"))):
            with np.load(path, allow_pickle=False) as z:
                keys, emb = z["keys"], z["emb"]
            for i, k in enumerate(keys):
                self.index[k.tobytes()] = (len(self.shards), i)
            self.shards.append(emb)
        self.seconds = 0.0

    @staticmethod
    def key(window: tuple) -> bytes:
        return hashlib.sha1(np.asarray(window, np.int32).tobytes()).digest()

    def __call__(self, windows: Sequence[tuple], save_every: int = 4096) -> np.ndarray:
        missing = list(dict.fromkeys(w for w in windows if self.key(w) not in self.index))
        if missing:
            print(f"[embed] {len(missing)} new windows ({len(self.index)} cached)", flush=True)
        for lo in range(0, len(missing), save_every):
            self._embed_and_save(missing[lo:lo + save_every])
        out = np.zeros((len(windows), G.EMBED_DIM), np.float32)
        for i, w in enumerate(windows):
            shard, row = self.index[self.key(w)]
            out[i] = self.shards[shard][row]
        return out

    def _embed_and_save(self, windows: list[tuple]) -> None:
        start = time.time()
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        emb = np.zeros((len(windows), G.EMBED_DIM), np.float32)
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo:lo + self.batch_size]
            longest = max(len(windows[i]) for i in chunk) + 2
            length = next(b for b in self.BUCKETS if longest <= b) if longest <= self.BUCKETS[-1] else longest
            ids = np.zeros((self.batch_size, length), np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for r, i in enumerate(chunk):
                seq = [self.cls_id, *windows[i], self.sep_id]
                ids[r, :len(seq)] = seq
                mask[r, :len(seq)] = 1
            _, e = encoder_lib.encode_ids_jit(self.encoder.config, self.encoder.params, ids, mask)
            emb[chunk] = np.asarray(e)[:len(chunk)]
        keys = np.stack([np.frombuffer(self.key(w), np.uint8) for w in windows])
        path = os.path.join(self.cache_dir, f"shard-{len(self.shards):05d}.npz")
        np.savez(path, keys=keys, emb=emb)
        for i, k in enumerate(keys):
            self.index[k.tobytes()] = (len(self.shards), i)
        self.shards.append(emb)
        self.seconds += time.time() - start
        print(f"[embed] {len(windows)} windows in {time.time() - start:.0f}s -> {path}", flush=True)


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


FIRST_WINDOW = G.WINDOW_SCALES[1][0]  # the reply head's user context: the user message's first 126 tokens


def _user_context_ids(tokens: Tokens, history: Sequence[str]) -> list[int]:
    context: list[int] = []
    for turn in history[-G.CONTEXT_TURNS:]:
        context += tokens([turn])[0]
    return context[-G.CONTEXT_TOKENS:]


def message_windows(m: Message, tokens: Tokens, rng: np.random.Generator, max_negative_windows: int = 3
                    ) -> list[tuple[tuple, int]]:
    """(window, label) rows of one message, as the guard will read it.

    Positives: the window(s) that hold the whole message (short texts), or the first whole-message window of a
    long post; multi-turn positives: the whole-context window. Negatives: every window (at most a few, sampled)."""
    content = tokens([m.text])[0]
    if m.role == "user" and m.history:
        context = _user_context_ids(tokens, m.history)
        full = context + content
        windows = G.host_windows(full, len(context))
        if m.label:
            big = G.WINDOW_SCALES[1][0]
            return [(tuple(full[-big:]), 1)]
        return [(w, 0) for w in _sample(windows, max_negative_windows, rng)]
    if m.label:
        return [(tuple(content[:FIRST_WINDOW]), 1)]
    windows = G.host_windows(content)
    keep = [windows[0]] + _sample(windows[1:], max_negative_windows - 1, rng)
    return [(w, 0) for w in keep]


def composite_rows(positives: Sequence[Message], fillers: Sequence[str], tokens: Tokens, rng: np.random.Generator,
                   role: str, source: str) -> list[tuple[tuple, int, Message]]:
    """Long messages: ordinary sentences, then a written message. Windows holding the whole written span take its
    label; windows that miss it are negatives; windows cutting it are left out."""
    rows = []
    for m in positives:
        span = tokens([m.text])[0]
        filler: list[int] = []
        target = int(rng.integers(20, 140))
        while len(filler) < target:
            filler += tokens([fillers[int(rng.integers(len(fillers)))]])[0]
        before = rng.random() < 0.8  # mostly at the end, sometimes at the start
        content = filler + span if before else span + filler
        lo = len(filler) if before else 0
        hi = lo + len(span)
        for size, stride in G.active_scales(len(content)):
            for k in range(len(content) // stride + 1):
                off = k * stride
                if off >= len(content) or (k > 0 and off - stride + size >= len(content)):
                    break
                end = min(off + size, len(content))
                if off <= lo and end >= hi:
                    rows.append((tuple(content[off:end]), m.label, m))
                elif (end <= lo or off >= hi) and rng.random() < 0.3:
                    rows.append((tuple(content[off:end]), 0, m))
    return rows


# ============================================================================ training (JAX)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    hidden_dim: int = 256
    dropout: float = 0.2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 512
    max_epochs: int = 60
    patience: int = 6
    category_weight: float = 0.5


def _forward(params, x, rng, dropout):
    h = jax.nn.relu(x @ params["w_hidden"] + params["b_hidden"])
    if rng is not None and dropout > 0:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout), 0.0)
    return h @ params["w_out"] + params["b_out"]


def _loss(params, batch, rng, dropout, category_weight):
    logits = _forward(params, batch["x"], rng, dropout)
    main = optax.sigmoid_binary_cross_entropy(logits[:, 0], batch["y"])
    cats = optax.sigmoid_binary_cross_entropy(logits[:, 1:], batch["cats"]).mean(axis=-1) * batch["has_cats"]
    w = batch["w"]
    return jnp.sum(w * (main + category_weight * cats)) / jnp.maximum(jnp.sum(w), 1e-9)


@functools.partial(jax.jit, static_argnames=("optimizer", "dropout", "category_weight"))
def _step(params, opt_state, batch, rng, *, optimizer, dropout, category_weight):
    loss, grads = jax.value_and_grad(_loss)(params, batch, rng, dropout, category_weight)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def fit_head(rng: jax.Array, train: dict, dev: dict, opts: FitOptions, log: Callable[[str], None]) -> tuple[dict, dict]:
    """MLP (in -> hidden -> 1 + 6) with weighted sigmoid losses; early stopping on the dev loss."""
    in_dim = train["x"].shape[1]
    k_init, k_loop = jax.random.split(rng)
    k1, k2 = jax.random.split(k_init)
    params = {"w_hidden": jax.random.normal(k1, (in_dim, opts.hidden_dim)) * np.sqrt(2.0 / in_dim),
              "b_hidden": jnp.zeros((opts.hidden_dim,)),
              "w_out": jax.random.normal(k2, (opts.hidden_dim, 7)) * 0.01,
              "b_out": jnp.zeros((7,))}
    optimizer = optax.adamw(opts.learning_rate, weight_decay=opts.weight_decay)
    opt_state = optimizer.init(params)
    dev_loss_fn = jax.jit(lambda p, b: _loss(p, b, None, 0.0, opts.category_weight))
    n = len(train["y"])
    best, best_params, stale, history = np.inf, params, 0, []
    for epoch in range(opts.max_epochs):
        k_loop, k_perm = jax.random.split(k_loop)
        order = np.asarray(jax.random.permutation(k_perm, n))
        for lo in range(0, n, opts.batch_size):
            idx = order[lo:lo + opts.batch_size]
            pad = opts.batch_size - len(idx)
            batch = {k: np.concatenate([v[idx], np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in train.items()}
            k_loop, k_drop = jax.random.split(k_loop)
            params, opt_state, _ = _step(params, opt_state, batch, k_drop, optimizer=optimizer,
                                         dropout=opts.dropout, category_weight=opts.category_weight)
        dev_loss = float(dev_loss_fn(params, dev))
        history.append(dev_loss)
        if dev_loss < best - 1e-5:
            best, best_params, stale = dev_loss, params, 0
        else:
            stale += 1
            if stale >= opts.patience:
                break
    log(f"  stopped after {len(history)} epochs, best dev loss {best:.4f}")
    return jax.device_get(best_params), {"epochs": len(history), "best_dev_loss": best, "dev_loss": history,
                                         "last_params": jax.device_get(params)}


# ============================================================================ assembling the data


def build_rows(messages: list[Message], tokens: Tokens, seed: int) -> tuple[list[WindowRow], list[WindowRow]]:
    """(user rows, reply rows) with per-source weights (see REWARDS.md for the weighting)."""
    rng = np.random.default_rng(seed + 5)
    user_rows: list[WindowRow] = []
    reply_rows: list[WindowRow] = []
    for m in messages:
        for w, label in message_windows(m, tokens, rng):
            weight = WRITTEN_NEGATIVE_WEIGHT if (not label and m.role == "user" and m.source.startswith("written")) else 1.0
            if m.source.startswith("written_issue11"):
                weight = ISSUE_WEIGHT
            row = WindowRow(w, label, weight, m.source, m.split, m.categories if label else ())
            if m.role == "user":
                user_rows.append(row)
            else:
                row.user_window = tuple(tokens([m.history[-1]])[0][:FIRST_WINDOW]) if m.history else None
                reply_rows.append(row)
    # long messages: ordinary dataset sentences around a written message
    fillers = [m.text for m in messages if m.source in ("goemotions", "empatheticdialogues", "mesc_client")
               and m.split == "train" and len(m.text.split()) >= 4]
    therapist = [m.text for m in messages if m.source in ("esconv_supporter", "annomi_therapist") and m.split == "train"]
    for split in sorted({m.split for m in messages if m.source.startswith("written")}):
        for role, filler_pool, prefix in (("user", fillers, "written_crisis"), ("user", fillers, "written_negative"),
                                          ("reply", therapist, "written_harmful"),
                                          ("reply", therapist, "written_supportive")):
            chosen = [m for m in messages if m.split == split and m.source.startswith(prefix)]
            chosen = _sample(chosen, len(chosen) // 2, rng)
            for w, label, m in composite_rows(chosen, filler_pool, tokens, rng, role, "composite"):
                row = WindowRow(w, label, 0.5 * (WRITTEN_NEGATIVE_WEIGHT if not label and role == "user" else 1.0),
                                f"composite:{m.source}",
                                split, m.categories if label else ())
                (user_rows if role == "user" else reply_rows).append(row)
    # replies also appear with a random user message as context (the label does not change)
    contexts: dict[str, list[Message]] = {}
    for m in messages:
        if m.role == "user" and m.source.startswith(("written_crisis", "written_negative")):
            contexts.setdefault(m.split, []).append(m)
    extra = []
    for r in reply_rows:
        if r.source.startswith(("written_harmful", "written_supportive")) and r.user_window is None:
            pool = contexts[r.split]
            c = pool[int(rng.integers(len(pool)))]
            extra.append(dataclasses.replace(r, user_window=tuple(tokens([c.text])[0][:FIRST_WINDOW])))
    reply_rows += extra
    _weight(user_rows, {"sdcnl_suicidewatch": 0.25, "sdcnl_suicidewatch_title": 0.1, "sdcnl_mined_sentence": 0.25,
                        "cssrs_": 0.15}, {"sdcnl_depression": 0.015, "dataset_hard_words": 0.15, "__datasets__": DATASET_NEGATIVE_SHARE},
            tokens)
    _weight(reply_rows, {}, {"__datasets__": REPLY_DATASET_NEGATIVE_SHARE}, tokens)
    return user_rows, reply_rows


def _weight(rows: list[WindowRow], positive_shares: dict, negative_shares: dict, tokens: Tokens) -> None:
    """Dataset sources get a total weight that is a share of the written examples' total (per split); inside a
    negative dataset, windows with crisis words (HARD_WORDS) count HARD_NEGATIVE_FACTOR times more."""
    hard = set()
    for word in HARD_WORDS:
        hard.update(tokens([word])[0])
    written = ("written", "composite")
    w_pos_all = sum(r.weight for r in rows if r.label and r.source.startswith(written)) or 1.0
    w_neg_all = sum(r.weight for r in rows if not r.label and r.source.startswith(written)) or 1.0
    for split in ("train", "dev"):  # dataset splits; written rows sit in folds and keep their weights
        part = [r for r in rows if r.split == split]
        scale = 1.0 if split == "train" else 1.0 / K_FOLDS
        w_pos, w_neg = w_pos_all * scale, w_neg_all * scale
        for prefix, share in positive_shares.items():
            group = [r for r in part if r.source.startswith(prefix) and r.label]
            for r in group:
                r.weight = share * w_pos / len(group)
        named = [p for p in negative_shares if p != "__datasets__"]
        for prefix in named:
            group = [r for r in part if r.source.startswith(prefix) and not r.label]
            for r in group:
                r.weight = negative_shares[prefix] * w_neg / len(group)
        rest = [r for r in part if not r.label and not r.source.startswith(written)
                and not any(r.source.startswith(p) for p in named)]
        sources = sorted({r.source for r in rest})
        for s in sources:
            group = [r for r in rest if r.source == s]
            boost = [HARD_NEGATIVE_FACTOR if hard.intersection(r.window) else 1.0 for r in group]
            for r, b in zip(group, boost):
                r.weight = negative_shares["__datasets__"] * w_neg / len(sources) * b / sum(boost)


def arrays(rows: list[WindowRow], emb: dict, names: tuple, reply: bool) -> dict:
    x = np.stack([emb[r.window] for r in rows])
    if reply:
        zeros = np.zeros((G.EMBED_DIM,), np.float32)
        ctx = np.stack([emb[r.user_window] if r.user_window is not None else zeros for r in rows])
        x = np.concatenate([x, ctx], axis=1)
    cats = np.zeros((len(rows), len(names)), np.float32)
    has = np.zeros((len(rows),), np.float32)
    for i, r in enumerate(rows):
        known = [names.index(c) for c in r.categories if c in names]
        if r.label and known:
            cats[i, known] = 1.0
            has[i] = 1.0
    return {"x": x.astype(np.float32), "y": np.asarray([r.label for r in rows], np.float32), "cats": cats,
            "has_cats": has, "w": np.asarray([r.weight for r in rows], np.float32)}


# ============================================================================ development scoring


def previous_sets() -> dict[str, tuple[list[str], list[str]]]:
    """The hand-written sets of tests/test_safety.py and lexicon/dev_probes.json (never guard training data)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_safety_sets", os.path.join(REPO, "tests", "test_safety.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = {"A": (mod.HELDOUT_CRISIS, mod.HELDOUT_HARD_NEGATIVES), "B": (mod.HELDOUT_B_CRISIS, mod.HELDOUT_B_HARD_NEGATIVES),
           "C": (mod.HELDOUT_C_CRISIS, mod.HELDOUT_C_HARD_NEGATIVES), "D": (mod.HELDOUT_D_CRISIS, mod.HELDOUT_D_HARD_NEGATIVES)}
    with open(TH.DEV_PROBES_FILE, encoding="utf-8") as f:
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


def dev_items(messages: list[Message], sizes: dict, seed: int) -> list[dict]:
    """Threshold data: every written message (scored out of fold), a sample of dataset dev text ("ordinary"), and
    the earlier hand-written sets (previous_pos / previous_neg)."""
    rng = np.random.default_rng(seed + 7)
    items = []
    for m in messages:
        if m.source.startswith("written"):
            group = "written_" + ("pos" if m.label else "neg")
        elif m.split == "dev" and not m.label and m.source != "sdcnl_depression":
            group = "ordinary"  # noisy subreddit labels never pick thresholds
        else:
            continue
        items.append({"message": m, "group": group})
    ordinary = [i for i in items if i["group"] == "ordinary"]
    keep = {id(i) for i in _sample(ordinary, sizes["dev_ordinary"], rng)}
    items = [i for i in items if i["group"] != "ordinary" or id(i) in keep]
    for name, (pos, neg) in previous_sets().items():
        items += [{"message": Message(t, 1, "user", name, "previous"), "group": "previous_pos"} for t in pos]
        items += [{"message": Message(t, 0, "user", name, "previous"), "group": "previous_neg"} for t in neg]
    for it in items:
        m = it["message"]
        it.update(role=m.role, text=m.text, history=list(m.history), label=m.label, source=m.source, split=m.split)
    return items


def lexicon_evidence(guard: G.Guard, items: list[dict], log: Callable[[str], None]) -> None:
    """item["evidence"]: the lexicon signals of each item (the head probability is filled in later)."""
    start = time.time()
    for i, item in enumerate(items):
        item["evidence"] = guard.evidence(item["text"], item["role"], [("user", h) for h in item["history"]])
        if i and i % 1000 == 0:
            log(f"  lexicon signals {i}/{len(items)} ({time.time() - start:.0f}s)")


def scoring_windows(m: Message, tokens: Tokens) -> tuple[list[tuple], tuple | None]:
    """Every window the guard reads for this message (and, for a reply, the user message's window)."""
    content = tokens([m.text])[0]
    if m.role == "user" and m.history:
        context = _user_context_ids(tokens, m.history)
        return G.host_windows(context + content, len(context)), None
    user_window = tuple(tokens([m.history[-1]])[0][:FIRST_WINDOW]) if m.role == "reply" and m.history else None
    return G.host_windows(content), user_window


def predict_messages(head: dict, messages: Sequence[Message], tokens: Tokens, embedder: "WindowEmbedder",
                     reply: bool) -> np.ndarray:
    """[N] max-window probability of each message, as guard.crisis_scores / reply_harm_scores compute it."""
    if not messages:
        return np.zeros(0)
    parts = [scoring_windows(m, tokens) for m in messages]
    rows, owner, users = [], [], []
    for i, (windows, user_window) in enumerate(parts):
        rows += windows
        owner += [i] * len(windows)
        users += [user_window] * len(windows)
    x = embedder(rows)
    if reply:
        known = [u for u in users if u is not None]
        emb = dict(zip(known, embedder(known))) if known else {}
        zeros = np.zeros((G.EMBED_DIM,), np.float32)
        x = np.concatenate([x, np.stack([emb[u] if u is not None else zeros for u in users])], axis=1)
    p = np.asarray(jax.nn.sigmoid(_forward(head, jnp.asarray(x), None, 0.0)[:, 0]))
    out = np.zeros(len(messages))
    np.maximum.at(out, np.asarray(owner), p)
    return out


def choose_thresholds(items: list[dict], role: str, base: dict) -> tuple[dict, list]:
    """Grid over the head threshold, the lexicon supports and the idiom threshold (the rule of `guard.decide`,
    vectorised). Keep settings with dev false alarms <= MAX_DEV_FALSE_ALARMS on hand-written hard negatives and
    <= MAX_DEV_ORDINARY_FLAGS on dataset text; take the highest recall on hand-written dev positives, then fewer
    false alarms, then the higher head threshold."""
    key = "crisis" if role == "user" else "reply"
    sel = [it for it in items if it["role"] == role]
    p = np.asarray([it["evidence"]["probability"] for it in sel])
    lex = np.asarray([bool(it["evidence"]["lexicon"]) for it in sel])
    idiom = np.asarray([bool(it["evidence"].get("idiom")) for it in sel]) & ~lex
    weak = np.asarray([bool(it["evidence"].get("weak")) for it in sel])
    group = np.asarray([it["group"] for it in sel])
    pos, neg, ordinary = np.char.endswith(group, "_pos"), np.char.endswith(group, "_neg"), group == "ordinary"
    idioms = (None, 0.9, 0.95, 0.98, 2.0) if role == "user" else (None,)
    weaks = (0.3, 0.4, 0.5, 0.6, 0.7, 2.0) if role == "user" else (2.0,)
    grid = []
    for t in np.round(np.arange(0.05, 0.991, 0.01), 3):
        for s in (0.0, 0.05, 0.1, 0.2, 0.3, 2.0):
            for i in idioms:
                for wk in weaks:
                    idiom_t = float(t) if i is None else max(float(t), i)
                    weak_t = min(float(wk), float(t)) if wk < 2 else 2.0
                    alone = np.where(idiom, idiom_t, t)
                    flag = (p >= alone) | (lex & (p >= s)) | (weak & (p >= weak_t))
                    recall, fa = flag[pos].mean(), flag[neg].mean()
                    ordinary_rate = flag[ordinary].mean() if ordinary.any() else 0.0
                    grid.append({"threshold": float(t), "lexicon_support": float(s), "idiom": idiom_t,
                                 "weak_support": weak_t, "recall": float(recall), "false_alarms": float(fa),
                                 "ordinary_flags": float(ordinary_rate),
                                 "ok": bool(fa <= MAX_DEV_FALSE_ALARMS and ordinary_rate <= MAX_DEV_ORDINARY_FLAGS)})
    ok = [g for g in grid if g["ok"]] or sorted(grid, key=lambda g: (g["false_alarms"], -g["recall"]))[:1]
    best = max(ok, key=lambda g: (g["recall"], -g["false_alarms"], g["threshold"], -g["idiom"], g["weak_support"]))
    chosen = {key: best["threshold"], f"{key}_lexicon_support": best["lexicon_support"]}
    if role == "user":
        chosen["crisis_idiom"] = best["idiom"]
        chosen["crisis_weak_support"] = best["weak_support"]
    return chosen, grid


def dev_report(items: list[dict], thresholds: dict) -> dict:
    """Flag rates per group (written: out-of-fold; previous sets per name; ordinary dataset text)."""
    out = {}
    for role in ("user", "reply"):
        per = {}
        for it in items:
            if it["role"] != role:
                continue
            r = G.decide(it["evidence"], role, thresholds)
            flag = r.crisis if role == "user" else r.harmful
            k = f"{it['group']}:{it['source']}" if it["group"].startswith("previous") else it["group"]
            if it["group"].startswith("written") and it["label"]:
                k += ":" + (it["message"].categories[0] if it["message"].categories else it["source"])
            per.setdefault(k, []).append(int(flag))
        out[role] = {k: {"flag_rate": round(float(np.mean(v)), 4), "n": len(v)} for k, v in sorted(per.items())}
    return out


# ============================================================================ held-out scoring (PROTOCOL.md)


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


def evaluate_heldout(folder: str, guard: G.Guard, weights_path: str, log: Callable[[str], None]) -> dict:
    """Score the frozen sets once: rates with Wilson intervals, per-category and per-kind tables, every miss and
    false alarm verbatim, latency. Also the previous detector (safety.CrisisDetector + encourages_harm)."""
    verify_hashes(folder)
    sets = {name: read_jsonl(os.path.join(folder, f"{name}.jsonl"))
            for name in ("crisis", "hard_negatives", "harmful_replies", "supportive_replies")}
    # warm-up: one call per padded length the sets need
    for rows in sets.values():
        for row in rows[:3]:
            guard.check(row["text"], row["role"], row["history"])
    results = {}
    latency = {}
    for name, rows in sets.items():
        for row in rows:
            guard.check(row["text"], row["role"], row["history"])  # compile every bucket before timing
        for row in rows:
            start = time.perf_counter()
            r = guard.check(row["text"], row["role"], row["history"])
            ms = (time.perf_counter() - start) * 1000
            row["result"] = r
            latency.setdefault(f"{row['role']}:{row.get('kind', 'reply')}", []).append(ms)
    def flagged(row):
        return row["result"].crisis if row["role"] == "user" else row["result"].harmful

    def rate(rows):
        k = sum(flagged(r) for r in rows)
        lo, hi = wilson(k, len(rows))
        return {"k": k, "n": len(rows), "rate": round(k / max(len(rows), 1), 4), "ci95": [round(lo, 4), round(hi, 4)]}

    out = {"weights_sha256": hashlib.sha256(open(weights_path, "rb").read()).hexdigest(),
           "crisis_recall": rate(sets["crisis"]), "crisis_false_alarms": rate(sets["hard_negatives"]),
           "reply_recall": rate(sets["harmful_replies"]), "reply_false_alarms": rate(sets["supportive_replies"])}
    per_cat = {}
    for row in sets["crisis"]:
        gold = row["categories"][0]
        d = per_cat.setdefault(gold, {"n": 0, "flagged": 0, "primary_category_reported": 0, "reported": {}})
        d["n"] += 1
        d["flagged"] += int(flagged(row))
        if flagged(row):
            d["primary_category_reported"] += int(gold in row["result"].categories)
            for c in row["result"].categories:
                d["reported"][c] = d["reported"].get(c, 0) + 1
    out["crisis_by_category"] = per_cat
    out["crisis_by_kind"] = {k: rate([r for r in sets["crisis"] if r["kind"] == k]) for k in ("short", "long", "multi_turn")}
    out["negatives_by_kind"] = {k: rate([r for r in sets["hard_negatives"] if r["kind"] == k]) for k in ("short", "long", "multi_turn")}
    out["negatives_by_topic"] = {t: rate([r for r in sets["hard_negatives"] if r["topic"] == t])
                                 for t in sorted({r["topic"] for r in sets["hard_negatives"]})}
    out["reply_by_category"] = {c: rate([r for r in sets["harmful_replies"] if r["categories"][0] == c])
                                for c in G.REPLY_CATEGORIES}
    out["misses"] = [{"id": r["id"], "text": r["text"], "history": r["history"], "score": round(r["result"].score, 4)}
                     for name in ("crisis", "harmful_replies") for r in sets[name] if not flagged(r)]
    out["false_alarms"] = [{"id": r["id"], "text": r["text"], "history": r["history"], "score": round(r["result"].score, 4),
                            "categories": list(r["result"].categories), "reasons": list(r["result"].reasons)}
                           for name in ("hard_negatives", "supportive_replies") for r in sets[name] if flagged(r)]
    out["latency_ms"] = {k: {"n": len(v), "mean": round(float(np.mean(v)), 1), "p50": round(float(np.median(v)), 1),
                             "p95": round(float(np.percentile(v, 95)), 1), "max": round(float(np.max(v)), 1)}
                         for k, v in sorted(latency.items())}
    all_ms = [x for v in latency.values() for x in v]
    out["latency_ms"]["all"] = {"n": len(all_ms), "mean": round(float(np.mean(all_ms)), 1),
                                "p50": round(float(np.median(all_ms)), 1), "p95": round(float(np.percentile(all_ms, 95)), 1)}
    out["previous_detector"] = previous_detector(sets, guard)
    for rows in sets.values():
        for row in rows:
            row.pop("result", None)
    return out


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


# ============================================================================ main


DEFAULT_SIZES = {
    "cssrs_posts_per_user": 8, "depression_severity": 1500, "goemotions_train": 6000, "goemotions_dev": 1200,
    "ed_train": 5000, "ed_dev": 800, "ed_listener_train": 1500, "ed_listener_dev": 300,
    "esconv_user_train": 2000, "esconv_user_dev": 400, "esconv_reply_train": 2000, "esconv_reply_dev": 400,
    "counselchat_q_train": 600, "counselchat_q_dev": 150, "counselchat_a_train": 1200, "counselchat_a_dev": 300,
    "annomi_train": 1000, "annomi_dev": 250, "mesc_train": 1500, "mesc_dev": 300, "dev_ordinary": 1500,
    "hard_words_train": 4000, "hard_words_dev": 500,
}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default=os.environ.get("THERAPY_RL_DATA", "/work/shared/data"))
    ap.add_argument("--out", default=G.default_weights_path(), help="guard weights file to write")
    ap.add_argument("--metrics", default=METRICS_FILE, help="training and development numbers (JSON)")
    ap.add_argument("--cache_dir", default="/tmp/therapy_rl_guard_cache", help="window embedding cache (not the repo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", type=int, default=8, help="sampled expansions per written pattern")
    ap.add_argument("--embed_only", action="store_true", help="build and cache the window embeddings, then stop")
    ap.add_argument("--eval_heldout", default=None, help="score a frozen evalsets/ folder with --out weights (once)")
    ap.add_argument("--dump_dev", default=None, help="write every development item with its evidence (JSON)")
    ap.add_argument("--report", default=None, help="where --eval_heldout writes its JSON (default: next to the set)")
    args = ap.parse_args(argv)
    log = functools.partial(print, flush=True)
    t0 = time.time()
    encoder = encoder_lib.load_sentence_encoder()
    lexicon = S.build_safety_lexicon(encoder.tokenizer)

    if args.eval_heldout:
        guard = G.Guard(encoder=encoder, params=G.load_guard_params(args.out), lexicon=lexicon)
        report = evaluate_heldout(args.eval_heldout, guard, args.out, log)
        path = args.report or os.path.join(args.eval_heldout, "RESULTS.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        log(json.dumps({k: report[k] for k in ("crisis_recall", "crisis_false_alarms", "reply_recall",
                                                "reply_false_alarms")}, indent=1))
        log(f"wrote {path} in {time.time() - t0:.0f}s")
        return 0

    tokens = Tokens(encoder.tokenizer)
    log("[data] written examples and datasets ...")
    messages = written_messages(args.seed, args.variants)
    messages += dataset_messages(args.data_dir, args.seed, DEFAULT_SIZES)
    messages += mined_sentences(lexicon, encoder, messages)
    counts: dict[str, int] = {}
    for m in messages:
        counts[f"{m.split}:{m.role}:{m.source}"] = counts.get(f"{m.split}:{m.role}:{m.source}", 0) + 1
    user_rows, reply_rows = build_rows(messages, tokens, args.seed)
    windows = list(dict.fromkeys([r.window for r in user_rows + reply_rows]
                                 + [r.user_window for r in reply_rows if r.user_window is not None]))
    log(f"[data] {len(messages)} messages, {len(user_rows)} user and {len(reply_rows)} reply window rows, "
        f"{len(windows)} distinct windows ({time.time() - t0:.0f}s)")
    embedder = WindowEmbedder(encoder, args.cache_dir)
    emb_matrix = embedder(windows)
    emb = {w: emb_matrix[i] for i, w in enumerate(windows)}
    log(f"[embed] done ({embedder.seconds:.0f}s embedding, {time.time() - t0:.0f}s total)")
    if args.embed_only:
        return 0

    opts = FitOptions()
    key = jax.random.key(args.seed)
    folds = sorted({m.split for m in messages if m.source.startswith("written")})
    items = dev_items(messages, DEFAULT_SIZES, args.seed)
    base = {"crisis": 0.5, "crisis_idiom": 0.5, "crisis_lexicon_support": 0.0, "crisis_weak_support": 2.0,
            "reply": 0.5, "reply_lexicon_support": 0.0, "category": 0.5}
    heads, fit_info = {}, {}
    for name, rows, names, reply, role in (("crisis", user_rows, G.CRISIS_CATEGORIES, False, "user"),
                                           ("reply", reply_rows, G.REPLY_CATEGORIES, True, "reply")):
        role_items = [it for it in items if it["role"] == role]
        shared = [it for it in role_items if not it["split"].startswith("fold")]
        probability = {id(it): 0.0 for it in role_items}
        epochs = []
        for fold in folds:
            key, sub = jax.random.split(key)
            train = arrays([r for r in rows if r.split not in (fold, "dev")], emb, names, reply)
            dev = arrays([r for r in rows if r.split in (fold, "dev")], emb, names, reply)
            log(f"[fit] {name} without {fold}: {len(train['y'])} rows ({int(train['y'].sum())} positive)")
            head, info = fit_head(sub, train, dev, opts, log)
            epochs.append(int(np.argmin(info["dev_loss"])) + 1)
            held = [it for it in role_items if it["split"] == fold]
            for it, q in zip(held, predict_messages(head, [it["message"] for it in held], tokens, embedder, reply)):
                probability[id(it)] = float(q)
            for it, q in zip(shared, predict_messages(head, [it["message"] for it in shared], tokens, embedder, reply)):
                probability[id(it)] += float(q) / len(folds)
        final_epochs = int(np.median(epochs))
        key, sub = jax.random.split(key)
        train = arrays([r for r in rows if r.split != "dev"], emb, names, reply)
        dev = arrays([r for r in rows if r.split == "dev"], emb, names, reply)
        log(f"[fit] {name} final: {len(train['y'])} rows, {final_epochs} epochs (median of the folds' best)")
        heads[name], info = fit_head(sub, train, dev, dataclasses.replace(opts, max_epochs=final_epochs,
                                                                          patience=final_epochs), log)
        heads[name] = info["last_params"]
        fit_info[name] = {"fold_best_epochs": epochs, "final_epochs": final_epochs}
        for it in role_items:
            it["cv_probability"] = probability[id(it)]
    params = G.GuardParams(crisis={k: jnp.asarray(v) for k, v in heads["crisis"].items()},
                           reply={k: jnp.asarray(v) for k, v in heads["reply"].items()},
                           thresholds={k: jnp.asarray(v, jnp.float32) for k, v in base.items()})
    guard = G.Guard(encoder=encoder, params=params, lexicon=lexicon)
    log("[dev] lexicon signals of the threshold data ...")
    lexicon_evidence(guard, items, log)
    for it in items:
        it["evidence"]["final_probability"] = it["evidence"]["probability"]
        it["evidence"]["probability"] = it["cv_probability"]
    if args.dump_dev:
        with open(args.dump_dev, "w", encoding="utf-8") as f:
            json.dump([{k: (dict(v, categories=v["categories"].tolist()) if k == "evidence" else v)
                        for k, v in it.items() if k != "message"} for it in items], f)
    chosen = dict(base)
    for role in ("user", "reply"):
        picked, _ = choose_thresholds(items, role, chosen)
        chosen.update(picked)
    log(f"[dev] thresholds {chosen}")
    params = params.replace(thresholds={k: jnp.asarray(v, jnp.float32) for k, v in chosen.items()})
    G.save_guard_params(params, args.out)
    guard.params = params
    issue = [dataclasses.asdict(guard.check(t)) for t in ISSUE_MISSED]
    final_previous = [it for it in items if it["group"].startswith("previous")]
    for it in final_previous:
        it["evidence"]["probability"] = it["evidence"]["final_probability"]
    metrics = {
        "command": "python tools/train_guard.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed, "variants": args.variants, "sizes": DEFAULT_SIZES, "fit_options": dataclasses.asdict(opts),
        "message_counts": dict(sorted(counts.items())), "fit": fit_info, "thresholds": chosen,
        "threshold_rule": {"max_dev_false_alarms": MAX_DEV_FALSE_ALARMS, "max_dev_ordinary_flags": MAX_DEV_ORDINARY_FLAGS,
                           "data": "out-of-fold probabilities (written), fold-averaged (previous sets, ordinary)"},
        "cross_validated": dev_report(items, chosen),
        "previous_sets_final_model": dev_report(final_previous, chosen)["user"],
        "issue_missed_messages": issue,
        "embedding_seconds": round(embedder.seconds), "total_seconds": round(time.time() - t0),
    }
    with open(args.metrics, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    log(json.dumps(metrics["cross_validated"], indent=1))
    log(f"wrote {args.out} and {args.metrics} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
