"""The paper's reward pieces as its code computes them (Zhang & Ive's RL notebook; NOTES.md), on reply TEXT.

These are the host-side alternatives selected by ``reward.therapy.quality.formula = "paper_code"`` and
``reward.therapy.relevance_text = "paper_clean"``; the project's own pieces (``components.py``) work on policy
token ids on device and differ as REWARDS.md ("The paper's code and ours") lists with measured effects.

Definitions (written from the paper's formulas; tests/test_paper_reward.py checks them against a second,
independent reference):

* **Words** are ``text.strip().split()``: whitespace-separated chunks, case and punctuation kept ("know." and
  "know" differ) for the n-gram rule.
* **Local n-gram repetition** (n=2: window 6, weight 4; n=3: window 5, weight 6). For every window of
  ``window`` consecutive words (start 0 .. len(words) - window; a reply shorter than the window has none), each
  distinct n-gram occurring c > 1 times in the window adds ``(c - 1) ** 1.5 * weight``. Overlapping windows
  count the same repetition again, so penalties grow fast.
* **Over-use.** Each word lower-cased with every non-``\\w`` character removed; each distinct such word longer than
  3 characters that occurs more than 4 times costs ``min((count - 1) ** 1.7 * 1.5, 8)``.
* **Meaningless** (score -10), searched case-insensitively in the stripped reply: no ASCII letter; only non-word
  characters; one character repeated 5+ times as the whole reply; a run of 3+ non-ASCII characters; any of the
  words yes / no / ok / thank / thanks; a run of 100+ characters without a newline. An empty reply is -10 too.
* quality = clip(2 - bigram - trigram - overuse, -10, 8), or -10 when meaningless.
* **Relevance text**: lower-cased, every character that is neither ``\\w`` nor whitespace replaced by a space,
  stripped; an empty reply or user text scores -8, a reply or user text empty after cleaning -5.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence

import numpy as np

START = 2.0
BIGRAM = (2, 6, 4.0)    # (n, window, weight)
TRIGRAM = (3, 5, 6.0)
OVERUSE_MIN_CHARS = 4
OVERUSE_MAX_COUNT = 4
OVERUSE_POWER, OVERUSE_SCALE, OVERUSE_CAP = 1.7, 1.5, 8.0
REPEAT_POWER = 1.5
SCORE_MIN, SCORE_MAX = -10.0, 8.0
MEANINGLESS_SCORE = -10.0
RELEVANCE_EMPTY = -8.0          # reply or user text empty
RELEVANCE_EMPTY_CLEANED = -5.0  # empty once cleaned

_MEANINGLESS = [re.compile(p, re.IGNORECASE) for p in (
    r"^[^a-zA-Z]*$",               # no ASCII letter
    r"^\W+$",                      # only non-word characters
    r"^(.)\1{4,}$",                # one character, 5+ times
    r"[^\x00-\x7F]{3,}",           # 3+ non-ASCII characters in a row
    r"\b(?:yes|no|ok|thanks?)\b",  # a short-answer word anywhere
    r".{100,}",                    # 100+ characters on one line
)]


def ngram_repetition(words: Sequence[str], n: int, window: int, weight: float) -> float:
    """Sum over every `window`-word window of sum over its n-grams seen c > 1 times of (c-1)^1.5 * weight."""
    if len(words) < n:
        return 0.0
    total = 0.0
    for start in range(len(words) - window + 1):
        chunk = words[start:start + window]
        counts: dict = {}
        for j in range(len(chunk) - n + 1):
            gram = tuple(chunk[j:j + n])
            counts[gram] = counts.get(gram, 0) + 1
        total += sum((c - 1) ** REPEAT_POWER * weight for c in counts.values() if c > 1)
    return total


def overuse_penalty(words: Sequence[str]) -> float:
    """Sum over distinct cleaned words (> 3 chars, > 4 occurrences) of min((count-1)^1.7 * 1.5, 8)."""
    counts: dict = {}
    for word in words:
        key = re.sub(r"[^\w]", "", word.lower())
        if len(key) >= OVERUSE_MIN_CHARS:
            counts[key] = counts.get(key, 0) + 1
    return sum(min((c - 1) ** OVERUSE_POWER * OVERUSE_SCALE, OVERUSE_CAP)
               for c in counts.values() if c > OVERUSE_MAX_COUNT)


def is_meaningless(text: str) -> bool:
    stripped = text.strip()
    return not stripped or any(p.search(stripped) for p in _MEANINGLESS)


def quality(text: str) -> float:
    """The paper's text-quality score of one reply, in [-10, 8]."""
    if is_meaningless(text):
        return MEANINGLESS_SCORE
    words = text.strip().split()
    raw = (START - ngram_repetition(words, *BIGRAM) - ngram_repetition(words, *TRIGRAM) - overuse_penalty(words))
    return float(max(min(raw, SCORE_MAX), SCORE_MIN))


def quality_batch(texts: Iterable[str]) -> np.ndarray:
    return np.asarray([quality(t) for t in texts], np.float32)


def clean_for_relevance(text: str) -> str:
    """Lower-case, punctuation (anything neither \\w nor whitespace) to spaces, stripped."""
    return re.sub(r"[^\w\s]", " ", text.lower()).strip()


def relevance_fallback(reply: str, user: Optional[str] = None) -> float:
    """The paper's fixed relevance for an empty reply/user text (-8) or one empty once cleaned (-5); NaN when the
    cosine step map applies. `user=None` skips the user side (its text is checked once per dataset)."""
    if not reply or (user is not None and not user):
        return RELEVANCE_EMPTY
    if not clean_for_relevance(reply) or (user is not None and not clean_for_relevance(user)):
        return RELEVANCE_EMPTY_CLEANED
    return math.nan


def relevance_fallback_batch(replies: Iterable[str]) -> np.ndarray:
    return np.asarray([relevance_fallback(r) for r in replies], np.float32)
