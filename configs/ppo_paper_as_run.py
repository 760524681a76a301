"""The paper's PPO as it actually RAN: configs/ppo_paper_as_described.py with no KL penalty.

    python -m therapy_rl.main --config configs/ppo_paper_as_run.py --workdir runs/ppo_as_run \
        --config.init_from=runs/sft

The paper's code wrapped the policy and the reference around the same GPT-2 object, so the reference moved with
the policy and the KL penalty was exactly 0 on all 1,855 updates (logged `objective/kl 0`; NOTES.md). Here that is
a KL coefficient of 0 with the controller off; everything else (reward pieces as the paper's code, token-level
reward whitening, MiniLM heads for the two classifiers) is as in ppo_paper_as_described.py.
"""

from therapy_rl import defaults


def get_config():
    config = defaults.config_file("ppo_paper_as_described")
    config.ppo.adaptive_kl = False
    config.ppo.init_kl_coef = 0.0
    return config
