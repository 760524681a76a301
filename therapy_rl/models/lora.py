"""LoRA adapters: low-rank updates on Dense layers chosen by a regex on their parameter path.

A targeted layer `name` holds, beside its frozen `kernel [in, out]` (and `bias`), the adapter params
    name/lora_a [in, r]   ~ N(0, 1/r)-ish (kaiming-uniform like PEFT)
    name/lora_b [r, out]  = 0, so a fresh adapter leaves the model unchanged
and computes  y = x @ kernel + bias + dropout(x) @ lora_a @ lora_b * (alpha / r).
The base kernel and bias pass through `stop_gradient`, so their gradient is exactly zero; `adapter_optimizer`
gives optimizer state to the adapter leaves only. A model config with `lora=None` applied to the same params tree
ignores the adapter leaves: that is the base model (the PPO reference), with no second copy of the weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from therapy_rl import ops

ADAPTER_LEAVES = ("lora_a", "lora_b")
DEFAULT_TARGETS = r"self_attn/(q_proj|k_proj|v_proj|o_proj)$"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout_rate: float = 0.0
    target_regex: str = DEFAULT_TARGETS  # searched in the layer path, e.g. "layers_3/self_attn/q_proj"
    # SFT also trains the token embedding and LM head (PEFT's modules_to_save): the run's marker and emotion tokens
    # are new rows a frozen base could not learn. PPO keeps them frozen (its reference is the base).
    train_embeddings: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"LoraConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        try:
            re.compile(self.target_regex)
        except re.error as err:
            raise ValueError(f"LoraConfig.target_regex {self.target_regex!r} is not a regex ({err})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets(self, layer_path: str) -> bool:
        return re.search(self.target_regex, layer_path) is not None


def _lora_a_init(key, shape, dtype=jnp.float32):
    """torch kaiming_uniform_(a=sqrt(5)) on a [r, in] weight: U(-1/sqrt(in), 1/sqrt(in)); stored as [in, r]."""
    bound = 1.0 / np.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
    """A Dense layer (kernel [in, out], optional bias) with an optional LoRA adapter (see the module docstring)."""

    features: int
    use_bias: bool
    dtype: Any
    param_dtype: Any
    init_std: float
    lora: Optional[LoraConfig] = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kernel = self.param("kernel", nn.initializers.normal(self.init_std), (x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        adapted = self.lora is not None and self.lora.targets("/".join(self.scope.path))
        if adapted:
            kernel = jax.lax.stop_gradient(kernel)
            bias = None if bias is None else jax.lax.stop_gradient(bias)
        y = ops.dense_matmul(x, kernel, self.dtype)  # float32 (accumulated in float32 under bfloat16)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        y = y.astype(self.dtype)
        if adapted:
            lora_a = self.param("lora_a", _lora_a_init, (x.shape[-1], self.lora.rank), jnp.float32)
            lora_b = self.param("lora_b", nn.initializers.zeros, (self.lora.rank, self.features), jnp.float32)
            h = nn.Dropout(self.lora.dropout_rate)(x, deterministic=deterministic)
            delta = (h.astype(self.dtype) @ lora_a.astype(self.dtype)) @ lora_b.astype(self.dtype)
            y = y + delta * jnp.asarray(self.lora.scale, self.dtype)
        return y


# ----------------------------------------------------------------------------------------- params helpers


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_adapter_path(names: tuple[str, ...]) -> bool:
    return bool(names) and names[-1] in ADAPTER_LEAVES


def adapter_labels(params, also_trainable: tuple = ()) -> Any:
    """"adapter" for lora_a / lora_b leaves (and leaves under a key in `also_trainable`, e.g. PPO's value head),
    "frozen" for every other leaf."""
    def label(path, _):
        names = _path_names(path)
        return "adapter" if is_adapter_path(names) or any(n in also_trainable for n in names) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def adapter_optimizer(optimizer, also_trainable: tuple = ()):
    """`optimizer` on the adapter leaves only; frozen leaves get zero updates and no optimizer state."""
    import optax

    return optax.multi_transform({"adapter": optimizer, "frozen": optax.set_to_zero()},
                                 lambda params: adapter_labels(params, tuple(also_trainable)))


def split_adapters(params) -> tuple[dict, dict]:
    """(base params without adapter leaves, {layer path: {"lora_a", "lora_b"}})."""
    adapters: dict = {}

    def walk(node, prefix):
        out = {}
        for key, value in node.items():
            if isinstance(value, dict) and "lora_a" in value:
                adapters["/".join(prefix + (key,))] = {k: value[k] for k in ADAPTER_LEAVES}
                out[key] = {k: v for k, v in value.items() if k not in ADAPTER_LEAVES}
            elif isinstance(value, dict):
                out[key] = walk(value, prefix + (key,))
            else:
                out[key] = value
        return out

    return walk(dict(params), ()), adapters


def merge(params, lora: LoraConfig) -> dict:
    """Base params with every adapter folded in (kernel += lora_a @ lora_b * scale) and the adapter leaves dropped."""
    base, adapters = split_adapters(params)
    for layer_path, adapter in adapters.items():
        node = base
        for key in layer_path.split("/"):
            node = node[key]
        delta = (jnp.asarray(adapter["lora_a"], jnp.float32) @ jnp.asarray(adapter["lora_b"], jnp.float32)) * lora.scale
        node["kernel"] = (jnp.asarray(node["kernel"], jnp.float32) + delta).astype(node["kernel"].dtype)
    return base


def count_adapter_params(params) -> int:
    return sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if is_adapter_path(_path_names(path)))


# ----------------------------------------------------------------------------------------- PEFT export


def save_peft_adapter(params, lora: LoraConfig, hf_module_name, out_dir: str, base_model: str = "",
                      saved_modules: Optional[dict] = None) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` that PEFT's `PeftModel.from_pretrained` loads.

    `hf_module_name(layer_path)` gives the HF module name of one of our layer paths (e.g.
    "layers_0/self_attn/q_proj" -> "model.layers.0.self_attn.q_proj"). `saved_modules` {HF module name: weight}
    are whole modules shipped with the adapter (PEFT's `modules_to_save`), e.g. the embedding grown for new tokens.
    """
    from safetensors.numpy import save_file

    _, adapters = split_adapters(params)
    tensors, modules = {}, []
    for layer_path, adapter in sorted(adapters.items()):
        module = hf_module_name(layer_path)
        modules.append(module)
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(adapter["lora_a"], np.float32).T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(adapter["lora_b"], np.float32).T)
    for module, weight in (saved_modules or {}).items():
        tensors[f"base_model.model.{module}.weight"] = np.ascontiguousarray(np.asarray(weight, np.float32))
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout_rate, "bias": "none",
        # PEFT full-matches a string against each module name: exactly the modules we adapted.
        "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted({m.rsplit(".", 1)[-1] for m in saved_modules}) if saved_modules else None,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=2)
