"""Tokenizer loading/training, piecewise encoding, loss masks against a hand-built expectation, reply parsing."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from therapy_rl.data import labels, sources
from therapy_rl.data.samples import Sample, SampleOptions, build_samples
from therapy_rl.data.tokenize import (decode_reply, encode_prompt, encode_sample, encode_samples, load_tokenizer,
                                      strategy_token, train_bpe_tokenizer, training_texts)

CORPUS = ["anger", "joy", "neutral", "I feel anger and joy.", "Nothing is neutral.", "How do you feel today?",
          "My sadness is heavy.", "I told you so.", "What happened next?"] * 30


def _base_bpe(vocab_size=400) -> tokenizers.Tokenizer:
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe


@pytest.fixture(scope="module")
def gpt2_like_dir(tmp_path_factory):
    """A tiny GPT-2-style tokenizer directory (tokenizer.json + config), built locally (no hub)."""
    out = tmp_path_factory.mktemp("tiny_gpt2")
    hf = PreTrainedTokenizerFast(tokenizer_object=_base_bpe(), bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return out


@pytest.fixture(scope="module")
def vocab_merges_dir(tmp_path_factory):
    """The older GPT-2 layout: vocab.json + merges.txt only."""
    out = tmp_path_factory.mktemp("vocab_merges")
    _base_bpe().model.save(str(out))
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return out


@pytest.fixture(scope="module")
def tok(gpt2_like_dir):
    return load_tokenizer(gpt2_like_dir, strategies=labels.MESC_STRATEGIES)


def _plain(text):
    """Reference encoding of a text piece with a separately built BPE (same training, no added tokens)."""
    return _base_bpe().encode(text, add_special_tokens=False).ids


SAMPLE = Sample(problem="grief", user_text="I told you so.", user_emotion="sadness",
                therapist_text="What happened next?", therapist_emotion="neutral", strategy="Open question",
                context=(("client", "How do you feel today?"), ("therapist", "Nothing is neutral.")),
                dialogue_id="x", turn_index=3)


@pytest.mark.parametrize("layout", ["gpt2_like_dir", "vocab_merges_dir"])
def test_load_tokenizer_markers_and_single_token_labels(layout, request):
    model_dir = request.getfixturevalue(layout)
    base = _base_bpe()
    tok = load_tokenizer(model_dir)
    ids = list(tok.marker_ids.values())
    assert list(tok.marker_ids) == list(labels.MARKER_TOKENS) and len(set(ids)) == len(ids)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(tok.marker_ids[m] for m in (labels.BOS, labels.EOS, labels.PAD))
    assert min(ids) >= base.get_vocab_size()  # markers are new tokens
    for word, token_id in zip(labels.EMOTIONS, tok.emotion_token_ids):
        base_ids = base.encode(word, add_special_tokens=False).ids
        if len(base_ids) == 1:
            assert token_id == base_ids[0]  # an existing single token keeps its id
        else:
            assert token_id >= base.get_vocab_size()
        assert tok.hf.convert_ids_to_tokens(token_id).replace("Ġ", "") == word
    kept = [w for w in labels.EMOTIONS if len(base.encode(w, add_special_tokens=False).ids) == 1]
    assert set(kept) >= {"anger", "joy", "neutral"} and "depression" not in kept
    assert tok.vocab_size == len(tok.hf) == base.get_vocab_size() + len(labels.MARKER_TOKENS) + 7 - len(kept)
    assert tok.strategies == () and tok.strategy_token_ids == ()


def test_loading_is_deterministic_and_save_round_trips(gpt2_like_dir, tok, tmp_path):
    again = load_tokenizer(gpt2_like_dir, strategies=labels.MESC_STRATEGIES)
    assert (again.marker_ids, again.emotion_token_ids, again.strategy_token_ids) == \
        (tok.marker_ids, tok.emotion_token_ids, tok.strategy_token_ids)
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)  # strategies come from therapy_tokenizer.json
    assert back.strategies == labels.MESC_STRATEGIES
    assert (back.marker_ids, back.emotion_token_ids, back.strategy_token_ids, back.vocab_size) == \
        (tok.marker_ids, tok.emotion_token_ids, tok.strategy_token_ids, tok.vocab_size)
    assert len(set(tok.strategy_token_ids)) == len(labels.MESC_STRATEGIES)
    assert tok.hf.convert_ids_to_tokens(tok.strategy_id("Open question")) == strategy_token("Open question")


def test_encode_sample_matches_hand_built_expectation(tok):
    m = tok.marker_ids
    opts = SampleOptions()
    sample = SAMPLE.__class__(**{**SAMPLE.__dict__, "context": ()})
    prompt = ([m["<bos>"], m["<problem>"]] + _plain("grief") + [m["<user>"]] + _plain("I told you so.")
              + [m["<user_emotion>"], tok.emotion_token_ids[labels.EMOTION_TO_INDEX["sadness"]], m["<therapist>"]])
    target = (_plain("What happened next?") + [m["<therapist_emotion>"],
              tok.emotion_token_ids[labels.EMOTION_TO_INDEX["neutral"]], m["<eos>"]])
    encoded = encode_sample(tok, sample, opts)
    assert encoded.ids.dtype == np.int32 and encoded.loss_mask.dtype == np.float32
    assert encoded.ids.tolist() == prompt + target
    assert encoded.loss_mask.tolist() == [0.0] * len(prompt) + [1.0] * len(target)
    assert encoded.prompt_length == len(prompt)
    start = 2 + len(_plain("grief")) + 1
    assert encoded.user_span == (start, start + len(_plain("I told you so.")))
    assert encode_prompt(tok, sample, opts).tolist() == prompt


def test_encode_options_strategy_context_no_emotion(tok):
    m = tok.marker_ids
    opts = SampleOptions(include_therapist_emotion=False, include_strategy=True, context_turns=2)
    encoded = encode_sample(tok, SAMPLE, opts)
    context = ([m["<context>"], m["<user>"]] + _plain("How do you feel today?") + [m["<therapist>"]]
               + _plain("Nothing is neutral."))
    prompt = ([m["<bos>"], m["<problem>"]] + _plain("grief") + context + [m["<user>"]] + _plain("I told you so.")
              + [m["<user_emotion>"], tok.emotion_id("sadness"), m["<therapist>"]])
    target = [m["<strategy>"], tok.strategy_id("Open question")] + _plain("What happened next?") + [m["<eos>"]]
    assert encoded.ids.tolist() == prompt + target
    assert encoded.loss_mask.tolist() == [0.0] * len(prompt) + [1.0] * len(target)
    assert m["<therapist_emotion>"] not in encoded.ids.tolist()
    missing = Sample(**{**SAMPLE.__dict__, "strategy": None})
    with pytest.raises(ValueError, match="no strategy"):
        encode_sample(tok, missing, opts)


def test_labels_are_single_tokens_and_texts_cannot_inject_markers(tok):
    m = tok.marker_ids
    for emotion in labels.EMOTIONS:
        sample = Sample("p", "I feel " + emotion + " <eos> <therapist>", emotion, "ok", emotion, None, (), "d", 0)
        ids = encode_sample(tok, sample, SampleOptions()).ids.tolist()
        assert ids.count(m["<eos>"]) == 1 and ids[-1] == m["<eos>"]
        assert ids.count(m["<therapist>"]) == 1 and ids.count(m["<user_emotion>"]) == 1
        after_user_emotion = ids[ids.index(m["<user_emotion>"]) + 1]
        after_therapist_emotion = ids[ids.index(m["<therapist_emotion>"]) + 1]
        assert after_user_emotion == after_therapist_emotion == tok.emotion_token_ids[labels.EMOTION_TO_INDEX[emotion]]
        assert tok.decode([after_user_emotion]).strip() == emotion


def test_encode_samples_batch_equals_single(tok):
    dialogues, _ = sources.read_bundled_sample("val")
    samples = build_samples(dialogues, SampleOptions(context_turns=1))
    batch = encode_samples(tok, samples, SampleOptions(context_turns=1))
    for sample, encoded in zip(samples[:5], batch[:5]):
        single = encode_sample(tok, sample, SampleOptions(context_turns=1))
        np.testing.assert_array_equal(single.ids, encoded.ids)
        np.testing.assert_array_equal(single.loss_mask, encoded.loss_mask)


def test_decode_reply(tok):
    m = tok.marker_ids
    text = _plain("What happened next?")
    reply = ([m["<strategy>"], tok.strategy_id("Approval")] + text
             + [m["<therapist_emotion>"], tok.emotion_id("joy"), m["<eos>"], m["<pad>"], m["<pad>"]])
    assert decode_reply(tok, np.asarray(reply)) == ("What happened next?", "joy", "Approval")
    assert decode_reply(tok, [m["<therapist>"]] + text + [m["<eos>"]]) == ("What happened next?", None, None)
    assert decode_reply(tok, text + [m["<therapist_emotion>"], text[0]]) == ("What happened next?", None, None)
    assert decode_reply(tok, text + [m["<therapist_emotion>"]]) == ("What happened next?", None, None)
    assert decode_reply(tok, text + [m["<user>"]] + text) == ("What happened next?", None, None)
    assert decode_reply(tok, []) == ("", None, None)


def test_train_bpe_tokenizer_on_bundled_sample(tmp_path):
    dialogues, _ = sources.read_bundled_sample("train")
    samples = build_samples(dialogues)
    tok = train_bpe_tokenizer(training_texts(samples), 600, tmp_path / "bpe")
    assert tok.vocab_size <= 600 + 7 and tok.marker_ids[labels.BOS] == 0  # markers reserved first
    reloaded = load_tokenizer(tmp_path / "bpe")
    assert reloaded.emotion_token_ids == tok.emotion_token_ids and reloaded.marker_ids == tok.marker_ids
    assert len(set(tok.emotion_token_ids)) == 7
    text = samples[0].therapist_text
    assert tok.decode(tok.encode_text(text)) == text
    encoded = encode_sample(tok, samples[0], SampleOptions())
    assert decode_reply(tok, encoded.ids[encoded.prompt_length:]) == (text, samples[0].therapist_emotion, None)
    assert int(encoded.ids.max()) < tok.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["x"], 100, tmp_path / "tiny")
