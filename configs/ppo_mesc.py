"""PPO on MESC prompts in the paper's settings (Zhang & Ive, TRL 0.11 PPOTrainer), starting from an SFT run.

    python -m therapy_rl.main --config configs/ppo_mesc.py --workdir runs/ppo --config.init_from=runs/sft

Batch and mini-batch 16, 4 PPO epochs, lr 1e-6, clip 0.2, value weight 0.1, adaptive KL 0.2 (target 6, horizon
10000), gamma 1, lambda 0.95, sampled replies of at most 128 new tokens, the project's reward (rewards/combine.py),
clipped to [-10, 10] and z-scored over the batch's sequence scores (the project's choice; the paper's code whitened
the per-token rewards, mean kept). The reference is the frozen SFT policy, as the paper describes (its code shared
the policy's weights, so its KL penalty was 0: configs/ppo_paper_as_run.py). Unlike the paper, prompts carry an
attention mask and the checkpoint kept in best/ is the one with the highest validation reward (the SFT policy itself
included). The paper's method named three ways: configs/ppo_paper_as_described.py, ppo_paper_as_run.py, ppo_ours.py.
Data options (format, lengths) come from the SFT run's run_info.json unless set here.
"""

from therapy_rl import defaults


def get_config():
    config = defaults.ppo_defaults()
    config.data.source = "mesc"
    config.num_epochs = 4.0
    config.eval_every_iterations = 50
    config.checkpoint_every_iterations = 50
    config.early_stopping_patience_evals = 4
    config.num_eval_prompts = 256
    return config
