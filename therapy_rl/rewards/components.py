r"""Reward components as pure, jittable functions (Zhang & Ive's reward, plus a length range and safety).

Every function here takes device arrays and small static settings; the only host work is building
`PolicyTables` once from the policy tokenizer (per-vocabulary lookup tables).

Definitions used on POLICY token ids (documented here once; tests check them against a plain-Python reference):

* **Text region.** Response positions with mask 1, after an optional leading `<therapist>` and an optional
  `<strategy>` S pair, and before the next special token (any marker, `<eos>`, `<pad>`, a strategy token, or an
  id outside the tokenizer). Emotion words are never special. The reply text is what the region decodes to
  (the same cut as `data.tokenize.decode_reply`).
* **Characters.** UTF-8 code points of the region (whitespace included); per token, the bytes that are not
  UTF-8 continuation bytes. **Letters** are ASCII letters and every non-ASCII character (a byte-level token
  may hold a fraction of a character, so non-ASCII characters are not classified further).
* **Words.** A word is a maximal run of consecutive region tokens that each contain a letter (or any byte of
  a non-ASCII character), or are a lone ASCII apostrophe between two such tokens; a token that begins with
  whitespace always starts a new word. For GPT-2-style byte BPE (whose pre-tokenizer never mixes ASCII letters
  with digits, spaces or ASCII punctuation) this equals the character-level rule
  `re.findall(r"L+(?:'L+)*", text)` with L = `(?:[A-Za-z]|[^\x00-\x7f])`, whatever the merges:
  "don't" is one word, "well-being" two, "café" one. Words compare by their bytes, leading whitespace removed
  and ASCII lower-cased; on device a word is identified by two independent 32-bit polynomial hashes of them.
* **Repeated n-grams** (the paper's windows 6 and 5, weights 4 and 6). For n=2 and n=3 over the word sequence,
  the n-gram starting at word i is *repeated* if the same n-gram starts at some word j with 1 <= i-j <= window.
  penalty_n = weight_n * (#repeated n-grams / max(#n-grams, 1)); the two penalties together are at most 10.
* **Over-used words.** Each distinct word of more than 3 letters that occurs more than 4 times costs
  `overuse_weight` (default 2; the project's flat amount: the paper's code charges min((count-1)^1.7 * 1.5, 8) per
  word, and sums (count-1)^1.5 * weight over sliding windows for repeated n-grams: `quality.formula="paper_code"`,
  rewards/paper_code.py).
* **Formula.** `formula="tokens"` (default) is everything in this list, on policy ids on device;
  `formula="paper_code"` replaces the whole component by the paper's code on the decoded reply text
  (rewards/paper_code.quality, computed on the host and passed in).
* **Degenerate** (score -10): no non-space character; no letter; every non-space byte the same (ASCII-case
  folded: "aaaa", "I", "!!!!"); or (switch) more than half of the non-space characters are non-ASCII.
* **Length rule.** "range" (default): below `min_chars` costs `length_weight * (min_chars - n) / min_chars`, above
  `max_chars` costs `length_weight * min(1, (n - max_chars) / max_chars)`. "paper": -10 when n >= 100 characters
  or when any word is exactly one of yes/no/ok/thanks.
* quality = clip(2 - bigram - trigram - overuse - length, -10, 8), or -10 when degenerate.

Emotion alignment (the tag is the first non-blank token after the first `<therapist_emotion>` marker):
  generated label g: missing (no marker, or the marker is followed by nothing / a special token) -> `missing`;
  a token that is not one of the 7 labels, or a label continued by more letters ("neutral"+"ity") -> `invalid`;
  a valid label scores `valid + match(g, target)` (additive reading of NOTES.md: valid +1, *plus* the match term):
    exact: +6 (non-neutral target) / +1 (neutral); same group, different label: +3 / +1 (the neutral case is
    unreachable with MESC's groups, where neutral is alone in its group); joy vs a negative label either way: -5;
    any other mismatch (neutral vs non-neutral): -1.
  So a valid tag scores 7 (exact, non-neutral), 2 (exact neutral), 4 (another negative label), -4 (joy vs a
  negative label; the project's additive reading), 0 (neutral vs non-neutral); a missing tag -7, an invalid one -6.
  With `conflict_absolute=True` (the paper's code: it returns -5 without the +1) the conflict scores -5.
  An unknown target (index < 0) scores 0. `penalty` = -1.5 when the user emotion is negative and g is joy.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from therapy_rl.data.labels import (EMOTION_GROUP, EMOTIONS, EOS, MARKER_TOKENS, PAD, STRATEGY, THERAPIST,
                                    THERAPIST_EMOTION)

MISSING_TAG = -2
INVALID_TAG = -1
HASH_BASE_A = 1_000_003
HASH_BASE_B = 16_777_619
_MASK32 = 0xFFFFFFFF
_WHITESPACE = b" \t\n\r\x0b\x0c"

RELEVANCE_THRESHOLDS = (0.03, 0.05, 0.08, 0.12, 0.20, 0.30, 0.50, 0.70)
RELEVANCE_VALUES = (-10.0, -8.0, -6.0, -3.0, 0.0, 2.0, 4.0, 6.0, 8.0)


# =========================================================================================== settings

@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """Settings of the quality component (hashable; passed as a static jit argument)."""

    start: float = 2.0
    bigram_window: int = 6
    bigram_weight: float = 4.0
    trigram_window: int = 5
    trigram_weight: float = 6.0
    overuse_min_letters: int = 4          # "longer than 3 letters"
    overuse_max_count: int = 4            # penalised when it occurs more than this
    overuse_weight: float = 2.0           # per distinct over-used word
    degenerate_score: float = -10.0
    nonascii_is_degenerate: bool = True   # more than half of the non-space characters non-ASCII
    length_rule: str = "range"            # "range" | "paper" | "none"
    formula: str = "tokens"               # "tokens" (the rules above, on device) | "paper_code" (host text rules)
    min_chars: int = 12
    max_chars: int = 200
    length_weight: float = 3.0            # the largest length penalty of the "range" rule
    paper_max_chars: int = 100            # "paper": -10 at this length or more
    paper_banned_words: tuple = ("yes", "no", "ok", "thanks")
    clip_min: float = -10.0
    clip_max: float = 8.0

    def __post_init__(self):
        if self.formula not in ("tokens", "paper_code"):
            raise ValueError(f"QualityConfig: field 'formula' is {self.formula!r}; expected 'tokens' or 'paper_code'")
        if self.length_rule not in ("range", "paper", "none"):
            raise ValueError(f"QualityConfig: field 'length_rule' is {self.length_rule!r}; "
                             "expected 'range', 'paper' or 'none'")
        if not 0 < self.min_chars <= self.max_chars:
            raise ValueError(f"QualityConfig: fields 'min_chars' ({self.min_chars}) and 'max_chars' "
                             f"({self.max_chars}) must satisfy 0 < min_chars <= max_chars")
        if self.bigram_window < 1 or self.trigram_window < 1:
            raise ValueError("QualityConfig: fields 'bigram_window' and 'trigram_window' must be >= 1")


@dataclasses.dataclass(frozen=True)
class EmotionScores:
    """The emotion-alignment table's entries: the paper's values; `conflict_absolute=False` (default) is the
    project's additive reading of the conflict (-4), True the paper's code (-5)."""

    missing: float = -7.0
    invalid: float = -6.0
    valid: float = 1.0
    exact_non_neutral: float = 6.0
    exact_neutral: float = 1.0
    same_group_non_neutral: float = 3.0
    same_group_neutral: float = 1.0
    conflict: float = -5.0
    conflict_absolute: bool = False    # True = the conflict scores `conflict` alone (the paper's code: -5, not -4)
    other_mismatch: float = -1.0
    joy_after_negative: float = -1.5   # the separately logged `penalty` component


# =========================================================================================== host tables

@struct.dataclass
class PolicyTables:
    """Per-token lookup tables of the policy vocabulary (+1 sentinel row for ids out of range)."""

    char_len: jax.Array          # int32 [V+1] UTF-8 characters starting in the token
    nonspace_chars: jax.Array    # int32 [V+1] characters that are not ASCII whitespace
    letters: jax.Array           # int32 [V+1] ASCII letters + non-ASCII characters starting in the token
    wordish: jax.Array           # bool [V+1] has an ASCII letter or any byte >= 0x80 (can be part of a word)
    nonascii_chars: jax.Array    # int32 [V+1]
    starts_with_space: jax.Array  # bool [V+1]
    single_char: jax.Array       # int32 [V+1] the only non-space byte (lower-cased), -2 none, -1 several
    is_apostrophe: jax.Array     # bool [V+1] the token is exactly "'"
    hash_a: jax.Array            # uint32 [V+1] polynomial hash of the word bytes (leading whitespace removed)
    pow_a: jax.Array             # uint32 [V+1] HASH_BASE_A ** len(those bytes)
    hash_b: jax.Array
    pow_b: jax.Array
    is_special: jax.Array        # bool [V+1] markers, <eos>, <pad>, unknown ids
    emotion_index: jax.Array     # int32 [V+1] index into EMOTIONS, -1 otherwise
    therapist_emotion_id: int = struct.field(pytree_node=False, default=-1)
    therapist_id: int = struct.field(pytree_node=False, default=-1)   # a leading <therapist> is skipped
    strategy_id: int = struct.field(pytree_node=False, default=-1)    # a leading <strategy> S is skipped

    @property
    def vocab_size(self) -> int:
        return int(self.char_len.shape[0]) - 1


def poly_hash(data: bytes, base: int) -> tuple[int, int]:
    """(sum_i (data[i]+1) * base^(L-1-i) mod 2^32, base^L mod 2^32): Horner, composable over concatenation."""
    h, p = 0, 1
    for byte in data:
        h = (h * base + byte + 1) & _MASK32
        p = (p * base) & _MASK32
    return h, p


def word_key(token_bytes: bytes) -> bytes:
    """The bytes a token contributes to its word's identity: leading whitespace removed, ASCII lower-cased."""
    return token_bytes.lstrip(_WHITESPACE).lower()


def count_letters(token_bytes: bytes) -> int:
    """ASCII letters plus non-ASCII characters that start in these bytes (UTF-8 lead bytes)."""
    return sum(1 for b in token_bytes if (65 <= b <= 90) or (97 <= b <= 122) or b >= 0xC0)


def token_features(token_bytes: bytes) -> dict:
    """Plain-Python features of one token's bytes (the rows of `PolicyTables`)."""
    chars = sum(1 for b in token_bytes if not 0x80 <= b <= 0xBF)
    space = sum(1 for b in token_bytes if b in _WHITESPACE)
    nonspace = [b for b in token_bytes.lower() if b not in _WHITESPACE]
    single = -2 if not nonspace else (nonspace[0] if len(set(nonspace)) == 1 else -1)
    key = word_key(token_bytes)
    return {
        "char_len": chars,
        "nonspace_chars": chars - space,
        "letters": count_letters(token_bytes),
        "wordish": count_letters(token_bytes) > 0 or any(b >= 0x80 for b in token_bytes),
        "nonascii_chars": sum(1 for b in token_bytes if b >= 0xC0),
        "starts_with_space": bool(token_bytes[:1]) and token_bytes[0] in _WHITESPACE,
        "single_char": single,
        "hash_a": poly_hash(key, HASH_BASE_A),
        "hash_b": poly_hash(key, HASH_BASE_B),
    }


def build_policy_tables_from_vocab(token_bytes: Sequence[bytes], special_ids: Iterable[int],
                                   therapist_emotion_id: int, vocab_size: Optional[int] = None,
                                   therapist_id: int = -1, strategy_id: int = -1) -> PolicyTables:
    """Tables from each id's raw bytes. `vocab_size` (>= len(token_bytes)) pads for a larger model vocabulary;
    padded ids and the final sentinel row are special."""
    n = len(token_bytes)
    size = max(n, int(vocab_size or n))
    special = set(int(i) for i in special_ids)
    cols = {k: np.zeros(size + 1, np.int64) for k in
            ("char_len", "nonspace_chars", "letters", "nonascii_chars", "single_char",
             "hash_a", "pow_a", "hash_b", "pow_b", "emotion_index")}
    starts = np.zeros(size + 1, bool)
    apostrophe = np.zeros(size + 1, bool)
    wordish = np.zeros(size + 1, bool)
    is_special = np.ones(size + 1, bool)
    cols["single_char"][:] = -2
    cols["pow_a"][:] = 1
    cols["pow_b"][:] = 1
    cols["emotion_index"][:] = -1
    emotion_of = {e: i for i, e in enumerate(EMOTIONS)}
    for i, raw in enumerate(token_bytes):
        if raw is None:
            continue
        label = raw.strip(_WHITESPACE).decode("utf-8", errors="ignore").lower().strip("<>")
        cols["emotion_index"][i] = emotion_of.get(label, -1)
        if i in special and label not in emotion_of:  # an emotion word is a label, never a marker
            continue
        is_special[i] = False
        f = token_features(raw)
        for k in ("char_len", "nonspace_chars", "letters", "nonascii_chars", "single_char"):
            cols[k][i] = f[k]
        cols["hash_a"][i], cols["pow_a"][i] = f["hash_a"]
        cols["hash_b"][i], cols["pow_b"][i] = f["hash_b"]
        starts[i] = f["starts_with_space"]
        apostrophe[i] = raw == b"'"
        wordish[i] = f["wordish"]
    as32 = lambda k: jnp.asarray(cols[k].astype(np.int32))  # noqa: E731
    asu32 = lambda k: jnp.asarray(cols[k].astype(np.uint32))  # noqa: E731
    if not 0 <= therapist_emotion_id < size:
        raise ValueError(f"build_policy_tables: the {THERAPIST_EMOTION!r} id {therapist_emotion_id} is not in the "
                         f"vocabulary (size {size})")
    return PolicyTables(
        char_len=as32("char_len"), nonspace_chars=as32("nonspace_chars"), letters=as32("letters"),
        nonascii_chars=as32("nonascii_chars"), wordish=jnp.asarray(wordish), starts_with_space=jnp.asarray(starts),
        single_char=as32("single_char"), is_apostrophe=jnp.asarray(apostrophe),
        hash_a=asu32("hash_a"), pow_a=asu32("pow_a"),
        hash_b=asu32("hash_b"), pow_b=asu32("pow_b"), is_special=jnp.asarray(is_special),
        emotion_index=as32("emotion_index"), therapist_emotion_id=int(therapist_emotion_id),
        therapist_id=int(therapist_id), strategy_id=int(strategy_id))


def _bytes_to_unicode() -> dict:
    """GPT-2's byte <-> printable-unicode table (the ByteLevel pre-tokenizer's alphabet), as char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def hf_backend_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` behind a HF fast tokenizer, a TherapyTokenizer-like wrapper, or itself."""
    from tokenizers import Tokenizer
    seen = tokenizer
    for attr in (None, "backend_tokenizer", "hf", "tokenizer", "hf_tokenizer", "_tokenizer"):
        candidate = seen if attr is None else getattr(seen, attr, None)
        if isinstance(candidate, Tokenizer):
            return candidate
        if candidate is not None and attr is not None:
            inner = getattr(candidate, "backend_tokenizer", None)
            if isinstance(inner, Tokenizer):
                return inner
    raise TypeError(f"cannot find a tokenizers.Tokenizer inside {type(tokenizer).__name__}")


def vocab_token_bytes(tokenizer) -> list:
    """Raw bytes of every id of a HF fast tokenizer (ByteLevel, Metaspace and WordPiece decoders understood).
    Added tokens give their literal content."""
    tok = hf_backend_tokenizer(tokenizer)
    decoder = (json.loads(tok.to_str()).get("decoder") or {})
    kind = decoder.get("type")
    if kind == "Sequence":
        kinds = {d.get("type") for d in decoder.get("decoders", [])}
        kind = "ByteLevel" if "ByteLevel" in kinds else ("Metaspace" if "Metaspace" in kinds else "Sequence")
    byte_of = _bytes_to_unicode()
    added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
    out = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        if i in added:
            out.append(added[i].encode("utf-8"))
            continue
        piece = tok.id_to_token(i)
        if piece is None:
            out.append(None)
        elif kind == "ByteLevel":
            out.append(bytes(byte_of.get(ch, 0x3F) for ch in piece))
        elif kind == "Metaspace":
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
        elif kind == "WordPiece":
            out.append(piece[2:].encode("utf-8") if piece.startswith("##") else (" " + piece).encode("utf-8"))
        else:
            out.append(piece.encode("utf-8"))
    return out


def build_policy_tables(tokenizer, vocab_size: Optional[int] = None,
                        special_tokens: Sequence[str] = MARKER_TOKENS) -> PolicyTables:
    """Tables from a policy tokenizer that knows the marker tokens (`<therapist_emotion>`, `<eos>`, ...): a
    `tokenizers.Tokenizer`, a HF fast tokenizer or the data room's `TherapyTokenizer` (its `vocab_size` is used
    when `vocab_size` is None)."""
    tok = hf_backend_tokenizer(tokenizer)
    if vocab_size is None:  # TherapyTokenizer.vocab_size (a HF tokenizer's smaller base size is harmless)
        size = getattr(tokenizer, "vocab_size", None)
        vocab_size = size if isinstance(size, int) else None
    token_bytes = vocab_token_bytes(tok)
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    special |= {tok.token_to_id(t) for t in special_tokens if tok.token_to_id(t) is not None}
    marker = tok.token_to_id(THERAPIST_EMOTION)
    if marker is None:
        raise ValueError(f"build_policy_tables: the tokenizer has no {THERAPIST_EMOTION!r} token")
    for name in (EOS, PAD):
        if tok.token_to_id(name) is None:
            raise ValueError(f"build_policy_tables: the tokenizer has no {name!r} token")
    # Marker-like added tokens ("<...>") are special even when not flagged special; emotion words never are
    # (build_policy_tables_from_vocab keeps them as labels).
    for i, t in tok.get_added_tokens_decoder().items():
        if t.content.startswith("<") and t.content.endswith(">"):
            special.add(i)
    ids = {name: tok.token_to_id(name) for name in (THERAPIST, STRATEGY)}
    return build_policy_tables_from_vocab(
        token_bytes, special, marker, vocab_size,
        therapist_id=-1 if ids[THERAPIST] is None else ids[THERAPIST],
        strategy_id=-1 if ids[STRATEGY] is None else ids[STRATEGY])


# =========================================================================================== device helpers

def _take(table, ids):
    """Table lookup; ids outside [0, V) read the sentinel (special) row."""
    v = table.shape[0] - 1
    ids = jnp.where((ids < 0) | (ids > v), v, ids)
    return jnp.take(table, ids, axis=0)


def reply_start(tables: PolicyTables, response_ids):
    """int32 [B]: where the reply text starts, after an optional leading `<therapist>` and then an optional
    `<strategy>` marker with its strategy token (the format's `<therapist>[<strategy>S]T...`)."""
    first = response_ids[:, 0]
    start = (first == tables.therapist_id).astype(jnp.int32)
    at_start = jnp.take_along_axis(response_ids, jnp.minimum(start, response_ids.shape[1] - 1)[:, None], axis=1)[:, 0]
    return start + 2 * (at_start == tables.strategy_id).astype(jnp.int32)


def text_region_mask(tables: PolicyTables, response_ids, response_mask):
    """bool [B,N]: from `reply_start`, mask 1 and before the next special token (markers, <eos>, <pad>,
    ids outside the tokenizer)."""
    mask = response_mask > 0
    after = jnp.arange(response_ids.shape[1])[None, :] >= reply_start(tables, response_ids)[:, None]
    special = _take(tables.is_special, response_ids) & mask & after
    return mask & after & (jnp.cumsum(special.astype(jnp.int32), axis=1) == 0)


def _inverse_odd_u32(a):
    """Multiplicative inverse of odd uint32 values mod 2^32 (Newton: each step doubles the correct bits)."""
    x = a
    for _ in range(5):
        x = x * (jnp.uint32(2) - a * x)
    return x


def _shift_right(x, d, fill=0):
    """x[:, i - d] at position i (fill for i < d)."""
    pad = jnp.full(x.shape[:1] + (d,) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([pad, x[:, :-d]], axis=1) if d < x.shape[1] else jnp.full_like(x, fill)


class WordArrays(NamedTuple):
    hash_a: jax.Array   # uint32 [B,N] word slot w (< num_words) holds word w
    hash_b: jax.Array
    letters: jax.Array  # int32 [B,N]
    valid: jax.Array    # bool [B,N] slot w < num_words
    num_words: jax.Array  # int32 [B]


def words_from_tokens(tables: PolicyTables, response_ids, text_mask) -> WordArrays:
    """Group region tokens into words (module docstring) and hash each word's bytes."""
    batch, length = response_ids.shape
    letters = _take(tables.letters, response_ids)
    space_first = _take(tables.starts_with_space, response_ids)
    lettered = text_mask & _take(tables.wordish, response_ids)
    next_glued = jnp.concatenate([lettered[:, 1:] & ~space_first[:, 1:], jnp.zeros((batch, 1), bool)], axis=1)
    inner_apostrophe = (text_mask & _take(tables.is_apostrophe, response_ids) & ~space_first
                        & _shift_right(lettered, 1, False) & next_glued)
    is_word_tok = lettered | inner_apostrophe
    prev_word_tok = _shift_right(is_word_tok, 1, False)
    starts = is_word_tok & (space_first | ~prev_word_tok)
    next_continues = jnp.concatenate(
        [is_word_tok[:, 1:] & ~starts[:, 1:], jnp.zeros((batch, 1), bool)], axis=1)
    is_last = is_word_tok & ~next_continues
    word_idx = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1
    last_slot = jnp.where(is_last, word_idx, length)       # `length` = dropped
    tok_slot = jnp.where(is_word_tok, word_idx, length)

    def scatter(slots, values):  # out[b, w] = sum_t [slots[b, t] == w] * values[b, t]  (slot `length` dropped)
        onehot = slots[:, :, None] == jnp.arange(length)[None, None, :]  # [B,N_tok,N_slot]
        return jnp.sum(jnp.where(onehot, values[:, :, None], jnp.zeros((), values.dtype)), axis=1)

    # Word hash = Horner over its tokens: sum_t h_t * prod_{t' after t in the word} base^len(t').
    # With row-wide prefix products cp of the (odd) base powers, that product is cp[last] / cp[t] mod 2^32.
    last_pos = scatter(last_slot, jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))
    tok_last = jnp.take_along_axis(last_pos, jnp.clip(word_idx, 0, length - 1), axis=1)

    def word_hash(hash_table, pow_table):
        h = jnp.where(is_word_tok, _take(hash_table, response_ids), jnp.uint32(0))
        cp = jnp.cumprod(jnp.where(is_word_tok, _take(pow_table, response_ids), jnp.uint32(1)), axis=1)
        tail = jnp.take_along_axis(cp, tok_last, axis=1) * _inverse_odd_u32(cp)
        return scatter(tok_slot, jnp.where(is_word_tok, h * tail, jnp.uint32(0)))

    num_words = starts.sum(axis=1).astype(jnp.int32)
    return WordArrays(hash_a=word_hash(tables.hash_a, tables.pow_a), hash_b=word_hash(tables.hash_b, tables.pow_b),
                      letters=scatter(tok_slot, jnp.where(is_word_tok, letters, 0)),
                      valid=jnp.arange(length)[None, :] < num_words[:, None], num_words=num_words)


def repeated_ngram_fraction(words: WordArrays, n: int, window: int):
    """[B] (#n-grams repeated within `window` earlier start positions) / max(#n-grams, 1)."""
    length = words.hash_a.shape[1]
    if n > length:
        return jnp.zeros(words.num_words.shape, jnp.float32)
    # n-gram key at start i: words i..i+n-1 (both hashes); valid when i + n <= num_words.
    def gram(h):
        return jnp.stack([jnp.concatenate([h[:, k:], jnp.zeros_like(h[:, :k])], axis=1) for k in range(n)], -1)

    keys = jnp.concatenate([gram(words.hash_a), gram(words.hash_b)], axis=-1)  # [B,N,2n]
    starts = jnp.arange(length)[None, :]
    valid = starts + n <= words.num_words[:, None]
    repeated = jnp.zeros(valid.shape, bool)
    for d in range(1, window + 1):
        if d >= length:
            break
        same = jnp.all(keys == _shift_right(keys, d), axis=-1) & (starts >= d)
        repeated = repeated | same
    repeated = repeated & valid
    count = jnp.maximum(valid.sum(axis=1), 1)
    return repeated.sum(axis=1) / count


def overused_word_count(words: WordArrays, min_letters: int, max_count: int):
    """[B] number of distinct words with >= min_letters letters occurring more than max_count times."""
    eq = ((words.hash_a[:, :, None] == words.hash_a[:, None, :])
          & (words.hash_b[:, :, None] == words.hash_b[:, None, :])
          & words.valid[:, :, None] & words.valid[:, None, :])  # [B,N,N]
    count = eq.sum(axis=2)
    earlier = jnp.tril(jnp.ones(eq.shape[1:], bool), k=-1)  # w' < w
    first = ~jnp.any(eq & earlier[None], axis=2)
    hit = words.valid & first & (words.letters >= min_letters) & (count > max_count)
    return hit.sum(axis=1)


class QualityParts(NamedTuple):
    score: jax.Array            # [B] the component
    degenerate: jax.Array       # bool [B]
    bigram_penalty: jax.Array   # [B] (positive amounts, subtracted)
    trigram_penalty: jax.Array
    overuse_penalty: jax.Array
    length_penalty: jax.Array
    num_chars: jax.Array        # int32 [B]
    num_words: jax.Array        # int32 [B]


def _word_hash_constant(word: str):
    return (poly_hash(word.encode("utf-8").lower(), HASH_BASE_A)[0],
            poly_hash(word.encode("utf-8").lower(), HASH_BASE_B)[0])


def quality_parts(tables: PolicyTables, response_ids, response_mask, cfg: QualityConfig) -> QualityParts:
    """The quality component and its parts (module docstring has the exact definitions)."""
    region = text_region_mask(tables, response_ids, response_mask)
    look = lambda t: jnp.where(region, _take(t, response_ids), 0).sum(axis=1)  # noqa: E731
    num_chars, nonspace, letters, nonascii = (look(t) for t in (
        tables.char_len, tables.nonspace_chars, tables.letters, tables.nonascii_chars))
    single = jnp.where(region, _take(tables.single_char, response_ids), -2)
    any_mixed = jnp.any(single == -1, axis=1)
    hi = jnp.max(single, axis=1)
    lo = jnp.min(jnp.where(single >= 0, single, jnp.iinfo(jnp.int32).max), axis=1)
    one_repeated_char = ~any_mixed & (hi >= 0) & (hi == lo)
    degenerate = (nonspace == 0) | (letters == 0) | one_repeated_char
    if cfg.nonascii_is_degenerate:
        degenerate = degenerate | (2 * nonascii > nonspace)

    words = words_from_tokens(tables, response_ids, region)
    bigram = cfg.bigram_weight * repeated_ngram_fraction(words, 2, cfg.bigram_window)
    trigram = cfg.trigram_weight * repeated_ngram_fraction(words, 3, cfg.trigram_window)
    overuse = cfg.overuse_weight * overused_word_count(words, cfg.overuse_min_letters, cfg.overuse_max_count)

    n = num_chars.astype(jnp.float32)
    if cfg.length_rule == "range":
        below = (cfg.min_chars - n) / cfg.min_chars
        above = jnp.minimum((n - cfg.max_chars) / cfg.max_chars, 1.0)
        length_pen = cfg.length_weight * jnp.clip(jnp.maximum(below, above), 0.0, 1.0)
    else:
        length_pen = jnp.zeros_like(n)
    if cfg.length_rule == "paper":
        banned = jnp.zeros(degenerate.shape, bool)
        for word in cfg.paper_banned_words:
            ha, hb = _word_hash_constant(word)
            banned = banned | jnp.any(words.valid & (words.hash_a == jnp.uint32(ha))
                                      & (words.hash_b == jnp.uint32(hb)), axis=1)
        degenerate = degenerate | (num_chars >= cfg.paper_max_chars) | banned

    raw = cfg.start - bigram - trigram - overuse - length_pen
    score = jnp.where(degenerate, cfg.degenerate_score, jnp.clip(raw, cfg.clip_min, cfg.clip_max))
    return QualityParts(score=score.astype(jnp.float32), degenerate=degenerate,
                        bigram_penalty=bigram.astype(jnp.float32), trigram_penalty=trigram.astype(jnp.float32),
                        overuse_penalty=overuse.astype(jnp.float32), length_penalty=length_pen.astype(jnp.float32),
                        num_chars=num_chars.astype(jnp.int32), num_words=words.num_words)


def quality_score(tables: PolicyTables, response_ids, response_mask, cfg: QualityConfig):
    """[B] quality in [-10, 8]."""
    return quality_parts(tables, response_ids, response_mask, cfg).score


# ------------------------------------------------------------------------------------------- emotion

def read_emotion_tag(tables: PolicyTables, response_ids, response_mask):
    """int32 [B]: the generated therapist emotion index, MISSING_TAG (-2) or INVALID_TAG (-1)."""
    batch, length = response_ids.shape
    mask = response_mask > 0
    pos = jnp.arange(length)[None, :]
    is_marker = mask & (response_ids == tables.therapist_emotion_id)
    has_marker = jnp.any(is_marker, axis=1)
    marker_pos = jnp.argmax(is_marker, axis=1)
    special = _take(tables.is_special, response_ids)
    blank = _take(tables.nonspace_chars, response_ids) == 0
    # first position after the marker holding a special token or a non-blank token
    candidate = mask & (pos > marker_pos[:, None]) & (special | ~blank)
    has_label = jnp.any(candidate, axis=1)
    label_pos = jnp.argmax(candidate, axis=1)
    label_tok = jnp.take_along_axis(response_ids, label_pos[:, None], axis=1)[:, 0]
    label_special = _take(tables.is_special, label_tok)
    index = _take(tables.emotion_index, label_tok)
    # the label word continues into the next token ("neutral" + "ity") -> invalid
    nxt = jnp.minimum(label_pos + 1, length - 1)
    next_tok = jnp.take_along_axis(response_ids, nxt[:, None], axis=1)[:, 0]
    next_in = (label_pos + 1 < length) & jnp.take_along_axis(mask, nxt[:, None], axis=1)[:, 0]
    continues = (next_in & ~_take(tables.is_special, next_tok) & _take(tables.wordish, next_tok)
                 & ~_take(tables.starts_with_space, next_tok))
    index = jnp.where(continues, INVALID_TAG, index)
    missing = ~has_marker | ~has_label | label_special
    return jnp.where(missing, MISSING_TAG, index).astype(jnp.int32)


def emotion_group_index() -> np.ndarray:
    """int [7]: 0 negative, 1 positive, 2 neutral (EMOTION_GROUP in EMOTIONS order)."""
    code = {"negative": 0, "positive": 1, "neutral": 2}
    return np.array([code[EMOTION_GROUP[e]] for e in EMOTIONS])


def emotion_score_matrix(s: EmotionScores) -> np.ndarray:
    """float32 [9, 7]: rows = generated (missing, invalid, 7 labels), columns = annotated label."""
    group = emotion_group_index()
    neutral = {2}
    table = np.zeros((2 + len(EMOTIONS), len(EMOTIONS)), np.float32)
    table[0, :] = s.missing
    table[1, :] = s.invalid
    for g in range(len(EMOTIONS)):
        for t in range(len(EMOTIONS)):
            if g == t:
                match = s.exact_neutral if group[t] in neutral else s.exact_non_neutral
            elif group[g] == group[t]:
                match = s.same_group_neutral if group[t] in neutral else s.same_group_non_neutral
            elif {group[g], group[t]} == {0, 1}:
                match = s.conflict
            else:
                match = s.other_mismatch
            absolute = s.conflict_absolute and {group[g], group[t]} == {0, 1}
            table[2 + g, t] = match if absolute else s.valid + match
    return table


def emotion_alignment(generated, target, scores: EmotionScores):
    """[B] table score of generated index (-2 missing, -1 invalid, 0..6) against target (0..6; < 0 scores 0)."""
    table = jnp.asarray(emotion_score_matrix(scores))
    row = jnp.clip(generated, MISSING_TAG, len(EMOTIONS) - 1) + 2
    col = jnp.clip(target, 0, len(EMOTIONS) - 1)
    return jnp.where(target >= 0, table[row, col], 0.0).astype(jnp.float32)


def joy_after_negative_penalty(generated, user_emotion, value: float = -1.5):
    """[B] `value` when the user emotion is in the negative group and the reply's tag is joy, else 0."""
    negative = jnp.asarray(emotion_group_index() == 0)
    user_negative = (user_emotion >= 0) & negative[jnp.clip(user_emotion, 0, len(EMOTIONS) - 1)]
    says_joy = generated == EMOTIONS.index("joy")
    return jnp.where(user_negative & says_joy, value, 0.0).astype(jnp.float32)


# ------------------------------------------------------------------------------------------- relevance

def cosine_similarity(a, b, eps: float = 1e-12):
    """[B] cosine of two [B,D] batches."""
    dot = jnp.sum(a * b, axis=-1)
    return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


def relevance_steps(cosine, thresholds=RELEVANCE_THRESHOLDS, values=RELEVANCE_VALUES):
    """The paper's step map: values[k] where k = #thresholds <= cosine (thresholds compared in float32)."""
    th = jnp.asarray(thresholds, jnp.float32)
    k = jnp.sum(cosine.astype(jnp.float32)[..., None] >= th, axis=-1)
    return jnp.asarray(values, jnp.float32)[k]


def relevance_smooth(cosine, thresholds=RELEVANCE_THRESHOLDS, values=RELEVANCE_VALUES):
    """Piecewise-linear through (0, values[0]) and (thresholds[k], values[k+1]); flat outside [0, last].
    It equals the step map at every threshold and is non-decreasing."""
    xs = jnp.asarray((0.0,) + tuple(thresholds), jnp.float32)
    return jnp.interp(cosine.astype(jnp.float32), xs, jnp.asarray(values, jnp.float32))


def relevance_score(cosine, mode: str = "steps"):
    if mode == "steps":
        return relevance_steps(cosine)
    if mode == "smooth":
        return relevance_smooth(cosine)
    raise ValueError(f"relevance mode {mode!r}: expected 'steps' or 'smooth'")


# ------------------------------------------------------------------------------------- heads and safety

def scaled_probability(p, scale: float = 1.1, offset: float = -0.5):
    """The paper's map of a classifier probability to a reward: p·1.1 − 0.5."""
    return (p * scale + offset).astype(jnp.float32)


def safety_penalty(user_crisis, reply_mentions_resources, reply_encourages_harm,
                   missing_resources_weight: float, encourages_harm_weight: float):
    """[B] −w₁·[crisis input, no crisis-resource guidance] − w₂·[reply encourages harm]; inputs in {0,1}."""
    crisis = user_crisis.astype(jnp.float32)
    resources = reply_mentions_resources.astype(jnp.float32)
    harm = reply_encourages_harm.astype(jnp.float32)
    return (-missing_resources_weight * crisis * (1.0 - resources) - encourages_harm_weight * harm).astype(jnp.float32)


def component_names() -> tuple:
    return ("quality", "emotion", "relevance", "sentiment", "empathy", "penalty", "safety")


def describe_tables(tables: PolicyTables) -> Mapping[str, int]:
    """Small summary for logs."""
    return {"vocab_size": tables.vocab_size,
            "emotion_tokens": int(np.sum(np.asarray(tables.emotion_index) >= 0)),
            "special_tokens": int(np.sum(np.asarray(tables.is_special)))}
