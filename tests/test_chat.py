"""The chat CLI: crisis messages get the fixed guidance message, never model output; ordinary messages get a
model reply; it runs non-interactively from stdin."""

import json
import os
import subprocess
import sys


from therapy_rl import chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FakeDetector:
    def __init__(self, flagged):
        self.flagged = flagged

    def detect(self, texts):
        from therapy_rl.rewards.safety import CrisisResult

        return [CrisisResult(flag=t in self.flagged, score=1.0 if t in self.flagged else 0.0, reasons=("test",))
                for t in texts]


def test_session_routes_crisis_to_guard_and_keeps_context():
    calls = []

    def reply_fn(text, emotion, context):
        calls.append((text, emotion, context))
        return "model reply", "neutral"

    session = chat.ChatSession(reply_fn, _FakeDetector({"crisis text"}), lambda t: "sadness",
                               lambda reply: False, context_turns=2)
    first = session.respond("hello there")
    crisis = session.respond("crisis text")
    session.respond("still here", user_emotion="fear")
    assert first.source == "model" and first.reply == "model reply" and first.user_emotion == "sadness"
    assert crisis.source == "crisis_guard" and crisis.reply == chat.CRISIS_MESSAGE and crisis.crisis
    assert "988" in chat.CRISIS_MESSAGE
    assert [c[0] for c in calls] == ["hello there", "still here"]  # the model never saw the crisis message
    assert calls[1][1] == "fear"
    assert calls[1][2] == (("client", "crisis text"), ("therapist", chat.CRISIS_MESSAGE))


def test_unsafe_model_reply_is_replaced():
    session = chat.ChatSession(lambda *a: ("do it", None), _FakeDetector(set()), lambda t: "neutral",
                               lambda reply: reply == "do it", context_turns=0)
    turn = session.respond("what should I do")
    assert turn.source == "unsafe_reply_guard" and turn.reply == chat.UNSAFE_REPLY_MESSAGE


def test_cli_stdin_to_stdout(quickstart_sft_workdir):
    messages = ["I had a long week at work and I feel drained.",
                "I've decided to kill myself tonight, I already gave my dog away.",
                "This exam is killing me, but I'll survive."]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    # A relative --workdir, as a user types it (orbax needs absolute paths internally).
    parent, name = os.path.split(os.path.abspath(quickstart_sft_workdir))
    result = subprocess.run([sys.executable, "-m", "therapy_rl.chat", "--workdir", name, "--json",
                             "--max_new_tokens=16"], input="\n".join(messages) + "\n", capture_output=True, text=True,
                            env=env, cwd=parent, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    turns = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [t["user"] for t in turns] == messages
    assert [t["source"] for t in turns] == ["model", "crisis_guard", "model"]
    assert turns[1]["reply"] == chat.CRISIS_MESSAGE
    assert turns[0]["reply"] != chat.CRISIS_MESSAGE
