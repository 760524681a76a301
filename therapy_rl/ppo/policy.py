"""The PPO policy: a GPT-2 trunk with a scalar value head (or a separate critic trunk), and its response scores.

Params layout (a contract: `parallel.GPT2_PARTITION_RULES` shard every leaf by its path):

    {"trunk":        GPT-2 params (the policy; `best/` checkpoints hold exactly this, in SFT's layout),
     "value_head":   {"summary": {"kernel": [D, 1], "bias": [1]}},
     "critic_trunk": GPT-2 params                                  (only with a separate critic)}

With a shared trunk the value head reads the policy trunk's final hidden states (TRL's
`AutoModelForCausalLMWithValueHead`, the paper's set-up); with a separate critic it reads the critic trunk's.

Every score of a response is computed on the sequence `[prompt (P, left-padded) | response (N)]` under the mask
`[prompt_mask | response_mask]`, so positions come from the mask exactly as in `sampling.generate` (the prompt's
real tokens count from 0, response token n sits at position prompt_length + n). Up to and including a row's first
EOS the key mask equals the sampler's (which marks every generated slot real), so the log-probs equal the
sampler's `logprobs`; after EOS (pad tokens, mask 0) they are masked out everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from therapy_rl import ops
from therapy_rl.models import families, gpt2, value_head
from therapy_rl.ppo import core

TRUNK_KEY = "trunk"
CRITIC_KEY = "critic_trunk"
VALUE_HEAD_KEY = value_head.VALUE_HEAD_KEY


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """Static description of the policy (hashable: safe to close over in jitted code)."""

    model_config: gpt2.GPT2Config
    separate_critic: bool = False  # a second GPT-2 trunk for the value head
    dropout: bool = False  # trunk and value-head dropout in the PPO update (off: the ratio starts at exactly 1)
    value_dropout_rate: float = 0.1  # the value head's own dropout, used only when `dropout`
    logprob_temperature: float = 1.0  # log-probs of softmax(logits / T); 1.0 = the sampler's raw log-probs


def init_policy_params(trunk_params: Any, rng: jax.Array, spec: PolicySpec, value_head_init: str = "torch_linear",
                       critic_params: Optional[Any] = None) -> dict[str, Any]:
    """{"trunk", "value_head"[, "critic_trunk"]}; the critic trunk starts from `critic_params` (default: a copy of
    the trunk). `rng` only initialises the value head."""
    params = {TRUNK_KEY: trunk_params,
              VALUE_HEAD_KEY: value_head.init_value_head(rng, spec.model_config.n_embd, value_head_init)}
    if spec.separate_critic:
        source = trunk_params if critic_params is None else critic_params
        params[CRITIC_KEY] = jax.tree_util.tree_map(jnp.copy, source)
    return params


def trainable_optimizer(spec: PolicySpec, optimizer):
    """`optimizer` on what PPO trains: every leaf, or with LoRA the adapters and the value head (not the embeddings)."""
    return families.trainable_optimizer(spec.model_config, optimizer, also_trainable=(VALUE_HEAD_KEY,),
                                        embeddings=False)


def trainable_mask(spec: PolicySpec, params: Any):
    """The leaves `trainable_optimizer` updates, as `families.trainable_mask` (None: all)."""
    return families.trainable_mask(spec.model_config, params, also_trainable=(VALUE_HEAD_KEY,), embeddings=False)


def full_sequence(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(ids [B, P+N], mask [B, P+N]) of prompt + response; the prompt is left-padded, the response right-padded."""
    ids = jnp.concatenate([batch["prompt_ids"], batch["tokens"]], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1).astype(jnp.int32)
    return ids, mask


def response_hidden(config: gpt2.GPT2Config, trunk_params: Any, batch: Mapping[str, jax.Array],
                    dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Final hidden states [B, N, D] at the positions that predict each response token (see `core.slice_response`).

    Dropout is active only when `dropout_rng` is given.
    """
    return _response_hidden_and_aux(config, trunk_params, batch, dropout_rng)[0]


def _response_hidden_and_aux(config, trunk_params, batch, dropout_rng):
    """(response hidden states, the trunk's auxiliary loss: MoE load balancing, None for dense models)."""
    ids, mask = full_sequence(batch)
    deterministic = dropout_rng is None
    rngs = None if deterministic else {"dropout": dropout_rng}
    out = families.module(config).apply({"params": trunk_params}, ids, mask, deterministic=deterministic,
                                        rngs=rngs, compute_logits=False)
    return core.slice_response(out.hidden_states, batch["prompt_ids"].shape[1]), getattr(out, "aux_loss", None)


def response_logits(config: gpt2.GPT2Config, trunk_params: Any, hidden: jax.Array) -> jax.Array:
    """float32 logits [B, N, V] from response hidden states (the tied LM head, on the N response slots only)."""
    return families.lm_logits(trunk_params, hidden, config)


def logprobs_and_entropy(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log softmax(logits)[tokens], entropy of softmax(logits)) per position, from the fused kernel
    `ops.softmax_token_stats`: equals `core.token_logprobs` and `core.token_entropy` (float32). Only the log-prob
    is differentiated: the entropy is a metric here (the core functions give an entropy bonus its gradient)."""
    stats = ops.softmax_token_stats(logits, tokens)
    return stats.logp, stats.entropy


def response_logprobs(spec: PolicySpec, trunk_params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """log pi(token_t | prompt, tokens_<t) [B, N], deterministic (the reference policy, and rollouts)."""
    hidden = response_hidden(spec.model_config, trunk_params, batch)
    logits = response_logits(spec.model_config, trunk_params, hidden) / spec.logprob_temperature
    return logprobs_and_entropy(logits, batch["tokens"])[0]


def reference_logprobs(spec: PolicySpec, trunk_params: Any, ref_params: Any,
                       batch: Mapping[str, jax.Array]) -> jax.Array:
    """The reference policy's log-probs [B, N]: `ref_params`, or (None, with LoRA) the policy trunk with its adapters
    off, i.e. the frozen base, with no second copy of the weights."""
    if ref_params is not None:
        return response_logprobs(spec, ref_params, batch)
    base = dataclasses.replace(spec, model_config=families.without_adapters(spec.model_config))
    return jax.lax.stop_gradient(response_logprobs(base, trunk_params, batch))


def policy_outputs(spec: PolicySpec, params: Mapping[str, Any], batch: Mapping[str, jax.Array],
                   dropout_rng: Optional[jax.Array] = None, with_entropy: bool = False,
                   entropy_grad: bool = False, with_aux: bool = False) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """(logp [B, N], values [B, N], entropy [B, N] or None) of the policy + value head on a rollout batch.

    With `with_aux` a fourth item: the policy trunk's auxiliary loss (MoE load balancing; None for dense models).

    `batch` needs prompt_ids, prompt_mask, tokens, response_mask. Values are float32; value[t] estimates the return
    before emitting response token t. With `dropout_rng` (and `spec.dropout`) dropout is active in trunk and head.
    The entropy is a stopped-gradient metric unless `entropy_grad` (an entropy bonus).
    """
    use_dropout = spec.dropout and dropout_rng is not None
    keys = jax.random.split(dropout_rng, 3) if use_dropout else (None, None, None)
    hidden, aux = _response_hidden_and_aux(spec.model_config, params[TRUNK_KEY], batch, keys[0])
    logits = response_logits(spec.model_config, params[TRUNK_KEY], hidden) / spec.logprob_temperature
    if entropy_grad:
        logp, entropy = core.token_logprobs(logits, batch["tokens"]), core.token_entropy(logits)
    else:
        logp, entropy = logprobs_and_entropy(logits, batch["tokens"])
        entropy = jax.lax.stop_gradient(entropy)
    entropy = entropy if with_entropy else None
    if spec.separate_critic:
        critic_hidden = response_hidden(spec.model_config, params[CRITIC_KEY], batch, keys[1])
    else:
        critic_hidden = hidden
    values = value_head.values_from_hidden(params[VALUE_HEAD_KEY], critic_hidden, spec.value_dropout_rate,
                                           keys[2])
    if with_aux:
        return logp, values, entropy, aux
    return logp, values, entropy
