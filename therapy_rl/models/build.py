"""Model set-up from ``config.model``: a fresh GPT-2 of the configured shape, or local HF weights resized to
the run's tokenizer."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from therapy_rl import settings
from therapy_rl.models import gpt2, hf_io


# config.model fields that apply on top of an HF checkpoint; its other fields (the shape) come from the checkpoint.
CONFIG_OVER_HF = ("dropout_rate", "dtype", "remat")


def model_config_from(model_cfg, vocab_size: int) -> gpt2.GPT2Config:
    """The GPT2Config of a run; an HF checkpoint's own shape wins over the configured one."""
    from therapy_rl.models import decoder_build

    if decoder_build.is_decoder(model_cfg):  # mistral, llama, qwen2, mixtral
        return decoder_build.config_from(model_cfg, vocab_size)
    decoder_build.check_gpt2_section(model_cfg)
    hf_shape = {}
    if model_cfg.hf_checkpoint:
        hf_config = dataclasses.asdict(hf_io.read_hf_config(model_cfg.hf_checkpoint))
        hf_shape = {k: v for k, v in hf_config.items() if k not in CONFIG_OVER_HF}
    return settings.from_section(gpt2.GPT2Config, model_cfg, "config.model",
                                 ignore=("hf_checkpoint",) + decoder_build.DECODER_ONLY_KEYS,
                                 **{**hf_shape, "vocab_size": vocab_size})


def initial_params(model_cfg, config: gpt2.GPT2Config, seed: int, mesh=None) -> Any | Callable[[jax.Array], Any]:
    """Loaded HF params (embeddings resized to ``config.vocab_size``), or an init function of a key so the
    caller can create them directly sharded. Other families load tensor by tensor, sharded on ``mesh``."""
    if not isinstance(config, gpt2.GPT2Config):
        from therapy_rl.models import families

        if not model_cfg.hf_checkpoint:
            return lambda key: families.init_params(config, key)
        return families.load_hf(model_cfg.hf_checkpoint, config, mesh, seed)
    if not model_cfg.hf_checkpoint:
        return lambda key: gpt2.init_params(config, key)
    _, params = hf_io.load_hf_gpt2(model_cfg.hf_checkpoint)
    resize_key = jax.random.fold_in(jax.random.key(seed), 1)
    return hf_io.resize_token_embeddings(params, config.vocab_size, resize_key)
