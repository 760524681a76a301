"""The Python API and `open_run`: the README's example runs as written, reply/generate agree and compile once per
batch shape, the guard answers crises and harmful replies, decoding defaults, input checks, a cheap import."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import therapy_rl
from therapy_rl import api, errors, run as run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRISIS = "I've decided to kill myself tonight, I already gave my dog away."
GREEDY = {"greedy": True}


@pytest.fixture(scope="module")
def policy(quickstart_ppo_workdir):
    return therapy_rl.load(quickstart_ppo_workdir)


def readme_python_example() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(quickstart_ppo_workdir, tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    os.symlink(quickstart_ppo_workdir, tmp_path / "runs" / "qs_ppo")  # the README's path, as after the quickstart
    monkeypatch.chdir(tmp_path)
    code = readme_python_example()
    assert 'therapy_rl.load("runs/qs_ppo")' in code
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("Policy(ppo run") and lines[1].startswith("model ")
    assert lines[2].startswith("joy -> ") and len(lines) == 4


def test_generate_agrees_with_reply_and_compiles_once_per_shape(policy):
    texts = ["I had a long week at work and I feel drained.", "My sister stopped talking to me.",
             "I passed my driving test!"]
    batch = policy.generate([{"text": t, "user_emotion": "sadness"} for t in texts], sampling=GREEDY)
    single = [policy.reply(t, user_emotion="sadness", sampling=GREEDY) for t in texts]
    assert batch == single  # padding rows never change a reply
    assert all(r.source == "model" and not r.crisis and r.user_emotion == "sadness" for r in batch)
    more = policy.generate([api.Message(t, "fear") for t in texts * 2], sampling=GREEDY)  # 6 rows: one batch of 8
    assert [r.text for r in more[:3]] == [r.text for r in more[3:]]
    sampler = policy._samplers[policy.sampling_config(GREEDY)]
    compiled = sampler._cache_size()  # the program is shared by every sampler with this plan (sampling.py)
    assert len(policy._samplers) == 1 and compiled <= 2  # one row, and batch_size rows
    policy.generate([api.Message(t, "joy") for t in texts], sampling=GREEDY)
    policy.reply(texts[0], user_emotion="joy", sampling=GREEDY)
    assert sampler._cache_size() == compiled  # shapes seen before compile nothing new


def test_sampled_replies_follow_the_seed(policy):
    twin = api.Policy(policy.run, policy.params, safety=policy.safety)  # same seed 0: the same key sequence
    first = [policy.reply("Work has been so hard lately.", user_emotion="sadness", rng=5) for _ in range(2)]
    assert first[0] == first[1]
    a = [twin.reply("Work has been so hard lately.", user_emotion="sadness") for _ in range(3)]
    b_policy = api.Policy(policy.run, policy.params, safety=policy.safety)
    b = [b_policy.reply("Work has been so hard lately.", user_emotion="sadness") for _ in range(3)]
    assert a == b and len({r.text for r in a}) > 1  # reproducible, yet each call draws a new key


def test_crisis_messages_never_reach_the_model(policy, monkeypatch):
    seen = []
    model_replies = policy._model_replies

    def recording(messages, config, key):
        seen.extend(m.text for m in messages)
        return model_replies(messages, config, key)

    monkeypatch.setattr(policy, "_model_replies", recording)
    crisis = policy.reply(CRISIS)
    assert crisis.crisis and crisis.source == "guard" and crisis.text == api.CRISIS_MESSAGE and crisis.reasons
    assert crisis.emotion is None and "988" in crisis.text
    mixed = policy.generate(["I had a long week at work.", CRISIS, "This exam is killing me, but I'll survive."])
    assert [(r.source, r.crisis) for r in mixed] == [("model", False), ("guard", True), ("model", False)]
    assert seen == ["I had a long week at work.", "This exam is killing me, but I'll survive."]


def test_harmful_model_reply_is_replaced(policy, monkeypatch):
    from therapy_rl import replies

    def harmful(messages, config, key):
        return [replies.Reply("honestly you'd be better off dead", "neutral", None, 8) for _ in messages]

    monkeypatch.setattr(policy, "_model_replies", harmful)
    reply = policy.reply("Nobody at work listens to me.", user_emotion="anger")
    assert reply.source == "guard" and not reply.crisis and reply.text == api.UNSAFE_REPLY_MESSAGE


def test_guard_off_returns_model_output(policy):
    unguarded = api.Policy(policy.run, policy.params, guard=False, safety=policy.safety)
    reply = unguarded.reply(CRISIS, user_emotion="sadness", sampling=GREEDY)
    assert reply.source == "model" and not reply.crisis


def test_decoding_defaults_and_overrides(quickstart_sft_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(quickstart_sft_workdir, workdir)
    run = run_lib.open_run(workdir)
    values, source = run.default_sampling()
    assert values == {**run_lib.DEFAULT_SAMPLING, **run.sampling} and "config.sampling" in source
    with open(os.path.join(workdir, "decoding.json"), "w") as f:
        json.dump({"settings": {"top_p": 0.8, "top_k": 5, "temperature": 1.2}, "chosen_on_split": "val"}, f)
    run = run_lib.open_run(workdir)
    values, source = run.default_sampling()
    assert (values["top_p"], values["top_k"], values["temperature"]) == (0.8, 5, 1.2)
    assert source.endswith("decoding.json") and values["max_new_tokens"] == run.sampling["max_new_tokens"]
    assert run.default_sampling(False)[0]["top_k"] == run.sampling["top_k"]
    assert run.default_sampling({"top_p": 0.7, "top_k": 0, "temperature": 1.0})[0]["top_p"] == 0.7

    policy = api.Policy(run, guard=False)
    assert (policy.sampling.top_p, policy.sampling.top_k) == (0.8, 5) and policy.sampling.eos_id == run.tokenizer.eos_id
    assert policy.sampling_config({"top_k": 3, "greedy": True}).top_k == 3
    with pytest.raises(errors.ConfigError, match="unknown fields"):
        policy.sampling_config({"topk": 3})
    with pytest.raises(errors.ConfigError, match="n_positions"):
        policy.sampling_config({"max_new_tokens": 10_000})
    with pytest.raises(errors.ConfigError, match="temperature"):
        policy.sampling_config({"temperature": 0.0})


def test_input_checks(policy):
    with pytest.raises(ValueError, match="user_emotion"):
        policy.reply("hello", user_emotion="happy")
    with pytest.raises(ValueError, match="expected keys"):
        policy.generate([{"message": "hello"}])
    with pytest.raises(ValueError, match="history speaker"):
        policy.reply("hello", history=[("me", "hi")])
    with pytest.raises(ValueError, match="empty"):
        policy.reply("   ")
    assert policy.generate([]) == []
    assert api._context((("client", "a"), ("therapist", "b"), ("client", "c")), 2) == (("therapist", "b"),
                                                                                       ("client", "c"))
    assert api._context((("client", "a"),), 0) == ()


def test_open_run_choices(quickstart_ppo_workdir, tmp_path):
    best, last = run_lib.open_run(quickstart_ppo_workdir), run_lib.open_run(quickstart_ppo_workdir, "last")
    assert best.which == "best" and last.which == "last" and last.step == 2 and best.mode == "ppo"
    assert run_lib.open_run(quickstart_ppo_workdir, "1").step == 1 == run_lib.open_run(quickstart_ppo_workdir, 1).step
    assert best.reward["kind"] == "emotion_tag" and best.workdir == os.path.abspath(quickstart_ppo_workdir)
    assert run_lib.open_run(os.path.join(quickstart_ppo_workdir, "checkpoints")).workdir == best.workdir
    assert run_lib.checkpoint_choice("best", -1) == "best" and run_lib.checkpoint_choice("best", 3) == 3
    params = last.read_params()
    assert "wte" in params and "trunk" not in params  # the PPO state's policy trunk, in SFT's layout
    with pytest.raises(errors.MissingFileError, match="no such step"):
        run_lib.open_run(quickstart_ppo_workdir, 77)
    with pytest.raises(errors.ConfigError, match="best, last or a step"):
        run_lib.open_run(quickstart_ppo_workdir, "newest")
    with pytest.raises(errors.MissingFileError, match="no such folder"):
        run_lib.open_run(str(tmp_path / "missing"))
    target = best.copy_tokenizer(str(tmp_path))
    assert sorted(os.listdir(target)) == sorted(os.listdir(best.tokenizer_dir))


def test_import_is_cheap():
    code = "import sys, therapy_rl; assert 'jax' not in sys.modules, 'jax imported'; print(therapy_rl.Reply)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "therapy_rl.api.Reply" in proc.stdout  # the lazy export resolves
