"""A learned human reward: a ridge-regression head on MiniLM embeddings, fitted to the store's ratings, so a few
hundred ratings can steer many PPO steps (reward.kind = "learned_human").

    features(reply, user) = [e_reply, e_reply * e_user]     768 values; both L2-normalised all-MiniLM-L6-v2
    target(reply)         = its mean rating score, or 0 when any rater flagged it unsafe
    prediction            = features @ w + b,  w = (Xc'Xc + alpha I)^-1 Xc'yc on centred X, y;  b = mean(y) - mean(X) w

`train_reward_model` holds out a seeded share of the rated replies, picks alpha by k-fold cross-validation
(mean squared error) on the rest, and reports held-out Spearman of the model against two baselines (the reply's
length in words; the training mean, a constant, whose rank correlation is undefined) and the mean absolute error
against the mean predictor. It then refits on every rated reply and writes `reward_model.npz` + `report.json`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from therapy_rl.errors import ConfigError, InputError, MissingFileError

FORMAT_VERSION = 1
MODEL_FILE = "reward_model.npz"
REPORT_FILE = "report.json"
FEATURES = "reply_embedding, reply_embedding * user_embedding"
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
MIN_SAMPLES = 10
MIN_HELDOUT = 3


# ------------------------------------------------------------------------------------------ maths


def features(reply_emb, user_emb, xp=np):
    """[N, 2E]: the reply embedding and its elementwise product with the user-text embedding."""
    return xp.concatenate([reply_emb, reply_emb * user_emb], axis=-1)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); nan when either side is constant."""
    ra, rb = average_ranks(np.asarray(a)), average_ranks(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / denominator) if denominator > 0 else float("nan")


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """(w, b) minimising |y - x w - b|^2 + alpha |w|^2 (the intercept is not penalised)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return w, float(y_mean - x_mean @ w)


def choose_alpha(x: np.ndarray, y: np.ndarray, alphas: Sequence[float], seed: int, max_folds: int = 5) -> float:
    """The alpha with the least k-fold cross-validated mean squared error (folds from a seeded permutation)."""
    folds = np.array_split(np.random.default_rng([seed, 1]).permutation(len(y)), min(max_folds, len(y)))
    best, best_error = alphas[0], math.inf
    for alpha in alphas:
        errors = []
        for held in folds:
            train = np.setdiff1d(np.arange(len(y)), held)
            w, b = fit_ridge(x[train], y[train], alpha)
            errors.append(np.mean((x[held] @ w + b - y[held]) ** 2))
        if float(np.mean(errors)) < best_error:
            best, best_error = alpha, float(np.mean(errors))
    return float(best)


# ------------------------------------------------------------------------------------------ data and training


@dataclasses.dataclass(frozen=True)
class RatedData:
    sample_ids: np.ndarray
    replies: list[str]
    user_texts: list[str]
    targets: np.ndarray  # [N] in [0, 1]
    num_ratings: int


def rated_data(store) -> RatedData:
    """Every rated reply of the store with its target (module docstring)."""
    rows = store.rated_samples()
    targets = [0.0 if any(r.unsafe for r in ratings) else float(np.mean([r.score for r in ratings]))
               for _, ratings in rows]
    return RatedData(np.asarray([s.id for s, _ in rows], np.int64), [s.reply for s, _ in rows],
                     [s.user_text for s, _ in rows], np.asarray(targets, np.float64),
                     sum(len(ratings) for _, ratings in rows))


@dataclasses.dataclass(frozen=True)
class LearnedHead:
    w: np.ndarray  # [2E] float32
    b: float
    alpha: float


def train_reward_model(store, out_dir: str, encoder=None, heldout_fraction: float = 0.2, seed: int = 0,
                       alphas: Sequence[float] = ALPHAS) -> dict[str, Any]:
    """Fits, evaluates and saves the head (module docstring); returns the report (also in out_dir/report.json)."""
    data = rated_data(store)
    n = len(data.targets)
    if n < MIN_SAMPLES:
        raise InputError(f"{store.path}: {n} rated replies; the reward model needs at least {MIN_SAMPLES}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout fraction {heldout_fraction}: must be in (0, 1)")
    if encoder is None:
        from therapy_rl.rewards.encoder import load_sentence_encoder
        encoder = load_sentence_encoder()
    x = features(encoder.embed(data.replies), encoder.embed(data.user_texts)).astype(np.float64)
    y = data.targets
    order = np.random.default_rng([seed, 0]).permutation(n)
    n_held = min(max(MIN_HELDOUT, int(round(heldout_fraction * n))), n - MIN_HELDOUT)
    held, train = order[:n_held], order[n_held:]
    alpha = choose_alpha(x[train], y[train], alphas, seed)
    w, b = fit_ridge(x[train], y[train], alpha)
    predicted = x[held] @ w + b
    lengths = np.asarray([len(data.replies[i].split()) for i in held], np.float64)
    train_mean = float(y[train].mean())
    heldout = {
        "spearman_model": spearman(predicted, y[held]),
        "spearman_length_baseline": spearman(lengths, y[held]),
        "spearman_mean_baseline": None,  # a constant predictor has no rank correlation
        "mae_model": float(np.mean(np.abs(predicted - y[held]))),
        "mae_mean_baseline": float(np.mean(np.abs(train_mean - y[held]))),
    }
    w_all, b_all = fit_ridge(x, y, alpha)
    head = LearnedHead(w_all.astype(np.float32), float(b_all), alpha)
    os.makedirs(out_dir, exist_ok=True)
    save_head(os.path.join(out_dir, MODEL_FILE), head)
    report = {"store": store.path, "num_replies": n, "num_ratings": data.num_ratings, "num_train": int(len(train)),
              "num_heldout": int(n_held), "seed": seed, "alpha": alpha, "features": FEATURES,
              "target_mean": float(y.mean()), "target_std": float(y.std()), "heldout": heldout,
              "model": os.path.join(out_dir, MODEL_FILE)}
    with open(os.path.join(out_dir, REPORT_FILE), "w", encoding="utf-8") as f:
        json.dump(_json_safe(report), f, indent=1)
    return report


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def save_head(path: str, head: LearnedHead) -> None:
    with open(path + ".tmp", "wb") as f:
        np.savez(f, format_version=np.asarray(FORMAT_VERSION, np.int32), w=np.asarray(head.w, np.float32),
                 b=np.asarray(head.b, np.float32), alpha=np.asarray(head.alpha, np.float64),
                 features=np.asarray(FEATURES))
    os.replace(path + ".tmp", path)


def load_head(path: str) -> LearnedHead:
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no learned reward model; fit one with "
                               "`python -m therapy_rl.rate train-rm --workdir W`")
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    for field in ("format_version", "w", "b", "alpha", "features"):
        if field not in data:
            raise InputError(f"{path}: missing field {field!r}")
    if int(data["format_version"]) != FORMAT_VERSION:
        raise InputError(f"{path}: field 'format_version' is {int(data['format_version'])}, expected {FORMAT_VERSION}")
    if str(data["features"]) != FEATURES:
        raise InputError(f"{path}: field 'features' is {str(data['features'])!r}, expected {FEATURES!r}")
    w = np.asarray(data["w"], np.float32)
    if w.ndim != 1 or not np.all(np.isfinite(w)):
        raise InputError(f"{path}: field 'w' must be a finite vector, got shape {w.shape}")
    return LearnedHead(w, float(data["b"]), float(data["alpha"]))


# ------------------------------------------------------------------------------------------ the reward


def _predict(encoder_config, encoder_params, w, b, ids, mask, user_emb):
    import jax.numpy as jnp

    from therapy_rl.rewards.encoder import encode_ids

    _, reply_emb = encode_ids(encoder_config, encoder_params, ids, mask)
    return features(reply_emb, user_emb.astype(reply_emb.dtype), xp=jnp) @ w + b


@functools.lru_cache(maxsize=1)
def predict_jit():
    """The jitted scorer (MiniLM on the reply ids + the head), built on first use."""
    import jax

    return jax.jit(_predict, static_argnums=0)


@dataclasses.dataclass
class LearnedHumanReward:
    """RewardFn: total = scale * predicted rating. Host step: decode the reply and tokenise it for MiniLM (as the
    therapy reward does); the encoder and head run jitted. User texts are embedded once, when registered."""

    head: LearnedHead
    encoder: Any  # rewards.encoder.SentenceEncoder
    decode_fn: Callable[[Sequence[int]], str]
    scale: float = 1.0
    reply_max_length: int = 128
    user_texts: list = dataclasses.field(default_factory=list)
    _user_embedding: Optional[np.ndarray] = None

    def register_samples(self, prompts: Mapping[str, np.ndarray], samples: Sequence[Any]) -> dict[str, np.ndarray]:
        return self.register_prompts(prompts, [s.user_text for s in samples])

    def register_prompts(self, prompts: Mapping[str, np.ndarray], user_texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The prompt arrays plus `rm_user_id` [N] (row i -> user_texts[i]), with those texts embedded."""
        if len(user_texts) != len(prompts["valid"]):
            raise ValueError(f"LearnedHumanReward.register_prompts: {len(user_texts)} texts for "
                             f"{len(prompts['valid'])} rows")
        unique = list(dict.fromkeys(user_texts))
        known = {t: i for i, t in enumerate(self.user_texts)}
        new = [t for t in unique if t not in known]
        if new:
            emb = np.asarray(self.encoder.embed(new), np.float32)
            self._user_embedding = emb if self._user_embedding is None else np.concatenate([self._user_embedding, emb])
            for t in new:
                known[t] = len(self.user_texts)
                self.user_texts.append(t)
        out = dict(prompts)
        out["rm_user_id"] = np.asarray([known[t] for t in user_texts], np.int32)
        return out

    def __call__(self, batch, tokens, response_mask):
        from therapy_rl.rewards.protocol import ProcessRows

        if "rm_user_id" not in batch:
            raise KeyError("LearnedHumanReward: the prompt batch has no `rm_user_id`; call register_prompts first")
        rows = ProcessRows.of(batch["valid"])
        ids, mask = rows.take(tokens), rows.take(response_mask) != 0
        texts = [self.decode_fn(ids[b][mask[b]].tolist()) for b in range(len(ids))]
        minilm_ids, minilm_mask = self.encoder.tokenize(texts, self.reply_max_length)
        user = self._user_embedding[rows.take(batch["rm_user_id"])]
        predicted = np.asarray(predict_jit()(self.encoder.config, self.encoder.params, self.head.w,
                                             np.float32(self.head.b), minilm_ids, minilm_mask, user), np.float32)
        predicted = np.where(rows.take(batch["valid"]) != 0, predicted, 0.0).astype(np.float32)
        return rows.to_global(self.scale * predicted), {"learned_human": rows.to_global(predicted)}


def learned_reward(learned_cfg, tok, encoder=None) -> LearnedHumanReward:
    """reward.kind = learned_human from `config.reward.learned_human` (model_path, scale)."""
    from therapy_rl.data import tokenize

    if not learned_cfg.model_path:
        raise ConfigError("config.reward.learned_human.model_path is empty: point it at the reward_model.npz written "
                          "by `python -m therapy_rl.rate train-rm --workdir W`")
    head = load_head(learned_cfg.model_path)
    if encoder is None:
        from therapy_rl.rewards.encoder import load_sentence_encoder
        encoder = load_sentence_encoder()
    if head.w.shape != (2 * encoder.config.hidden_size,):
        raise InputError(f"{learned_cfg.model_path}: field 'w' has shape {head.w.shape}, the encoder needs "
                         f"({2 * encoder.config.hidden_size},)")
    return LearnedHumanReward(head, encoder, lambda ids: tokenize.decode_reply(tok, ids)[0],
                              scale=float(learned_cfg.scale))
