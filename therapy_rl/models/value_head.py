"""Scalar value head for PPO: hidden states [B, T, D] -> values [B, T] (float32). Independent of the trunk.

Like TRL's `ValueHead` (the paper's `AutoModelForCausalLMWithValueHead`): dropout on the trunk's final hidden
states (after `ln_f`), then one Dense(D -> 1) named `summary`. The trainer stores these params under the key
`VALUE_HEAD_KEY`, so their paths read `value_head/summary/{kernel, bias}` (kernel [D, 1], bias [1]).

Initialisation (`init_scheme`):
    "torch_linear"  (default) kernel and bias ~ U(-1/sqrt(D), 1/sqrt(D)): torch `nn.Linear`'s default, which TRL 0.11
                    keeps when no `v_head_init_strategy` is given, i.e. what the paper ran (std = 1/sqrt(3D)).
    "scaled_normal" kernel ~ N(0, 1/(D+1)), bias 0: OpenAI lm-human-preferences' scalar head.
    "zeros"         kernel = bias = 0: every value starts at exactly 0.
All three keep initial values small (|v| ~ 1 for unit-scale hidden states) next to rewards in [-10, 10].
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

VALUE_HEAD_KEY = "value_head"
INIT_SCHEMES = ("torch_linear", "scaled_normal", "zeros")


def _initializers(init_scheme: str, hidden_size: int):
    """(kernel_init, bias_init) for a Dense(hidden_size -> 1)."""
    if init_scheme == "torch_linear":
        bound = 1.0 / hidden_size ** 0.5

        def uniform(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
        return uniform, uniform
    if init_scheme == "scaled_normal":
        return nn.initializers.normal(stddev=1.0 / (hidden_size + 1) ** 0.5), nn.initializers.zeros
    if init_scheme == "zeros":
        return nn.initializers.zeros, nn.initializers.zeros
    raise ValueError(f"therapy_rl/models/value_head.py: init_scheme={init_scheme!r} is not one of {INIT_SCHEMES}")


class ValueHead(nn.Module):
    """Dropout + Dense(D -> 1) on [B, T, D]; computes in float32 whatever the hidden dtype."""

    init_scheme: str = "torch_linear"
    dropout_rate: float = 0.1  # TRL's summary_dropout_prob default; only active with deterministic=False

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        if hidden.ndim != 3:
            raise ValueError(f"therapy_rl/models/value_head.py: hidden must be [B, T, D], got shape {hidden.shape}")
        kernel_init, bias_init = _initializers(self.init_scheme, hidden.shape[-1])
        x = hidden.astype(jnp.float32)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=kernel_init, bias_init=bias_init,
                     name="summary")(x)
        return x[..., 0]


def init_value_head(rng: jax.Array, hidden_size: int, init_scheme: str = "torch_linear") -> dict[str, Any]:
    """Fresh head params {"summary": {"kernel": [D, 1], "bias": [1]}} from an explicit key."""
    if hidden_size < 1:
        raise ValueError(f"therapy_rl/models/value_head.py: hidden_size must be >= 1, got {hidden_size}")
    module = ValueHead(init_scheme=init_scheme)
    return module.init(rng, jnp.zeros((1, 1, hidden_size), jnp.float32))["params"]


def values_from_hidden(head_params: Any, hidden: jax.Array, dropout_rate: float = 0.1,
                       rng: Optional[jax.Array] = None) -> jax.Array:
    """values[b, t] = summary(dropout(hidden[b, t])): [B, T, D] -> [B, T] float32.

    Dropout runs only when `rng` is given (training); rollouts and evaluation pass no key and are deterministic.
    Value at position i estimates the return from the state after token i, so for a prompt of length P the values
    of response tokens are `ppo.core.slice_response(values, P)`.
    """
    module = ValueHead(dropout_rate=dropout_rate)
    if rng is None:
        return module.apply({"params": head_params}, hidden, deterministic=True)
    return module.apply({"params": head_params}, hidden, deterministic=False, rngs={"dropout": rng})
