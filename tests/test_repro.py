"""The pre-training stream of therapy_rl.repro never holds MESC val/test or ESConv test dialogue text."""
import os

import numpy as np
import pytest

from therapy_rl import pretrain

DATA = os.environ.get("THERAPY_RL_DATA", "")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "mesc")), reason="needs $THERAPY_RL_DATA")


@needs_data
def test_no_test_dialogue_text_in_the_pretraining_stream():
    heldout = pretrain.heldout_utterances(DATA)
    assert len(heldout) > 5000  # MESC val + test and ESConv test utterances
    docs, stats = pretrain.corpus_documents(DATA)
    assert set(stats) == set(pretrain.ALL_SOURCES) and all(s["documents"] > 0 for s in stats.values())
    lines = {ln.strip() for doc in docs for ln in doc.split("\n")}
    assert not lines & heldout
    # whole long utterances are not hidden inside longer lines either (a sample, to keep the test fast)
    stream = "\n".join(docs)
    long_ones = sorted(t for t in heldout if len(t) >= 80)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(long_ones), size=min(150, len(long_ones)), replace=False):
        assert long_ones[i] not in stream, long_ones[i][:80]


@needs_data
def test_mesc_pretraining_text_is_train_only():
    from therapy_rl.data import sources

    train = {d.dialogue_id for d in sources.read_mesc(os.path.join(DATA, "mesc"), "train")[0]}
    others = {d.dialogue_id for s in ("val", "test") for d in sources.read_mesc(os.path.join(DATA, "mesc"), s)[0]}
    assert train and others and not train & others
    docs = pretrain.read_source(DATA, "mesc_train")
    assert len(docs) == len(train)
