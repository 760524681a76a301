"""Bytes per device of a training config on a mesh: parameters, gradients, optimizer state, activations.

    python -m therapy_rl.memory --config configs/sft_mistral7b_lora_esconv.py --preset mistral-7b \
        --mesh 1,8,1 --mesh 1,4,2 --mesh 1,4,1,2 [--config.global_batch_size=16]

A mesh is data,fsdp,tensor[,expert] (expert = 1 when left out).

The shape comes from `--preset` (mistral-7b, mixtral-8x7b, gpt2; no download) or from the config
(`config.model.hf_checkpoint`'s config.json, else its n_* fields). Parameter shards come from the family's real
partition rules on the real parameter tree (built abstractly with `jax.eval_shape`), so a dimension a mesh axis does
not divide is counted as replicated, as training would place it. Estimates, not measurements:
- params in `param_dtype` (float32 unless --param_dtype=bfloat16); gradients like the trainable params;
  AdamW keeps two float32 moments of each trainable param (LoRA: adapters only, plus the frozen base);
- activations per device for one micro-batch (global_batch_size / grad_accum_steps rows, max_length_tokens each)
  split over data x expert x fsdp (rows) and tensor (heads, MLP width, vocabulary): the tensors each block saves for the
  backward pass (inputs of every matmul, attention probabilities in float32, SwiGLU/GELU intermediates; the MoE
  block's dense dispatch keeps E experts' intermediates) plus the float32 logits and their gradient.
  With remat a block keeps only its input; one block's full set is live again during its backward.
XLA's temporaries and fragmentation come on top (plan for ~20%).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import numpy as np

PRESETS = {
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=4096),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2),
}
GIB = 1024 ** 3


@dataclasses.dataclass
class Estimate:
    params: float
    grads: float
    optimizer: float
    activations: float
    activations_remat: float

    def total(self, remat: bool) -> float:
        return self.params + self.grads + self.optimizer + (self.activations_remat if remat else self.activations)


def _shard_bytes(shapes, rules, mesh_sizes: dict) -> tuple[float, float]:
    """(bytes per device of all leaves, of the LoRA adapter leaves) under `rules` on a mesh of these sizes."""
    import jax

    from therapy_rl import parallel
    from therapy_rl.models import lora

    class FakeMesh:  # partition_specs only reads mesh.shape
        shape = mesh_sizes

    specs = parallel.partition_specs(shapes, rules, FakeMesh())
    total = adapters = 0.0
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], flat_specs):
        split = 1
        for axes in spec:
            for axis in (axes if isinstance(axes, tuple) else (axes,)) if axes is not None else ():
                split *= mesh_sizes[axis]
        size = np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize / split
        total += size
        if lora.is_adapter_path(tuple(str(getattr(k, "key", k)) for k in path)):
            adapters += size
    return total, adapters


def _activation_bytes(config, rows: float, seq: int, tensor: int) -> tuple[float, float]:
    """(saved activations without remat, with remat) per device for `rows` sequences of `seq` tokens."""
    from therapy_rl.models import gpt2

    tokens = rows * seq
    b = np.dtype(config.compute_dtype).itemsize
    if isinstance(config, gpt2.GPT2Config):
        d, heads, kv, ffn, experts = config.n_embd, config.n_head, config.n_embd, 4 * config.n_embd, 1
    else:
        d, heads = config.hidden_size, config.num_attention_heads
        kv = config.num_key_value_heads * config.head_dim_
        ffn, experts = config.intermediate_size, max(config.num_local_experts, 1)
    keys = seq  # scores are [T, S] even with a sliding window (a mask, not a smaller buffer)
    per_token = (4 * d + (d + 2 * kv) / tensor + d / tensor) * b  # residual, norms, q/k/v, attention out
    per_token += 2 * heads * keys * 4 / tensor  # scores and probs, float32
    per_token += (experts * 4 * ffn / tensor) * b  # gate, up, act, product (every expert with dense dispatch)
    block = tokens * per_token
    logits = tokens * config.vocab_size * 4 * 2 / tensor  # float32 logits and their gradient
    layers = config.n_layer
    return layers * block + logits, layers * tokens * d * b + block + logits


def estimate(config, mesh: Sequence[int], rows_per_step: int, seq: int, optimizer_moments: int = 2) -> Estimate:
    import jax

    from therapy_rl.models import families

    data, fsdp, tensor, expert = (*mesh, 1) if len(mesh) == 3 else mesh
    sizes = {"data": data, "expert": expert, "fsdp": fsdp, "tensor": tensor}
    shapes = jax.eval_shape(lambda k: families.init_params(config, k), jax.random.key(0))
    params, adapters = _shard_bytes(shapes, families.partition_rules(config), sizes)
    lora = families.lora_config(config)
    if lora is not None:  # adapters are stored in float32
        trainable = trainable_f32 = adapters
        if lora.train_embeddings:
            heads = {k: v for k, v in shapes.items() if k in ("embed_tokens", "lm_head")}
            embeddings = _shard_bytes(heads, families.partition_rules(config), sizes)[0]
            trainable += embeddings
            trainable_f32 += embeddings * 4 / np.dtype(config.params_dtype).itemsize
    else:
        trainable = params
        trainable_f32 = params * 4 / np.dtype(config.params_dtype).itemsize
    acts, acts_remat = _activation_bytes(config, rows_per_step / (data * expert * fsdp), seq, tensor)
    return Estimate(params=params, grads=trainable, optimizer=optimizer_moments * trainable_f32, activations=acts,
                    activations_remat=acts_remat)


def model_config_for(config, preset: str, param_dtype: str):
    from therapy_rl.models import build, decoder_build, mistral

    runtime = dict(dtype=str(config.model.dtype), param_dtype=param_dtype, lora=decoder_build.lora_from(config.model))
    if preset in PRESETS:
        return mistral.MistralConfig(**PRESETS[preset], **runtime)
    if preset == "gpt2":
        from therapy_rl.models import gpt2

        return gpt2.GPT2Config.named("gpt2", dtype=runtime["dtype"], param_dtype=param_dtype)
    model_config = build.model_config_from(config.model, config.model.get("vocab_size", 32000))
    return model_config.replace(param_dtype=param_dtype)


def table(config, model_config, meshes: Sequence[Sequence[int]]) -> str:
    rows = int(config.global_batch_size) // max(int(config.get("grad_accum_steps", 1)), 1)
    seq = int(config.data.max_length_tokens)
    lines = [f"model {getattr(model_config, 'model_type', 'gpt2')}, params {model_config.param_dtype}, compute "
             f"{model_config.dtype}, LoRA {'rank %d' % model_config.lora.rank if getattr(model_config, 'lora', None) else 'off'}, "
             f"{rows} rows x {seq} tokens per step", "",
             "| mesh (data, fsdp, tensor, expert) | params | grads | optimizer | activations | act. (remat) | total | total (remat) |",
             "|---|---|---|---|---|---|---|---|"]
    for mesh in meshes:
        e = estimate(model_config, mesh, rows, seq)
        cells = [e.params, e.grads, e.optimizer, e.activations, e.activations_remat, e.total(False), e.total(True)]
        lines.append(f"| {tuple(mesh) + (1,) * (4 - len(mesh))} | " + " | ".join(f"{c / GIB:.2f} GiB" for c in cells) + " |")
    return "\n".join(lines)


def main(argv):
    from absl import flags

    flags_ = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    meshes = [tuple(int(x) for x in m.split(",")) for m in flags_.mesh]
    for mesh in meshes:
        if len(mesh) not in (3, 4) or min(mesh) < 1:
            from therapy_rl import errors

            raise errors.ConfigError(f"--mesh {mesh}: expected positive sizes data,fsdp,tensor[,expert]")
    model_config = model_config_for(flags_.config, flags_.preset, flags_.param_dtype)
    print(table(flags_.config, model_config, meshes))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from therapy_rl import cli

    config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
    flags.DEFINE_string("preset", "", "mistral-7b | mixtral-8x7b | gpt2; empty = the config's model.")
    flags.DEFINE_multi_string("mesh", ["1,8,1"], "data,fsdp,tensor[,expert] sizes; repeat for several meshes.")
    flags.DEFINE_string("param_dtype", "bfloat16", "Storage dtype of the parameters: bfloat16 | float32.")
    flags.mark_flags_as_required(["config"])
    sys.exit(cli.run_cli(main))
