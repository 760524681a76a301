"""Evaluating the crisis detector (lexicon + crisis head, `rewards/safety.crisis_evidence`) offline: thresholds
from false-alarm rates, recall and false alarms on held-out splits, Reddit C-SSRS users, the development probes."""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from therapy_rl.rewards import safety as S
from tools import head_fitting as F
from tools import reward_datasets as D

DEV_PROBES_FILE = os.path.join(os.path.dirname(S.LEXICON_FILE), "dev_probes.json")


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
            "auc_suicidewatch_vs_goemotions": F.roc_auc(pos, neg_go),
            "auc_suicidewatch_vs_depression": F.roc_auc(pos, scores[f"sdcnl_{split}_post"][labels[split] == 0]),
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
        texts = [t for t, _ in D.load_mesc_clients(data_dir, split)]
        ev = runner(texts, embed(texts, f"mesc-client-{split}"))
        det[split]["flag_rate_mesc_client_utterances"] = float(np.mean(ev["flag"]))
    out["detector"] = det
    # Reddit C-SSRS: a user is flagged when any of their posts is flagged
    users = D.load_cssrs(data_dir, max_posts)
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
              "head_alone_flag_rate": float(np.mean(user_head[levels == lvl]))} for lvl in D.CSSRS_LEVELS
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
