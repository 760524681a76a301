"""The project's recommended PPO setting on MESC (its own choices, not the paper's), from the with-emotion SFT run:

    python -m therapy_rl.main --config configs/ppo_ours.py --workdir runs/ppo_ours --config.init_from=runs/sft

Same PPO core as the paper (TRL 0.11 settings: batch = mini-batch 16, 4 PPO epochs, lr 1e-6, clip 0.2, value weight
0.1, adaptive KL from 0.2 against the frozen SFT reference, gamma 1, lambda 0.95, 128 sampled new tokens) and the
same reward weights. Where it differs from the paper's code (measured effects on MESC validation replies: REWARDS.md,
"The paper's code and ours", from tools/paper_reward_table.py):

- quality: the project's token-level rules (`quality.formula="tokens"`): letter-based words, repeated n-grams as a
  fraction of the reply's n-grams (at most 10 together), a flat 2 per over-used word, and the "range" length rule
  (a soft penalty below 12 or above 200 characters) instead of -10 for 100+ characters or any yes/no/ok/thanks.
  Softer on repetition ("I know. I know. I know. I know." -4.86, the paper's code -10).
- emotion: joy against a negative label scores valid +1 plus the -5 conflict = -4 (the paper's code: -5).
- relevance: MiniLM cosine of the texts as they are (the paper's code lower-cases and strips punctuation first).
- safety: a penalty the paper does not have (crisis input answered without crisis resources, replies that
  encourage harm; the learned guard), added after the clip so saturation cannot hide it.
- normalisation: one z-scored score per reply (`ppo.whiten_scores=True`; the paper's code whitened per-token rewards
  with the mean kept).
- sentiment and empathy: MiniLM heads stand in for the paper's two classifiers (as in every configuration here).
- 4 epochs over the prompts with early stopping on the validation reward (patience 4 evaluations); the paper ran 8
  and evaluated its epoch-4 checkpoint.
"""

from therapy_rl import defaults


def get_config():
    return defaults.config_file("ppo_mesc")  # the project's recommended setting is configs/ppo_mesc.py
