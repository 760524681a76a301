"""Quickstart: a tiny GPT-2 trained from scratch (with its own byte-level BPE) on the bundled sample.

Runs on a laptop CPU in a couple of minutes; it shows the whole pipeline, not a useful model.
"""

from therapy_rl import defaults


def get_config():
    config = defaults.sft_defaults()
    config.data.source = "bundled_sample"
    config.data.max_length_tokens = 96
    config.data.max_prompt_tokens = 64
    config.tokenizer.bpe_vocab_size = 1200
    config.model.n_layer = 2
    config.model.n_head = 4
    config.model.n_embd = 128
    config.model.n_positions = 256
    config.model.dropout_rate = 0.0
    config.global_batch_size = 16
    config.num_epochs = 16.0
    config.learning_rate = 3e-3
    config.warmup_fraction = 0.05
    config.log_every_steps = 10
    config.eval_every_steps = 22
    config.early_stopping_patience_evals = 3
    config.checkpoint_every_steps = 44
    config.eval_batch_size = 32
    config.num_sample_replies = 3
    config.sampling.max_new_tokens = 32
    config.sampling.top_k = 20
    return config
