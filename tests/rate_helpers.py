"""Shared by the tests/test_rate_*.py files: start the real rating server and talk to it over HTTP."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    """`python -m therapy_rl.rate serve --workdir W --port 0` as a subprocess; `url` once it listens."""

    def __init__(self, workdir, timeout_s=60):
        self.log_path = os.path.join(workdir, f"serve-{time.time_ns()}.log")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "therapy_rl.rate", "serve", "--workdir", workdir,
                                         "--port", "0"], stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        deadline = time.time() + timeout_s
        self.url = None
        while time.time() < deadline and self.process.poll() is None:
            found = re.search(r"serving on (http://[0-9.]+:\d+)/", self.output())
            if found:
                self.url = found.group(1)
                break
            time.sleep(0.05)
        if self.url is None:
            self.stop()
            raise RuntimeError(f"rating server did not start:\n{self.output()}")

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def kill(self):
        """SIGKILL: no clean shutdown, as in a crash."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()


def request(url, method="GET", token=None, body=None, raw=None, content_type="application/json", timeout=30):
    """(status, parsed JSON or text) of one HTTP request; 4xx/5xx are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, payload, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        status, payload, headers = e.code, e.read(), dict(e.headers)
    text = payload.decode("utf-8", "replace")
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, text, headers


def rate(server_url, token, sample_id, score, **fields):
    return request(f"{server_url}/api/ratings", "POST", token, {"sample_id": sample_id, "score": score, **fields})
