"""Errors a user causes on the command line end as ONE line ``error: …`` on stderr with exit status 2 (NaN: 3),
no traceback (unless --debug / THERAPY_RL_DEBUG=1), and nothing written: the workdir is never created.

Each case is a real ``python -m therapy_rl.main`` process; they run side by side (a process mostly waits on
imports), then each test reads its own result."""

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
    return os.path.join(REPO, "configs", name)


def _env(**changes):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TOKENIZERS_PARALLELISM="false")
    env.pop("THERAPY_RL_DEBUG", None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(args, env=None):
    return subprocess.run([sys.executable, "-m", "therapy_rl.main", *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *fragments, status=2):
    """Exit ``status``, stderr exactly one non-empty line starting ``error:`` holding every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# (id, config file, extra args, fragments the line must hold, env changes). Every case runs with
# --workdir <tmp>/run, which must not exist afterwards.
CASES = [
    ("unknown_flag", "quickstart.py", ["--bogus_flag=1"], ["bogus_flag", "--helpfull"], {}),
    ("unknown_field", "quickstart.py", ["--config.lr_schedul=cosine"],
     ["--config.lr_schedul", "did you mean --config.lr_schedule"], {}),
    ("unknown_section", "quickstart.py", ["--config.dat.source=mesc"], ["--config.data.source"], {}),
    ("unparsable_value", "quickstart.py", ["--config.global_batch_size=abc"], ["global_batch_size", "abc"], {}),
    ("missing_config_file", "no_such_config.py", [], ["no_such_config.py", "--config="], {}),
    ("bad_enum_and_ranges", "quickstart.py",
     ["--config.lr_schedule=cosin", "--config.sampling.top_p=0", "--config.learning_rate=nan",
      "--config.model.dtype=float16"],
     ["--config.lr_schedule='cosin'", "'cosine'", "--config.sampling.top_p", "--config.learning_rate",
      "--config.model.dtype"], {}),
    ("batch_not_divisible", "quickstart.py", ["--config.grad_accum_steps=3"],
     ["--config.grad_accum_steps=3", "global_batch_size=16"], {}),
    ("batch_vs_mesh", "quickstart.py", ["--config.global_batch_size=12", "--config.eval_batch_size=8"],
     ["--config.global_batch_size=12", "data 8"], {}),
    ("mesh_vs_devices", "quickstart.py", ["--config.mesh.data=3"], ["--config.mesh.data=3", "device count 8"], {}),
    ("length_over_positions", "quickstart.py", ["--config.data.max_length_tokens=512"],
     ["--config.data.max_length_tokens=512", "n_positions 256"], {}),
    ("missing_dataset_dir", "quickstart.py", ["--config.data.source=mesc", "--config.data.data_dir={tmp}/no_data"],
     ["--config.data.data_dir", "no_data"], {}),
    ("missing_dataset_file", "quickstart.py", ["--config.data.source=mesc", "--config.data.data_dir={tmp}"],
     ["MESC.csv", "--config.data.data_dir"], {}),
    ("no_data_root", "quickstart.py", ["--config.data.source=esconv"], ["THERAPY_RL_DATA", "data_dir"],
     {"THERAPY_RL_DATA": None}),
    ("missing_jsonl", "quickstart.py", ["--config.data.source=jsonl", "--config.data.train_path={tmp}/train.jsonl"],
     ["train.jsonl", "train split"], {}),
    ("missing_hf_checkpoint", "quickstart.py", ["--config.model.hf_checkpoint={tmp}/gpt2"],
     ["--config.model.hf_checkpoint", "gpt2: no such folder"], {}),
    ("missing_tokenizer", "quickstart.py", ["--config.tokenizer.path={tmp}/tok"],
     ["--config.tokenizer.path", "no such folder"], {}),
    ("ppo_init_from_not_a_run", "quickstart_ppo.py", ["--config.init_from={tmp}"],
     ["--config.init_from", "run workdir"], {}),
    ("ppo_init_from_missing", "quickstart_ppo.py", ["--config.init_from={tmp}/nowhere"],
     ["--config.init_from", "no such folder"], {}),
    ("ppo_init_from_empty", "quickstart_ppo.py", [], ["--config.init_from is empty"], {}),
    ("eval_checkpoint_not_a_run", "eval_quickstart.py", ["--config.checkpoint={tmp}"],
     ["--config.checkpoint", "run workdir"], {}),
    ("eval_search_on_test", "eval_quickstart.py", ["--config.decoding_search.split=test"],
     ["--config.decoding_search.split='test'", "allow_test_split"], {}),
    ("workdir_is_a_file", "quickstart.py", ["--workdir={tmp}/a_file"], ["--workdir", "a_file", "not a folder"], {}),
    ("stray_argument", "quickstart.py", ["stray"], ["stray", "--flag=value"], {}),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{case id: (CompletedProcess, workdir)} for every case, run a few at a time."""
    root = tmp_path_factory.mktemp("cli_errors")

    def launch(case):
        case_id, config, args, _, env = case
        tmp = root / case_id
        tmp.mkdir()
        (tmp / "a_file").write_text("not a folder\n")
        (tmp / "some_file.txt").write_text("a folder that is not a run\n")
        workdir = str(tmp / "run")
        args = [a.format(tmp=tmp) for a in args]
        flags = ["--config", _config(config)] + ([] if any(a.startswith("--workdir") for a in args)
                                                 else ["--workdir", workdir])
        return case_id, (_run(flags + args, _env(**env)), workdir)

    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(launch, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line(results, case):
    result, workdir = results[case[0]]
    assert_one_line_error(result, *case[3])
    assert not os.path.exists(workdir), "the workdir was created before the config was checked"


def test_missing_workdir_flag():
    result = _run(["--config", _config("quickstart.py")])
    assert_one_line_error(result, "--workdir is required")


def test_debug_shows_traceback(tmp_path):
    """THERAPY_RL_DEBUG=1 (a check in the run) and --debug (a flag parse error) print the traceback, then the line."""
    args = ["--config", _config("quickstart.py"), "--workdir", str(tmp_path / "run")]
    by_env = _run(args + ["--config.lr_schedule=cosin"], _env(THERAPY_RL_DEBUG="1"))
    assert by_env.returncode == 2 and "Traceback" in by_env.stderr and "ConfigError" in by_env.stderr
    assert by_env.stderr.strip().splitlines()[-1].startswith("error: --config.lr_schedule")
    by_flag = _run(args + ["--debug", "--config.lr_schedul=cosine"])
    assert by_flag.returncode == 2 and "Traceback" in by_flag.stderr
    assert by_flag.stderr.strip().splitlines()[-1].startswith("error: unknown config field")
    assert not os.path.exists(tmp_path / "run")


def test_user_error_inside_the_run(tmp_path):
    """A bad record found by a reader once the run started (DataError), and a refused resume."""
    good = {"dialogue_id": "d1", "problem_type": "work", "utterances": [
        {"speaker": "client", "text": "I can't sleep.", "emotion": "fear"},
        {"speaker": "therapist", "text": "What keeps you up?", "emotion": "neutral"}]}
    bad = dict(good, utterances=[dict(good["utterances"][0], emotion="grumpy")])
    paths = {}
    for split, records in (("train", [good, bad]), ("val", [good]), ("test", [good])):
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    data_args = ["--config.data.source=jsonl"] + [f"--config.data.{s}_path={p}" for s, p in paths.items()]
    result = _run(["--config", _config("quickstart.py"), "--workdir", str(tmp_path / "run"), *data_args])
    assert_one_line_error(result, f"{paths['train']}:2:", "utterances[0].emotion", "grumpy")

    ppo_run = tmp_path / "ppo_run"
    ppo_run.mkdir()
    (ppo_run / "run_info.json").write_text(json.dumps({"mode": "ppo"}))
    refused = _run(["--config", _config("quickstart.py"), "--workdir", str(ppo_run)])
    assert_one_line_error(refused, "ppo run", "--workdir")


def test_run_cli_statuses(tmp_path):
    """The wrapper chat uses too: a UserError exits 2, a NonFiniteError 3, one line each; a clean main exits 0."""
    script = tmp_path / "tool.py"
    script.write_text(textwrap.dedent("""
        import sys
        from absl import flags
        from therapy_rl import cli, errors

        flags.DEFINE_string("raise_", "", "which error to raise")

        def main(argv):
            if flags.FLAGS.raise_ == "user":
                raise errors.MissingFileError("--workdir=/x: no such folder; pass a run workdir")
            if flags.FLAGS.raise_ == "nan":
                raise errors.NonFiniteError("non-finite loss at step 3: lower the learning rate")
            print("ran")

        cli.run_cli(main)
    """))

    def tool(*args, **env):
        return subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=_env(**env), capture_output=True,
                              text=True, timeout=120)

    assert_one_line_error(tool("--raise_=user"), "--workdir=/x", "pass a run workdir")
    assert_one_line_error(tool("--raise_=nan"), "non-finite loss at step 3", status=3)
    assert_one_line_error(tool("--no_such_flag"), "no_such_flag")
    debug = tool("--raise_=nan", "--debug")
    assert debug.returncode == 3 and "Traceback" in debug.stderr
    clean = tool()
    assert clean.returncode == 0 and clean.stdout.strip() == "ran" and not clean.stderr.strip()
