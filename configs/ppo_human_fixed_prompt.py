"""Clinician-in-the-loop PPO on one fixed prompt: the protocol of Barrow's Stanford RLHF report, made repeatable.

    python -m therapy_rl.rate add-rater dr_lee --workdir runs/human_ppo     # prints the rater's token, once
    python -m therapy_rl.rate serve --workdir runs/human_ppo                # http://127.0.0.1:8765/?token=...
    python -m therapy_rl.main --config configs/ppo_human_fixed_prompt.py --workdir runs/human_ppo \
        --config.init_from=runs/sft

Each of the 50 iterations samples `global_batch_size` replies to "I'm feeling depressed and hopeless. Can you help
me?" and queues them in runs/human_ppo/ratings.sqlite. Raters score each reply 0-1 (with the report's rubric,
a comment and an unsafe flag); the run waits for `reward.human.min_ratings` ratings per reply or
`reward.human.timeout_s`, skips the replies nobody rated, and updates the policy on the rest. Stopping and
rerunning the same command resumes, re-attaching to the batch that was waiting for ratings.

The report's settings: lr 1.4e-5, clip 0.2, 50 steps, one rater (k = 1). Validation runs on six held-out
scenarios with the project's automatic reward (raters only see training batches). Other prompt sets:
--config.data.train_path / --config.data.val_path (JSON Lines, therapy_rl/data/SCHEMA.md). Several raters:
--config.reward.human.min_ratings=3 --config.reward.human.aggregate=zscore.
"""

import os

from therapy_rl import defaults

PROMPTS_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "therapy_rl",
                                            "rate", "prompts"))


def get_config():
    config = defaults.ppo_defaults()
    config.data.source = "jsonl"
    config.data.train_path = os.path.join(PROMPTS_DIR, "fixed_prompt.jsonl")
    config.data.val_path = os.path.join(PROMPTS_DIR, "scenarios.jsonl")
    config.global_batch_size = 4  # replies rated per iteration
    config.ppo.minibatch_size = 4
    config.max_iterations = 50
    config.learning_rate = 1.4e-5
    config.ppo.clip_eps = 0.2
    config.reward.kind = "human"
    config.reward.human.min_ratings = 1
    config.reward.human.aggregate = "mean"
    config.reward.human.auto_kind = "therapy"  # the validation reward; weight 0 in training
    config.reward.human.auto_weight = 0.0
    config.eval_at_start = True
    config.eval_every_iterations = 10
    config.checkpoint_every_iterations = 1  # a stop loses at most the batch being rated (it is re-attached)
    config.num_eval_prompts = 0
    config.eval_batch_size = 8
    config.num_sample_replies = 4
    return config
