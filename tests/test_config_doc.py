"""Config you can discover: every field has a comment, ``--show_config`` lists them, one conversion from a config
section to typed settings, and PPO / eval data options inherit only what was not set."""

import glob
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, load_config

from therapy_rl import config_doc, defaults, errors, settings

CONFIG_NAMES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO_ROOT, "configs",
                                                                                                 "*.py")))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_field_of_every_config_has_a_comment(name):
    config = load_config(name)
    fields = [field for field, _ in config_doc.leaves(config)]
    assert len(fields) > 20
    missing = config_doc.uncommented(config)
    assert not missing, f"configs/{name}.py: fields without a comment in therapy_rl/defaults.py: {missing}"


def test_a_field_without_a_comment_is_reported():
    config = defaults.ppo_defaults()
    config.reward.therapy.brand_new_weight = 0.5  # set by a config file, absent from defaults.py
    config.ppo.clip_eps = 0.3
    assert config_doc.uncommented(config) == ["reward.therapy.brand_new_weight"]


def test_section_comments_and_maps():
    docs = config_doc.field_comments("eval_defaults")
    assert "grid search" in docs["decoding_search"]  # a section's comment, from `d = ConfigDict()  # ...`
    assert "run's value" in docs["data"]
    config = load_config("eval_esconv")  # a map filled by the config file is one field, shown whole
    rows = {name: (value, comment) for name, value, comment in config_doc.describe(config)}
    assert rows["data.esconv_emotion_map"][0]["shame"] == "sadness" and rows["data.esconv_emotion_map"][1]
    assert not any(name.startswith("data.esconv_emotion_map.") for name in rows)


def _main(*args, cwd=REPO_ROOT):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "therapy_rl.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_show_config_lists_every_resolved_field_with_its_comment(tmp_path):
    workdir = tmp_path / "run"
    result = _main("--config", os.path.join(REPO_ROOT, "configs", "quickstart_ppo.py"), "--show_config",
                   "--config.data.max_prompt_tokens=96", "--config.ppo.clip_eps=0.3", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.strip() for line in result.stdout.splitlines()]
    config = load_config("quickstart_ppo", **{"data.max_prompt_tokens": 96, "ppo.clip_eps": 0.3})
    for name, value in config_doc.leaves(config):
        line = next((line for line in lines if line.startswith(f"{name} = ")), None)
        assert line is not None, f"{name} missing from --show_config"
        assert line.startswith(f"{name} = {value!r}") and "  # " in line and "(no comment)" not in line, line
    assert "data.max_prompt_tokens = 96" in result.stdout and "ppo.clip_eps = 0.3" in result.stdout
    assert "data.include_strategy = None" in result.stdout  # not set: PPO takes the SFT run's value
    assert "max_iterations = 12" in result.stdout  # the config file's own value
    assert not workdir.exists()

    no_workdir = _main("--config", os.path.join(REPO_ROOT, "configs", "eval_mesc.py"), "--show_config")
    assert no_workdir.returncode == 0, no_workdir.stderr[-3000:]
    assert "decoding_search.top_p = (0.6," in no_workdir.stdout and "[decoding_search]  # grid search" in \
        no_workdir.stdout


# ------------------------------------------------------------------------------------------ data inheritance


def _sft_run_data(**changes):
    data = defaults.data_defaults().to_dict()
    data.update(source="bundled_sample", max_prompt_tokens=64, max_length_tokens=80, include_strategy=True,
                max_eval_samples=8)
    data.update(changes)
    return data


def test_explicit_data_option_equal_to_the_default_is_not_replaced_by_the_runs():
    """--config.data.max_prompt_tokens=96 (the default) on PPO from an SFT run with 64 keeps 96; unset fields come
    from the run. Parsed by the real config flag, as main does."""
    from absl import flags
    from ml_collections import config_flags

    from therapy_rl.ppo import trainer

    argv = ["main", f"--config={os.path.join(REPO_ROOT, 'configs', 'quickstart_ppo.py')}",
            "--config.data.max_prompt_tokens=96", "--config.data.strict=True"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    assert defaults.data_defaults().max_prompt_tokens == 96
    resolved = trainer.resolve_data_config(flag_values.config.data, _sft_run_data(strict=False))
    assert resolved.max_prompt_tokens == 96 and resolved.strict is True  # set: kept though equal to the default
    assert resolved.max_length_tokens == 80 and resolved.include_strategy is True  # not set: the run's
    assert resolved.source == "bundled_sample" and resolved.max_eval_samples == 8

    unset = trainer.resolve_data_config(defaults.ppo_defaults().data, _sft_run_data())
    assert unset.max_prompt_tokens == 64


def test_eval_data_options():
    from therapy_rl.evaluation import runner

    run = _sft_run_data(source="mesc", data_dir="/data/mesc")
    same = runner.resolve_data_config(defaults.eval_defaults().data, run)
    assert same.max_eval_samples == 0 and same.data_dir == "/data/mesc"  # the eval's own speed setting
    config = defaults.eval_defaults()
    config.data.source = "esconv"
    config.data.max_eval_samples = 8
    cross = runner.resolve_data_config(config.data, run)
    assert cross.source == "esconv" and cross.data_dir == "" and cross.max_eval_samples == 8
    config.data.include_strategy = False  # set against the run's format
    with pytest.raises(ValueError, match="include_strategy"):
        runner.resolve_data_config(config.data, run)


def test_max_eval_samples_caps_validation_and_test_not_train():
    from therapy_rl.data import pipeline

    data = load_config("quickstart").data
    full = pipeline.load_samples(data, ("train", "val", "test"))
    assert min(len(full["val"]), len(full["test"])) > 2
    data.max_eval_samples = 2
    capped = pipeline.load_samples(data, ("train", "val", "test"))
    assert len(capped["val"]) == len(capped["test"]) == 2
    assert len(capped["train"]) == len(full["train"])
    assert "val AND test" in config_doc.field_comments("sft_defaults")["data.max_eval_samples"]


def test_validation_accepts_unset_data_and_checks_wandb(tmp_path):
    from therapy_rl import config_validation

    ppo = load_config("quickstart_ppo")  # every data option unset: the first problem is the missing SFT run
    with pytest.raises(errors.ConfigError, match="init_from is empty"):
        config_validation.validate(ppo, str(tmp_path / "run"), device_count=1, process_count=1)
    ppo.data.max_prompt_tokens = 0
    with pytest.raises(errors.ConfigError, match="--config.data.max_prompt_tokens=0"):
        config_validation.validate(ppo, str(tmp_path / "run"), device_count=1, process_count=1)
    sft = load_config("quickstart", **{"wandb.mode": "onlin"})
    assert sft.wandb.enabled is False and sft.wandb.project == "therapy_rl"
    with pytest.raises(errors.ConfigError, match="--config.wandb.mode='onlin'"):
        config_validation.validate(sft, str(tmp_path / "run"), device_count=1, process_count=1)


# ------------------------------------------------------------------------------------------ typed settings


class _Tok:
    eos_id, pad_id = 3, 0


def test_typed_settings_defaults_are_the_configs():
    """The dataclass defaults and defaults.py agree (they are read from it): a run built from the default config
    and the library's defaults are the same settings."""
    from therapy_rl import replies, sampling
    from therapy_rl.models import build, gpt2
    from therapy_rl.ppo import step, trainer

    assert replies.sampling_config_from(defaults.sampling_defaults(), _Tok) == sampling.SamplingConfig(
        max_new_tokens=defaults.sampling_defaults().max_new_tokens, eos_id=3, pad_id=0)
    model = defaults.model_defaults()
    assert build.model_config_from(model, 100) == gpt2.GPT2Config(
        vocab_size=100, n_positions=model.n_positions, n_embd=model.n_embd, n_layer=model.n_layer,
        n_head=model.n_head)
    config = defaults.ppo_defaults()
    hyper = trainer.hyper_from_config(config.ppo, config.global_batch_size, 7)
    assert hyper == step.PPOHyper(num_minibatches=config.global_batch_size // config.ppo.minibatch_size, eos_id=7)


def test_hyper_reads_renamed_and_off_fields():
    from therapy_rl.ppo import trainer

    ppo = defaults.ppo_defaults().ppo
    ppo.num_ppo_epochs, ppo.kl_target, ppo.loss_aggregation = 2, 3.0, "sequence_mean"
    ppo.value_clip_eps, ppo.ratio_threshold, ppo.gamma = 0.0, -1.0, 1  # <= 0 = off; an int for a float
    hyper = trainer.hyper_from_config(ppo, 16, 5)
    assert hyper.num_epochs == 2 and hyper.kl.target == 3.0 and hyper.loss.aggregation == "sequence_mean"
    assert hyper.loss.value_clip_eps is None and hyper.ratio_threshold is None
    assert hyper.gamma == 1.0 and isinstance(hyper.gamma, float)


def test_from_section_errors_name_the_field():
    from therapy_rl import sampling

    section = defaults.sampling_defaults().to_dict()  # a config file can hold any type; a ConfigDict casts
    with pytest.raises(errors.ConfigError, match=r"config\.sampling\.top_k=2\.5: expected int"):
        settings.from_section(sampling.SamplingConfig, {**section, "top_k": 2.5}, "config.sampling")
    with pytest.raises(errors.ConfigError, match=r"config\.sampling\.greedy=1: expected bool"):
        settings.from_section(sampling.SamplingConfig, {**section, "greedy": 1}, "config.sampling")
    section = defaults.sampling_defaults()
    section.beam_width = 4
    with pytest.raises(errors.ConfigError, match=r"config\.sampling\.beam_width: unknown field"):
        settings.from_section(sampling.SamplingConfig, section, "config.sampling")
    assert settings.from_section(sampling.SamplingConfig, section, "config.sampling", partial=True).top_k == 0
    with pytest.raises(errors.ConfigError, match=r"config\.sampling\.max_new_tokens missing"):
        settings.from_section(sampling.SamplingConfig, {"temperature": 0.7}, "config.sampling")
    with pytest.raises(errors.ConfigError, match=r"config\.sampling: SamplingConfig\.top_p"):
        settings.from_section(sampling.SamplingConfig, {"max_new_tokens": 4, "top_p": 1.5}, "config.sampling")
