"""Mixtral's sparse MoE MLP (top-k of E SwiGLU experts) and the router's load-balancing loss.

Routing (HF `MixtralSparseMoeBlock`): probs = softmax(x @ gate) in float32; the top-k experts of each token are
weighted by their probs renormalised to sum to 1; expert e computes w2(silu(x @ w1[e]) * (x @ w3[e])).

Dispatch is dense: every expert runs on every token and the outputs are combined with weights that are zero
outside each token's top-k. It is exact and shards over the expert axis with no capacity or token dropping, at
E / k times the MLP FLOPs of a capacity-based dispatch (4x for Mixtral-8x7B).

Load-balancing loss (Switch Transformer eq. 4-6, as HF's `load_balancing_loss_func` with an attention mask):
over the real tokens of all layers, f_e = (top-k assignments to e) / rows and P_e = (sum of probs of e) / rows,
aux = E * sum_e f_e * P_e  (rows = real tokens x layers). Balanced routing gives aux = k.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from therapy_rl import ops


class SparseMoe(nn.Module):
    config: "object"  # mistral.MistralConfig with num_local_experts > 0

    @nn.compact
    def __call__(self, x, token_mask):
        """x [B, T, D], token_mask [B, T] -> (out [B, T, D], (assignments [E], prob_sums [E], rows))."""
        from therapy_rl.models import lora as lora_lib

        cfg = self.config
        experts, top_k, ffn = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size
        d = x.shape[-1]
        router_logits = lora_lib.Linear(experts, False, cfg.compute_dtype, cfg.params_dtype, cfg.initializer_range,
                                        cfg.lora, name="gate")(x)  # [B, T, E]
        probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
        top_probs, top_index = jax.lax.top_k(probs, top_k)  # [B, T, k]
        top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
        chosen = jax.nn.one_hot(top_index, experts, dtype=jnp.float32)  # [B, T, k, E]
        combine = jnp.einsum("btk,btke->bte", top_probs, chosen)  # [B, T, E]

        init = nn.initializers.normal(cfg.initializer_range)
        w1 = self.param("w1", init, (experts, d, ffn), cfg.params_dtype)
        w3 = self.param("w3", init, (experts, d, ffn), cfg.params_dtype)
        w2 = self.param("w2", init, (experts, ffn, d), cfg.params_dtype)
        cd = cfg.compute_dtype  # expert matmuls accumulate in float32 (ops.mixed_einsum)
        gate = ops.mixed_einsum("btd,edf->btef", x, w1, cd).astype(cd)
        up = ops.mixed_einsum("btd,edf->btef", x, w3, cd).astype(cd)
        hidden = jax.nn.silu(gate) * up  # [B, T, E, F]
        weighted = hidden * combine.astype(cd)[..., None]
        out = ops.mixed_einsum("btef,efd->btd", weighted, w2, cd).astype(cd)

        m = token_mask.astype(jnp.float32)
        assignments = jnp.einsum("bt,btke->e", m, chosen)
        prob_sums = jnp.einsum("bt,bte->e", m, probs)
        return out, (assignments, prob_sums, jnp.sum(m))


def load_balancing_loss(layer_stats: Sequence, config) -> jax.Array:
    """aux = E * sum_e f_e P_e over the real tokens of every layer (see the module docstring)."""
    assignments = sum(s[0] for s in layer_stats)
    prob_sums = sum(s[1] for s in layer_stats)
    rows = jnp.maximum(sum(s[2] for s in layer_stats), 1.0)
    return config.num_local_experts * jnp.sum((assignments / rows) * (prob_sums / rows))
