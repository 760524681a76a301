"""SFT on MESC in the paper's settings (Zhang & Ive): GPT-2 small shape, AdamW 2e-5, batch 32, 128 tokens,
10% warm-up then linear decay, grad-clip 1.0, 20 epochs.

Start from real GPT-2 weights with ``--config.model.hf_checkpoint=/path/to/gpt2`` (a local HF directory).
Small smoke run: ``--config.model.n_layer=2 --config.model.n_embd=128 --config.model.n_head=4 --config.max_steps=20``.
"""

from therapy_rl import defaults


def get_config():
    config = defaults.sft_defaults()
    config.data.source = "mesc"
    config.data.max_length_tokens = 128
    config.data.drop_long = True
    config.tokenizer.bpe_vocab_size = 16000  # only used without an HF checkpoint
    config.global_batch_size = 32
    config.num_epochs = 20.0
    config.learning_rate = 2e-5
    config.warmup_fraction = 0.1
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    config.early_stopping_patience_evals = 5
    return config
