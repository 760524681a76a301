"""tools/train_guard.py's threshold rule on made-up development evidence: the highest recall whose false alarms stay
within every bound (written negatives, their sad subset, dataset text), and the idiom threshold's cap."""
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tools import train_guard as T  # noqa: E402


def _evidence(p, idiom=None, lex=None, long=None):
    p = np.asarray(p, float)

    def mark(x):
        return np.zeros(p.shape, bool) if x is None else np.asarray(x, bool)

    return {"p": p, "lex": mark(lex), "idiom": mark(idiom), "weak": mark(None), "long": mark(long)}


BASE = {"crisis": 0.5, "crisis_long": 0.5, "crisis_idiom": 0.9, "crisis_lexicon_support": 2.0,
        "crisis_long_lexicon_support": 2.0,
        "crisis_weak_support": 2.0, "reply": 0.5, "reply_lexicon_support": 2.0, "category": 0.5}


def _user_ev(sad_p):
    pos = _evidence(np.linspace(0.5, 1.0, 100))
    neg = _evidence(np.concatenate([np.full(95, 0.1), [0.91, 0.93, 0.95, 0.97]]))  # 4/99 above 0.9: within 4%
    return {"user_pos": pos, "user_neg": neg, "user_ordinary": _evidence(np.full(50, 0.05)),
            "user_sad": _evidence(sad_p)}


def _recall_and_bounds(ev, t):
    fa = T.flags(ev["user_neg"], t, "user").mean()
    sad = T.flags(ev["user_sad"], t, "user").mean()
    return T.flags(ev["user_pos"], t, "user").mean(), fa, sad


def test_the_sad_bound_raises_the_threshold_only_when_it_binds():
    loose = T.choose_thresholds(_user_ev(np.full(20, 0.1)), "user", BASE)
    rec_loose, fa, sad = _recall_and_bounds(_user_ev(np.full(20, 0.1)), loose)
    assert fa <= T.MAX_DEV_FALSE_ALARMS and sad == 0.0
    # 3 of 20 sad messages at 0.92: 15% > 8% unless the threshold passes 0.92
    sad_p = np.concatenate([np.full(17, 0.1), [0.92, 0.92, 0.92]])
    tight = T.choose_thresholds(_user_ev(sad_p), "user", BASE)
    rec_tight, fa, sad = _recall_and_bounds(_user_ev(sad_p), tight)
    assert sad <= T.MAX_DEV_SAD_FALSE_ALARMS and fa <= T.MAX_DEV_FALSE_ALARMS
    assert tight["crisis"] > 0.92 >= loose["crisis"]
    assert rec_tight < rec_loose
    # without the sad subset the rule is the old one
    no_sad = {k: v for k, v in _user_ev(sad_p).items() if k != "user_sad"}
    assert T.choose_thresholds(no_sad, "user", BASE)["crisis"] == loose["crisis"]


def test_an_idiom_never_vetoes_a_near_certain_head():
    """Idiom negatives at 0.995 would be excluded by an idiom veto (the uncapped rule's 2.0), which would also drop
    idiom positives at 0.9995; under the cap the idiom adds at most MAX_IDIOM_THRESHOLD, so they stay flagged."""
    ev = _user_ev(np.full(20, 0.1))
    ev["user_pos"] = _evidence(np.concatenate([np.linspace(0.5, 1.0, 100), np.full(10, 0.9995)]),
                               idiom=np.r_[np.zeros(100, bool), np.ones(10, bool)])
    neg = ev["user_neg"]
    ev["user_neg"] = _evidence(np.concatenate([neg["p"], np.full(10, 0.995)]),
                               idiom=np.r_[np.zeros(len(neg["p"]), bool), np.ones(10, bool)])
    t = T.choose_thresholds(ev, "user", BASE)
    assert t["crisis_idiom"] <= max(T.MAX_IDIOM_THRESHOLD, t["crisis"])  # an idiom adds at most the cap
    assert T.flags(ev["user_pos"], t, "user")[100:].all()
    assert T.flags(ev["user_neg"], t, "user").mean() <= T.MAX_DEV_FALSE_ALARMS


def test_sad_evidence_selects_sources_by_topic():
    class M:
        def __init__(self, source):
            self.source = source

    groups = {"user_neg": [M("v2_negative:sad_not_crisis"), M("v4c_negative:everyday_plans_with_time"),
                           M("r1_written_negative:physical_pain"), M("v4d_negative:low_mood_no_risk")]}
    ev = {"user_neg": _evidence([0.1, 0.2, 0.3, 0.4])}
    assert T.sad_evidence(ev, groups)["p"].tolist() == [0.1, 0.3, 0.4]


def test_long_messages_get_their_own_lexicon_support():
    """Short positives need lexicon support at p 0.1; long negatives with a lexicon hit at p 0.1-0.3 (a teacher's
    question about suicide) would then break the false-alarm bound, so long messages get a higher support while
    short ones keep 0.1."""
    n_pos = 100
    pos = _evidence(np.r_[np.full(n_pos - 20, 0.99), np.full(20, 0.12)], lex=np.r_[np.zeros(80), np.ones(20)])
    neg_p = np.r_[np.full(90, 0.05), np.full(10, 0.25)]
    neg = _evidence(neg_p, lex=np.r_[np.zeros(90), np.ones(10)], long=np.r_[np.zeros(90), np.ones(10)])
    ev = {"user_pos": pos, "user_neg": neg, "user_ordinary": _evidence(np.full(50, 0.05))}
    t = T.choose_thresholds(ev, "user", BASE)
    assert t["crisis_lexicon_support"] <= 0.12 < 0.25 < t["crisis_long_lexicon_support"]
    assert T.flags(pos, t, "user").all() and not T.flags(neg, t, "user").any()
    # the same negatives counted as short: the support cannot separate them, so the short positives are lost
    ev["user_neg"] = _evidence(neg_p, lex=np.r_[np.zeros(90), np.ones(10)])
    t_short = T.choose_thresholds(ev, "user", BASE)
    assert T.flags(pos, t_short, "user").mean() < 1.0


def test_long_messages_get_a_threshold_within_their_own_bound():
    """Long negatives whose max-over-windows score reaches 0.92 (8 of 40: 20%, while 8 of 240 negatives in all is
    within the overall 4%) break MAX_DEV_LONG_FALSE_ALARMS at the short messages' threshold; the long threshold is
    raised above them while the short one stays."""
    pos = _evidence(np.r_[np.linspace(0.8, 1.0, 90), np.full(10, 0.97)], long=np.r_[np.zeros(90), np.ones(10)])
    neg = _evidence(np.r_[np.full(200, 0.1), np.full(8, 0.92), np.full(32, 0.2)],
                    long=np.r_[np.zeros(200), np.ones(40)])
    ev = {"user_pos": pos, "user_neg": neg, "user_ordinary": _evidence(np.full(50, 0.05))}
    t = T.choose_thresholds(ev, "user", BASE)
    assert t["crisis"] <= 0.92 < t["crisis_long"] <= 0.97
    long_neg = T.long_negative_evidence(ev)
    assert len(long_neg["p"]) == 40 and T.flags(long_neg, t, "user").mean() <= T.MAX_DEV_LONG_FALSE_ALARMS
    assert T.flags(pos, t, "user")[90:].all()
