"""Fixed-shape numpy batches, a resumable shuffling iterator and per-host slicing.

Batch dicts (ARCHITECTURE.md):
- SFT (right-padded): ``input_ids [B,T] int32``, ``attention_mask [B,T] int32``, ``loss_mask [B,T] float32``.
- Prompts (left-padded): ``prompt_ids [B,P] int32``, ``prompt_mask [B,P] int32``, ``user_emotion [B] int32``,
  ``therapist_emotion [B] int32`` (indices into labels.EMOTIONS), ``sample_index [B] int32``, ``valid [B] int32``.

Numpy only; jax is imported only to ask ``jax.process_index()`` / ``jax.process_count()`` when they are not given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Mapping, Sequence

import numpy as np

from therapy_rl.data.labels import EMOTION_TO_INDEX
from therapy_rl.data.samples import Sample
from therapy_rl.data.tokenize import EncodedSample

Arrays = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class LengthReport:
    """What fitting sequences into ``max_length`` did. ``kept_indices[i]`` is the input row of output row i."""

    total: int
    kept: int
    dropped_long: int  # longer than max_length, dropped (drop_long=True)
    truncated_user: int  # fitted by trimming the start of the user text only
    truncated_other: int  # still too long without any user text: cut at the end (SFT) / the start (prompts)
    dropped_no_target: int  # SFT rows left with no supervised token after truncation
    max_length: int
    longest: int  # longest input sequence before fitting
    kept_indices: np.ndarray

    def summary(self) -> str:
        return (f"{self.kept}/{self.total} kept at max_length {self.max_length} (longest {self.longest}): "
                f"dropped {self.dropped_long} long + {self.dropped_no_target} without target; truncated "
                f"{self.truncated_user} in the user text + {self.truncated_other} elsewhere")


def _trim_user(length: int, span: tuple[int, int], excess: int) -> np.ndarray:
    """Positions kept after removing up to ``excess`` tokens from the start of the user text ``span``."""
    start, end = span
    cut = min(excess, max(end - start, 0))
    return np.concatenate([np.arange(start), np.arange(start + cut, length)])


def make_sft_arrays(encoded: Sequence[EncodedSample], max_length: int, *, pad_id: int,
                    drop_long: bool = True) -> tuple[dict[str, np.ndarray], LengthReport]:
    """Right-padded SFT arrays ``[N, max_length]`` plus a LengthReport.

    A sequence longer than ``max_length`` is dropped (``drop_long=True``, the paper: "over 128 tokens") or
    fitted: first tokens are removed from the start of the user text (the reply stays whole), and only if the
    user text is not enough the sequence is cut at its end. Rows left without any target are dropped.
    Padding positions hold ``pad_id`` with attention_mask = loss_mask = 0.
    """
    rows, kept = [], []
    dropped_long = truncated_user = truncated_other = dropped_no_target = 0
    longest = 0
    for index, e in enumerate(encoded):
        ids, mask = np.asarray(e.ids, np.int32), np.asarray(e.loss_mask, np.float32)
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            if drop_long:
                dropped_long += 1
                continue
            keep = _trim_user(len(ids), e.user_span, len(ids) - max_length)
            ids, mask = ids[keep][:max_length], mask[keep][:max_length]
            if len(keep) > max_length:
                truncated_other += 1
            else:
                truncated_user += 1
            if mask[1:].sum() == 0:
                dropped_no_target += 1
                continue
        rows.append((ids, mask))
        kept.append(index)
    n = len(rows)
    input_ids = np.full((n, max_length), pad_id, np.int32)
    attention_mask = np.zeros((n, max_length), np.int32)
    loss_mask = np.zeros((n, max_length), np.float32)
    for r, (ids, mask) in enumerate(rows):
        input_ids[r, :len(ids)] = ids
        attention_mask[r, :len(ids)] = 1
        loss_mask[r, :len(ids)] = mask
    report = LengthReport(len(encoded), n, dropped_long, truncated_user, truncated_other, dropped_no_target,
                          max_length, longest, np.asarray(kept, np.int32))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}, report


def make_prompt_arrays(encoded: Sequence[EncodedSample | np.ndarray], samples: Sequence[Sample],
                       max_prompt_length: int, *, pad_id: int,
                       drop_long: bool = True) -> tuple[dict[str, np.ndarray], LengthReport]:
    """Left-padded prompt arrays ``[N, max_prompt_length]`` with the label fields.

    ``encoded[i]`` is an EncodedSample (its prompt is ``ids[:prompt_length]``) or a 1-D prompt from
    ``encode_prompt``; ``samples[i]`` gives the emotions, and ``sample_index`` is ``i``. A prompt that is too long is
    dropped (``drop_long``) or fitted: tokens are removed from the start of the user text, then (or, for a bare
    array, directly) from the prompt's start, so it always ends with ``<therapist>``.
    """
    if len(encoded) != len(samples):
        raise ValueError(f"{len(encoded)} encoded prompts but {len(samples)} samples")
    rows, kept = [], []
    dropped_long = truncated_user = truncated_other = 0
    longest = 0
    for index, e in enumerate(encoded):
        if isinstance(e, EncodedSample):
            prompt, span = np.asarray(e.ids[:e.prompt_length], np.int32), e.user_span
        else:
            prompt, span = np.asarray(e, np.int32), (0, 0)
        longest = max(longest, len(prompt))
        if len(prompt) > max_prompt_length:
            if drop_long:
                dropped_long += 1
                continue
            keep = _trim_user(len(prompt), span, len(prompt) - max_prompt_length)
            prompt = prompt[keep]
            if len(prompt) > max_prompt_length:
                prompt = prompt[-max_prompt_length:]
                truncated_other += 1
            else:
                truncated_user += 1
        rows.append(prompt)
        kept.append(index)
    n = len(rows)
    prompt_ids = np.full((n, max_prompt_length), pad_id, np.int32)
    prompt_mask = np.zeros((n, max_prompt_length), np.int32)
    for r, prompt in enumerate(rows):
        prompt_ids[r, max_prompt_length - len(prompt):] = prompt
        prompt_mask[r, max_prompt_length - len(prompt):] = 1
    kept_array = np.asarray(kept, np.int32)
    arrays = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "user_emotion": np.asarray([EMOTION_TO_INDEX[samples[i].user_emotion] for i in kept], np.int32),
        "therapist_emotion": np.asarray([EMOTION_TO_INDEX[samples[i].therapist_emotion] for i in kept], np.int32),
        "sample_index": kept_array,
        "valid": np.ones((n,), np.int32),
    }
    report = LengthReport(len(encoded), n, dropped_long, truncated_user, truncated_other, 0, max_prompt_length,
                          longest, kept_array)
    return arrays, report


# ---------------------------------------------------------------- iteration


def _num_rows(arrays: Arrays) -> int:
    if not arrays:
        raise ValueError("arrays is empty")
    sizes = {k: np.shape(v)[0] for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays disagree on the number of rows: {sizes}")
    return next(iter(sizes.values()))


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _take(arrays: Arrays, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of every array; a row index of -1 gives an all-zero padding row (masks 0, valid 0)."""
    real = rows >= 0
    out = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if real.all():
            out[key] = value[rows]
        else:
            block = np.zeros((len(rows),) + value.shape[1:], value.dtype)
            block[real] = value[rows[real]]
            out[key] = block
    return out


def _host_rows(global_rows: np.ndarray, global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """This host's rows ``[pi*B/pc, (pi+1)*B/pc)`` of a global batch padded with -1 to ``global_batch_size``."""
    padded = np.full((global_batch_size,), -1, np.int64)
    padded[:len(global_rows)] = global_rows
    local = global_batch_size // process_count
    return padded[process_index * local:(process_index + 1) * local]


class BatchIterator:
    """Endless batches over epochs; epoch ``e`` visits the rows in the order
    ``np.random.default_rng([seed, e]).permutation(N)`` (or 0..N-1 without shuffle).

    Each step yields this host's slice ``[pi*B/pc, (pi+1)*B/pc)`` of the global batch, so the hosts together
    see the global batch exactly once. ``get_state()`` -> ``{"epoch", "position"}`` (batches already taken in
    that epoch) and ``set_state`` resume exactly. With ``drop_remainder=False`` the last, short global batch of
    an epoch is padded with all-zero rows (masks 0, ``valid`` 0).
    """

    def __init__(self, arrays: Arrays, global_batch_size: int, seed: int, shuffle: bool = True,
                 drop_remainder: bool = True, process_index: int | None = None, process_count: int | None = None):
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_rows = _num_rows(self._arrays)
        self.process_index, self.process_count = _process_info(process_index, process_count)
        if global_batch_size <= 0 or global_batch_size % self.process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the "
                             f"process count {self.process_count}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
        if drop_remainder:
            self.steps_per_epoch = self.num_rows // global_batch_size
        else:
            self.steps_per_epoch = math.ceil(self.num_rows / global_batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_rows} rows give no batch of {global_batch_size} "
                             f"(drop_remainder={drop_remainder})")
        self._epoch, self._position = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: Mapping[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.steps_per_epoch:
            raise ValueError(f"bad iterator state {dict(state)}: position must be in [0, {self.steps_per_epoch}]")
        self._epoch, self._position = epoch, position
        self._normalise()

    def _normalise(self) -> None:
        if self._position >= self.steps_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._order_epoch != self._epoch:
            self._order, self._order_epoch = self.epoch_order(self._epoch), self._epoch
        start = self._position * self.global_batch_size
        global_rows = self._order[start:start + self.global_batch_size]
        rows = _host_rows(global_rows, self.global_batch_size, self.process_index, self.process_count)
        self._position += 1
        self._normalise()
        return _take(self._arrays, rows)


def eval_batches(arrays: Arrays, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order, in ``ceil(N / batch_size)`` global batches of fixed size; the last one is
    padded with all-zero rows (``valid`` = 0, loss/attention/prompt masks 0), so nothing is dropped or counted
    twice. Each host gets its slice of each global batch."""
    n = _num_rows(arrays)
    pi, pc = _process_info(process_index, process_count)
    if batch_size <= 0 or batch_size % pc:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of the process count {pc}")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for start in range(0, n, batch_size):
        global_rows = np.arange(start, min(start + batch_size, n))
        yield _take(arrays, _host_rows(global_rows, batch_size, pi, pc))


def num_eval_batches(num_rows: int, batch_size: int) -> int:
    return math.ceil(num_rows / batch_size)
