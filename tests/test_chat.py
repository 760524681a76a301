"""The chat CLI: crisis messages get the fixed guidance message, never model output; ordinary messages get a
model reply; it runs non-interactively from stdin."""

import json
import os
import subprocess
import sys


from therapy_rl import chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FakePolicy:
    """Answers like `api.Policy`: the guard for flagged texts, else a model reply; records every call."""

    def __init__(self, crisis=(), harmful=()):
        self.crisis, self.harmful, self.calls = set(crisis), set(harmful), []

    def reply(self, text, *, user_emotion=None, problem=None, history=(), sampling=None):
        from therapy_rl import api

        self.calls.append((text, user_emotion, problem, history, sampling))
        emotion = user_emotion or "sadness"
        if text in self.crisis:
            return api.Reply(chat.CRISIS_MESSAGE, None, True, api.GUARD, emotion, ("test",))
        if text in self.harmful:
            return api.Reply(chat.UNSAFE_REPLY_MESSAGE, None, False, api.GUARD, emotion, ("reply:test",))
        return api.Reply("model reply", "neutral", False, api.MODEL, emotion)


def test_session_routes_crisis_to_guard_and_keeps_context():
    policy = _FakePolicy(crisis={"crisis text"})
    session = chat.ChatSession(policy, problem="work", sampling={"top_k": 3})
    first = session.respond("hello there")
    crisis = session.respond("crisis text")
    session.respond("still here", user_emotion="fear")
    assert first.source == "model" and first.reply == "model reply" and first.user_emotion == "sadness"
    assert crisis.source == "crisis_guard" and crisis.reply == chat.CRISIS_MESSAGE and crisis.crisis
    assert crisis.crisis_reasons == ("test",) and "988" in chat.CRISIS_MESSAGE
    assert [c[1] for c in policy.calls] == [None, None, "fear"]  # "auto" = the policy infers it
    assert all(c[2] == "work" and c[4] == {"top_k": 3} for c in policy.calls)
    assert policy.calls[2][3] == (("client", "hello there"), ("therapist", "model reply"),
                                  ("client", "crisis text"), ("therapist", chat.CRISIS_MESSAGE))


def test_unsafe_model_reply_is_replaced():
    session = chat.ChatSession(_FakePolicy(harmful={"what should I do"}))
    turn = session.respond("what should I do")
    assert turn.source == "unsafe_reply_guard" and turn.reply == chat.UNSAFE_REPLY_MESSAGE and not turn.crisis


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


def test_cli_bad_checkpoint_is_one_line(quickstart_sft_workdir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run([sys.executable, "-m", "therapy_rl.chat", "--workdir", quickstart_sft_workdir,
                             "--checkpoint", "999"], input="hello\n", capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "no such step" in result.stderr
