"""Fitting one reward head on frozen MiniLM embeddings (offline): the embedding cache, the losses, the training
loop with early stopping, and the classification metrics reported in `weights/metrics.json`."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from therapy_rl.data.labels import EMOTION_TO_INDEX
from therapy_rl.rewards import heads as H


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
