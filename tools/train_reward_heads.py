"""Train the reward heads on frozen MiniLM embeddings and write `weights/heads.npz` + `weights/metrics.json`.

    python tools/train_reward_heads.py --data_dir $THERAPY_RL_DATA --out therapy_rl/rewards/weights

Datasets (read each folder's SOURCE.md; `tools/reward_datasets.py`): epitome/ (empathy), sst2/ (sentiment),
goemotions/ + mesc/ (emotion), sdcnl/ + goemotions/ (crisis), reddit_cssrs/ (user-level crisis check only).
Embeddings are cached under --cache_dir (never in the repo; `tools/head_fitting.py`); the crisis detector is
evaluated by `tools/crisis_evaluation.py`. Every choice (dedup, splits, label mapping, subsampling) is documented in
REWARDS.md and recorded in metrics.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from therapy_rl.data.labels import EMOTION_TO_INDEX, EMOTIONS  # noqa: E402
from therapy_rl.rewards import heads as H  # noqa: E402
from therapy_rl.rewards import safety as S  # noqa: E402
from tools import crisis_evaluation as E  # noqa: E402
from tools import head_fitting as F  # noqa: E402
from tools import reward_datasets as D  # noqa: E402


# ============================================================================ tasks


def train_sentiment(rng, embed, data_dir, opts, max_train, seed) -> tuple[dict, dict]:
    data = D.load_sst2(data_dir, max_train, seed)
    xs = {k: embed([t for t, _ in data[k]], f"sst2-{k}") for k in ("train", "val", "test")}
    ys = {k: np.asarray([y for _, y in data[k]], np.int32) for k in ("train", "val", "test")}
    batch = lambda k: {"target": ys[k].astype(np.float32), "weight": np.ones(len(ys[k]), np.float32)}
    params, log = F.fit_head(rng, 1, xs["train"], batch("train"), xs["val"], batch("val"), F.binary_loss, opts,
                             "sentiment")
    metrics = {"fit": log, "data": {"train": len(ys["train"]), "train_pool_after_dedup": data["train_pool"],
                                    "val(GLUE dev)": len(ys["val"]), "test": len(ys["test"])}}
    for k in ("val", "test"):
        pred = (F.predict_logits(params, xs[k])[:, 0] > 0).astype(np.int32)
        metrics[k] = F.with_majority_baseline(ys[k], pred, ys["train"], 2)
    return params, metrics


def train_empathy(rng, embed, data_dir, opts, seed) -> tuple[dict, dict]:
    data = D.load_epitome(data_dir, seed)
    x_all = embed(data["texts"], "epitome-replies")
    parts = {name: np.flatnonzero(data["split"] == i) for i, name in enumerate(("train", "val", "test"))}
    batch = lambda idx: {"target": data["target"][idx], "weight": np.ones(len(idx), np.float32)}
    params, log = F.fit_head(rng, 9, x_all[parts["train"]], batch(parts["train"]), x_all[parts["val"]],
                           batch(parts["val"]), F.empathy_loss, opts, "empathy")
    metrics = {"fit": log, "data": {k: int(len(v)) for k, v in parts.items()} | {
        k: data[k] for k in ("rows_read", "unique_pairs", "conflicting_pairs", "groups")}}
    hard = np.argmax(data["target"], axis=-1)  # ties -> the lower level
    heads_tmp = H.RewardHeads(empathy=params, sentiment={}, emotion={}, crisis={}, crisis_thresholds={})
    for split in ("val", "test"):
        idx = parts[split]
        level_p = np.asarray(H.empathy_level_probabilities(heads_tmp, jnp.asarray(x_all[idx])))
        out = {}
        for d, mech in enumerate(H.EMPATHY_MECHANISMS):
            out[mech] = F.with_majority_baseline(hard[idx, d], level_p[:, d].argmax(-1), hard[parts["train"], d], 3)
        total = hard.sum(-1)
        y_bin = (total >= H.EMPATHETIC_MIN_TOTAL).astype(np.int32)
        p_emp = np.asarray(H.empathy_probability(heads_tmp, jnp.asarray(x_all[idx])))
        out["empathetic(total>=2)"] = F.with_majority_baseline(y_bin[idx], (p_emp >= 0.5).astype(np.int32),
                                                             y_bin[parts["train"]], 2)
        out["empathetic_auc"] = F.roc_auc(p_emp[y_bin[idx] == 1], p_emp[y_bin[idx] == 0])
        metrics[split] = out
    return params, metrics


def train_emotion(rng, embed, data_dir, opts, max_train, seed) -> tuple[dict, dict]:
    go = D.goemotions_splits(data_dir, max_train, seed)
    me = {k: D.load_mesc_clients(data_dir, k) for k in ("train", "val", "test")}
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
    params, log = F.fit_head(rng, len(EMOTIONS), x_tr, b_tr, x_va, b_va, F.softmax_loss, opts, "emotion")
    metrics = {"fit": log, "data": {"goemotions_" + k: len(v) for k, v in go.items()} |
               {"mesc_client_" + k: len(v) for k, v in me.items()}}
    me_train_y = np.asarray([y for _, y in me["train"]])
    for split, go_split in (("val", "dev"), ("test", "test")):
        me_split = split
        y = np.asarray([y for _, y in me[me_split]])
        pred = F.predict_logits(params, x_me[me_split]).argmax(-1)
        res = {"mesc_client_7way": F.with_majority_baseline(y, pred, me_train_y, len(EMOTIONS))}
        # GoEmotions: single-label examples only; depression folded into sadness (6 classes, GoEmotions has none)
        targets = np.stack([t for _, t in go[go_split]])
        single = np.flatnonzero(targets.max(-1) == 1.0)
        fold = np.arange(len(EMOTIONS))
        fold[EMOTION_TO_INDEX["depression"]] = EMOTION_TO_INDEX["sadness"]
        y_go = fold[targets[single].argmax(-1)]
        p_go = fold[F.predict_logits(params, x_go[go_split][single]).argmax(-1)]
        tr_targets = np.stack([t for _, t in go["train"]])
        y_go_train = fold[tr_targets[tr_targets.max(-1) == 1.0].argmax(-1)]
        res["goemotions_ekman_single_label"] = F.with_majority_baseline(y_go, p_go, y_go_train, len(EMOTIONS))
        metrics[split] = res
    return params, metrics


# Ordinary texts that use crisis words (mostly figuratively): up-weighted negatives ("hard negatives").
HARD_NEGATIVE_WORDS = re.compile(
    r"\b(kill|killing|killed|kills|die|dying|died|dead|death|suicid\w*|murder\w*|shoot|shot|cut|cutting|hurt|"
    r"hurting|hang|hanging|end it|jump|overdos\w*)\b", re.IGNORECASE)


def train_crisis(rng, embed, data_dir, opts, max_negatives, depression_weight, hard_negative_weight, seed,
                 lexicon: S.SafetyLexicon | None = None) -> tuple[dict, dict, dict]:
    """Positives: r/SuicideWatch posts (title + body, and the title alone). Negatives: ordinary GoEmotions
    comments (the emotion head's subsample), EmpatheticDialogues speaker turns (first-person everyday emotional
    talk) and MESC client utterances (therapy talk; official split), those with crisis words weighted
    `hard_negative_weight`, plus r/depression posts at `depression_weight` (0 = left out). ED and MESC texts
    that talk about suicide (ED_CRISIS_TEXT) are left out of the negatives. With `lexicon`, sentences of the
    sdcnl posts (train / val split respectively) that carry a strong lexicon hit are added as positives."""
    sd_train = D.load_sdcnl(data_dir, "training-set.csv")
    sd_test = D.load_sdcnl(data_dir, "testing-set.csv")
    train_posts = {D.normalise_text(p["post"]) for p in sd_train}
    sd_test = [p for p in sd_test if D.normalise_text(p["post"]) not in train_posts]  # 9 test posts repeat train posts
    val_mask = D.split_groups([D.normalise_text(p["post"]) for p in sd_train], (0.85, 0.15, 0.0), seed) == 1
    sd = {"train": [p for p, v in zip(sd_train, val_mask) if not v],
          "val": [p for p, v in zip(sd_train, val_mask) if v], "test": sd_test}
    go = {k: [t for t, _ in v] for k, v in D.goemotions_splits(data_dir, max_negatives, seed).items()}
    ed = D.empathetic_dialogues_splits(data_dir, {"train": max_negatives // 2, "val": 2000, "test": 2000}, seed)
    mesc_all = {k: [t for t, _ in D.load_mesc_clients(data_dir, k)] for k in ("train", "val", "test")}
    mesc_keep = {k: np.asarray([not D.ED_CRISIS_TEXT.search(t) for t in v], bool) for k, v in mesc_all.items()}
    mesc = {k: [t for t, keep in zip(v, mesc_keep[k]) if keep] for k, v in mesc_all.items()}

    x_post = {k: embed([p["post"] for p in v], f"sdcnl-post-{k}") for k, v in sd.items()}
    x_title = {k: embed([p["title"] for p in v], f"sdcnl-title-{k}") for k, v in sd.items()}
    x_go = {k: embed(v, f"goemotions-{k}") for k, v in go.items()}
    x_ed = {k: embed(v, f"ed-{k}") for k, v in ed.items()}
    x_mesc = {k: embed(v, f"mesc-client-{k}")[mesc_keep[k]] for k, v in mesc_all.items()}
    mined = {k: D.mined_crisis_sentences(lexicon, embed.encoder, sd[k]) if lexicon is not None else []
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
    params, log = F.fit_head(rng, 1, x_tr, b_tr, x_va, b_va, F.binary_loss, opts, "crisis")
    prob = lambda x: 1 / (1 + np.exp(-F.predict_logits(params, x)[:, 0]))
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
    opts = F.FitOptions(hidden_dim=args.hidden_dim)
    embed = F.CachedEmbedder(args.encoder, args.max_length, args.cache_dir)
    k_emp, k_sent, k_emo, k_cri = jax.random.split(rng, 4)
    command = "python tools/train_reward_heads.py " + " ".join(sys.argv[1:] if argv is None else argv)
    metrics: dict = {"command": command,
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
    thresholds = {"alone": E.pick_threshold(ordinary_val, args.crisis_max_false_alarm, floor=0.5),
                  "support": E.pick_threshold(ordinary_val, args.crisis_support_false_alarm, floor=0.1)}
    heads = H.RewardHeads(empathy=empathy, sentiment=sentiment, emotion=emotion, crisis=crisis,
                          crisis_thresholds={k: jnp.asarray(v, jnp.float32) for k, v in thresholds.items()})
    train_seconds = time.time() - start

    runner = E.DetectorRunner(embed.encoder, heads, lexicon, args.max_length)
    metrics["crisis"].update(E.evaluate_crisis(heads, runner, embed, args.data_dir, crisis_data,
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
