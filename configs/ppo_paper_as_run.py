"""The paper's PPO as it actually RAN: configs/ppo_paper_as_described.py with no KL penalty.

    python -m therapy_rl.main --config configs/ppo_paper_as_run.py --workdir runs/ppo_as_run \
        --config.init_from=runs/sft

The paper's code wrapped the policy and the reference around the same GPT-2 object, so the reference moved with
the policy and the KL penalty was exactly 0 on all 1,855 updates (logged `objective/kl 0`; NOTES.md). Here that is
a KL coefficient of 0 with the controller off; everything else (reward pieces as the paper's code, token-level
reward whitening, MiniLM heads for the two classifiers) is as in ppo_paper_as_described.py.
"""

import importlib.util
import os


def _described():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_paper_as_described.py")
    spec = importlib.util.spec_from_file_location("ppo_paper_as_described", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    config = _described().get_config()
    config.ppo.adaptive_kl = False
    config.ppo.init_kl_coef = 0.0
    return config
