"""Generating and decoding replies for prompt arrays: shared by SFT's sample print-out, PPO validation,
evaluation and chat. Fixed batch shapes so the sampler compiles once."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from therapy_rl import sampling
from therapy_rl.data import tokenize


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    emotion: str | None  # label after <therapist_emotion>, None when missing or invalid
    strategy: str | None
    num_tokens: int


def sampling_config_from(sampling_cfg, tok: tokenize.TherapyTokenizer, **overrides) -> sampling.SamplingConfig:
    values = dict(max_new_tokens=sampling_cfg.max_new_tokens, temperature=sampling_cfg.temperature,
                  top_k=sampling_cfg.top_k, top_p=sampling_cfg.top_p, greedy=sampling_cfg.greedy)
    values.update(overrides)
    return sampling.SamplingConfig(eos_id=tok.eos_id, pad_id=tok.pad_id, **values)


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Fixed-size batches in order; the last is padded by repeating its first row. Yields (batch, real rows)."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        real = len(rows)
        rows = np.concatenate([rows, np.full(batch_size - real, rows[0])])
        yield {k: v[rows] for k, v in arrays.items()}, real


def host_copy(tree: Any) -> Any:
    """Whole arrays as numpy. An array spread over several processes is gathered: a collective, so every
    process must call this with the same arrays."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def generate_token_rows(generate_fn, params: Any, prompts: dict[str, np.ndarray], batch_size: int,
                        rng: jax.Array) -> list[np.ndarray]:
    """Generated token ids of every prompt row, in order, each cut at its response length. The last batch's filler
    rows are marked inactive, so they stop at once. ``generate_fn`` is ``sampling.make_generate_fn(...)``."""
    rows: list[np.ndarray] = []
    for index, (batch, real) in enumerate(padded_batches(dict(prompts), batch_size)):
        active = (np.arange(batch_size) < real).astype(np.int32)
        out = generate_fn(params, batch["prompt_ids"], batch["prompt_mask"], jax.random.fold_in(rng, index), active)
        tokens, lengths = host_copy((out.tokens, out.lengths))
        rows.extend(np.asarray(tokens[r, :lengths[r]]) for r in range(real))
    return rows


def generate_replies(generate_fn, params: Any, tok: tokenize.TherapyTokenizer, prompts: dict[str, np.ndarray],
                     batch_size: int, rng: jax.Array) -> list[Reply]:
    """Decoded replies for every prompt row, in order."""
    out: list[Reply] = []
    for ids in generate_token_rows(generate_fn, params, prompts, batch_size, rng):
        text, emotion, strategy = tokenize.decode_reply(tok, ids)
        out.append(Reply(text=text, emotion=emotion, strategy=strategy, num_tokens=len(ids)))
    return out


def print_sample_replies(model_config, params, tok, split_arrays, config, count: int,
                         title: str | None = None) -> list[Reply]:
    """Generates replies for the first ``count`` validation prompts (every process must call this: on several
    processes it gathers), and prints them, under ``title``, from process 0 only."""
    prompts = {k: v[:count] for k, v in split_arrays.prompts.items()}
    sampling_config = sampling_config_from(config.sampling, tok)
    generate_fn = sampling.make_generate_fn(model_config, sampling_config)
    rng = jax.random.fold_in(jax.random.key(config.seed), 7)
    replies = generate_replies(generate_fn, params, tok, prompts, count, rng)
    if jax.process_index() == 0:
        if title:
            print(title)
        for row, reply in zip(prompts["sample_index"], replies):
            sample = split_arrays.samples[int(row)]
            print(f"\n[user ({sample.user_emotion})] {sample.user_text}\n"
                  f"[reference ({sample.therapist_emotion})] {sample.therapist_text}\n"
                  f"[model ({reply.emotion or 'no tag'})] {reply.text}")
    return replies
