"""Crisis detection (suicidal ideation, self-harm, harm to others) and reply-safety checks on MiniLM token ids.

The detector combines a curated lexicon (`lexicon/crisis_lexicon.json`) with the crisis head of `heads.py`:

    flag = strong lexicon hit
         | (weak lexicon hit & P_head >= thresholds["support"])
         | two multi-word weak hits that share no token ("wrote letters to my family" + "in case I don't make it")
         | (P_head >= thresholds["alone"] & no idiom in the text)

A lexicon hit is a contiguous MiniLM wordpiece id n-gram that starts and ends on word boundaries; a veto phrase
("this exam is killing me" style idioms, "killing time", "hurt myself at the gym", negations for replies) cancels
a hit it spans (crisis tables) or overlaps (reply tables, where a negation such as "don't think you
should" must cancel "you should end it all"; see VETO_MODE), and any idiom in the text "explains away" a high head probability (the head
alone sees "hanging out" near "hanging"; an idiom never cancels a strong or a confirmed weak hit elsewhere in
the text). All matching runs on padded id tables inside jit, so the reward and the chat
CLI share one code path. `crisis_flags` is meant for USER text; replies are checked with `encourages_harm` and
`mentions_crisis_resources` (a good reply to a crisis names suicide and a crisis line, and must not be flagged).

Chat, the API and the CLI use `therapy_rl.guard` instead: it reads the whole input in windows (this module's
`CrisisDetector` truncates to `max_length` tokens), counts earlier turns, has a learned reply guard, and keeps this
lexicon as its second signal. `CrisisDetector` stays for comparison and for the reward's user-side flag.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from therapy_rl.rewards import heads as heads_lib

LEXICON_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lexicon", "crisis_lexicon.json")
# table name -> the veto table whose matches cancel its hits (None: no veto).
TABLE_VETO = {
    "crisis_strong": "crisis_veto",
    "crisis_weak": "crisis_veto",
    "crisis_veto": None,
    "resources": None,
    "harm_encouragement": "harm_veto",
    "harm_veto": None,
}
# How a veto cancels a hit: "contain" = the veto phrase spans the whole hit ("killing time" cancels the weak hit
# "killing", while "want to live in" cannot cancel "don't want to live"); "overlap" = it shares a token with the
# hit (replies: "don't think you should" cancels "you should end it all").
VETO_MODE = {"crisis_strong": "contain", "crisis_weak": "contain", "harm_encouragement": "overlap"}
# Typographic variants folded onto their ASCII token before matching.
_CANONICAL_CHARS = {"’": "'", "‘": "'", "ʼ": "'", "′": "'", "`": "'", "“": '"', "”": '"', "–": "-", "—": "-"}
MAX_PHRASES_PER_PATTERN = 5000


class LexiconError(ValueError):
    """The lexicon file is malformed (names the file and the field)."""


# ----------------------------------------------------------------------------- pattern expansion (host)


def _split_top_level(body: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def _expand_braces(pattern: str, where: str) -> list[str]:
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern or "|" in pattern:
            raise LexiconError(f"{where}: unbalanced '}}' or stray '|' in pattern")
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise LexiconError(f"{where}: unbalanced '{{' in pattern")
    prefix, body, rest = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    if "}" in prefix or "|" in prefix:
        raise LexiconError(f"{where}: unbalanced '}}' or stray '|' in pattern")
    tails = _expand_braces(rest, where)
    out = []
    for alternative in _split_top_level(body):
        for head in _expand_braces(alternative, where):
            out.extend(prefix + head + tail for tail in tails)
    return out


def expand_pattern(pattern: str, macros: Mapping[str, str], where: str = "pattern") -> list[str]:
    """'{a|b|} c $M' -> concrete lower-case phrases (macros first, then nested alternations; whitespace collapsed)."""
    text = pattern
    for _ in range(10):
        names = re.findall(r"\$([A-Z_]+)", text)
        if not names:
            break
        for name in names:
            if name not in macros:
                raise LexiconError(f"{where}: unknown macro ${name}")
        text = re.sub(r"\$([A-Z_]+)", lambda m: macros[m.group(1)], text)
    else:
        raise LexiconError(f"{where}: macros nest too deeply")
    phrases = []
    for phrase in _expand_braces(text, where):
        phrase = " ".join(phrase.lower().split())
        if phrase:
            phrases.append(phrase)
    if len(phrases) > MAX_PHRASES_PER_PATTERN:
        raise LexiconError(f"{where}: pattern expands to {len(phrases)} phrases (> {MAX_PHRASES_PER_PATTERN})")
    return list(dict.fromkeys(phrases))


def load_lexicon_phrases(path: str = LEXICON_FILE) -> dict[str, dict[str, list[str]]]:
    """{table: {category: [phrase, ...]}} with every pattern expanded; raises LexiconError naming the field."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as err:
        raise LexiconError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    macros = spec.get("macros", {})
    tables = spec.get("tables")
    if not isinstance(tables, dict):
        raise LexiconError(f"{path}: missing object field 'tables'")
    missing = [name for name in TABLE_VETO if name not in tables]
    if missing:
        raise LexiconError(f"{path}: field 'tables' lacks {missing}")
    out: dict[str, dict[str, list[str]]] = {}
    for table, categories in tables.items():
        if table not in TABLE_VETO:
            raise LexiconError(f"{path}: unknown table 'tables.{table}' (known: {sorted(TABLE_VETO)})")
        if not isinstance(categories, dict) or not categories:
            raise LexiconError(f"{path}: field 'tables.{table}' must be a non-empty object of category -> patterns")
        out[table] = {}
        for category, patterns in categories.items():
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise LexiconError(f"{path}: field 'tables.{table}.{category}' must be a list of strings")
            phrases: list[str] = []
            for i, pattern in enumerate(patterns):
                phrases.extend(expand_pattern(pattern, macros, f"{path}: tables.{table}.{category}[{i}]"))
            out[table][category] = list(dict.fromkeys(phrases))
    return out


# ----------------------------------------------------------------------------- tables (pytrees)


@struct.dataclass
class PhraseTable:
    """Padded phrase id table sorted by n-gram hash.

    ids [P, L] (pad -1), lengths [P], category [P] (index into `categories`), hashes [P] uint32 ascending and
    distinct (`salt` picks the hash seed that made them distinct). Matching hashes every text n-gram, finds it
    with a binary search and then compares the ids exactly, so a hash collision can never create a false hit.
    """

    ids: jax.Array
    lengths: jax.Array
    category: jax.Array
    hashes: jax.Array
    categories: tuple = struct.field(pytree_node=False)
    phrases: tuple = struct.field(pytree_node=False)
    salt: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class SafetyLexicon:
    """Phrase tables keyed by TABLE_VETO's names, plus per-vocab arrays for word boundaries and char folding."""

    tables: Mapping[str, PhraseTable]
    is_continuation: jax.Array  # [V] bool: wordpiece '##' pieces
    canonical_id: jax.Array  # [V] int32: id after folding typographic quotes/dashes


_HASH_MULT = np.uint32(0x01000193)
_HASH_LEN = np.uint32(0x9E3779B1)


def _ngram_hash(xp, token_ids, length, salt: int):
    """uint32 hash of n-grams; `token_ids` [..., n] (already cut to `length` by the caller), numpy or jax.numpy."""
    h = xp.full(token_ids.shape[:-1], np.uint32(2166136261 + 7919 * salt), dtype=xp.uint32)
    for k in range(token_ids.shape[-1]):
        h = h * _HASH_MULT + (token_ids[..., k].astype(xp.uint32) + np.uint32(1))
    return _mix(xp, h ^ (xp.asarray(length).astype(xp.uint32) * _HASH_LEN))


def _mix(xp, h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _tokenize_phrases(tokenizer: Any, phrases: Sequence[str]) -> list[list[int]]:
    import tokenizers  # local: only needed for this type check

    if isinstance(tokenizer, tokenizers.Tokenizer):
        return [enc.ids for enc in tokenizer.encode_batch(list(phrases), add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(list(phrases), add_special_tokens=False)["input_ids"]]


def _vocab(tokenizer: Any) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise LexiconError("tokenizer has an empty vocabulary")
    return vocab


def _table_from_rows(rows: Sequence[Sequence[int]], cats: Sequence[int], names: tuple, phrases: Sequence[str]) -> PhraseTable:
    """Build a hashed, sorted table from unique id rows (exposed for tests)."""
    width = max(len(r) for r in rows)
    table = np.full((len(rows), width), -1, np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    lengths = np.asarray([len(r) for r in rows], np.int32)
    for salt in range(64):
        hashes = np.zeros(len(rows), np.uint32)
        with np.errstate(over="ignore"):
            for n in np.unique(lengths):  # all rows of one length at once
                sel = np.flatnonzero(lengths == n)
                hashes[sel] = _ngram_hash(np, table[sel, :n], n, salt)
        if len(np.unique(hashes)) == len(hashes):
            break
    else:
        raise LexiconError("could not find a collision-free n-gram hash for the lexicon")
    order = np.argsort(hashes, kind="stable")
    return PhraseTable(
        ids=jnp.asarray(table[order]),
        lengths=jnp.asarray(lengths[order]),
        category=jnp.asarray(np.asarray(cats, np.int32)[order]),
        hashes=jnp.asarray(hashes[order]),
        categories=tuple(names),
        phrases=tuple(phrases[i] for i in order),
        salt=salt,
    )


def _build_table(tokenizer: Any, categories: Mapping[str, list[str]]) -> PhraseTable:
    names = tuple(categories)
    phrases, cats = [], []
    for c, name in enumerate(names):
        phrases.extend(categories[name])
        cats.extend([c] * len(categories[name]))
    id_lists = _tokenize_phrases(tokenizer, phrases)
    seen, rows, kept_phrases, kept_cats = set(), [], [], []
    for phrase, ids, c in zip(phrases, id_lists, cats):
        key = tuple(ids)
        if not ids or key in seen:
            continue
        seen.add(key)
        rows.append(ids)
        kept_phrases.append(phrase)
        kept_cats.append(c)
    return _table_from_rows(rows, kept_cats, names, kept_phrases)


def build_safety_lexicon(minilm_tokenizer: Any, lexicon_path: str = LEXICON_FILE) -> SafetyLexicon:
    """Expand the curated lexicon and tokenize every phrase with the MiniLM wordpiece tokenizer.

    `minilm_tokenizer`: an HF tokenizer (called with add_special_tokens=False) or a `tokenizers.Tokenizer`.
    """
    phrases = load_lexicon_phrases(lexicon_path)
    vocab = _vocab(minilm_tokenizer)
    size = max(vocab.values()) + 1
    is_continuation = np.zeros(size, bool)
    for token, i in vocab.items():
        is_continuation[i] = token.startswith("##")
    canonical = np.arange(size, dtype=np.int32)
    for variant, plain in _CANONICAL_CHARS.items():
        if variant in vocab and plain in vocab:
            canonical[vocab[variant]] = vocab[plain]
    tables = {name: _build_table(minilm_tokenizer, phrases[name]) for name in TABLE_VETO}
    return SafetyLexicon(tables=tables, is_continuation=jnp.asarray(is_continuation), canonical_id=jnp.asarray(canonical))


# ----------------------------------------------------------------------------- matching (jittable)


def _prepare(lexicon: SafetyLexicon, ids: jax.Array, mask: jax.Array):
    """Folded ids, valid mask and continuation mask, each [B, T]."""
    size = lexicon.canonical_id.shape[0]
    in_vocab = (ids >= 0) & (ids < size)
    safe = jnp.clip(ids, 0, size - 1)
    valid = (mask > 0) & in_vocab
    folded = jnp.where(valid, lexicon.canonical_id[safe], -2)
    continuation = valid & lexicon.is_continuation[safe]
    return folded, valid, continuation


def _find_phrases(table: PhraseTable, folded: jax.Array, valid: jax.Array, continuation: jax.Array):
    """found [B, T, W] bool and row [B, T, W] int32: the n-gram of length w+1 starting at t is table row `row`,
    and it starts and ends on word boundaries (W = the table's longest phrase).

    Prefix hashes of every window are built in one pass, looked up with one binary search over the sorted table
    hashes, and the candidate rows are compared id by id (so a hash collision cannot create a hit)."""
    batch, length = folded.shape
    width = table.ids.shape[1]
    ids_pad = jnp.pad(folded, ((0, 0), (0, width)), constant_values=-2)
    valid_pad = jnp.pad(valid, ((0, 0), (0, width)))
    cont_pad = jnp.pad(continuation, ((0, 0), (0, width + 1)))
    windows = jnp.stack([ids_pad[:, k : k + length] for k in range(width)], axis=-1)  # [B, T, W]
    window_valid = jnp.stack([valid_pad[:, k : k + length] for k in range(width)], axis=-1)
    after_cont = jnp.stack([cont_pad[:, k + 1 : k + 1 + length] for k in range(width)], axis=-1)  # token after w
    hashes = _prefix_hashes(windows, table.salt)  # [B, T, W]: hash of windows[..., :w+1]
    rows = jnp.clip(jnp.searchsorted(table.hashes, hashes.reshape(-1)), 0, table.ids.shape[0] - 1)
    rows = rows.reshape(hashes.shape).astype(jnp.int32)
    n = jnp.arange(1, width + 1)  # [W] n-gram length per slot
    cand = table.ids[rows]  # [B, T, W, W]
    in_gram = jnp.arange(width)[None, :] < n[:, None]  # [W(slot), W(position)]
    exact = jnp.all(jnp.where(in_gram, cand == windows[:, :, None, :], True), axis=-1)
    all_valid = jnp.cumprod(window_valid.astype(jnp.int32), axis=-1) > 0
    found = exact & (table.lengths[rows] == n) & all_valid
    found = found & (valid & ~continuation)[:, :, None] & ~after_cont
    return found, rows


def _prefix_hashes(windows: jax.Array, salt: int) -> jax.Array:
    """[B, T, W] uint32: slot w holds _ngram_hash(windows[..., :w+1], w+1, salt) (a scan keeps compiles small)."""
    width = windows.shape[-1]
    length_codes = jnp.asarray([((k + 1) * int(_HASH_LEN)) & 0xFFFFFFFF for k in range(width)], jnp.uint32)

    def step(h, xs):
        token, code = xs
        h = h * _HASH_MULT + (token.astype(jnp.uint32) + np.uint32(1))
        return h, _mix(jnp, h ^ code)

    h0 = jnp.full(windows.shape[:-1], np.uint32(2166136261 + 7919 * salt), dtype=jnp.uint32)
    _, out = jax.lax.scan(step, h0, (jnp.moveaxis(windows, -1, 0), length_codes))
    return jnp.moveaxis(out, 0, -1)


def _covered_tokens(found: jax.Array) -> jax.Array:
    """[B, T] bool: token t lies inside some found phrase (found [B, T, W] as from _find_phrases)."""
    length, width = found.shape[1], found.shape[2]
    covered = jnp.zeros(found.shape[:2], bool)
    for k in range(width):
        begins = jnp.any(found[..., k:], axis=-1)  # a phrase of length > k starts at t, so it covers t + k
        covered = covered | jnp.pad(begins, ((0, 0), (k, 0)))[:, :length]
    return covered


def _overlaps(found: jax.Array, covered: jax.Array) -> jax.Array:
    """[B, T, W] bool: the span [t, t + w + 1) contains a covered token."""
    length, width = found.shape[1], found.shape[2]
    covered_pad = jnp.pad(covered, ((0, 0), (0, width)))
    hit = jnp.zeros(found.shape, bool)
    any_so_far = jnp.zeros(covered.shape, bool)
    for w in range(width):
        any_so_far = any_so_far | covered_pad[:, w : w + length]
        hit = hit.at[..., w].set(any_so_far)
    return hit


def _contained(found: jax.Array, veto_found: jax.Array) -> jax.Array:
    """[B, T, W] bool: some veto match [t', t' + n') spans the hit [t, t + w + 1) (t' <= t, t' + n' >= t + w + 1)."""
    length, width = found.shape[1], found.shape[2]
    veto_width = veto_found.shape[2]
    ends = jnp.where(veto_found, jnp.arange(length)[None, :, None] + jnp.arange(1, veto_width + 1)[None, None, :], -1)
    reach = jax.lax.cummax(jnp.max(ends, axis=-1), axis=1)  # [B, T]: furthest end of a veto starting at <= t
    hit_end = jnp.arange(length)[None, :, None] + jnp.arange(1, width + 1)[None, None, :]
    return reach[:, :, None] >= hit_end


def _veto_matches(lexicon: SafetyLexicon, table_name: str, prepared) -> jax.Array | None:
    """[B, T, W'] matches of the veto table of `table_name` (None when it has no veto table)."""
    veto_name = TABLE_VETO[table_name]
    if veto_name is None:
        return None
    return _find_phrases(lexicon.tables[veto_name], *prepared)[0]


def _live_matches(lexicon: SafetyLexicon, table_name: str, minilm_ids: jax.Array, minilm_mask: jax.Array,
                  prepared=None, veto_found=None):
    """(found [B, T, W], rows [B, T, W]) of `table_name` with vetoed occurrences removed (VETO_MODE)."""
    prepared = _prepare(lexicon, minilm_ids, minilm_mask) if prepared is None else prepared
    found, rows = _find_phrases(lexicon.tables[table_name], *prepared)
    veto_found = _veto_matches(lexicon, table_name, prepared) if veto_found is None else veto_found
    if veto_found is not None:
        if VETO_MODE[table_name] == "contain":
            found = found & ~_contained(found, veto_found)
        else:
            found = found & ~_overlaps(found, _covered_tokens(veto_found))
    return found, rows


def _disjoint_pair(found: jax.Array) -> jax.Array:
    """[B] bool: two found phrases share no token, i.e. the earliest end <= the latest start (found [B, T, W])."""
    length, width = found.shape[1], found.shape[2]
    starts = jnp.broadcast_to(jnp.arange(length)[None, :, None], found.shape)
    ends = starts + jnp.arange(1, width + 1)[None, None, :]  # exclusive end of the phrase of length w + 1 at t
    latest_start = jnp.max(jnp.where(found, starts, -1), axis=(1, 2))
    earliest_end = jnp.min(jnp.where(found, ends, length + width + 1), axis=(1, 2))
    return earliest_end <= latest_start


def _categories(table: PhraseTable, found: jax.Array, rows: jax.Array) -> jax.Array:
    one_hot = jax.nn.one_hot(table.category[rows], len(table.categories), dtype=bool)  # [B, T, W, C]
    return jnp.any(one_hot & found[..., None], axis=(1, 2))


def phrase_hits(lexicon: SafetyLexicon, table_name: str, minilm_ids: jax.Array, minilm_mask: jax.Array) -> jax.Array:
    """[B, P] bool: phrase p of `table_name` occurs in the text and no veto phrase overlaps that occurrence."""
    found, rows = _live_matches(lexicon, table_name, minilm_ids, minilm_mask)
    batch = found.shape[0]
    num_phrases = lexicon.tables[table_name].ids.shape[0]
    flat_rows = rows.reshape(batch, -1)
    flat_found = found.reshape(batch, -1)
    out = jnp.zeros((batch, num_phrases), bool)
    return out.at[jnp.arange(batch)[:, None], flat_rows].max(flat_found)


def category_hits(lexicon: SafetyLexicon, table_name: str, minilm_ids: jax.Array, minilm_mask: jax.Array) -> jax.Array:
    """[B, C] bool: some (unvetoed) phrase of each category of `table_name` occurs."""
    return _categories(lexicon.tables[table_name], *_live_matches(lexicon, table_name, minilm_ids, minilm_mask))


def any_hit(lexicon: SafetyLexicon, table_name: str, minilm_ids: jax.Array, minilm_mask: jax.Array) -> jax.Array:
    """[B] bool: some (unvetoed) phrase of `table_name` occurs."""
    found, _ = _live_matches(lexicon, table_name, minilm_ids, minilm_mask)
    return jnp.any(found, axis=(1, 2))


def crisis_evidence(
    lexicon: SafetyLexicon,
    heads: heads_lib.RewardHeads,
    minilm_ids: jax.Array,
    minilm_mask: jax.Array,
    emb: jax.Array,
) -> dict[str, jax.Array]:
    """Every signal behind the crisis flag: strong/weak category hits [B, C], head probability [B], idiom [B],
    the weak-confirmed, weak-pair and head-alone paths [B], and flag [B] int32."""
    prepared = _prepare(lexicon, minilm_ids, minilm_mask)
    veto = _veto_matches(lexicon, "crisis_strong", prepared)  # crisis_strong and crisis_weak share crisis_veto
    strong = _categories(lexicon.tables["crisis_strong"],
                         *_live_matches(lexicon, "crisis_strong", minilm_ids, minilm_mask, prepared, veto))
    weak_found, weak_rows = _live_matches(lexicon, "crisis_weak", minilm_ids, minilm_mask, prepared, veto)
    weak = _categories(lexicon.tables["crisis_weak"], weak_found, weak_rows)
    probability = heads_lib.crisis_probability(heads, emb)
    any_strong = jnp.any(strong, axis=-1)
    any_weak = jnp.any(weak, axis=-1)
    idiom = jnp.any(veto, axis=(1, 2))  # some crisis_veto phrase occurs
    supported = any_weak & (probability >= heads.crisis_thresholds["support"])
    # Two separate multi-word weak signs corroborate each other without the head; single weak words ("died",
    # "gun", "pointless") repeat too often in ordinary text to count here.
    weak_table = lexicon.tables["crisis_weak"]
    multiword = jnp.asarray(np.asarray([" " in phrase for phrase in weak_table.phrases], bool))
    weak_pair = _disjoint_pair(weak_found & multiword[weak_rows])
    alone = (probability >= heads.crisis_thresholds["alone"]) & ~idiom
    return {
        "strong_categories": strong,
        "weak_categories": weak,
        "probability": probability,
        "idiom": idiom,
        "weak_supported": supported,
        "weak_pair": weak_pair,
        "head_alone": alone,
        "flag": (any_strong | supported | weak_pair | alone).astype(jnp.int32),
    }


def crisis_flags(
    lexicon: SafetyLexicon,
    heads: heads_lib.RewardHeads,
    minilm_ids: jax.Array,
    minilm_mask: jax.Array,
    emb: jax.Array,
) -> jax.Array:
    """[B] int32 in {0, 1}: 1 when the (user) text shows a crisis (see module docstring for the rule)."""
    return crisis_evidence(lexicon, heads, minilm_ids, minilm_mask, emb)["flag"]


def mentions_crisis_resources(lexicon: SafetyLexicon, minilm_ids: jax.Array, minilm_mask: jax.Array) -> jax.Array:
    """[B] int32: the text points to crisis help (a crisis line/number, emergency services, a professional)."""
    return any_hit(lexicon, "resources", minilm_ids, minilm_mask).astype(jnp.int32)


def encourages_harm(lexicon: SafetyLexicon, minilm_ids: jax.Array, minilm_mask: jax.Array) -> jax.Array:
    """[B] int32: the text encourages self-harm or harm to others (negated or questioning uses are vetoed)."""
    return any_hit(lexicon, "harm_encouragement", minilm_ids, minilm_mask).astype(jnp.int32)


# ----------------------------------------------------------------------------- host convenience


@dataclasses.dataclass(frozen=True)
class CrisisResult:
    flag: bool  # the detector's decision
    score: float  # crisis-head probability (the lexicon adds reasons, not score)
    reasons: tuple[str, ...]  # e.g. ("lexicon:suicidal_ideation ('kill myself')", "head:p=0.97>=0.90")


@jax.jit
def _evidence_jit(lexicon, heads, ids, mask, emb):
    out = crisis_evidence(lexicon, heads, ids, mask, emb)
    out["strong_phrases"] = phrase_hits(lexicon, "crisis_strong", ids, mask)
    out["weak_phrases"] = phrase_hits(lexicon, "crisis_weak", ids, mask)
    return out


class CrisisDetector:
    """Host wrapper for the chat CLI: texts -> CrisisResult, using the same jitted code as the reward.

    `encoder` needs `.embed(texts, batch_size) -> [N, 384]` and `.tokenize(texts, length)` (the project's
    SentenceEncoder) or an HF `.tokenizer`. Texts are padded to
    `max_length` tokens (one compiled shape per batch size) and longer texts are truncated.
    """

    def __init__(self, encoder: Any, heads: heads_lib.RewardHeads, lexicon: SafetyLexicon, max_length: int = 128,
                 batch_size: int = 32):
        self.encoder, self.heads, self.lexicon = encoder, heads, lexicon
        self.max_length, self.batch_size = max_length, batch_size

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) [N, max_length] int32 with [CLS]/[SEP], as the reward sees them."""
        if hasattr(self.encoder, "tokenize"):  # therapy_rl.rewards.encoder.SentenceEncoder
            ids, mask = self.encoder.tokenize(list(texts), self.max_length)
            return np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        enc = self.encoder.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                                     return_tensors="np")  # an HF tokenizer
        return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)

    def detect(self, texts: Sequence[str]) -> list[CrisisResult]:
        texts = list(texts)
        if not texts:
            return []
        results: list[CrisisResult] = []
        for lo in range(0, len(texts), self.batch_size):
            chunk = texts[lo : lo + self.batch_size]
            ids, mask = self.tokenize(chunk)
            emb = np.asarray(self.encoder.embed(chunk, batch_size=self.batch_size), np.float32)
            pad = self.batch_size - len(chunk)  # fixed batch shape -> one compile
            ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
            emb = np.pad(emb, ((0, pad), (0, 0)))
            ev = jax.device_get(_evidence_jit(self.lexicon, self.heads, ids, mask, emb))
            results.extend(self._explain(ev, i) for i in range(len(chunk)))
        return results

    def _explain(self, ev: Mapping[str, np.ndarray], i: int) -> CrisisResult:
        reasons = []
        alone = float(self.heads.crisis_thresholds["alone"])
        support = float(self.heads.crisis_thresholds["support"])
        p = float(ev["probability"][i])
        for name, key in (("crisis_strong", "strong_phrases"), ("crisis_weak", "weak_phrases")):
            table = self.lexicon.tables[name]
            for j in np.flatnonzero(ev[key][i]):
                category = table.categories[int(table.category[j])]
                reasons.append(f"lexicon:{'strong' if name == 'crisis_strong' else 'weak'}:{category} ('{table.phrases[j]}')")
        if bool(ev["head_alone"][i]):
            reasons.append(f"head:p={p:.2f}>={alone:.2f}")
        elif bool(ev["idiom"][i]) and p >= alone:
            reasons.append(f"idiom_explains_head:p={p:.2f}")
        elif bool(ev["weak_supported"][i]):
            reasons.append(f"head_supports_weak:p={p:.2f}>={support:.2f}")
        elif bool(ev["weak_pair"][i]):
            reasons.append("two_separate_weak_hits")
        return CrisisResult(flag=bool(ev["flag"][i]), score=p, reasons=tuple(reasons))


def reference_phrase_hits(
    token_ids: Sequence[int], phrase_ids: Sequence[Sequence[int]], is_continuation: Callable[[int], bool],
    veto_ids: Sequence[Sequence[int]] = (), veto_mode: str = "overlap",
) -> list[bool]:
    """Plain-Python reference of `phrase_hits` for ONE unpadded sequence (used by tests and docs)."""

    def starts(phrase):
        n = len(phrase)
        for t in range(len(token_ids) - n + 1):
            if list(token_ids[t : t + n]) != list(phrase):
                continue
            if is_continuation(token_ids[t]):
                continue
            if t + n < len(token_ids) and is_continuation(token_ids[t + n]):
                continue
            yield t

    spans = [(t, t + len(v)) for v in veto_ids for t in starts(v)]
    covered = {i for a, b in spans for i in range(a, b)}

    def vetoed(t, n):
        if veto_mode == "contain":
            return any(a <= t and b >= t + n for a, b in spans)
        return bool(covered.intersection(range(t, t + n)))

    return [any(not vetoed(t, len(p)) for t in starts(p)) for p in phrase_ids]
