"""One small interface over the model families, so SFT, sampling, PPO, eval, export and the API take any of them.

A `Family` bundles, for one config type:
    module(config)                     a linen module: apply(params, ids, mask, position_ids=, cache=, deterministic=,
                                       compute_logits=) -> output with .logits, .hidden_states, .cache (and
                                       .aux_loss for mixture-of-experts models)
    init_params(config, key)           fresh params
    init_cache(config, batch, length)  an empty `gpt2.KVCache`
    lm_logits(params, hidden, config)  the LM head on hidden states (float32 logits)
    partition_rules(config)            ordered regex -> PartitionSpec rules (`parallel.partition_specs`)
    read_hf_config(dir)                config.json -> config;  hf_config(config, **extra) -> config.json dict
    load_hf(dir, config, mesh, seed)   params from safetensors (sharded on `mesh` when given)
    save_hf(config, params, dir, **extra)  config.json + safetensors that transformers loads

Adding a family is one new module registered in `_FAMILIES` plus its parity test. The module-level functions
below dispatch on the config's type (or on `model_type` in an HF config.json).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from therapy_rl import errors, ops
from therapy_rl.models import gpt2, lora as lora_lib, mistral


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_type: type
    model_types: tuple  # HF `model_type` values this family reads
    module: Callable
    init_params: Callable
    init_cache: Callable
    lm_logits: Callable
    partition_rules: Callable
    read_hf_config: Callable
    hf_config: Callable
    load_hf: Callable
    save_hf: Callable
    tied_embedding: Callable = lambda params, config: None  # the [V, D] embedding that is also the LM head, or None


# ------------------------------------------------------------------------------------------------ GPT-2


def _gpt2_rules(config):
    from therapy_rl import parallel

    return parallel.GPT2_PARTITION_RULES


def _gpt2_load(model_dir: str, config: gpt2.GPT2Config, mesh=None, seed: int = 0):
    from therapy_rl.models import hf_io

    _, params = hf_io.load_hf_gpt2(model_dir)
    params = hf_io.resize_token_embeddings(params, config.vocab_size, jax.random.fold_in(jax.random.key(seed), 1))
    if mesh is not None:
        from therapy_rl import parallel

        params = jax.device_put(params, parallel.named_shardings(params, parallel.GPT2_PARTITION_RULES, mesh))
    return params


def _gpt2_save(config, params, out_dir, **extra):
    from therapy_rl.models import hf_io

    hf_io.save_hf_gpt2(config, params, out_dir, **extra)


def _gpt2_read(model_dir):
    from therapy_rl.models import hf_io

    return hf_io.read_hf_config(model_dir)


GPT2 = Family(
    name="gpt2", config_type=gpt2.GPT2Config, model_types=("gpt2",), module=gpt2.GPT2LMHeadModel,
    init_params=gpt2.init_params, init_cache=gpt2.init_cache,
    lm_logits=lambda params, hidden, config: gpt2.lm_logits(params["wte"]["embedding"], hidden, config),
    partition_rules=_gpt2_rules, read_hf_config=_gpt2_read, hf_config=lambda c, **extra: c.to_hf_dict(**extra),
    load_hf=_gpt2_load, save_hf=_gpt2_save, tied_embedding=lambda params, config: params["wte"]["embedding"])


# ------------------------------------------------------------------------------ Mistral / Llama / Qwen2 / Mixtral

# Mesh axes: "fsdp" shards the model dimension D, "tensor" heads and the MLP width, and "expert" the stacked
# experts of a MoE layer. The batch is split over "expert" too (parallel.BATCH_AXES), so outside the MoE layers
# those devices are data parallel, and each holds 1/expert of every MoE layer's experts.
EXPERT_AXIS = "expert"

MISTRAL_PARTITION_RULES: tuple = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tensor")),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", P("tensor")),
    (r"self_attn/o_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/(gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),
    (r"block_sparse_moe/gate/kernel$", P("fsdp", None)),
    (r"block_sparse_moe/(w1|w3)$", P(EXPERT_AXIS, "fsdp", "tensor")),
    (r"block_sparse_moe/w2$", P(EXPERT_AXIS, "tensor", "fsdp")),
    # LoRA: A [in, r] follows its kernel's input sharding, B [r, out] its output sharding.
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|gate)/lora_a$", P("fsdp", None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_b$", P(None, "tensor")),
    (r"(o_proj|down_proj)/lora_a$", P("tensor", None)),
    (r"(o_proj|down_proj)/lora_b$", P(None, "fsdp")),
    (r"lora_(a|b)$", P()),
    (r"(layernorm|norm)/scale$", P()),
    (r"value_head/.*kernel$", P("fsdp", None)),
    (r"value_head/.*bias$", P()),
)


def _mistral_load(model_dir: str, config: mistral.MistralConfig, mesh=None, seed: int = 0):
    from therapy_rl import parallel
    from therapy_rl.models import mistral_hf, sharded_load

    files = _checkpoint_files(model_dir, config)
    sources = mistral_hf.tensor_sources(config)
    sharded_load.check_shapes(model_dir, sources, files, _describe(config))
    shardings = None
    if mesh is not None:
        shapes = {name: jax.ShapeDtypeStruct(src.shape, config.params_dtype) for name, src in sources.items()}
        specs = parallel.named_shardings(_nest(shapes), MISTRAL_PARTITION_RULES, mesh)
        shardings = sharded_load.flatten_names(specs)
    base = sharded_load.load_params(files, sources, np.dtype(config.params_dtype), shardings, seed=seed,
                                    init_std=config.initializer_range)
    if config.lora is None:
        return base
    return add_adapters(config, base, jax.random.fold_in(jax.random.key(seed), 2), mesh)


def _checkpoint_files(model_dir: str, config) -> dict:
    """HF tensor name -> file, less buffers that are not parameters (and a tied head's copy)."""
    from therapy_rl.models import sharded_load

    files = sharded_load.weight_files(model_dir)
    return {n: f for n, f in files.items() if not n.endswith("rotary_emb.inv_freq")
            and not (config.tie_word_embeddings and n == "lm_head.weight")}


def _describe(config) -> str:
    return (f"model_type={config.model_type}, num_hidden_layers={config.num_hidden_layers}, "
            f"hidden_size={config.hidden_size}, vocab_size={config.vocab_size}")


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        keys = name.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def add_adapters(config: mistral.MistralConfig, base_params, key, mesh=None) -> dict:
    """Base params + fresh LoRA leaves (lora_b = 0, so the model is unchanged) for `config.lora`'s targets."""
    from therapy_rl import parallel

    fresh_shapes = jax.eval_shape(lambda k: mistral.init_params(config, k), key)
    flat_base = _flat(base_params)
    adapter_names = [n for n in _flat(fresh_shapes) if n.rsplit("/", 1)[-1] in lora_lib.ADAPTER_LEAVES]

    def adapters(k):
        fresh = _flat(mistral.init_params(config, k))
        return {n: fresh[n] for n in adapter_names}

    out_shardings = None
    if mesh is not None:
        shapes = {n: v for n, v in _flat(fresh_shapes).items() if n in adapter_names}
        out_shardings = _flat(parallel.named_shardings(_nest(shapes), MISTRAL_PARTITION_RULES, mesh))
    new = jax.jit(adapters, out_shardings=out_shardings)(key)
    return _nest({**flat_base, **new})


def _flat(tree) -> dict:
    from therapy_rl.models import sharded_load

    return sharded_load.flatten_names(tree)


def _mistral_save(config: mistral.MistralConfig, params, out_dir: str, max_shard_bytes: int = 0, **extra):
    """config.json + safetensors; LoRA adapters are merged into the kernels first."""
    from therapy_rl.models import mistral_hf, sharded_load

    params = jax.device_get(params)
    if config.lora is not None:
        params = jax.device_get(lora_lib.merge(params, config.lora))
    flat = sharded_load.flatten_names(params)
    tensors = {}
    for name, source in mistral_hf.tensor_sources(config).items():
        value = np.asarray(flat[name], np.float32)
        if len(source.hf_names) > 1:
            for j, hf_name in enumerate(source.hf_names):
                tensors[hf_name] = np.ascontiguousarray(value[j].T if source.transpose else value[j])
        else:
            tensors[source.hf_names[0]] = np.ascontiguousarray(value.T if source.transpose else value)
    sharded_load.save_safetensors(tensors, out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(mistral_hf.config_to_hf_dict(config, **extra), f, indent=2)


def _mistral_read(model_dir):
    from therapy_rl.models import mistral_hf

    return mistral_hf.read_config(model_dir)


def _mistral_hf_config(config, **extra):
    from therapy_rl.models import mistral_hf

    return mistral_hf.config_to_hf_dict(config, **extra)


MISTRAL = Family(
    name="mistral", config_type=mistral.MistralConfig, model_types=mistral.MODEL_TYPES,
    module=mistral.MistralForCausalLM, init_params=mistral.init_params, init_cache=mistral.init_cache,
    lm_logits=mistral.lm_logits, partition_rules=lambda config: MISTRAL_PARTITION_RULES,
    read_hf_config=_mistral_read, hf_config=_mistral_hf_config, load_hf=_mistral_load, save_hf=_mistral_save,
    tied_embedding=lambda params, config: params["embed_tokens"]["embedding"] if config.tie_word_embeddings else None)

_FAMILIES = (GPT2, MISTRAL)


# ------------------------------------------------------------------------------------------------ dispatch


def family_of(config) -> Family:
    for family in _FAMILIES:
        if isinstance(config, family.config_type):
            return family
    raise TypeError(f"no model family for config type {type(config).__name__}")


def family_for_model_type(model_type: str, source: str = "config.json") -> Family:
    for family in _FAMILIES:
        if model_type in family.model_types:
            return family
    known = sorted(t for f in _FAMILIES for t in f.model_types)
    raise errors.InputError(f"{source}: field 'model_type' is {model_type!r}; supported: {known}")


def hf_model_type(model_dir: str) -> str:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f).get("model_type", "gpt2")
    except FileNotFoundError:
        raise errors.MissingFileError(f"{path}: no such file; an HF model folder holds config.json and "
                                      "model.safetensors") from None
    except json.JSONDecodeError as err:
        raise errors.InputError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None


def read_hf_config(model_dir: str):
    """The config of any supported HF folder (dispatch on config.json's model_type)."""
    return family_for_model_type(hf_model_type(model_dir), os.path.join(model_dir, "config.json")).read_hf_config(
        model_dir)


def check_hf_dir(model_dir: str, where: str = "model folder"):
    """The config of a local HF folder after checking, from headers only, that its weights match it."""
    if not os.path.isdir(model_dir):
        raise errors.MissingFileError(f"{where}={model_dir}: no such folder; pass a local HF model folder "
                                      "(config.json + model.safetensors or its shards)")
    if hf_model_type(model_dir) == "gpt2":
        from therapy_rl.models import hf_io

        return hf_io.check_hf_dir(model_dir, where)
    from therapy_rl.models import mistral_hf, sharded_load

    config = read_hf_config(model_dir)
    files = _checkpoint_files(model_dir, config)
    sharded_load.check_shapes(model_dir, mistral_hf.tensor_sources(config), files, _describe(config))
    return config


def module(config):
    return family_of(config).module(config)


def init_params(config, key):
    return family_of(config).init_params(config, key)


def init_cache(config, batch_size: int, max_length: int):
    return family_of(config).init_cache(config, batch_size, max_length)


def lm_logits(params, hidden, config):
    return family_of(config).lm_logits(params, hidden, config)


def decode_logits(params, hidden, config):
    """The LM head on a decode step's rows hidden [B, D] (float32 [B, V]): a tied [V, D] embedding is applied
    vocab-major (`ops.vocab_major_logits`, faster at few rows); an untied [D, V] head as `lm_logits`. Equal to
    `lm_logits` up to float rounding (summation order)."""
    embedding = family_of(config).tied_embedding(params, config)
    if embedding is None:
        return lm_logits(params, hidden, config)
    return ops.vocab_major_logits(hidden, embedding, config.compute_dtype)


def partition_rules(config):
    return family_of(config).partition_rules(config)


def load_hf(model_dir: str, config, mesh=None, seed: int = 0):
    return family_of(config).load_hf(model_dir, config, mesh, seed)


def save_hf(config, params, out_dir: str, **extra) -> None:
    os.makedirs(out_dir, exist_ok=True)
    family_of(config).save_hf(config, params, out_dir, **extra)


def aux_loss_coef(config) -> float:
    """Weight of the model's auxiliary (load-balancing) loss in training; 0 for dense models."""
    return float(getattr(config, "router_aux_loss_coef", 0.0)) if getattr(config, "is_moe", False) else 0.0


def save_peft_adapter(config, params, out_dir: str, base_model: str = "") -> None:
    """The LoRA adapters in PEFT's format, with the token embedding and LM head as `modules_to_save`: the run's
    vocabulary (markers, emotion tokens) is larger than the base checkpoint's, so PEFT needs those rows too
    (load the base, `resize_token_embeddings(len(tokenizer))`, then `PeftModel.from_pretrained`)."""
    from therapy_rl.models import mistral_hf

    params = jax.device_get(params)
    saved = {"model.embed_tokens": np.asarray(params["embed_tokens"]["embedding"])}
    if not config.tie_word_embeddings:
        saved["lm_head"] = np.asarray(params["lm_head"]["kernel"]).T
    lora_lib.save_peft_adapter(params, config.lora, mistral_hf.hf_module_name, out_dir, base_model, saved)


def lora_config(config) -> Optional[lora_lib.LoraConfig]:
    return getattr(config, "lora", None)


def without_adapters(config):
    """The same model with its LoRA adapters off (the PPO reference), applied to the same params tree."""
    return config.replace(lora=None) if lora_config(config) is not None else config


def _trained_keys(lora, also_trainable: tuple, embeddings: bool) -> tuple:
    if embeddings and lora.train_embeddings:
        return tuple(also_trainable) + ("embed_tokens", "lm_head")
    return tuple(also_trainable)


def trainable_optimizer(config, optimizer, also_trainable: tuple = (), embeddings: bool = True):
    """`optimizer` restricted to the LoRA adapters (and the keys `also_trainable`, and with `embeddings` and
    `lora.train_embeddings` the token embedding and LM head) when the config has adapters: frozen weights get no
    optimizer state."""
    lora = lora_config(config)
    if lora is None:
        return optimizer
    return lora_lib.adapter_optimizer(optimizer, _trained_keys(lora, also_trainable, embeddings))


def trainable_mask(config, params, also_trainable: tuple = (), embeddings: bool = True):
    """Pytree of Python bools over `params`, True on the leaves `trainable_optimizer` (same arguments) updates;
    None without LoRA (every leaf is trained). `ops.accumulate_gradients` differentiates only the True leaves."""
    lora = lora_config(config)
    if lora is None:
        return None
    labels = lora_lib.adapter_labels(params, _trained_keys(lora, also_trainable, embeddings))
    return jax.tree.map(lambda label: label == "adapter", labels)


def restart_adapters(config, params, key, mesh=None):
    """Adapters merged into the base, then fresh adapters (zero delta): the same function, a new adapter to train."""
    from therapy_rl import parallel

    rules = partition_rules(config)

    def restart(p, k):
        base = lora_lib.merge(p, config.lora)
        fresh = {n: v for n, v in _flat(init_params(config, k)).items()
                 if n.rsplit("/", 1)[-1] in lora_lib.ADAPTER_LEAVES}
        return _nest({**_flat(base), **fresh})

    out_shardings = None
    if mesh is not None:
        out_shardings = parallel.named_shardings(jax.eval_shape(restart, params, key), rules, mesh)
    return jax.jit(restart, out_shardings=out_shardings)(params, key)


# ------------------------------------------------------------------------------------- run_info round trip


def config_to_dict(config) -> dict:
    """A JSON-able dict of a model config; `config_from_dict` rebuilds it (GPT-2 dicts carry no family key)."""
    out = dataclasses.asdict(config)
    family = family_of(config)
    if family is not GPT2:
        out["family"] = family.name
    return out


def config_from_dict(info: dict):
    info = dict(info)
    name = info.pop("family", "gpt2")
    for family in _FAMILIES:
        if family.name == name:
            return family.config_type(**info)
    raise errors.InputError(f"run_info.json: model_config.family {name!r} is unknown")


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
