"""LLM judge against a real local HTTP server that plays an OpenAI-compatible /v1/chat/completions endpoint."""
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from therapy_rl.evaluation import judge

ITEM = {"problem": "grief", "user_text": "My mother died last spring and I still can't sleep.",
        "user_emotion": "sadness", "reply": "That sounds exhausting. What keeps you awake at night?"}


def completion(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


class FakeEndpoint:
    """A scripted endpoint: each request pops the next (status, body, delay_s, headers); when the script is empty
    it answers {"score": 4}. Every request is recorded."""

    def __init__(self):
        self.script = deque()
        self.requests = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "json": json.loads(body)})
                status, payload, delay, headers = (endpoint.script.popleft() if endpoint.script else
                                                   (200, completion('{"score": 4, "reason": "fine"}'), 0.0, {}))
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("THERAPY_RL_TEST_JUDGE_KEY", "sk-test-123")
    return "THERAPY_RL_TEST_JUDGE_KEY"


def make_config(endpoint, api_key, tmp_path=None, **kw):
    values = dict(base_url=endpoint.base_url, model="judge-model", api_key_env=api_key, timeout_s=0.3,
                  max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05, jitter_seed=3,
                  cache_path=str(tmp_path / "judge_cache.jsonl") if tmp_path else None)
    values.update(kw)
    return judge.JudgeConfig(**values)


class SleepRecorder:
    def __init__(self):
        self.waits = []

    def __call__(self, seconds):
        self.waits.append(seconds)


def test_normal_replies_per_criterion(endpoint, api_key):
    for score in (5, 4, 3, 2, 1, 4):
        endpoint.script.append((200, completion(json.dumps({"score": score, "reason": "r"})), 0.0, {}))
    out = judge.judge_items([ITEM], make_config(endpoint, api_key), sleep=SleepRecorder())
    assert out["counts"]["ok"] == 6 and out["counts"]["parse_failures"] == 0 and out["counts"]["http_failures"] == 0
    assert [out["per_item"][0][c] for c in judge.CRITERIA] == [5, 4, 3, 2, 1, 4]
    assert out["overall"] == pytest.approx(19 / 6)
    assert len(endpoint.requests) == 6
    first = endpoint.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer sk-test-123"
    assert first["json"]["model"] == "judge-model" and first["json"]["temperature"] == 0.1
    prompt = first["json"]["messages"][-1]["content"]
    for text in (ITEM["problem"], ITEM["user_text"], ITEM["user_emotion"], ITEM["reply"], judge.CRITERIA[0]):
        assert text in prompt


@pytest.mark.parametrize("content", [
    '{"score": 4, "reason": "unterminated',  # malformed JSON
    '{"reason": "no score given"}',  # no score
    '{"score": 7, "reason": "out of range"}',  # out of range
    '{"score": 0}',
    "I would rate it highly.",  # prose without a score
])
def test_unparsable_judgments_are_counted_not_raised(endpoint, api_key, content):
    endpoint.script.append((200, completion(content), 0.0, {}))
    out = judge.judge_items([ITEM], make_config(endpoint, api_key, mode="per_criterion"), sleep=SleepRecorder())
    assert out["counts"]["parse_failures"] == 1 and out["counts"]["ok"] == 5
    assert out["per_item"][0][judge.CRITERIA[0]] is None
    assert out["per_criterion"][judge.CRITERIA[0]]["n"] == 0 and out["per_criterion"][judge.CRITERIA[1]]["n"] == 1


def test_malformed_response_body_is_a_parse_failure(endpoint, api_key):
    endpoint.script.append((200, b"{this is not json", 0.0, {}))
    endpoint.script.append((200, json.dumps({"choices": []}).encode(), 0.0, {}))
    out = judge.judge_items([ITEM], make_config(endpoint, api_key), sleep=SleepRecorder())
    assert out["counts"]["parse_failures"] == 2 and out["counts"]["ok"] == 4
    assert len(endpoint.requests) == 6  # not retried


def test_score_parsing_variants():
    assert judge.parse_score('```json\n{"score": 5, "reason": "x"}\n```') == 5
    assert judge.parse_score('Here: {"Score": "3"} done') == 3
    assert judge.parse_score('score: 2') == 2
    assert judge.parse_score('{"score": 4.5}') is None
    assert judge.parse_score('{"score": null}') is None
    all_six = {c: 3 for c in judge.CRITERIA}
    assert judge.parse_all_scores(json.dumps(all_six)) == all_six
    assert judge.parse_all_scores(json.dumps({**all_six, judge.CRITERIA[2]: 9})) is None


def test_slow_reply_times_out_then_ok_on_retry(endpoint, api_key):
    endpoint.script.append((200, completion('{"score": 5}'), 1.0, {}))  # beyond the 0.3 s timeout
    sleeps = SleepRecorder()
    start = time.monotonic()
    out = judge.judge_items([ITEM], make_config(endpoint, api_key), sleep=sleeps)
    assert time.monotonic() - start < 5
    assert out["counts"]["ok"] == 6 and out["counts"]["http_failures"] == 0
    assert out["counts"]["retries"] == 1 and len(sleeps.waits) == 1
    assert out["per_item"][0][judge.CRITERIA[0]] == 4  # the retry got the default answer


def test_server_error_then_ok_and_429_retry_after(endpoint, api_key):
    endpoint.script.append((500, b'{"error": "boom"}', 0.0, {}))
    endpoint.script.append((429, b'{"error": "slow down"}', 0.0, {"Retry-After": "0.04"}))
    sleeps = SleepRecorder()
    out = judge.judge_items([ITEM], make_config(endpoint, api_key), sleep=sleeps)
    assert out["counts"]["ok"] == 6 and out["counts"]["retries"] == 2 and out["counts"]["http_failures"] == 0
    assert len(endpoint.requests) == 8
    assert sleeps.waits[1] >= 0.04  # Retry-After honoured (capped by backoff_max_s = 0.05)


def test_persistent_errors_are_http_failures(endpoint, api_key):
    for _ in range(3):  # max_retries = 2 -> 3 attempts
        endpoint.script.append((503, b"{}", 0.0, {}))
    endpoint.script.append((400, b'{"error": "bad request"}', 0.0, {}))  # not retried
    sleeps = SleepRecorder()
    out = judge.judge_items([ITEM], make_config(endpoint, api_key), sleep=sleeps)
    assert out["counts"]["http_failures"] == 2 and out["counts"]["ok"] == 4
    assert len(endpoint.requests) == 3 + 1 + 4
    assert out["per_item"][0][judge.CRITERIA[0]] is None and out["per_item"][0][judge.CRITERIA[1]] is None
    # Exponential back-off with jitter in [0.5, 1] of base * 2**attempt.
    assert 0.005 <= sleeps.waits[0] <= 0.01 and 0.01 <= sleeps.waits[1] <= 0.02


def test_backoff_jitter_is_seeded(endpoint, api_key):
    def run(seed):
        for _ in range(3):
            endpoint.script.append((500, b"{}", 0.0, {}))
        sleeps = SleepRecorder()
        judge.judge_items([ITEM], make_config(endpoint, api_key, jitter_seed=seed, mode="all_criteria"), sleep=sleeps)
        return sleeps.waits

    assert run(1) == run(1) and run(1) != run(2)


def test_cache_prevents_second_request(endpoint, api_key, tmp_path):
    config = make_config(endpoint, api_key, tmp_path)
    endpoint.script.append((200, completion("no score here"), 0.0, {}))  # a failure is not cached
    first = judge.judge_items([ITEM, {**ITEM, "reply": "Go on."}], config, sleep=SleepRecorder())
    assert len(endpoint.requests) == 12 and first["counts"]["parse_failures"] == 1
    second = judge.judge_items([ITEM, {**ITEM, "reply": "Go on."}], config, sleep=SleepRecorder())
    assert len(endpoint.requests) == 13  # only the failed judgment is asked again
    assert second["counts"]["cache_hits"] == 11 and second["counts"]["ok"] == 12
    assert second["per_item"][1] == first["per_item"][1]
    lines = (tmp_path / "judge_cache.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all("key" in json.loads(line) for line in lines)
    # Another judge model does not reuse the cache.
    judge.judge_items([ITEM], make_config(endpoint, api_key, tmp_path, model="other"), sleep=SleepRecorder())
    assert len(endpoint.requests) == 19
    # A truncated last line (killed run) is skipped, not fatal.
    with open(tmp_path / "judge_cache.jsonl", "a") as f:
        f.write('{"key": "abc", "scor')
    third = judge.judge_items([ITEM], config, sleep=SleepRecorder())
    assert third["cache_skipped_lines"] == 1 and third["counts"]["cache_hits"] == 6


def test_all_criteria_mode_one_call(endpoint, api_key):
    scores = {c: i + 1 if i < 5 else 5 for i, c in enumerate(judge.CRITERIA)}
    endpoint.script.append((200, completion(json.dumps(scores)), 0.0, {}))
    out = judge.judge_items([ITEM], make_config(endpoint, api_key, mode="all_criteria"), sleep=SleepRecorder())
    assert len(endpoint.requests) == 1 and out["counts"]["ok"] == 1
    assert out["per_item"][0] == scores
    for c in judge.CRITERIA:
        assert c in endpoint.requests[0]["json"]["messages"][-1]["content"]


def test_config_errors(endpoint, monkeypatch):
    monkeypatch.delenv("THERAPY_RL_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="THERAPY_RL_MISSING_KEY"):
        judge.judge_items([ITEM], make_config(endpoint, "THERAPY_RL_MISSING_KEY"))
    with pytest.raises(ValueError, match="mode"):
        make_config(endpoint, None, mode="bogus")
    with pytest.raises(ValueError, match="unknown fields"):
        judge.judge_config_from_dict({"base_url": "x", "model": "m", "temprature": 0.1})
    with pytest.raises(ValueError, match="item 0: field 'reply'"):
        judge.judge_items([{"user_text": "hi"}], make_config(endpoint, None))
    # No auth header when api_key_env is None.
    judge.judge_items([ITEM], make_config(endpoint, None, mode="all_criteria"), sleep=SleepRecorder())
    assert "Authorization" not in endpoint.requests[-1]["headers"]
