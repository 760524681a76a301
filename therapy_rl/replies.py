"""Generating and decoding replies for prompt arrays: shared by SFT's sample print-out, PPO validation,
evaluation and chat. Fixed batch shapes so the sampler compiles once."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from therapy_rl import sampling, settings
from therapy_rl.data import batches, tokenize


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    emotion: str | None  # label after <therapist_emotion>, None when missing or invalid
    strategy: str | None
    num_tokens: int


def sampling_config_from(sampling_cfg, tok: tokenize.TherapyTokenizer, **overrides) -> sampling.SamplingConfig:
    """``config.sampling`` with the tokenizer's EOS and padding ids; ``overrides`` (e.g. a saved decoding) win."""
    return settings.from_section(sampling.SamplingConfig, sampling_cfg, "config.sampling",
                                 **{"eos_id": tok.eos_id, "pad_id": tok.pad_id, **overrides})


def host_copy(tree: Any) -> Any:
    """Whole arrays as numpy. An array spread over several processes is gathered: a collective, so every
    process must call this with the same arrays."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def generate_token_rows(generate_fn, params: Any, prompts: dict[str, np.ndarray], batch_size: int,
                        rng: jax.Array, mesh=None) -> list[np.ndarray]:
    """Generated token ids of every prompt row, in order, each cut at its response length. The last batch's filler
    rows are marked inactive, so they stop at once. ``generate_fn`` is ``sampling.make_generate_fn(...)``.
    With ``mesh``, each batch goes in as a global array sharded on the batch axes, each process giving its block of
    rows (``batch_size`` must split evenly), and every process gets all rows back (a collective)."""
    rows: list[np.ndarray] = []
    num_rows = len(prompts["prompt_ids"])
    whole_batches = batches.eval_batches(dict(prompts), batch_size, process_index=0, process_count=1)
    for index, batch in enumerate(whole_batches):
        real = min(batch_size, num_rows - index * batch_size)
        inputs = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
                  "active": (np.arange(batch_size) < real).astype(np.int32)}
        if mesh is not None:
            inputs = _global_batch(inputs, mesh)
        out = generate_fn(params, inputs["prompt_ids"], inputs["prompt_mask"], jax.random.fold_in(rng, index),
                          inputs["active"])
        tokens, lengths = host_copy((out.tokens, out.lengths))
        rows.extend(np.asarray(tokens[r, :lengths[r]]) for r in range(real))
    return rows


def _global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's block of rows of a whole host batch, assembled into global batch-sharded arrays."""
    from therapy_rl import parallel

    n, count = len(batch["active"]), jax.process_count()
    if n % count:
        raise ValueError(f"a batch of {n} rows does not split over {count} processes")
    start = jax.process_index() * (n // count)
    return parallel.global_batch_from_host({k: v[start:start + n // count] for k, v in batch.items()}, mesh)


def generate_replies(generate_fn, params: Any, tok: tokenize.TherapyTokenizer, prompts: dict[str, np.ndarray],
                     batch_size: int, rng: jax.Array) -> list[Reply]:
    """Decoded replies for every prompt row, in order."""
    out: list[Reply] = []
    for ids in generate_token_rows(generate_fn, params, prompts, batch_size, rng):
        text, emotion, strategy = tokenize.decode_reply(tok, ids)
        out.append(Reply(text=text, emotion=emotion, strategy=strategy, num_tokens=len(ids)))
    return out


class SampleReplies:
    """Replies to the first ``count`` validation prompts with the config's sampling settings and seed: one compiled
    sampler, reused at every eval (every process must call ``generate``: on several processes it gathers)."""

    def __init__(self, model_config, tok, split_arrays, config, count: int):
        self.tok = tok
        self.split_arrays = split_arrays
        self.prompts = {k: v[:count] for k, v in split_arrays.prompts.items()}
        self.batch_size = count
        self.generate_fn = sampling.make_generate_fn(model_config, sampling_config_from(config.sampling, tok))
        self.rng = jax.random.fold_in(jax.random.key(config.seed), 7)

    def generate(self, params) -> list[Reply]:
        return generate_replies(self.generate_fn, params, self.tok, self.prompts, self.batch_size, self.rng)

    def lines(self, replies: list[Reply]) -> list[str]:
        """One block per prompt: user, reference, model."""
        blocks = []
        for row, reply in zip(self.prompts["sample_index"], replies):
            sample = self.split_arrays.samples[int(row)]
            blocks.append(f"[user ({sample.user_emotion})] {sample.user_text}\n"
                          f"[reference ({sample.therapist_emotion})] {sample.therapist_text}\n"
                          f"[model ({reply.emotion or 'no tag'})] {reply.text}")
        return blocks

    def print_replies(self, params, title: str | None = None) -> list[Reply]:
        """Generates the replies (on every process) and prints them under ``title`` from process 0 only."""
        replies = self.generate(params)
        if jax.process_index() == 0:
            if title:
                print(title)
            for block in self.lines(replies):
                print("\n" + block)
        return replies

    def markdown(self, replies: list[Reply]) -> str:
        """The blocks as TensorBoard text (markdown: two spaces end a line)."""
        return "\n\n---\n\n".join(block.replace("\n", "  \n") for block in self.lines(replies))
