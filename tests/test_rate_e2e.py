"""End to end: a scripted rater drives a short human-reward PPO run (configs/ppo_human_fixed_prompt.py) over real
HTTP; the trainer is SIGKILLed while a batch waits for ratings, the rating server is killed and restarted, the
rater goes on rating while the trainer is down, and the resumed run re-attaches to the pending batch, skips the
reply nobody rated after the timeout, and finishes."""

import json
import os
import subprocess
import sys
import threading
import time

from rate_helpers import REPO_ROOT, Server, rate, request
from therapy_rl.rate import store as store_lib

TIMEOUT_S = 20


class ScriptedRater(threading.Thread):
    """Polls the queue over HTTP and rates every reply whose batch iteration `allow` accepts: longer replies
    score higher (a stand-in for a clinician's judgement)."""

    def __init__(self, url, token, store, allow):
        super().__init__(daemon=True)
        self.url, self.token, self.store, self.allow = url, token, store, allow
        self.halt, self.rated, self.errors = threading.Event(), [], []

    def run(self):
        while not self.halt.is_set():
            try:
                status, body, _ = request(self.url + "/api/queue", token=self.token, timeout=10)
                for s in body.get("samples", []) if status == 200 else []:
                    if self.allow(self.store.batch(s["batch_id"]).iteration):
                        score = round(min(1.0, len(s["reply"].split()) / 20), 2)
                        code, answer, _ = rate(self.url, self.token, s["id"], score,
                                               rubric={"empathy": score > 0.5}, comment="scripted")
                        (self.rated if code == 201 else self.errors).append((s["id"], code))
            except OSError as e:  # the server is being restarted
                self.errors.append(("connection", str(e)))
            self.halt.wait(0.2)

    def stop(self):
        self.halt.set()
        self.join(timeout=30)


def _command(sft_workdir, workdir):
    return [sys.executable, "-m", "therapy_rl.main", "--config", "configs/ppo_human_fixed_prompt.py",
            "--workdir", workdir, f"--config.init_from={sft_workdir}", "--config.max_iterations=3",
            "--config.reward.human.auto_kind=emotion_tag", f"--config.reward.human.timeout_s={TIMEOUT_S}",
            "--config.reward.human.poll_s=0.2", "--config.eval_at_start=False", "--config.eval_batch_size=4",
            "--config.num_sample_replies=0", "--config.progress_bar=False", "--config.sampling.max_new_tokens=24",
            "--config.ppo.num_ppo_epochs=2", "--config.learning_rate=1e-4"]


def _wait_for(predicate, timeout_s, what):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_human_ppo_over_http_with_restarts(quickstart_sft_workdir, tmp_path):
    workdir = str(tmp_path / "human_ppo")
    store = store_lib.RatingStore.in_workdir(workdir)
    token = store.add_rater("scripted")
    late_token = store.add_rater("late")
    server = Server(workdir)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    run_name = os.path.basename(workdir)

    # Run A: iteration 0 is rated over HTTP; the run is killed while iteration 1 waits for ratings.
    rater = ScriptedRater(server.url, token, store, allow=lambda iteration: iteration == 0)
    rater.start()
    log_a = open(tmp_path / "run_a.log", "w")
    trainer = subprocess.Popen(_command(quickstart_sft_workdir, workdir), cwd=REPO_ROOT, env=env, stdout=log_a,
                               stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: store.live_batch(run_name, 1) is not None or trainer.poll() is not None, 900,
                  "iteration 1 to be queued")
        assert trainer.poll() is None, (tmp_path / "run_a.log").read_text()
        trainer.kill()
        trainer.wait(timeout=60)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        log_a.close()
        rater.stop()
    first, pending = store.live_batch(run_name, 0), store.live_batch(run_name, 1)
    assert first.status == "closed" and pending.status == "open"
    assert all(s.used_rated for s in store.samples(first.id))
    assert store.rating_counts(pending.id) == {s.id: 0 for s in store.samples(pending.id)}

    # The rating server crashes and comes back; ratings arrive while the trainer is down (3 of 4 replies).
    server.kill()
    server = Server(workdir)
    pending_samples = store.samples(pending.id)
    assert len(pending_samples) == 4
    for s in pending_samples[:3]:
        assert rate(server.url, late_token, s.id, 0.9, unsafe=(s.row == 0))[0] == 201

    # Run B resumes: it re-attaches to batch 1, waits out the timeout for the 4th reply, skips it, and finishes.
    rater = ScriptedRater(server.url, token, store, allow=lambda iteration: iteration >= 2)
    rater.start()
    try:
        out = subprocess.run(_command(quickstart_sft_workdir, workdir), cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=900)
    finally:
        rater.stop()
        server.stop()
    (tmp_path / "run_b.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"iteration 1: re-attached to queued batch {pending.id} (open, 4 replies)" in out.stdout
    assert "iteration 1: timeout after" in out.stdout and "1 unrated ones are skipped" in out.stdout
    assert rater.errors == [] or all(e[0] == "connection" for e in rater.errors), rater.errors

    batches = store.batches(run_name)
    assert [(b.iteration, b.status) for b in batches] == [(0, "closed"), (1, "closed"), (2, "closed")], \
        "the resumed run regenerated iteration 1's replies exactly and did not queue them again"
    resumed = store.samples(pending.id)
    assert [s.used_rated for s in resumed] == [True, True, True, False]
    assert [s.used_unsafe for s in resumed] == [True, False, False, False]
    assert resumed[1].used_score == 0.9 and resumed[3].used_score is None
    assert all(s.used_rated for s in store.samples(batches[2].id))
    assert all(s.guard_flag is not None for b in batches for s in store.samples(b.id)), "every reply was checked"

    records = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        record = json.loads(line)
        if "objective/scores" in record:
            records[record["step"]] = record
    assert sorted(records) == [1, 2, 3]
    # Iteration 1 (step 2): the 3 rated replies scored 0.9, one of them flagged unsafe (-2.0).
    assert abs(records[2]["reward/human"] - 0.9) < 1e-6
    assert abs(records[2]["objective/scores"] - (0.9 * 3 - 2.0) / 3) < 1e-5
    assert abs(records[2]["reward/human_unsafe"] - 1 / 3) < 1e-6
    used = [s.used_score for s in store.samples(batches[0].id)]
    assert abs(records[1]["reward/human"] - sum(used) / len(used)) < 1e-5
