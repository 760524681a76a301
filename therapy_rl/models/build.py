"""Model set-up from ``config.model``: a fresh GPT-2 of the configured shape, or local HF weights resized to
the run's tokenizer."""

from __future__ import annotations

from typing import Any, Callable

import jax

from therapy_rl.models import gpt2, hf_io


def model_config_from(model_cfg, vocab_size: int) -> gpt2.GPT2Config:
    """The GPT2Config of a run; an HF checkpoint's own shape wins over the configured one."""
    runtime = dict(dropout_rate=model_cfg.dropout_rate, dtype=model_cfg.dtype, remat=model_cfg.remat)
    if model_cfg.hf_checkpoint:
        base = hf_io.read_hf_config(model_cfg.hf_checkpoint)
        return base.replace(vocab_size=vocab_size, **runtime)
    return gpt2.GPT2Config(vocab_size=vocab_size, n_positions=model_cfg.n_positions, n_embd=model_cfg.n_embd,
                           n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, **runtime)


def initial_params(model_cfg, config: gpt2.GPT2Config, seed: int) -> Any | Callable[[jax.Array], Any]:
    """Loaded HF params (embeddings resized to ``config.vocab_size``), or an init function of a key so the
    caller can create them directly sharded."""
    if not model_cfg.hf_checkpoint:
        return lambda key: gpt2.init_params(config, key)
    _, params = hf_io.load_hf_gpt2(model_cfg.hf_checkpoint)
    resize_key = jax.random.fold_in(jax.random.key(seed), 1)
    return hf_io.resize_token_embeddings(params, config.vocab_size, resize_key)
