"""The rating service over real HTTP: tokens, validation (4xx and nothing written), concurrency, restart."""

import concurrent.futures
import os
import sqlite3
import subprocess
import sys

import pytest

from rate_helpers import REPO_ROOT, Server, rate, request
from therapy_rl.rate import store as store_lib


def _seed(workdir, raters=("alice", "bob"), replies=4, iteration=0):
    store = store_lib.RatingStore.in_workdir(workdir)
    tokens = {name: store.add_rater(name) for name in raters}
    batch = store.queue_batch("run", iteration, iteration, 1, [
        store_lib.NewSample(i, "depression", "I'm feeling depressed and hopeless. Can you help me?", "depression",
                            f"reply number {i}", "neutral", (10 + i, 11), guard_flag=(i == 1),
                            guard_categories=("reply:harm_encouragement",) if i == 1 else ())
        for i in range(replies)])
    return store, tokens, store.samples(batch.id)


def _rows(workdir):
    with sqlite3.connect(store_lib.store_path(workdir)) as db:
        return db.execute("SELECT sample_id, rater_id, score, unsafe, comment FROM ratings ORDER BY id").fetchall()


@pytest.fixture
def served(tmp_path):
    workdir = str(tmp_path)
    store, tokens, samples = _seed(workdir)
    server = Server(workdir)
    yield server, store, tokens, samples, workdir
    server.stop()


def test_add_rater_cli_prints_a_token(tmp_path):
    out = subprocess.run([sys.executable, "-m", "therapy_rl.rate", "add-rater", "dr_lee", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stdout.splitlines()[1].strip()
    store = store_lib.RatingStore.in_workdir(str(tmp_path))
    assert store.rater_for_token(token).name == "dr_lee"
    assert token not in open(store.path, "rb").read().decode("latin-1"), "only the token's hash is stored"
    again = subprocess.run([sys.executable, "-m", "therapy_rl.rate", "add-rater", "dr_lee", "--workdir",
                            str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert again.returncode == 2 and again.stderr.startswith("error:") and "already exists" in again.stderr
    assert store.journal_mode() == "wal"


def test_binds_loopback_and_every_request_needs_a_token(served):
    server, store, tokens, samples, workdir = served
    assert server.url.startswith("http://127.0.0.1:")
    for path in ("/", "/api/queue", "/nope", "/?token=wrong"):
        status, body, headers = request(server.url + path)
        assert status == 401, path
    status, _, _ = request(server.url + "/api/queue", token="not-a-token")
    assert status == 401
    status, page, headers = request(f"{server.url}/?token={tokens['alice']}")
    assert status == 200 and "Rate therapist replies" in page
    assert "script-src 'nonce-" in headers["content-security-policy"] and headers["cache-control"] == "no-store"
    status, body, _ = request(server.url + "/api/queue", token=tokens["alice"])
    assert status == 200 and body["rater"] == "alice" and len(body["samples"]) == 4
    flagged = [s for s in body["samples"] if s["guard"]["flagged"]]
    assert [s["id"] for s in flagged] == [samples[1].id]
    assert [r[0] for r in body["rubric"]] == ["empathy", "boundaries", "no_harm", "guidance"]
    assert "serving" in server.output() and tokens["alice"] not in server.output(), "tokens never reach the log"


def test_bad_inputs_are_refused_and_write_nothing(served):
    server, store, tokens, samples, workdir = served
    token, sid = tokens["alice"], samples[0].id
    url = server.url + "/api/ratings"
    cases = [
        (rate(server.url, token, sid, 1.5), 422),
        (rate(server.url, token, sid, -0.01), 422),
        (rate(server.url, token, sid, "0.5"), 422),
        (rate(server.url, token, sid, True), 422),
        (request(url, "POST", token, raw=b'{"sample_id": 1, "score": NaN}'), 422),
        (rate(server.url, token, sid, 0.5, rubric={"kindness": True}), 422),
        (rate(server.url, token, sid, 0.5, rubric={"empathy": "yes"}), 422),
        (rate(server.url, token, sid, 0.5, unsafe="no"), 422),
        (rate(server.url, token, sid, 0.5, comment="x" * 5000), 422),
        (rate(server.url, token, sid, 0.5, extra=1), 422),
        (request(url, "POST", token, {"score": 0.5}), 422),
        (rate(server.url, token, "1", 0.5), 422),
        (rate(server.url, token, 987654, 0.5), 404),
        (request(url, "POST", token, raw=b"not json"), 400),
        (request(url, "POST", token, raw=b"[1, 2]"), 422),
        (request(url, "POST", token, raw=b'{"sample_id": 1, "score": 0.5}', content_type="text/plain"), 415),
        (request(url, "POST", token, raw=b"{" + b" " * 70000 + b"}"), 413),
        (rate(server.url, "bad-token", sid, 0.5), 401),
        (request(url, "POST", None, {"sample_id": sid, "score": 0.5}), 401),
    ]
    for (status, body, _), expected in cases:
        assert status == expected, (status, body)
        assert isinstance(body, dict) and body.get("error"), body
    assert _rows(workdir) == []
    status, body, _ = rate(server.url, token, sid, 0.75, rubric={"empathy": True}, comment="warm", unsafe=False)
    assert status == 201
    status, body, _ = rate(server.url, token, sid, 0.1)  # a second rating of the same reply by the same rater
    assert status == 409 and "already rated" in body["error"]
    assert _rows(workdir) == [(sid, store.rater_for_token(token).id, 0.75, 0, "warm")]
    status, body, _ = request(server.url + "/api/queue", token=token)
    assert sid not in [s["id"] for s in body["samples"]]


def test_parallel_raters_lose_nothing(tmp_path):
    workdir = str(tmp_path)
    names = [f"rater{i}" for i in range(6)]
    store, tokens, samples = _seed(workdir, raters=names, replies=10)
    server = Server(workdir)
    try:
        jobs = [(name, s.id, round((i * 7 + j) % 21 / 20, 2)) for i, name in enumerate(names)
                for j, s in enumerate(samples)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(lambda job: rate(server.url, tokens[job[0]], job[1], job[2])[0], jobs))
            # the same rater racing on one reply: exactly one wins
            race = list(pool.map(lambda _: rate(server.url, tokens["rater0"], samples[0].id, 0.5)[0], range(8)))
        assert results == [201] * len(jobs)
        assert race == [409] * 8
        rows = _rows(workdir)
        assert len(rows) == len(jobs) == 60
        ids = {store.rater_for_token(tokens[n]).id: n for n in names}
        assert sorted((ids[r[1]], r[0], r[2]) for r in rows) == sorted(jobs)
    finally:
        server.stop()


def test_restart_loses_nothing(tmp_path):
    workdir = str(tmp_path)
    store, tokens, samples = _seed(workdir)
    server = Server(workdir)
    for s in samples[:3]:
        assert rate(server.url, tokens["alice"], s.id, 0.6, comment=f"c{s.id}")[0] == 201
    server.kill()  # a crash: no clean shutdown
    assert len(_rows(workdir)) == 3
    server = Server(workdir)
    try:
        assert rate(server.url, tokens["alice"], samples[0].id, 0.2)[0] == 409, "ratings survive the restart"
        assert rate(server.url, tokens["alice"], samples[3].id, 0.9)[0] == 201, "tokens survive the restart"
        status, body, _ = request(server.url + "/api/queue", token=tokens["alice"])
        assert body["rated"] == 4 and body["samples"] == []
        assert [r[4] for r in _rows(workdir)] == [f"c{s.id}" for s in samples[:3]] + [""]
    finally:
        server.stop()
    assert store_lib.RatingStore.in_workdir(workdir).journal_mode() == "wal"


def test_retired_and_closed_batches(tmp_path):
    workdir = str(tmp_path)
    store, tokens, samples = _seed(workdir)
    store.supersede(samples[0].batch_id)
    server = Server(workdir)
    try:
        status, body, _ = request(server.url + "/api/queue", token=tokens["bob"])
        assert body["samples"] == [], "retired batches are not shown"
        assert rate(server.url, tokens["bob"], samples[0].id, 0.5)[0] == 404
    finally:
        server.stop()
    assert os.path.exists(store.path)
