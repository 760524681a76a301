"""Train the reward heads on frozen MiniLM embeddings and write `weights/heads.npz` + `weights/metrics.json`.

    python -m therapy_rl.rewards.train_heads --data_dir /work/shared/data --out therapy_rl/rewards/weights

Datasets (read each folder's SOURCE.md): epitome/ (empathy), sst2/ (sentiment), goemotions/ + mesc/ (emotion),
sdcnl/ + goemotions/ (crisis), reddit_cssrs/ (user-level crisis check only). Embeddings are cached under
--cache_dir (never in the repo). Every choice (dedup, splits, label mapping, subsampling) is documented in
REWARDS.md and recorded in metrics.json.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from therapy_rl.data.labels import EMOTION_TO_INDEX, EMOTIONS
from therapy_rl.rewards import heads as H
from therapy_rl.rewards import safety as S

csv.field_size_limit(1 << 27)

GOEMOTIONS_DROPPED = ("surprise",)  # Ekman class with no MESC counterpart
CSSRS_LEVELS = ("Supportive", "Indicator", "Ideation", "Behavior", "Attempt")
DEV_PROBES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lexicon", "dev_probes.json")


class DatasetError(ValueError):
    """A dataset file is missing or malformed (names file, line and field)."""


# ============================================================================ options


@dataclasses.dataclass(frozen=True)
class FitOptions:
    hidden_dim: int = 128
    dropout: float = 0.1
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 80
    patience: int = 8  # epochs without a better validation loss before stopping


# ============================================================================ embeddings (host, cached)


class CachedEmbedder:
    """Embeds texts with the project MiniLM encoder (or sentence-transformers) and caches them in `cache_dir`."""

    def __init__(self, kind: str, max_length: int, cache_dir: str, batch_size: int = 64):
        from therapy_rl.rewards.encoder import gt_package_model_dir, load_sentence_encoder

        self.kind, self.max_length, self.cache_dir, self.batch_size = kind, max_length, cache_dir, batch_size
        self.encoder = load_sentence_encoder(max_length=max_length)  # tokenizer + (kind=project) the embedder
        self.seconds = 0.0
        os.makedirs(cache_dir, exist_ok=True)
        if kind == "sentence-transformers":
            import torch
            from sentence_transformers import SentenceTransformer

            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
            self.st_model = SentenceTransformer(str(gt_package_model_dir()), device="cpu")
            self.st_model.max_seq_length = max_length
            self.parity = self._check_parity()
        elif kind != "project":
            raise ValueError(f"--encoder must be 'project' or 'sentence-transformers', got {kind!r}")

    def _raw(self, texts: Sequence[str], kind: str) -> np.ndarray:
        if kind == "project":  # length-sorted batches waste less padding; order restored below
            order = np.argsort([len(t) for t in texts], kind="stable")
            emb = self.encoder.embed([texts[i] for i in order], batch_size=self.batch_size)
            out = np.empty_like(emb)
            out[order] = emb
            return out
        return self.st_model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def _check_parity(self, n: int = 32) -> float:
        probe = ["I can't sleep and everything feels pointless.", "What a lovely day at the beach!",
                 "this exam is killing me", "Tell me more about how that made you feel."] * (n // 4)
        cos = np.sum(self._raw(probe, "project") * self._raw(probe, "sentence-transformers"), axis=-1)
        if cos.min() < 0.9999:
            raise RuntimeError(f"sentence-transformers and the project encoder disagree (min cosine {cos.min():.6f})")
        return float(cos.min())

    def __call__(self, texts: Sequence[str], name: str) -> np.ndarray:
        digest = hashlib.sha1(f"{self.kind}|{self.max_length}|".encode())
        for t in texts:
            digest.update(t.encode("utf-8", "surrogatepass") + b"\x00")
        path = os.path.join(self.cache_dir, f"{name}-{digest.hexdigest()[:16]}.npy")
        if os.path.isfile(path):
            return np.load(path, allow_pickle=False)
        start = time.time()
        print(f"[embed] {name}: {len(texts)} texts with {self.kind} ...", flush=True)
        emb = np.asarray(self._raw(texts, self.kind), np.float32)
        self.seconds += time.time() - start
        print(f"[embed] {name}: done in {time.time() - start:.0f}s", flush=True)
        np.save(path, emb)
        return emb


# ============================================================================ metrics (numpy)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """Accuracy and macro-F1 (mean over classes with support in y_true)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    f1s = []
    for c in range(num_classes):
        if not np.any(y_true == c):
            continue
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"n": int(len(y_true)), "accuracy": float(np.mean(y_true == y_pred)), "macro_f1": float(np.mean(f1s))}


def with_majority_baseline(y_true, y_pred, y_train, num_classes: int) -> dict:
    majority = int(np.bincount(np.asarray(y_train), minlength=num_classes).argmax())
    return {"model": classification_metrics(y_true, y_pred, num_classes),
            "majority_baseline": classification_metrics(y_true, np.full_like(y_true, majority), num_classes),
            "majority_class": majority}


def roc_auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney)."""
    allv = np.concatenate([scores_pos, scores_neg])
    ranks = np.empty(len(allv))
    order = np.argsort(allv, kind="mergesort")
    sorted_v = allv[order]
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ============================================================================ training (JAX)


def _forward(params: Mapping, x: jax.Array, rng: jax.Array | None, dropout: float) -> jax.Array:
    """Head logits with dropout on the hidden layer when `rng` is given (training)."""
    if "w_hidden" in params:
        h = jax.nn.relu(x @ params["w_hidden"] + params["b_hidden"])
        if rng is not None and dropout > 0:
            keep = jax.random.bernoulli(rng, 1.0 - dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - dropout), 0.0)
        return h @ params["w_out"] + params["b_out"]
    return x @ params["w_out"] + params["b_out"]


def _weighted_mean(per_example: jax.Array, weight: jax.Array) -> jax.Array:
    return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1e-9)


def binary_loss(logits: jax.Array, batch: Mapping) -> jax.Array:
    """Per-example sigmoid cross-entropy against a (soft) target in [0, 1]."""
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], batch["target"])


def softmax_loss(logits: jax.Array, batch: Mapping) -> jax.Array:
    """Per-example cross-entropy against soft targets [B, K]; rows with `merge_sad_dep`=1 (GoEmotions) count the
    depression probability toward their sadness target (they never label depression themselves)."""
    log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    sad, dep = EMOTION_TO_INDEX["sadness"], EMOTION_TO_INDEX["depression"]
    if "merge_sad_dep" in batch:
        merged = jnp.where(batch["merge_sad_dep"] > 0, jnp.logaddexp(logits[:, sad], logits[:, dep]), logits[:, sad])
        logits = logits.at[:, sad].set(merged)
    return -jnp.sum(batch["target"] * (logits - log_z), axis=-1)


def empathy_loss(logits: jax.Array, batch: Mapping) -> jax.Array:
    """Sum over the three EPITOME mechanisms of the 3-level cross-entropy against soft targets [B, 3, 3]."""
    logp = jax.nn.log_softmax(logits.reshape(logits.shape[0], 3, 3), axis=-1)
    return -jnp.sum(batch["target"] * logp, axis=(1, 2))


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "dropout"))
def _train_step(params, opt_state, x, batch, rng, *, loss_fn, optimizer, dropout):
    def objective(p):
        return _weighted_mean(loss_fn(_forward(p, x, rng, dropout), batch), batch["weight"])

    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _eval_loss(params, x, batch, *, loss_fn):
    return _weighted_mean(loss_fn(_forward(params, x, None, 0.0), batch), batch["weight"])


@jax.jit
def _logits(params, x):
    return _forward(params, x, None, 0.0)


def predict_logits(params, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    return np.concatenate([np.asarray(_logits(params, jnp.asarray(x[i : i + chunk])))
                           for i in range(0, len(x), chunk)], axis=0) if len(x) else np.zeros((0, 1))


def fit_head(rng: jax.Array, out_dim: int, x_train: np.ndarray, train: Mapping[str, np.ndarray],
             x_val: np.ndarray, val: Mapping[str, np.ndarray], loss_fn: Callable, opts: FitOptions,
             name: str) -> tuple[dict, dict]:
    """Adam(W) on minibatches with early stopping on the validation loss; returns the best params and a log."""
    init_rng, rng = jax.random.split(rng)
    params = H.init_head(init_rng, out_dim, opts.hidden_dim)
    optimizer = optax.adamw(opts.learning_rate, weight_decay=opts.weight_decay)
    opt_state = optimizer.init(params)
    n = len(x_train)
    steps_per_epoch = max(1, n // opts.batch_size)
    shuffle_seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    best = (np.inf, params, -1)
    history = []
    val_j = {k: jnp.asarray(v) for k, v in val.items()}
    x_val_j = jnp.asarray(x_val)
    for epoch in range(opts.max_epochs):
        order = np.random.default_rng([shuffle_seed, epoch]).permutation(n)
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * opts.batch_size : (s + 1) * opts.batch_size]
            batch = {k: jnp.asarray(v[idx]) for k, v in train.items()}
            step_rng = jax.random.fold_in(jax.random.fold_in(rng, epoch), s)
            params, opt_state, loss = _train_step(params, opt_state, jnp.asarray(x_train[idx]), batch, step_rng,
                                                  loss_fn=loss_fn, optimizer=optimizer, dropout=opts.dropout)
            losses.append(float(loss))
        val_loss = float(_eval_loss(params, x_val_j, val_j, loss_fn=loss_fn))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss})
        if val_loss < best[0] - 1e-5:
            best = (val_loss, jax.tree.map(lambda a: a, params), epoch)
        elif epoch - best[2] >= opts.patience:
            break
    print(f"[fit] {name}: best epoch {best[2]} of {len(history)}, val loss {best[0]:.4f}", flush=True)
    return best[1], {"best_epoch": best[2], "epochs_run": len(history), "best_val_loss": best[0],
                     "train_examples": n, "val_examples": len(x_val), **dataclasses.asdict(opts)}


# ============================================================================ dataset readers (host)


def _require(path: str) -> str:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing (see the folder's SOURCE.md)")
    return path


def _read_csv_dicts(path: str, required: Sequence[str]) -> list[tuple[int, dict]]:
    with open(_require(path), encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}:1: header lacks field(s) {missing}")
        return [(reader.line_num, row) for row in reader]


def _norm(text: str) -> str:
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
        for line, row in _read_csv_dicts(path, ("sp_id", "rp_id", "seeker_post", "response_post", "level")):
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
        for other in (("sp", sp), ("rp", rp), ("reply", _norm(ex["reply"])), ("seeker", _norm(ex["seeker"]))):
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
    held = {_norm(t) for t, _ in dev + test}
    train = [(t, y) for t, y in train if t and _norm(t) not in held]
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
    for line, row in _read_csv_dicts(path, ("title", "selftext", "is_suicide")):
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
        for line, row in _read_csv_dicts(os.path.join(folder, name), ("Dialog_ID", "Type", "Actor", "Text")):
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
    for line, row in _read_csv_dicts(path, ("User", "Post", "Label")):
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


# ============================================================================ tasks


def train_sentiment(rng, embed, data_dir, opts, max_train, seed) -> tuple[dict, dict]:
    data = load_sst2(data_dir, max_train, seed)
    xs = {k: embed([t for t, _ in data[k]], f"sst2-{k}") for k in ("train", "val", "test")}
    ys = {k: np.asarray([y for _, y in data[k]], np.int32) for k in ("train", "val", "test")}
    batch = lambda k: {"target": ys[k].astype(np.float32), "weight": np.ones(len(ys[k]), np.float32)}
    params, log = fit_head(rng, 1, xs["train"], batch("train"), xs["val"], batch("val"), binary_loss, opts, "sentiment")
    metrics = {"fit": log, "data": {"train": len(ys["train"]), "train_pool_after_dedup": data["train_pool"],
                                    "val(GLUE dev)": len(ys["val"]), "test": len(ys["test"])}}
    for k in ("val", "test"):
        pred = (predict_logits(params, xs[k])[:, 0] > 0).astype(np.int32)
        metrics[k] = with_majority_baseline(ys[k], pred, ys["train"], 2)
    return params, metrics


def train_empathy(rng, embed, data_dir, opts, seed) -> tuple[dict, dict]:
    data = load_epitome(data_dir, seed)
    x_all = embed(data["texts"], "epitome-replies")
    parts = {name: np.flatnonzero(data["split"] == i) for i, name in enumerate(("train", "val", "test"))}
    batch = lambda idx: {"target": data["target"][idx], "weight": np.ones(len(idx), np.float32)}
    params, log = fit_head(rng, 9, x_all[parts["train"]], batch(parts["train"]), x_all[parts["val"]],
                           batch(parts["val"]), empathy_loss, opts, "empathy")
    metrics = {"fit": log, "data": {k: int(len(v)) for k, v in parts.items()} | {
        k: data[k] for k in ("rows_read", "unique_pairs", "conflicting_pairs", "groups")}}
    hard = np.argmax(data["target"], axis=-1)  # ties -> the lower level
    heads_tmp = H.RewardHeads(empathy=params, sentiment={}, emotion={}, crisis={}, crisis_thresholds={})
    for split in ("val", "test"):
        idx = parts[split]
        level_p = np.asarray(H.empathy_level_probabilities(heads_tmp, jnp.asarray(x_all[idx])))
        out = {}
        for d, mech in enumerate(H.EMPATHY_MECHANISMS):
            out[mech] = with_majority_baseline(hard[idx, d], level_p[:, d].argmax(-1), hard[parts["train"], d], 3)
        total = hard.sum(-1)
        y_bin = (total >= H.EMPATHETIC_MIN_TOTAL).astype(np.int32)
        p_emp = np.asarray(H.empathy_probability(heads_tmp, jnp.asarray(x_all[idx])))
        out["empathetic(total>=2)"] = with_majority_baseline(y_bin[idx], (p_emp >= 0.5).astype(np.int32),
                                                             y_bin[parts["train"]], 2)
        out["empathetic_auc"] = roc_auc(p_emp[y_bin[idx] == 1], p_emp[y_bin[idx] == 0])
        metrics[split] = out
    return params, metrics


def train_emotion(rng, embed, data_dir, opts, max_train, seed) -> tuple[dict, dict]:
    go = goemotions_splits(data_dir, max_train, seed)
    me = {k: load_mesc_clients(data_dir, k) for k in ("train", "val", "test")}
    x_go = {k: embed([t for t, _ in v], f"goemotions-{k}") for k, v in go.items()}
    x_me = {k: embed([t for t, _ in v], f"mesc-client-{k}") for k, v in me.items()}
    eye = np.eye(len(EMOTIONS), dtype=np.float32)

    def merged(go_split, me_split):
        x = np.concatenate([x_go[go_split], x_me[me_split]])
        target = np.concatenate([np.stack([t for _, t in go[go_split]]), eye[[y for _, y in me[me_split]]]])
        flag = np.concatenate([np.ones(len(go[go_split]), np.int32), np.zeros(len(me[me_split]), np.int32)])
        # each corpus gets half of the total weight (MESC is the chat's domain, GoEmotions the eval's)
        w = np.where(flag == 1, 0.5 / len(go[go_split]), 0.5 / len(me[me_split])) * len(flag)
        return x, {"target": target, "merge_sad_dep": flag, "weight": w.astype(np.float32)}

    x_tr, b_tr = merged("train", "train")
    x_va, b_va = merged("dev", "val")
    params, log = fit_head(rng, len(EMOTIONS), x_tr, b_tr, x_va, b_va, softmax_loss, opts, "emotion")
    metrics = {"fit": log, "data": {"goemotions_" + k: len(v) for k, v in go.items()} |
               {"mesc_client_" + k: len(v) for k, v in me.items()}}
    me_train_y = np.asarray([y for _, y in me["train"]])
    for split, go_split in (("val", "dev"), ("test", "test")):
        me_split = split
        y = np.asarray([y for _, y in me[me_split]])
        pred = predict_logits(params, x_me[me_split]).argmax(-1)
        res = {"mesc_client_7way": with_majority_baseline(y, pred, me_train_y, len(EMOTIONS))}
        # GoEmotions: single-label examples only; depression folded into sadness (6 classes, GoEmotions has none)
        targets = np.stack([t for _, t in go[go_split]])
        single = np.flatnonzero(targets.max(-1) == 1.0)
        fold = np.arange(len(EMOTIONS))
        fold[EMOTION_TO_INDEX["depression"]] = EMOTION_TO_INDEX["sadness"]
        y_go = fold[targets[single].argmax(-1)]
        p_go = fold[predict_logits(params, x_go[go_split][single]).argmax(-1)]
        tr_targets = np.stack([t for _, t in go["train"]])
        y_go_train = fold[tr_targets[tr_targets.max(-1) == 1.0].argmax(-1)]
        res["goemotions_ekman_single_label"] = with_majority_baseline(y_go, p_go, y_go_train, len(EMOTIONS))
        metrics[split] = res
    return params, metrics


# Ordinary texts that use crisis words (mostly figuratively): up-weighted negatives ("hard negatives").
HARD_NEGATIVE_WORDS = re.compile(
    r"\b(kill|killing|killed|kills|die|dying|died|dead|death|suicid\w*|murder\w*|shoot|shot|cut|cutting|hurt|"
    r"hurting|hang|hanging|end it|jump|overdos\w*)\b", re.IGNORECASE)


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


def train_crisis(rng, embed, data_dir, opts, max_negatives, depression_weight, hard_negative_weight, seed,
                 lexicon: S.SafetyLexicon | None = None) -> tuple[dict, dict, dict]:
    """Positives: r/SuicideWatch posts (title + body, and the title alone). Negatives: ordinary GoEmotions
    comments (the emotion head's subsample), EmpatheticDialogues speaker turns (first-person everyday emotional
    talk) and MESC client utterances (therapy talk; official split), those with crisis words weighted
    `hard_negative_weight`, plus r/depression posts at `depression_weight` (0 = left out). ED and MESC texts
    that talk about suicide (ED_CRISIS_TEXT) are left out of the negatives. With `lexicon`, sentences of the
    sdcnl posts (train / val split respectively) that carry a strong lexicon hit are added as positives."""
    sd_train = load_sdcnl(data_dir, "training-set.csv")
    sd_test = load_sdcnl(data_dir, "testing-set.csv")
    train_posts = {_norm(p["post"]) for p in sd_train}
    sd_test = [p for p in sd_test if _norm(p["post"]) not in train_posts]  # 9 test posts repeat train posts
    val_mask = split_groups([_norm(p["post"]) for p in sd_train], (0.85, 0.15, 0.0), seed) == 1
    sd = {"train": [p for p, v in zip(sd_train, val_mask) if not v],
          "val": [p for p, v in zip(sd_train, val_mask) if v], "test": sd_test}
    go = {k: [t for t, _ in v] for k, v in goemotions_splits(data_dir, max_negatives, seed).items()}
    ed = empathetic_dialogues_splits(data_dir, {"train": max_negatives // 2, "val": 2000, "test": 2000}, seed)
    mesc_all = {k: [t for t, _ in load_mesc_clients(data_dir, k)] for k in ("train", "val", "test")}
    mesc_keep = {k: np.asarray([not ED_CRISIS_TEXT.search(t) for t in v], bool) for k, v in mesc_all.items()}
    mesc = {k: [t for t, keep in zip(v, mesc_keep[k]) if keep] for k, v in mesc_all.items()}

    x_post = {k: embed([p["post"] for p in v], f"sdcnl-post-{k}") for k, v in sd.items()}
    x_title = {k: embed([p["title"] for p in v], f"sdcnl-title-{k}") for k, v in sd.items()}
    x_go = {k: embed(v, f"goemotions-{k}") for k, v in go.items()}
    x_ed = {k: embed(v, f"ed-{k}") for k, v in ed.items()}
    x_mesc = {k: embed(v, f"mesc-client-{k}")[mesc_keep[k]] for k, v in mesc_all.items()}
    mined = {k: mined_crisis_sentences(lexicon, embed.encoder, sd[k]) if lexicon is not None else []
             for k in ("train", "val")}
    x_mined = {k: embed(v, f"sdcnl-mined-{k}") if v else np.zeros((0, H.EMBED_DIM), np.float32)
               for k, v in mined.items()}

    def assemble(split, go_split):
        lab = np.asarray([p["label"] for p in sd[split]], np.float32)
        ordinary = go[go_split] + ed[split] + mesc[split]
        n_mined = len(mined[split])
        x = np.concatenate([x_post[split], x_title[split], x_mined[split], x_go[go_split], x_ed[split],
                            x_mesc[split]])
        y = np.concatenate([lab, lab, np.ones(n_mined, np.float32), np.zeros(len(ordinary), np.float32)])
        hard_w = hard_negative_weight if split == "train" else 1.0
        source_w = np.concatenate([np.where(lab == 1, 1.0, depression_weight)] * 2 + [np.ones(n_mined)] +
                                  [np.asarray([hard_w if HARD_NEGATIVE_WORDS.search(t) else 1.0 for t in ordinary])])
        pos, neg = y == 1, y == 0
        # positives carry a third of the total weight (they are ~7% of the rows)
        w = np.where(pos, (1 / 3) / max(source_w[pos].sum(), 1), (2 / 3) / max(source_w[neg].sum(), 1)) * source_w
        keep_rows = w > 0
        return x[keep_rows], {"target": y[keep_rows], "weight": (w * keep_rows.sum())[keep_rows].astype(np.float32)}

    x_tr, b_tr = assemble("train", "train")
    x_va, b_va = assemble("val", "dev")
    params, log = fit_head(rng, 1, x_tr, b_tr, x_va, b_va, binary_loss, opts, "crisis")
    prob = lambda x: 1 / (1 + np.exp(-predict_logits(params, x)[:, 0]))
    scores = {
        **{f"sdcnl_{k}_post": prob(x_post[k]) for k in sd}, **{f"sdcnl_{k}_title": prob(x_title[k]) for k in sd},
        **{f"goemotions_{k}": prob(x_go[k]) for k in ("dev", "test")},
        **{f"ed_{k}": prob(x_ed[k]) for k in ("val", "test")},
        **{f"mesc_{k}": prob(x_mesc[k]) for k in ("val", "test")},
    }
    labels = {k: np.asarray([p["label"] for p in v]) for k, v in sd.items()}
    texts = {"sd": sd, "go": go, "ed": ed}
    data = ({f"sdcnl_{k}": len(v) for k, v in sd.items()} | {f"goemotions_{k}": len(v) for k, v in go.items()} |
            {f"empathetic_dialogues_{k}": len(v) for k, v in ed.items()} |
            {f"mesc_client_{k}": len(v) for k, v in mesc.items()} |
            {f"mined_positive_sentences_{k}": len(v) for k, v in mined.items()} |
            {f"mesc_client_{k}_left_out_suicide_talk": int((~v).sum()) for k, v in mesc_keep.items()} |
            {"depression_weight": depression_weight, "hard_negative_weight": hard_negative_weight,
             "hard_negatives_in_train": int(sum(bool(HARD_NEGATIVE_WORDS.search(t))
                                               for t in go["train"] + ed["train"] + mesc["train"]))})
    return params, {"fit": log, "data": data}, {"scores": scores, "labels": labels, "texts": texts}


# ============================================================================ crisis detector evaluation


def pick_threshold(neg_scores: np.ndarray, max_false_alarm: float, floor: float) -> float:
    """Smallest threshold (>= floor) whose false-alarm rate on `neg_scores` is <= max_false_alarm."""
    s = np.sort(neg_scores)[::-1]
    k = int(np.floor(max_false_alarm * len(s)))
    return float(min(max(s[k] + 1e-6, floor), 0.999)) if k < len(s) else floor


class DetectorRunner:
    """Runs safety.crisis_evidence in fixed-size jitted batches over many texts."""

    def __init__(self, encoder, heads, lexicon, max_length: int, batch: int = 256):
        self.encoder, self.heads, self.lexicon, self.max_length, self.batch = encoder, heads, lexicon, max_length, batch
        self.fn = jax.jit(S.crisis_evidence)

    def __call__(self, texts: Sequence[str], emb: np.ndarray) -> dict[str, np.ndarray]:
        outs = []
        for i in range(0, len(texts), self.batch):
            chunk = list(texts[i : i + self.batch])
            pad = self.batch - len(chunk)
            ids, mask = self.encoder.tokenize(chunk + [""] * pad, self.max_length)
            e = np.pad(emb[i : i + len(chunk)], ((0, pad), (0, 0)))
            ev = jax.device_get(self.fn(self.lexicon, self.heads, ids, mask, e))
            outs.append({k: np.asarray(v)[: len(chunk)] for k, v in ev.items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}


def evaluate_crisis(heads, runner: DetectorRunner, embed, data_dir: str, crisis_data: dict, max_posts: int,
                    seed: int) -> dict:
    sd, go, ed = crisis_data["texts"]["sd"], crisis_data["texts"]["go"], crisis_data["texts"]["ed"]
    labels, scores = crisis_data["labels"], crisis_data["scores"]
    t_alone = float(heads.crisis_thresholds["alone"])
    out: dict = {"thresholds": {k: float(v) for k, v in heads.crisis_thresholds.items()}}
    for split in ("val", "test"):
        pos = scores[f"sdcnl_{split}_post"][labels[split] == 1]
        neg_go = scores["goemotions_dev" if split == "val" else "goemotions_test"]
        neg_ed = scores[f"ed_{split}"]
        out[f"head_{split}"] = {
            "auc_suicidewatch_vs_goemotions": roc_auc(pos, neg_go),
            "auc_suicidewatch_vs_depression": roc_auc(pos, scores[f"sdcnl_{split}_post"][labels[split] == 0]),
            "recall_suicidewatch_post@alone": float(np.mean(pos >= t_alone)),
            "recall_suicidewatch_title@alone": float(np.mean(
                scores[f"sdcnl_{split}_title"][labels[split] == 1] >= t_alone)),
            "flag_rate_depression_post@alone": float(np.mean(scores[f"sdcnl_{split}_post"][labels[split] == 0] >= t_alone)),
            "false_alarm_goemotions@alone": float(np.mean(neg_go >= t_alone)),
            "false_alarm_empathetic_dialogues@alone": float(np.mean(neg_ed >= t_alone)),
            "flag_rate_mesc_client@alone": float(np.mean(scores[f"mesc_{split}"] >= t_alone)),
        }
    # full detector (lexicon + head) on the held-out splits
    det = {}
    for split in ("val", "test"):
        posts = [p["post"] for p in sd[split]]
        titles = [p["title"] for p in sd[split]]
        ev_post = runner(posts, embed(posts, f"sdcnl-post-{split}"))
        ev_title = runner(titles, embed(titles, f"sdcnl-title-{split}"))
        go_split = "dev" if split == "val" else "test"
        ev_go = runner(go[go_split], embed(go[go_split], f"goemotions-{go_split}"))
        ev_ed = runner(ed[split], embed(ed[split], f"ed-{split}"))
        lab = labels[split]
        det[split] = {
            "recall_suicidewatch_post": float(np.mean(ev_post["flag"][lab == 1])),
            "recall_suicidewatch_title": float(np.mean(ev_title["flag"][lab == 1])),
            "flag_rate_depression_post": float(np.mean(ev_post["flag"][lab == 0])),
            "flag_rate_depression_title": float(np.mean(ev_title["flag"][lab == 0])),
            "false_alarm_goemotions": float(np.mean(ev_go["flag"])),
            "false_alarm_empathetic_dialogues": float(np.mean(ev_ed["flag"])),
            "ordinary_flagged_by": {
                name: {"strong_lexicon": int(np.sum(ev["strong_categories"].any(-1))),
                       "weak_lexicon+head": int(np.sum(ev["weak_supported"])),
                       "head_alone": int(np.sum(ev["head_alone"]))} for name, ev in (("goemotions", ev_go),
                                                                                  ("empathetic_dialogues", ev_ed))},
        }
    # MESC client utterances (therapy talk; a few are real crisis talk, so this is an upper bound on false alarms)
    for split in ("val", "test"):
        texts = [t for t, _ in load_mesc_clients(data_dir, split)]
        ev = runner(texts, embed(texts, f"mesc-client-{split}"))
        det[split]["flag_rate_mesc_client_utterances"] = float(np.mean(ev["flag"]))
    out["detector"] = det
    # Reddit C-SSRS: a user is flagged when any of their posts is flagged
    users = load_cssrs(data_dir, max_posts)
    flat = [p for u in users for p in u["posts"]]
    owner = np.asarray([i for i, u in enumerate(users) for _ in u["posts"]])
    emb = embed(flat, f"cssrs-posts{max_posts}")
    ev = runner(flat, emb)
    user_flag = np.zeros(len(users), bool)
    user_head = np.zeros(len(users), bool)
    np.logical_or.at(user_flag, owner, ev["flag"] > 0)
    np.logical_or.at(user_head, owner, ev["probability"] >= t_alone)
    levels = np.asarray([u["level"] for u in users])
    out["reddit_cssrs_user_level"] = {
        lvl: {"users": int(np.sum(levels == lvl)), "detector_flag_rate": float(np.mean(user_flag[levels == lvl])),
              "head_alone_flag_rate": float(np.mean(user_head[levels == lvl]))} for lvl in CSSRS_LEVELS
    }
    out["reddit_cssrs_user_level"]["_posts_embedded"] = len(flat)
    out["dev_probes"] = evaluate_probes(runner, embed)
    return out


def evaluate_probes(runner: DetectorRunner, embed) -> dict:
    """The hand-written DEVELOPMENT probes (lexicon/dev_probes.json, used while writing the lexicon)."""
    if not os.path.isfile(DEV_PROBES_FILE):
        return {}
    with open(DEV_PROBES_FILE, encoding="utf-8") as f:
        probes = json.load(f)
    res = {}
    for key in ("crisis", "hard_negatives"):
        texts = probes[key]
        ev = runner(texts, embed(texts, f"probes-{key}"))
        res[key] = {"n": len(texts), "flag_rate": float(np.mean(ev["flag"])),
                    "misses" if key == "crisis" else "false_alarms":
                        [t for t, f in zip(texts, ev["flag"]) if (f == 0) == (key == "crisis")]}
    return res


# ============================================================================ main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", required=True, help="folder with epitome/, sst2/, goemotions/, mesc/, sdcnl/, reddit_cssrs/")
    ap.add_argument("--out", default=H.default_weights_dir(), help="output folder for heads.npz and metrics.json")
    ap.add_argument("--cache_dir", default="/tmp/therapy_rl_head_embeddings", help="embedding cache (outside the repo)")
    ap.add_argument("--encoder", default="project", choices=("project", "sentence-transformers"),
                    help="project = therapy_rl.rewards.encoder (Flax); sentence-transformers = torch, checked to "
                         "agree with the project encoder (cosine >= 0.9999) before use")
    ap.add_argument("--max_length", type=int, default=128, help="MiniLM tokens per text (longer texts are truncated)")
    ap.add_argument("--max_per_task", type=int, default=20000, help="cap on training texts taken from a large corpus")
    ap.add_argument("--cssrs_max_posts", type=int, default=16, help="posts per C-SSRS user that are scored")
    ap.add_argument("--hidden_dim", type=int, default=128)
    ap.add_argument("--crisis_depression_weight", type=float, default=1.0,
                    help="weight of r/depression posts as crisis negatives (0 leaves them out)")
    ap.add_argument("--crisis_hard_negative_weight", type=float, default=3.0,
                    help="weight of ordinary negatives that contain crisis words (killing, die, hang, ...)")
    ap.add_argument("--crisis_mine_sentences", type=int, default=1,
                    help="1: add sdcnl sentences with a strong lexicon hit as crisis positives")
    ap.add_argument("--crisis_max_false_alarm", type=float, default=0.005,
                    help="the head-alone threshold allows this false-alarm rate on ordinary validation text "
                         "(GoEmotions dev + EmpatheticDialogues val + MESC val client utterances)")
    ap.add_argument("--crisis_support_false_alarm", type=float, default=0.05,
                    help="the weak-lexicon support threshold allows this false-alarm rate on the same text")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    start = time.time()
    rng = jax.random.PRNGKey(args.seed)
    opts = FitOptions(hidden_dim=args.hidden_dim)
    embed = CachedEmbedder(args.encoder, args.max_length, args.cache_dir)
    k_emp, k_sent, k_emo, k_cri = jax.random.split(rng, 4)
    metrics: dict = {"command": "python -m therapy_rl.rewards.train_heads " + " ".join(sys.argv[1:] if argv is None else argv),
                     "encoder": args.encoder, "max_length": args.max_length, "max_per_task": args.max_per_task,
                     "seed": args.seed}
    if args.encoder == "sentence-transformers":
        metrics["encoder_parity_min_cosine"] = embed.parity

    empathy, metrics["empathy"] = train_empathy(k_emp, embed, args.data_dir, opts, args.seed)
    sentiment, metrics["sentiment"] = train_sentiment(k_sent, embed, args.data_dir, opts, args.max_per_task, args.seed)
    emotion, metrics["emotion"] = train_emotion(k_emo, embed, args.data_dir, opts, args.max_per_task, args.seed)
    lexicon = S.build_safety_lexicon(embed.encoder.tokenizer)
    crisis, metrics["crisis"], crisis_data = train_crisis(k_cri, embed, args.data_dir, opts, args.max_per_task,
                                                          args.crisis_depression_weight,
                                                          args.crisis_hard_negative_weight, args.seed,
                                                          lexicon if args.crisis_mine_sentences else None)
    ordinary_val = np.concatenate([crisis_data["scores"][k] for k in ("goemotions_dev", "ed_val", "mesc_val")])
    thresholds = {"alone": pick_threshold(ordinary_val, args.crisis_max_false_alarm, floor=0.5),
                  "support": pick_threshold(ordinary_val, args.crisis_support_false_alarm, floor=0.1)}
    heads = H.RewardHeads(empathy=empathy, sentiment=sentiment, emotion=emotion, crisis=crisis,
                          crisis_thresholds={k: jnp.asarray(v, jnp.float32) for k, v in thresholds.items()})
    train_seconds = time.time() - start

    runner = DetectorRunner(embed.encoder, heads, lexicon, args.max_length)
    metrics["crisis"].update(evaluate_crisis(heads, runner, embed, args.data_dir, crisis_data,
                                             args.cssrs_max_posts, args.seed))
    metrics["runtime_seconds"] = {"total": time.time() - start, "embedding": embed.seconds,
                                  "train_and_embed": train_seconds}
    os.makedirs(args.out, exist_ok=True)
    H.save_reward_heads(heads, os.path.join(args.out, H.WEIGHTS_FILE))
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, default=float)
    print(json.dumps({k: metrics[k] for k in ("runtime_seconds",)}, indent=2))
    print(f"wrote {args.out}/{H.WEIGHTS_FILE} and metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
