"""Quickstart PPO: a few iterations on the bundled sample, from the quickstart SFT run.

    python -m therapy_rl.main --config configs/quickstart.py --workdir runs/qs_sft
    python -m therapy_rl.main --config configs/quickstart_ppo.py --workdir runs/qs_ppo --config.init_from=runs/qs_sft

The reward is the simple emotion-tag reward (valid tag, right label, length), so no reward model is loaded; pass
`--config.reward.kind=therapy` for the full reward. It shows the loop, not a useful model.
"""

from therapy_rl import defaults


def get_config():
    config = defaults.ppo_defaults()
    config.global_batch_size = 16
    config.ppo.minibatch_size = 8
    config.ppo.num_ppo_epochs = 2
    config.max_iterations = 12
    config.learning_rate = 1e-4
    config.ppo.init_kl_coef = 0.05
    config.reward.kind = "emotion_tag"
    config.reward.emotion_tag.target_length = 24
    config.sampling.max_new_tokens = 32
    config.log_every_iterations = 1
    config.eval_every_iterations = 4
    config.checkpoint_every_iterations = 4
    config.num_eval_prompts = 0
    config.eval_batch_size = 16  # = the rollout batch: one compiled sampler
    config.num_sample_replies = 3
    return config
