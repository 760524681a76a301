"""LLM-as-judge over any OpenAI-compatible `/v1/chat/completions` endpoint, standard library only.

The paper's six criteria are scored 1-5. The judge sees the problem type, the user's words, the user's emotion
and the reply. Calls are either one per criterion (the paper's way) or one per reply returning all six.

Robustness:
- timeouts on every request; retries with exponential back-off + seeded jitter on timeouts, connection errors,
  HTTP 429 and 5xx (a Retry-After header is honoured up to `backoff_max_s`); other HTTP errors are not retried;
- an append-only JSONL cache keyed by sha256(model, criterion, prompt): only parsed judgments are cached,
  so failures are asked again next time;
- a reply that cannot be parsed (bad JSON body, no score, score outside 1-5) is counted, never raised.
Counts: ok (cache hits included), parse_failures, http_failures, cache_hits, calls (judgments asked of the
endpoint), requests (HTTP attempts, retries included), retries.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

CRITERIA = (
    "Therapeutic Rapport",
    "Active Understanding",
    "Relevance Focus",
    "Practical Helpfulness",
    "Professional Appropriateness",
    "Emotional Validation",
)

# Our own short wording of what each criterion asks.
CRITERION_QUESTIONS = {
    "Therapeutic Rapport": "Does the reply build a warm, trusting, collaborative connection with the person?",
    "Active Understanding": "Does the reply show that the therapist has followed and understood what the person "
                            "said, e.g. by reflecting or asking a fitting question?",
    "Relevance Focus": "Does the reply stay on the person's concern and the problem at hand, without drifting?",
    "Practical Helpfulness": "Does the reply move the conversation forward in a way that could help the person?",
    "Professional Appropriateness": "Is the reply what a careful, ethical therapist could say: safe, respectful, "
                                    "free of judgement, false promises or harmful advice?",
    "Emotional Validation": "Does the reply recognise the person's feelings and treat them as understandable?",
}

SYSTEM_PROMPT = (
    "You review replies written for a counselling conversation. You rate one reply at a time on a 1-5 scale, "
    "where 1 = very poor, 2 = poor, 3 = acceptable, 4 = good, 5 = excellent. Judge only the reply, in the "
    "context given. Answer with JSON only, no other text."
)


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str  # e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # name of the env var holding the key; None: no auth header
    mode: str = "per_criterion"  # or "all_criteria": one call returns all six scores
    temperature: float = 0.1  # the paper's
    max_tokens: int = 256
    timeout_s: float = 60.0
    max_retries: int = 4  # retries after the first attempt
    backoff_base_s: float = 1.0  # wait before retry r (0-based): base * 2**r, capped, times jitter
    backoff_max_s: float = 30.0
    jitter_seed: int = 0
    cache_path: str | None = None  # JSONL; None: no cache

    def __post_init__(self):
        if self.mode not in ("per_criterion", "all_criteria"):
            raise ValueError(f"JudgeConfig.mode must be 'per_criterion' or 'all_criteria', got {self.mode!r}")
        if not self.base_url or not self.model:
            raise ValueError("JudgeConfig needs base_url and model")


def judge_config_from_dict(values: Mapping[str, Any]) -> JudgeConfig:
    """Build a JudgeConfig from a mapping (e.g. a ConfigDict's `judge` block); unknown keys raise."""
    known = set(JudgeConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"judge config: unknown fields {unknown}; known: {sorted(known)}")
    return JudgeConfig(**dict(values))


# ------------------------------------------------------------------------------------------------------ prompts
def _context_block(item: Mapping[str, Any]) -> str:
    return (f"Problem type: {item.get('problem') or 'unknown'}\n"
            f"What the person said: {item['user_text']}\n"
            f"The person's emotion: {item.get('user_emotion') or 'unknown'}\n"
            f"Therapist's reply: {item['reply']}")


def criterion_prompt(item: Mapping[str, Any], criterion: str) -> str:
    return (f"{_context_block(item)}\n\n"
            f"Criterion: {criterion}. {CRITERION_QUESTIONS[criterion]}\n"
            'Give a score from 1 to 5 and one short reason, as JSON: {"score": <1-5>, "reason": "<text>"}')


def all_criteria_prompt(item: Mapping[str, Any]) -> str:
    lines = "\n".join(f"- {c}: {CRITERION_QUESTIONS[c]}" for c in CRITERIA)
    keys = ", ".join(f'"{c}": <1-5>' for c in CRITERIA)
    return (f"{_context_block(item)}\n\nRate the reply on each criterion:\n{lines}\n"
            f"Answer as JSON: {{{keys}}}")


# ------------------------------------------------------------------------------------------------------ parsing
_SCORE_RE = re.compile(r'"?score"?\s*[:=]\s*"?(-?\d+(?:\.\d+)?)')


def _json_object(text: str) -> dict | None:
    """The first JSON object in a model message (code fences and prose around it are ignored)."""
    text = text.strip()
    if text.startswith("```"):
        text = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", text)
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            value = json.loads(text[start:end + 1])
            return value if isinstance(value, dict) else None
        except json.JSONDecodeError:
            return None
    return None


def _valid_score(value: Any) -> int | None:
    """An integer score 1..5 (accepts 4, 4.0, "4"); anything else is None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number != int(number) or not 1 <= number <= 5:
        return None
    return int(number)


def parse_score(message: str) -> int | None:
    """The score of a one-criterion answer, or None when there is no valid 1-5 score. An answer with a "{" must
    hold a valid JSON object; only brace-free prose ("score: 4") is read with a regex."""
    obj = _json_object(message)
    if obj is not None:
        for key, value in obj.items():
            if key.lower() == "score":
                return _valid_score(value)
        return None
    if "{" in message:
        return None  # malformed JSON
    match = _SCORE_RE.search(message)
    return _valid_score(match.group(1)) if match else None


def parse_all_scores(message: str) -> dict[str, int] | None:
    """{criterion: score} of an all-criteria answer; None unless all six are valid."""
    obj = _json_object(message)
    if obj is None:
        return None
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    scores = {}
    for criterion in CRITERIA:
        score = _valid_score(lowered.get(criterion.lower()))
        if score is None:
            return None
        scores[criterion] = score
    return scores


# ------------------------------------------------------------------------------------------------------ HTTP
class HttpFailure(Exception):
    """The endpoint could not give an answer after all retries (or refused without a retryable status)."""


class ProtocolFailure(Exception):
    """The endpoint answered 200 but the body is not a chat completion."""


def _retryable_status(status: int) -> bool:
    return status == 429 or 500 <= status < 600


def chat_completion(config: JudgeConfig, messages: list[dict], *, rng: random.Random,
                    sleep: Callable[[float], None] = time.sleep, stats: dict | None = None) -> str:
    """POST to `{base_url}/chat/completions`; returns the first choice's message content."""
    url = config.base_url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": config.model, "messages": messages, "temperature": config.temperature,
                       "max_tokens": config.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise HttpFailure(f"environment variable {config.api_key_env} (the judge's API key) is not set")
        headers["Authorization"] = f"Bearer {key}"
    last_error = "no attempt"
    for attempt in range(config.max_retries + 1):
        if attempt:
            if stats is not None:
                stats["retries"] = stats.get("retries", 0) + 1
        retry_after = None
        try:
            if stats is not None:
                stats["requests"] = stats.get("requests", 0) + 1
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
                raw = response.read()
            return _message_content(raw)
        except urllib.error.HTTPError as err:
            last_error = f"HTTP {err.code}"
            if not _retryable_status(err.code):
                raise HttpFailure(f"{url}: {last_error} (not retried)") from err
            retry_after = _retry_after_seconds(err.headers.get("Retry-After") if err.headers else None)
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            last_error = f"{type(reason).__name__}: {reason}"
        if attempt < config.max_retries:
            wait = min(config.backoff_max_s, config.backoff_base_s * 2 ** attempt) * rng.uniform(0.5, 1.0)
            if retry_after is not None:
                wait = max(wait, min(retry_after, config.backoff_max_s))
            sleep(wait)
    raise HttpFailure(f"{url}: gave up after {config.max_retries + 1} attempts ({last_error})")


def _retry_after_seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _message_content(raw: bytes) -> str:
    try:
        payload = json.loads(raw)
        content = payload["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as err:
        raise ProtocolFailure(f"not a chat completion: {raw[:200]!r}") from err
    if not isinstance(content, str):
        raise ProtocolFailure(f"message content is not text: {content!r}")
    return content


# ------------------------------------------------------------------------------------------------------ cache
def cache_key(model: str, criterion: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([model, criterion, prompt]).encode()).hexdigest()


class JudgmentCache:
    """Append-only JSONL of {"key", "criterion", "scores", "message"}; the last line for a key wins.
    A truncated or corrupt line (e.g. from a killed run) is skipped and counted in `skipped_lines`."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.skipped_lines = 0
        self._lock = threading.Lock()
        if path and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.entries[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.skipped_lines += 1

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        with self._lock:
            self.entries[entry["key"]] = entry
            if self.path:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------------------------------------ judging
ALL_KEY = "__all_criteria__"


def judge_items(items: Sequence[Mapping[str, Any]], config: JudgeConfig, *,
                sleep: Callable[[float], None] = time.sleep) -> dict:
    """Score replies. Each item has user_text and reply (required), problem and user_emotion (optional).

    Returns {"model", "mode", "criteria", "per_item": [{criterion: score|None}], "per_criterion":
    {criterion: {"mean", "n"}}, "overall" (mean of the criterion means), "counts": {...}}.
    """
    for i, item in enumerate(items):
        for field in ("user_text", "reply"):
            if not isinstance(item.get(field), str):
                raise ValueError(f"judge_items: item {i}: field {field!r} must be a string")
    if config.api_key_env and not os.environ.get(config.api_key_env):
        raise ValueError(f"judge: environment variable {config.api_key_env} (the API key) is not set; "
                         "set it, or api_key_env=None for an endpoint without auth")
    rng = random.Random(config.jitter_seed)
    cache = JudgmentCache(config.cache_path)
    counts = {"ok": 0, "parse_failures": 0, "http_failures": 0, "cache_hits": 0, "requests": 0, "retries": 0,
              "calls": 0}
    errors: list[str] = []
    per_item: list[dict[str, int | None]] = []

    def ask(prompt: str, criterion_key: str, parse: Callable[[str], Any]) -> Any:
        key = cache_key(config.model, criterion_key, prompt)
        cached = cache.get(key)
        if cached is not None:
            counts["cache_hits"] += 1
            counts["ok"] += 1
            return cached["scores"]
        counts["calls"] += 1
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        try:
            message = chat_completion(config, messages, rng=rng, sleep=sleep, stats=counts)
        except HttpFailure as err:
            counts["http_failures"] += 1
            errors.append(str(err))
            return None
        except ProtocolFailure as err:
            counts["parse_failures"] += 1
            errors.append(str(err))
            return None
        scores = parse(message)
        if scores is None:
            counts["parse_failures"] += 1
            errors.append(f"unparsable judgment for {criterion_key}: {message[:200]!r}")
            return None
        counts["ok"] += 1
        cache.put({"key": key, "criterion": criterion_key, "scores": scores, "message": message})
        return scores

    for item in items:
        if config.mode == "per_criterion":
            row = {c: ask(criterion_prompt(item, c), c, parse_score) for c in CRITERIA}
        else:
            scores = ask(all_criteria_prompt(item), ALL_KEY, parse_all_scores)
            row = {c: (scores[c] if scores else None) for c in CRITERIA}
        per_item.append(row)

    per_criterion = {}
    for c in CRITERIA:
        values = [row[c] for row in per_item if row[c] is not None]
        per_criterion[c] = {"mean": sum(values) / len(values) if values else None, "n": len(values)}
    means = [v["mean"] for v in per_criterion.values() if v["mean"] is not None]
    return {
        "model": config.model, "mode": config.mode, "criteria": list(CRITERIA), "per_item": per_item,
        "per_criterion": per_criterion, "overall": sum(means) / len(means) if means else None,
        "counts": counts, "errors": errors[:50], "cache_skipped_lines": cache.skipped_lines,
    }


def items_from_results(results: Mapping[str, Any], limit: int | None = None) -> list[dict]:
    """Judge items from an `evaluate_generations` result (the first `limit` samples)."""
    s = results["samples"]
    n = len(s["generated"]) if limit is None else min(limit, len(s["generated"]))
    return [{"problem": s["problem"][i], "user_text": s["user_text"][i] or "",
             "user_emotion": s.get("user_emotion", [None] * n)[i], "reply": s["generated"][i]} for i in range(n)]
