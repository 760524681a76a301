"""The paper's PPO as DESCRIBED (Zhang & Ive): a frozen SFT reference with an adaptive KL penalty from 0.2, and every
reward piece as the paper's code computes it. Start from the with-emotion SFT run:

    python -m therapy_rl.main --config configs/ppo_paper_as_described.py --workdir runs/ppo_described \
        --config.init_from=runs/sft

- PPO: TRL 0.11 settings (defaults.ppo_defaults: batch = mini-batch 16, 4 PPO epochs, lr 1e-6, clip 0.2, value
  weight 0.1, adaptive KL 0.2 with target 6 and horizon 10000, gamma 1, lambda 0.95, 128 sampled new tokens), 8
  epochs over the prompts like the paper.
- Reward normalisation: TRL's `whiten_rewards=True`, i.e. the per-token rewards (KL part + score on the last token)
  whitened over the batch with the mean kept (`ppo.whiten_scores=False`, `ppo.whiten_token_rewards=True`).
- Reward: 1.1 quality + 1.2 emotion + 1.1 relevance + 0.7 sentiment + 0.7 empathy + penalty, clipped to [-10, 10]:
  quality by the paper's text rules (`quality.formula="paper_code"`: whitespace words, (count-1)^1.5 windows,
  min((count-1)^1.7 * 1.5, 8) over-use, -10 for 100+ characters or yes/no/ok/thanks), the joy-vs-negative conflict
  -5 absolute, relevance on lower-cased texts without punctuation. No safety term (the paper has none).
- Stand-ins (no way around them here): sentiment and empathy come from MiniLM heads (rewards/heads.py) instead of
  the paper's DistilBERT-SST-2 and BERT-empathy classifiers.
- Not the paper: prompts carry an attention mask (the paper padded queries to 128 without one), and best/ keeps the
  checkpoint with the highest validation reward (the paper evaluated its epoch-4 checkpoint).
"""

from therapy_rl import defaults


def get_config():
    config = defaults.config_file("ppo_mesc")
    config.num_epochs = 8.0
    config.early_stopping_patience_evals = defaults.ppo_defaults().early_stopping_patience_evals
    config.ppo.adaptive_kl = True
    config.ppo.init_kl_coef = 0.2
    config.ppo.whiten_scores = False
    config.ppo.whiten_token_rewards = True
    t = config.reward.therapy
    t.use_safety = False
    t.quality.formula = "paper_code"
    t.quality.length_rule = "paper"  # unused by paper_code; the same choice for the tokens formula
    t.emotion_scores.conflict_absolute = True
    t.relevance_text = "paper_clean"
    return config
