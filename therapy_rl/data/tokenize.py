"""Tokenizer for the emotion-conditioned format, and sample -> ids / loss mask. No jax.

One training sequence per sample (markers from ``labels``; ``[...]`` parts only with their option):

    <bos><problem>P[<context>(<user>c | <therapist>t)...]<user>U<user_emotion>Eu<therapist>
        [<strategy>S]T[<therapist_emotion>Et]<eos>

Ids are built piece by piece: markers, emotion labels and strategies are placed as their single ids, and only
the free texts (P, context texts, U, T) go through the BPE. Texts are encoded with special-token matching off,
so a user who types ``<eos>`` gets the characters, not the marker. ``loss_mask[t] = 1`` iff token ``t`` is a
supervised target: everything after ``<therapist>`` (strategy marker and label, T, ``<therapist_emotion>``, its
label, ``<eos>``); the prompt (through ``<therapist>``) is never a target.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # transformers (and the torch it pulls in) is imported only when a tokenizer is loaded
    from transformers import PreTrainedTokenizerFast

from therapy_rl import errors
from therapy_rl.data import labels
from therapy_rl.data.samples import Sample, SampleOptions

THERAPY_TOKENIZER_FILE = "therapy_tokenizer.json"  # written next to the HF files: the strategy set in use
# What a byte-level BPE folder must hold: the fast tokenizer's file, or GPT-2's vocabulary and merges.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def check_tokenizer_dir(model_dir: str | Path, where: str = "") -> None:
    """Raises ``errors.MissingFileError`` unless ``model_dir`` holds tokenizer files (``TOKENIZER_FILE_SETS``):
    HF weights saved without their tokenizer would otherwise load as a tokenizer that encodes nothing.
    ``where`` names the setting in the message (e.g. ``--config.tokenizer.path``)."""
    model_dir = Path(model_dir)
    named = f"{where}={model_dir}" if where else str(model_dir)
    if not model_dir.is_dir():
        raise errors.MissingFileError(f"{named}: no such folder")
    if not any(all((model_dir / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        raise errors.MissingFileError(
            f"{named}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); save the "
            "model's tokenizer there (tokenizer.save_pretrained) or pass --config.tokenizer.path=<a folder with one>")


def min_bpe_vocab_size() -> int:
    """The smallest ``bpe_vocab_size`` a byte-level BPE can have: every byte plus the markers."""
    return len(pre_tokenizers.ByteLevel.alphabet()) + len(labels.MARKER_TOKENS)


def strategy_token(name: str) -> str:
    """The added token that stands for one strategy, e.g. ``<Open question>``."""
    return f"<{name}>"


@dataclasses.dataclass(frozen=True, eq=False)
class TherapyTokenizer:
    hf: PreTrainedTokenizerFast  # the HF tokenizer with every marker/label token added
    text_encoder: tokenizers.Tokenizer  # a copy that never matches special tokens inside texts
    marker_ids: Mapping[str, int]  # marker string (labels.MARKER_TOKENS) -> id
    emotion_token_ids: tuple[int, ...]  # aligned with labels.EMOTIONS; each label is exactly one id
    strategies: tuple[str, ...]  # strategies with a token, in id order ("" tuple when strategies are unused)
    strategy_token_ids: tuple[int, ...]  # aligned with ``strategies``
    pad_id: int
    eos_id: int
    bos_id: int
    vocab_size: int  # rows the model's embedding must have (every id < vocab_size)

    def encode_text(self, text: str) -> list[int]:
        return self.text_encoder.encode(text, add_special_tokens=False).ids

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.text_encoder.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def emotion_id(self, emotion: str) -> int:
        return self.emotion_token_ids[labels.EMOTION_TO_INDEX[emotion]]

    def strategy_id(self, strategy: str) -> int:
        if strategy not in self.strategies:
            raise ValueError(f"strategy {strategy!r} has no token; this tokenizer knows {self.strategies}")
        return self.strategy_token_ids[self.strategies.index(strategy)]

    def save(self, out_dir: str | Path) -> None:
        """HF files plus ``therapy_tokenizer.json``; ``load_tokenizer(out_dir)`` gives back the same ids."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out_dir))
        (out_dir / THERAPY_TOKENIZER_FILE).write_text(json.dumps({
            "strategies": list(self.strategies),
            "marker_ids": dict(self.marker_ids),
            "emotion_token_ids": dict(zip(labels.EMOTIONS, self.emotion_token_ids)),
            "vocab_size": self.vocab_size,
        }, indent=1), encoding="utf-8")


def _text_encoder(hf: PreTrainedTokenizerFast) -> tokenizers.Tokenizer:
    encoder = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    encoder.no_padding()
    encoder.no_truncation()
    encoder.encode_special_tokens = True
    return encoder


def _single_token_id(plain: tokenizers.Tokenizer, backend: tokenizers.Tokenizer, word: str) -> int | None:
    """The id of ``word`` if the plain BPE (special-token matching off) gives exactly one token, or if the
    word is already a whole token of the vocabulary (e.g. added by an earlier load); else None."""
    ids = plain.encode(word, add_special_tokens=False).ids
    if len(ids) == 1:
        return ids[0]
    return backend.token_to_id(word)


def load_tokenizer(model_dir: str | Path, strategies: Sequence[str] | None = None) -> TherapyTokenizer:
    """Load a local HF tokenizer directory (e.g. a GPT-2 checkpoint's, or one saved by ``TherapyTokenizer.save``)
    and add what the format needs:

    - the markers ``labels.MARKER_TOKENS`` as special tokens (``<bos>``/``<eos>``/``<pad>`` become bos/eos/pad);
    - every emotion label as exactly one id: a word the BPE already encodes as a single token keeps that id,
      any other is added as a special token (never matched inside texts);
    - when ``strategies`` is given (None: the set saved in ``therapy_tokenizer.json``, or none), one special
      token ``<name>`` per strategy.

    Tokens are added in a fixed order, so loading the same directory twice, or re-loading a saved
    TherapyTokenizer, gives the same ids.
    """
    model_dir = Path(model_dir)
    check_tokenizer_dir(model_dir)
    saved = model_dir / THERAPY_TOKENIZER_FILE
    if strategies is None:
        strategies = json.loads(saved.read_text(encoding="utf-8"))["strategies"] if saved.is_file() else ()
    strategies = tuple(strategies)
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"duplicate strategies in {strategies}")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    if not isinstance(hf, PreTrainedTokenizerFast):
        raise errors.InputError(f"{model_dir}: expected a fast (tokenizers-backed) tokenizer, got "
                                f"{type(hf).__name__}")
    if not hf.backend_tokenizer.encode("Hello there", add_special_tokens=False).ids:
        raise errors.InputError(f"{model_dir}: its tokenizer encodes 'Hello there' as no tokens (an empty "
                                "vocabulary?); check its tokenizer.json / vocab.json + merges.txt")

    others = [m for m in labels.MARKER_TOKENS if m not in (labels.BOS, labels.EOS, labels.PAD)]
    hf.add_special_tokens({"bos_token": labels.BOS, "eos_token": labels.EOS, "pad_token": labels.PAD,
                           "extra_special_tokens": others}, replace_extra_special_tokens=False)
    plain = _text_encoder(hf)  # added special tokens never change how a plain word is encoded
    for word in labels.EMOTIONS:
        if _single_token_id(plain, hf.backend_tokenizer, word) is None:
            hf.add_tokens([AddedToken(word, special=True, normalized=False)], special_tokens=True)
    for name in strategies:
        hf.add_tokens([AddedToken(strategy_token(name), special=True, normalized=False)], special_tokens=True)

    backend = hf.backend_tokenizer
    marker_ids = {m: backend.token_to_id(m) for m in labels.MARKER_TOKENS}
    emotion_ids = tuple(_single_token_id(plain, backend, w) for w in labels.EMOTIONS)
    strategy_ids = tuple(backend.token_to_id(strategy_token(s)) for s in strategies)
    all_ids = list(marker_ids.values()) + list(emotion_ids) + list(strategy_ids)
    if any(i is None for i in all_ids) or len(set(all_ids)) != len(all_ids):
        raise ValueError(f"{model_dir}: marker/emotion/strategy tokens are not distinct single ids: "
                         f"{marker_ids}, {dict(zip(labels.EMOTIONS, emotion_ids))}, {dict(zip(strategies, strategy_ids))}")
    vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(all_ids) + 1)
    return TherapyTokenizer(
        hf=hf, text_encoder=_text_encoder(hf), marker_ids=marker_ids, emotion_token_ids=emotion_ids,
        strategies=strategies, strategy_token_ids=strategy_ids, pad_id=marker_ids[labels.PAD],
        eos_id=marker_ids[labels.EOS], bos_id=marker_ids[labels.BOS], vocab_size=vocab_size)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        strategies: Sequence[str] = (), min_frequency: int = 2) -> TherapyTokenizer:
    """Train a byte-level BPE (GPT-2 style: no prefix space, byte fallback for every character) on ``texts``
    with ``tokenizers``, save it in ``out_dir`` in HF format and return ``load_tokenizer(out_dir, strategies)``
    (also saved). Markers are reserved as the first ids; ``vocab_size`` counts them."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < min_bpe_vocab_size():
        raise ValueError(f"vocab_size {vocab_size} is below the {len(alphabet)} bytes + "
                         f"{len(labels.MARKER_TOKENS)} markers a byte-level BPE needs")
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(labels.MARKER_TOKENS), initial_alphabet=alphabet)
    bpe.train_from_iterator(texts, trainer)
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=labels.BOS, eos_token=labels.EOS,
                                 pad_token=labels.PAD)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    tok = load_tokenizer(out_dir, strategies)
    tok.save(out_dir)
    return tok


def training_texts(samples: Sequence[Sample]) -> list[str]:
    """Every free text of ``samples`` (problem, user, therapist, context), each distinct text once, in order:
    the corpus for ``train_bpe_tokenizer``."""
    seen: dict[str, None] = {}
    for s in samples:
        for text in (s.problem, s.user_text, s.therapist_text, *(t for _, t in s.context)):
            seen.setdefault(text, None)
    return list(seen)


@dataclasses.dataclass(frozen=True)
class EncodedSample:
    ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # float32 [L]; 1 on supervised targets
    prompt_length: int  # ids[:prompt_length] is the prompt, ending with <therapist>
    user_span: tuple[int, int] = (0, 0)  # [start, end) of the user-text tokens: what truncation may trim


def _texts_of(sample: Sample, with_target: bool) -> list[str]:
    texts = [sample.problem, sample.user_text, *(t for _, t in sample.context)]
    return texts + [sample.therapist_text] if with_target else texts


def _assemble(tok: TherapyTokenizer, sample: Sample, opts: SampleOptions, enc: Mapping[str, list[int]],
              with_target: bool) -> EncodedSample:
    m = tok.marker_ids
    ids = [m[labels.BOS], m[labels.PROBLEM], *enc[sample.problem]]
    if sample.context:
        ids.append(m[labels.CONTEXT])
        for speaker, text in sample.context:
            ids.append(m[labels.USER] if speaker == "client" else m[labels.THERAPIST])
            ids.extend(enc[text])
    ids.append(m[labels.USER])
    user_start = len(ids)
    ids.extend(enc[sample.user_text])
    user_span = (user_start, len(ids))
    ids += [m[labels.USER_EMOTION], tok.emotion_id(sample.user_emotion), m[labels.THERAPIST]]
    prompt_length = len(ids)
    if with_target:
        if opts.include_strategy:
            if sample.strategy is None:
                raise ValueError(f"dialogue {sample.dialogue_id} turn {sample.turn_index}: include_strategy is on "
                                 "but the therapist turn has no strategy")
            ids += [m[labels.STRATEGY], tok.strategy_id(sample.strategy)]
        ids.extend(enc[sample.therapist_text])
        if opts.include_therapist_emotion:
            ids += [m[labels.THERAPIST_EMOTION], tok.emotion_id(sample.therapist_emotion)]
        ids.append(m[labels.EOS])
    loss_mask = np.zeros(len(ids), np.float32)
    loss_mask[prompt_length:] = 1.0
    return EncodedSample(np.asarray(ids, np.int32), loss_mask, prompt_length, user_span)


def encode_samples(tok: TherapyTokenizer, samples: Sequence[Sample], opts: SampleOptions,
                   with_target: bool = True) -> list[EncodedSample]:
    """``encode_sample`` for many samples, with every distinct text BPE-encoded once in a batch."""
    texts = list(dict.fromkeys(t for s in samples for t in _texts_of(s, with_target)))
    enc = dict(zip(texts, tok.encode_texts(texts)))
    return [_assemble(tok, s, opts, enc, with_target) for s in samples]


def encode_sample(tok: TherapyTokenizer, sample: Sample, opts: SampleOptions) -> EncodedSample:
    """The full training sequence of ``sample`` with its loss mask (see the module docstring)."""
    return encode_samples(tok, [sample], opts)[0]


def encode_prompt(tok: TherapyTokenizer, sample: Sample, opts: SampleOptions) -> np.ndarray:
    """int32 ids up to and including ``<therapist>``: what PPO / evaluation / chat feed the sampler.
    ``sample.therapist_text`` is not used (it may be empty)."""
    return encode_samples(tok, [sample], opts, with_target=False)[0].ids


def decode_reply(tok: TherapyTokenizer, ids: Iterable[int]) -> tuple[str, str | None, str | None]:
    """Parse a generated continuation of a prompt: ``[<strategy>S] text [<therapist_emotion>E] <eos> ...``.

    Returns ``(text, emotion label or None, strategy or None)``. The text runs to the first marker
    (``<therapist_emotion>``, ``<eos>``, ``<pad>`` or any other); the emotion is the label right after
    ``<therapist_emotion>`` (None when the tag or a valid label is missing). A leading ``<therapist>`` is skipped.
    """
    ids = [int(i) for i in ids]
    m = tok.marker_ids
    markers = set(m.values())
    emotion_of = dict(zip(tok.emotion_token_ids, labels.EMOTIONS))
    strategy_of = dict(zip(tok.strategy_token_ids, tok.strategies))
    i = 1 if ids and ids[0] == m[labels.THERAPIST] else 0
    strategy = None
    if i < len(ids) and ids[i] == m[labels.STRATEGY]:
        i += 1
        if i < len(ids) and ids[i] in strategy_of:
            strategy = strategy_of[ids[i]]
            i += 1
    start = i
    while i < len(ids) and ids[i] not in markers:
        i += 1
    text = tok.decode(ids[start:i]).strip()
    emotion = None
    if i + 1 < len(ids) and ids[i] == m[labels.THERAPIST_EMOTION]:
        emotion = emotion_of.get(ids[i + 1])
    return text, emotion, strategy
