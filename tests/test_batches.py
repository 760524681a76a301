"""Fixed-shape arrays, deterministic shuffling, exact resume, per-host slicing and complete eval batches."""

import numpy as np
import pytest

from therapy_rl.data import labels, sources
from therapy_rl.data.batches import BatchIterator, eval_batches, make_prompt_arrays, make_sft_arrays
from therapy_rl.data.samples import Sample, SampleOptions, build_samples
from therapy_rl.data.tokenize import EncodedSample, encode_samples, train_bpe_tokenizer, training_texts

PAD = 99


def _encoded(prompt_lengths, target_lengths, user_spans=None):
    """EncodedSamples with recognisable ids: prompt tokens 1000+i, target tokens 2000+i."""
    out = []
    for n, (p, t) in enumerate(zip(prompt_lengths, target_lengths)):
        ids = np.concatenate([1000 + np.arange(p), 2000 + np.arange(t)]).astype(np.int32)
        mask = np.concatenate([np.zeros(p), np.ones(t)]).astype(np.float32)
        span = user_spans[n] if user_spans else (0, 0)
        out.append(EncodedSample(ids, mask, p, span))
    return out


def test_sft_arrays_drop_long():
    encoded = _encoded([3, 5, 9, 2], [2, 4, 4, 1])
    arrays, report = make_sft_arrays(encoded, 8, pad_id=PAD)
    lengths = [len(e.ids) for e in encoded]
    keep = [i for i, n in enumerate(lengths) if n <= 8]  # reference: "over max_length" is dropped
    assert report.kept_indices.tolist() == keep and report.dropped_long == len(lengths) - len(keep)
    assert (report.total, report.kept, report.longest) == (4, len(keep), max(lengths))
    assert arrays["input_ids"].shape == (len(keep), 8) and arrays["input_ids"].dtype == np.int32
    assert arrays["attention_mask"].dtype == np.int32 and arrays["loss_mask"].dtype == np.float32
    for row, i in enumerate(keep):
        n = lengths[i]
        np.testing.assert_array_equal(arrays["input_ids"][row, :n], encoded[i].ids)
        assert (arrays["input_ids"][row, n:] == PAD).all()  # right padding
        np.testing.assert_array_equal(arrays["attention_mask"][row], (np.arange(8) < n).astype(np.int32))
        np.testing.assert_array_equal(arrays["loss_mask"][row, :n], encoded[i].loss_mask)
        assert (arrays["loss_mask"][row, n:] == 0).all()


def test_sft_arrays_truncate_user_text_first():
    # row 0: prompt of 10 with the user text at positions 3..8; row 1: a 1-token user text is not enough
    encoded = _encoded([10, 6, 4], [3, 6, 6], user_spans=[(3, 9), (3, 4), (1, 2)])
    arrays, report = make_sft_arrays(encoded, 9, pad_id=PAD, drop_long=False)
    assert report.kept == 3 and report.dropped_long == 0 and report.kept_indices.tolist() == [0, 1, 2]
    assert (report.truncated_user, report.truncated_other, report.dropped_no_target) == (2, 1, 0)
    # row 0: 13 tokens, 4 removed from the start of the user text (positions 3..6); the reply stays whole
    expected = np.concatenate([1000 + np.array([0, 1, 2, 7, 8, 9]), 2000 + np.arange(3)])
    np.testing.assert_array_equal(arrays["input_ids"][0], expected)
    np.testing.assert_array_equal(arrays["loss_mask"][0], [0] * 6 + [1] * 3)
    # row 1: 12 tokens; the user token goes, then the end of the reply is cut
    expected = np.concatenate([1000 + np.array([0, 1, 2, 4, 5]), 2000 + np.arange(4)])
    np.testing.assert_array_equal(arrays["input_ids"][1], expected)
    np.testing.assert_array_equal(arrays["loss_mask"][1], [0] * 5 + [1] * 4)
    # row 2: 10 tokens, its one user token removed
    np.testing.assert_array_equal(arrays["input_ids"][2], np.concatenate([[1000, 1002, 1003], 2000 + np.arange(6)]))


def test_sft_arrays_truncation_without_target_is_dropped():
    encoded = _encoded([12], [2], user_spans=[(2, 3)])
    arrays, report = make_sft_arrays(encoded, 6, pad_id=PAD, drop_long=False)
    assert report.kept == 0 and report.dropped_no_target == 1 and arrays["input_ids"].shape == (0, 6)


def _samples(n):
    return [Sample("p", f"u{i}", labels.EMOTIONS[i % 7], "t", labels.EMOTIONS[(i + 3) % 7], None, (), "d", i)
            for i in range(n)]


def test_prompt_arrays_left_padded():
    encoded = _encoded([3, 7, 5], [2, 2, 2], user_spans=[(1, 2), (2, 5), (1, 3)])
    samples = _samples(3)
    arrays, report = make_prompt_arrays(encoded, samples, 5, pad_id=PAD)
    assert report.kept_indices.tolist() == [0, 2] and report.dropped_long == 1
    assert arrays["prompt_ids"].shape == (2, 5) and arrays["prompt_ids"].dtype == np.int32
    np.testing.assert_array_equal(arrays["prompt_ids"][0], [PAD, PAD, 1000, 1001, 1002])
    np.testing.assert_array_equal(arrays["prompt_mask"][0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(arrays["prompt_ids"][1], 1000 + np.arange(5))
    assert arrays["sample_index"].tolist() == [0, 2] and arrays["valid"].tolist() == [1, 1]
    assert arrays["user_emotion"].tolist() == [labels.EMOTION_TO_INDEX[samples[i].user_emotion] for i in (0, 2)]
    assert arrays["therapist_emotion"].tolist() == [labels.EMOTION_TO_INDEX[samples[i].therapist_emotion]
                                                    for i in (0, 2)]
    for key in ("user_emotion", "therapist_emotion", "sample_index", "valid", "prompt_mask"):
        assert arrays[key].dtype == np.int32
    fitted, report = make_prompt_arrays(encoded, samples, 5, pad_id=PAD, drop_long=False)
    np.testing.assert_array_equal(fitted["prompt_ids"][1], 1000 + np.array([0, 1, 4, 5, 6]))  # user text cut
    bare, _ = make_prompt_arrays([np.arange(8, dtype=np.int32)], samples[:1], 5, pad_id=PAD, drop_long=False)
    np.testing.assert_array_equal(bare["prompt_ids"][0], [3, 4, 5, 6, 7])  # keeps the end (<therapist>)


def _rows(n):
    return {"row": np.arange(n, dtype=np.int32), "valid": np.ones(n, np.int32),
            "loss_mask": np.ones((n, 3), np.float32)}


def test_shuffle_is_a_function_of_seed_and_epoch():
    n, b = 23, 4
    it = BatchIterator(_rows(n), b, seed=7, process_index=0, process_count=1)
    assert it.steps_per_epoch == n // b
    for epoch in range(3):
        reference = np.random.default_rng([7, epoch]).permutation(n)
        got = np.concatenate([next(it)["row"] for _ in range(it.steps_per_epoch)])
        np.testing.assert_array_equal(got, reference[:it.steps_per_epoch * b])
    other = BatchIterator(_rows(n), b, seed=7, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(other)["row"], np.random.default_rng([7, 0]).permutation(n)[:b])
    different = BatchIterator(_rows(n), b, seed=8, process_index=0, process_count=1)
    assert not np.array_equal(next(different)["row"], np.random.default_rng([7, 0]).permutation(n)[:b])
    ordered = BatchIterator(_rows(n), b, seed=7, shuffle=False, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(ordered)["row"], np.arange(b))


@pytest.mark.parametrize("k", [0, 3, 5, 11])
def test_resume_gives_identical_batches(k):
    arrays = _rows(21)
    it = BatchIterator(arrays, 4, seed=3, process_index=0, process_count=1)  # 5 steps per epoch
    for _ in range(k):
        next(it)
    state = it.get_state()
    assert set(state) == {"epoch", "position"} and state["epoch"] == k // 5 and state["position"] == k % 5
    expected = [next(it) for _ in range(7)]
    resumed = BatchIterator(arrays, 4, seed=3, process_index=0, process_count=1)
    resumed.set_state(dict(state))
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError):
        resumed.set_state({"epoch": 0, "position": 6})


def test_two_hosts_cover_the_global_batch():
    arrays = _rows(30)
    whole = BatchIterator(arrays, 6, seed=1, process_index=0, process_count=1)
    hosts = [BatchIterator(arrays, 6, seed=1, process_index=i, process_count=2) for i in range(2)]
    for _ in range(12):
        global_rows = next(whole)["row"]
        parts = [next(h)["row"] for h in hosts]
        assert all(len(p) == 3 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), global_rows)
    with pytest.raises(ValueError, match="multiple"):
        BatchIterator(arrays, 5, seed=1, process_index=0, process_count=2)


def test_no_drop_remainder_pads_and_covers_each_row_once():
    it = BatchIterator(_rows(10), 4, seed=0, drop_remainder=False, process_index=0, process_count=1)
    assert it.steps_per_epoch == 3
    batches = [next(it) for _ in range(3)]
    valid_rows = np.concatenate([b["row"][b["valid"] == 1] for b in batches])
    assert sorted(valid_rows.tolist()) == list(range(10))
    assert batches[-1]["valid"].tolist() == [1, 1, 0, 0] and (batches[-1]["loss_mask"][2:] == 0).all()
    assert it.get_state() == {"epoch": 1, "position": 0}


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_row_once(process_count):
    n, b = 11, 4
    seen = []
    per_host = [list(eval_batches(_rows(n), b, process_index=i, process_count=process_count))
                for i in range(process_count)]
    assert all(len(batches) == 3 for batches in per_host)
    for step in range(3):
        for host in range(process_count):
            batch = per_host[host][step]
            assert batch["row"].shape == (b // process_count,)
            seen += batch["row"][batch["valid"] == 1].tolist()
            assert (batch["loss_mask"][batch["valid"] == 0] == 0).all()
    assert seen == list(range(n))


def test_bundled_sample_end_to_end(tmp_path):
    dialogues, _ = sources.read_bundled_sample("train")
    samples = build_samples(dialogues)
    tok = train_bpe_tokenizer(training_texts(samples), 800, tmp_path / "bpe")
    encoded = encode_samples(tok, samples, SampleOptions())
    arrays, report = make_sft_arrays(encoded, 96, pad_id=tok.pad_id)
    assert report.kept + report.dropped_long == len(samples) and report.kept > 0.9 * len(samples)
    first = arrays["input_ids"][:, 0]
    assert (first == tok.bos_id).all()
    last_real = arrays["attention_mask"].sum(1) - 1
    assert (arrays["input_ids"][np.arange(len(last_real)), last_real] == tok.eos_id).all()
    batch = next(BatchIterator(arrays, 8, seed=0, process_index=0, process_count=1))
    assert batch["input_ids"].shape == (8, 96)
    prompts, _ = make_prompt_arrays(encoded, samples, 64, pad_id=tok.pad_id)
    assert (prompts["prompt_ids"][:, -1] == tok.marker_ids[labels.THERAPIST]).all()


def test_process_defaults_come_from_jax():
    import jax

    it = BatchIterator(_rows(8), 4, seed=0)
    assert (it.process_index, it.process_count) == (jax.process_index(), jax.process_count())
    assert it.local_batch_size == 4 // jax.process_count()
