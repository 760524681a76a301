"""`config.model` -> `MistralConfig` for the mistral, llama, qwen2 and mixtral families (GPT-2 stays in build.py).

With `hf_checkpoint` the checkpoint's config.json gives the shape; `config.model` adds the run-time fields
(dropout, dtype, remat), the MoE loss weight and LoRA. Without one, `n_layer / n_head / n_embd / n_positions`
and `config.model.decoder` give the shape of a fresh model.
"""
from __future__ import annotations

from typing import Optional

from therapy_rl import errors
from therapy_rl.models import families, lora as lora_lib, mistral

DECODER_FAMILIES = mistral.MODEL_TYPES
# config.model keys the GPT-2 settings never read.
DECODER_ONLY_KEYS = ("family", "decoder", "router_aux_loss_coef", "lora")


def family_name(model_cfg) -> str:
    """The configured family, or the checkpoint's model_type; a conflict between them is a ConfigError."""
    configured = model_cfg.get("family", "") or ""
    if model_cfg.hf_checkpoint:
        found = families.hf_model_type(model_cfg.hf_checkpoint)
        if configured and configured != found:
            raise errors.ConfigError(f"config.model.family={configured!r} but {model_cfg.hf_checkpoint}/config.json "
                                     f"has model_type {found!r}; leave family empty or make them agree")
        return found
    if configured and configured not in ("gpt2",) + DECODER_FAMILIES:
        raise errors.ConfigError(f"config.model.family={configured!r}: expected one of "
                                 f"{('gpt2',) + DECODER_FAMILIES} or empty")
    return configured or "gpt2"


def is_decoder(model_cfg) -> bool:
    return family_name(model_cfg) in DECODER_FAMILIES


def lora_from(model_cfg) -> Optional[lora_lib.LoraConfig]:
    section = model_cfg.get("lora")
    if section is None or int(section.rank) <= 0:
        return None
    try:
        return lora_lib.LoraConfig(rank=int(section.rank), alpha=float(section.alpha),
                                   dropout_rate=float(section.dropout_rate), target_regex=str(section.target_regex),
                                   train_embeddings=bool(section.get("train_embeddings", False)))
    except ValueError as err:
        raise errors.ConfigError(f"config.model.lora: {err}") from None


def check_gpt2_section(model_cfg) -> None:
    """LoRA and MoE options are refused on GPT-2 rather than silently ignored."""
    if lora_from(model_cfg) is not None:
        raise errors.ConfigError("config.model.lora.rank > 0: LoRA is implemented for the mistral, llama, qwen2 and "
                                 "mixtral families, not gpt2; set config.model.lora.rank=0")


def config_from(model_cfg, vocab_size: int) -> mistral.MistralConfig:
    name = family_name(model_cfg)
    runtime = dict(dropout_rate=float(model_cfg.dropout_rate), dtype=str(model_cfg.dtype),
                   remat=bool(model_cfg.remat), lora=lora_from(model_cfg))
    coef = float(model_cfg.get("router_aux_loss_coef", -1.0))
    if coef >= 0:
        runtime["router_aux_loss_coef"] = coef
    try:
        if model_cfg.hf_checkpoint:
            base = families.read_hf_config(model_cfg.hf_checkpoint)
            return base.replace(vocab_size=vocab_size, **runtime)
        dec = model_cfg.decoder
        return mistral.MistralConfig(
            model_type=name, vocab_size=vocab_size, hidden_size=int(model_cfg.n_embd),
            intermediate_size=int(dec.intermediate_size) or 4 * int(model_cfg.n_embd),
            num_hidden_layers=int(model_cfg.n_layer), num_attention_heads=int(model_cfg.n_head),
            num_key_value_heads=int(dec.n_kv_head) or int(model_cfg.n_head),
            max_position_embeddings=int(model_cfg.n_positions),
            sliding_window=int(dec.sliding_window) if name in ("mistral", "mixtral") else 0,
            rope_theta=float(dec.rope_theta), qkv_bias=name == "qwen2",
            tie_word_embeddings=bool(dec.tie_word_embeddings),
            num_local_experts=int(dec.num_experts) if name == "mixtral" else 0,
            num_experts_per_tok=int(dec.experts_per_token), **runtime)
    except ValueError as err:
        if isinstance(err, errors.UserError):
            raise
        raise errors.ConfigError(f"config.model: {err}") from None
