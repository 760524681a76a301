"""The safety guard: crisis detection on user messages and harmful-reply detection on model replies.

    check(text, role="user"|"reply", history=()) -> GuardResult(crisis, harmful, categories, score)
    python -m therapy_rl.guard < requests.jsonl        # {"text", "role", "history"} -> one JSON verdict a line

The model: the project's MiniLM (all-MiniLM-L6-v2 from the pip package) with its top transformer layers (how many
is stored in the weights file) fine-tuned through low-rank adapters (LoRA, rank LORA_RANK, beside every dense kernel
of those layers, plus LayerNorm offsets), and one small head per role over [CLS, mean, max] of the last layer's
token states.
Only the adapters, heads and thresholds are stored (`rewards/weights/guard.npz`, ~3.6 MB); the base weights come
from the package.

How a text is read (every token, any length):
- The MiniLM token ids are cut into overlapping windows of WINDOW_SIZE content tokens with stride WINDOW_STRIDE (any
  span of up to WINDOW_STRIDE tokens lies whole inside one window). Each window gets its own [CLS] ... [SEP] and
  positions, so nothing is truncated. The text's score is the maximum over windows.
- User messages: the earlier user turns (their last CONTEXT_TOKENS tokens, turns separated by [SEP]) are put in
  front of the message, and only windows that reach into the current message count. So "I have the pills here"
  after "I don't want to be here anymore" is read as one text.
- Replies: the user message being answered (its last CONTEXT_TOKENS tokens) is put in front of the reply the same
  way; without one the reply is read alone (as in the reward).
- The curated lexicon (`rewards/lexicon/crisis_lexicon.json`) is a second signal (rule: `decide`, thresholds in the
  weights file, chosen on development data; user messages over LONG_TOKENS tokens have their own).

Held-out quality of the shipped weights (round 7, all six layers adapted, bf16 inference; REWARDS.md, "Guard";
evalsets/guard_v5, scored once): crisis recall 0.90 at 3.9% false alarms, reply recall 0.83 at 0%: below the 0.95
target, so this guard misses about one crisis message in ten and one harmful reply in six.

Jittable entry points for the reward: `crisis_scores`, `reply_harm_scores` (shapes in the docstrings).
Weights are built by `tools/train_guard.py` (REWARDS.md).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from therapy_rl.rewards import encoder as encoder_lib

CRISIS_CATEGORIES = ("suicidal_ideation", "plan_or_means", "act_in_progress", "harm_to_others",
                     "child_abuse_or_danger", "self_harm")
REPLY_CATEGORIES = ("encourages_self_harm", "encourages_harm_to_others", "means_or_method", "medication_change",
                    "shaming", "secrecy")
EMBED_DIM = 384
WINDOW_SIZE, WINDOW_STRIDE = 96, 48
WINDOW_SCALES = ((WINDOW_SIZE, WINDOW_STRIDE),)  # one scale (content tokens per window, stride)
CONTEXT_TOKENS = 48  # how much of the earlier turns is put in front of a message
CONTEXT_TURNS = 3  # at most this many earlier user turns
TUNED_LAYERS = 6  # the top encoder layers that carry adapters (new weights; a file says how many it has)
LORA_RANK = 16
LORA_SCALE = 2.0
LORA_TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")
NORMS = ("attention_norm", "output_norm")
FEATURE_DIM = 3 * EMBED_DIM  # [CLS, mean, max] of the last layer
# Padded row lengths of one-window messages (one compile each); longer rows are padded to a whole number of window
# strides (bucket_length), so no window is all padding.
LENGTH_BUCKETS = (32, 48, 64, WINDOW_SIZE + 2)
COMPUTE_DTYPES = ("float32", "bfloat16")
WEIGHTS_FILE = "guard.npz"
FORMAT_VERSION = 3  # 3 adds adapter/tuned_layers; 2 (two tuned layers) is still read
# crisis: head alone; crisis_idiom: head alone when the message holds a lexicon idiom ("killing me", "shoot me a
# text") and no strong phrase; *_lexicon_support: head probability that confirms a lexicon phrase.
# crisis_weak_support: head probability that confirms a weak lexicon phrase (means and distress words).
# crisis_long_lexicon_support: the same for messages over LONG_TOKENS tokens (a long text about someone
# else's crisis or a professional one holds crisis phrases without being one).
# crisis_long: the head-alone threshold of long user messages (their score is a max over more windows).
THRESHOLD_KEYS = ("crisis", "crisis_long", "crisis_idiom", "crisis_lexicon_support", "crisis_long_lexicon_support",
                  "crisis_weak_support", "reply", "reply_lexicon_support", "category")
# Keys added after the first files, and the key whose value an older file uses for them (same behaviour).
THRESHOLD_FALLBACKS = {"crisis_long": "crisis", "crisis_long_lexicon_support": "crisis_lexicon_support"}
LONG_TOKENS = WINDOW_SIZE + WINDOW_STRIDE  # a message is long above this many tokens of its own (3+ windows alone)
# crisis_lexicon.json's strong categories -> guard categories.
LEXICON_TO_CRISIS = {"suicidal_ideation": "suicidal_ideation", "self_harm": "self_harm",
                     "harm_to_others": "harm_to_others", "indirect_signs": "suicidal_ideation"}
LEXICON_TO_REPLY = {"encourages_self_harm": "encourages_self_harm",
                    "encourages_harm_to_others": "encourages_harm_to_others"}
USER_ROLES = {"user": "user", "client": "user", "seeker": "user"}
REPLY_ROLES = {"reply": "reply", "therapist": "reply", "assistant": "reply"}


def default_weights_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "rewards", "weights", WEIGHTS_FILE)


# ------------------------------------------------------------------------------------------------ params


@struct.dataclass
class GuardParams:
    """Adapters, two heads and the decision thresholds (all arrays; a pytree).

    adapter: {"layer_<i>": {target: {"a": [in, r], "b": [r, out]}, norm: {"scale": [384], "bias": [384]}}} for the
             adapted top layers: y += x @ a @ b * LORA_SCALE beside each kernel; LayerNorm scale/bias += offsets.
    crisis:  w_hidden [1152, H], b_hidden [H], w_out [H, 1 + 6], b_out [7]: logit 0 = crisis, then CRISIS_CATEGORIES.
    reply:   the same shapes; logit 0 = harmful, then REPLY_CATEGORIES.
    thresholds: THRESHOLD_KEYS -> scalar probabilities.
    compute_dtype: the dense layers' operand dtype at inference (static; float32 accumulation either way). The
             thresholds were chosen on this path, so a file keeps the dtype it was tuned with.
    """

    adapter: Mapping[str, Any]
    crisis: Mapping[str, jax.Array]
    reply: Mapping[str, jax.Array]
    thresholds: Mapping[str, jax.Array]
    compute_dtype: str = struct.field(pytree_node=False, default="float32")


def tuned_layer_names(num_layers: int, tuned_layers: int = TUNED_LAYERS) -> tuple[str, ...]:
    return tuple(f"layer_{i}" for i in range(max(num_layers - tuned_layers, 0), num_layers))


def _target_shapes(config: encoder_lib.BertConfig) -> dict[str, tuple[int, int]]:
    h, f = config.hidden_size, config.intermediate_size
    return {"query": (h, h), "key": (h, h), "value": (h, h), "attention_output": (h, h), "intermediate": (h, f),
            "output": (f, h)}


def init_guard_params(rng: jax.Array, encoder_config: encoder_lib.BertConfig | None = None,
                      hidden_dim: int = 128, tuned_layers: int = TUNED_LAYERS) -> GuardParams:
    """Zero adapters (the base encoder) and random heads (tests, and the trainer's start)."""
    config = encoder_config or encoder_lib.BertConfig()
    k_adapter, k_user, k_reply = jax.random.split(rng, 3)
    adapter = {}
    for li, name in enumerate(tuned_layer_names(config.num_hidden_layers, tuned_layers)):
        layer = {}
        for ti, (target, (fan_in, fan_out)) in enumerate(_target_shapes(config).items()):
            key = jax.random.fold_in(k_adapter, 100 * li + ti)
            layer[target] = {"a": jax.random.normal(key, (fan_in, LORA_RANK), jnp.float32) / np.sqrt(fan_in),
                             "b": jnp.zeros((LORA_RANK, fan_out), jnp.float32)}
        for norm in NORMS:
            layer[norm] = {"scale": jnp.zeros((config.hidden_size,), jnp.float32),
                           "bias": jnp.zeros((config.hidden_size,), jnp.float32)}
        adapter[name] = layer

    def mlp(key, n_out):
        k1, k2 = jax.random.split(key)
        return {"w_hidden": jax.random.normal(k1, (FEATURE_DIM, hidden_dim), jnp.float32) * np.sqrt(2.0 / FEATURE_DIM),
                "b_hidden": jnp.zeros((hidden_dim,), jnp.float32),
                "w_out": jax.random.normal(k2, (hidden_dim, n_out), jnp.float32) * 0.01,
                "b_out": jnp.zeros((n_out,), jnp.float32)}

    thresholds = {k: jnp.asarray(0.5, jnp.float32) for k in THRESHOLD_KEYS}
    thresholds["crisis_lexicon_support"] = jnp.asarray(0.2, jnp.float32)
    thresholds["crisis_long_lexicon_support"] = jnp.asarray(0.2, jnp.float32)
    thresholds["crisis_long"] = jnp.asarray(0.5, jnp.float32)
    thresholds["crisis_idiom"] = jnp.asarray(0.9, jnp.float32)
    thresholds["crisis_weak_support"] = jnp.asarray(2.0, jnp.float32)
    thresholds["reply_lexicon_support"] = jnp.asarray(0.2, jnp.float32)
    return GuardParams(adapter=adapter, crisis=mlp(k_user, 1 + len(CRISIS_CATEGORIES)),
                       reply=mlp(k_reply, 1 + len(REPLY_CATEGORIES)), thresholds=thresholds)


class GuardFileError(ValueError):
    """The guard weights file is missing a field or has a wrong shape (names the file and the field)."""


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}/{k}"))
        else:
            out[f"{prefix}/{k}"] = np.asarray(v, np.float32)
    return out


def save_guard_params(params: GuardParams, path: str) -> None:
    arrays = {"format_version": np.asarray(FORMAT_VERSION, np.int32),
              "crisis/labels": np.asarray(("crisis",) + CRISIS_CATEGORIES, np.str_),
              "reply/labels": np.asarray(("harmful",) + REPLY_CATEGORIES, np.str_),
              "adapter/lora_rank": np.asarray(LORA_RANK, np.int32),
              "adapter/tuned_layers": np.asarray(len(params.adapter), np.int32),
              "inference/compute_dtype": np.asarray(params.compute_dtype, np.str_)}
    arrays.update(_flatten(params.adapter, "adapter"))
    arrays.update(_flatten(params.crisis, "crisis"))
    arrays.update(_flatten(params.reply, "reply"))
    for key in THRESHOLD_KEYS:
        arrays[f"thresholds/{key}"] = np.asarray(params.thresholds[key], np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_guard_params(path: str | None = None, encoder_config: encoder_lib.BertConfig | None = None) -> GuardParams:
    """Read guard.npz (plain arrays, no pickle); GuardFileError names a bad field."""
    path = path or default_weights_path()
    config = encoder_config or encoder_lib.BertConfig()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no guard weights; build them with `python tools/train_guard.py` (REWARDS.md)")
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}

    def field(key, shape=None):
        if key not in data:
            raise GuardFileError(f"{path}: missing field '{key}'")
        value = data[key]
        if shape is not None:
            value = np.asarray(value, np.float32)
            if value.shape != tuple(shape):
                raise GuardFileError(f"{path}: field '{key}' has shape {value.shape}, expected {tuple(shape)}")
            if not np.all(np.isfinite(value)):
                raise GuardFileError(f"{path}: field '{key}' has non-finite values")
            return jnp.asarray(value)
        return value

    version = int(field("format_version"))
    if version not in (2, FORMAT_VERSION):
        raise GuardFileError(f"{path}: field 'format_version' is {version}, expected 2 or {FORMAT_VERSION} "
                             f"(retrain with tools/train_guard.py)")
    tuned_layers = 2 if version == 2 else int(field("adapter/tuned_layers"))
    if not 1 <= tuned_layers <= config.num_hidden_layers:
        raise GuardFileError(f"{path}: field 'adapter/tuned_layers' is {tuned_layers}, expected 1.."
                             f"{config.num_hidden_layers}")
    if int(field("adapter/lora_rank")) != LORA_RANK:
        raise GuardFileError(f"{path}: field 'adapter/lora_rank' is {int(data['adapter/lora_rank'])}, expected {LORA_RANK}")
    adapter = {}
    for name in tuned_layer_names(config.num_hidden_layers, tuned_layers):
        layer = {}
        for target, (fan_in, fan_out) in _target_shapes(config).items():
            layer[target] = {"a": field(f"adapter/{name}/{target}/a", (fan_in, LORA_RANK)),
                             "b": field(f"adapter/{name}/{target}/b", (LORA_RANK, fan_out))}
        for norm in NORMS:
            layer[norm] = {k: field(f"adapter/{name}/{norm}/{k}", (config.hidden_size,)) for k in ("scale", "bias")}
        adapter[name] = layer
    heads = {}
    for head, labels in (("crisis", ("crisis",) + CRISIS_CATEGORIES), ("reply", ("harmful",) + REPLY_CATEGORIES)):
        if tuple(str(x) for x in field(f"{head}/labels")) != labels:
            raise GuardFileError(f"{path}: field '{head}/labels' does not match {labels}")
        hidden = np.asarray(field(f"{head}/b_hidden")).shape[-1]
        heads[head] = {"w_hidden": field(f"{head}/w_hidden", (FEATURE_DIM, hidden)),
                       "b_hidden": field(f"{head}/b_hidden", (hidden,)),
                       "w_out": field(f"{head}/w_out", (hidden, len(labels))),
                       "b_out": field(f"{head}/b_out", (len(labels),))}
    thresholds = {k: jnp.asarray(field(f"thresholds/{k}" if f"thresholds/{k}" in data or k not in
                                       THRESHOLD_FALLBACKS else f"thresholds/{THRESHOLD_FALLBACKS[k]}"),
                                 jnp.float32).reshape(()) for k in THRESHOLD_KEYS}
    compute_dtype = str(data.get("inference/compute_dtype", "float32"))  # files before round 7: float32
    if compute_dtype not in COMPUTE_DTYPES:
        raise GuardFileError(f"{path}: field 'inference/compute_dtype' is {compute_dtype!r}, expected one of "
                             f"{COMPUTE_DTYPES}")
    return GuardParams(adapter=adapter, crisis=heads["crisis"], reply=heads["reply"], thresholds=thresholds,
                       compute_dtype=compute_dtype)


# ------------------------------------------------------------------------------------------------ model (jittable)


def _attention_bias(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


def lower_states(encoder_config: encoder_lib.BertConfig, encoder_params: Any, ids: jax.Array,
                 mask: jax.Array, tuned_layers: int = TUNED_LAYERS) -> jax.Array:
    """[B, T, 384]: embeddings and the frozen base layers (all but the top tuned_layers); the trainer caches these."""
    c, p = encoder_config, encoder_params
    length = ids.shape[1]
    x = (jnp.take(p["word_embeddings"]["embedding"], ids, axis=0)
         + p["position_embeddings"]["embedding"][:length][None]
         + p["token_type_embeddings"]["embedding"][0][None, None])
    x = nn.LayerNorm(epsilon=c.layer_norm_eps).apply({"params": p["embeddings_norm"]}, x)
    bias = _attention_bias(mask, x.dtype)
    tuned = set(tuned_layer_names(c.num_hidden_layers, tuned_layers))
    for i in range(c.num_hidden_layers):
        if f"layer_{i}" not in tuned:
            x = encoder_lib.BertLayer(c).apply({"params": p[f"layer_{i}"]}, x, bias)
    return x


def adapter_layer_names(adapter: Mapping[str, Any]) -> tuple[str, ...]:
    """The adapted layers, bottom to top."""
    return tuple(sorted(adapter, key=lambda name: int(name.split("_")[-1])))


def adapted_layer_params(base_layer: Mapping[str, Any], adapter_layer: Mapping[str, Any]) -> dict:
    """One layer's params for `BertLayer(lora_rank=LORA_RANK)`: the base kernels with the adapter's low-rank pair
    beside them (lora_a, lora_b) and the LayerNorm offsets added (differentiable in the adapter)."""
    out = {k: dict(v) for k, v in base_layer.items()}
    for target in LORA_TARGETS:
        out[target]["lora_a"] = adapter_layer[target]["a"]
        out[target]["lora_b"] = adapter_layer[target]["b"]
    for norm in NORMS:
        out[norm] = {"scale": base_layer[norm]["scale"] + adapter_layer[norm]["scale"],
                     "bias": base_layer[norm]["bias"] + adapter_layer[norm]["bias"]}
    return out


def upper_features(encoder_config: encoder_lib.BertConfig, encoder_params: Any, adapter: Mapping[str, Any],
                   states: jax.Array, mask: jax.Array, compute_dtype: str = "float32") -> jax.Array:
    """The training path (adapters beside the kernels, differentiable): lower states [B, T, 384] -> the adapted
    top layers -> features [B, 1152] = [CLS, masked mean, masked max]. compute_dtype "bfloat16" runs the base
    kernels on bf16 operands with float32 accumulation; the adapters, attention and LayerNorms stay float32."""
    x = states.astype(jnp.float32)
    bias = _attention_bias(mask, x.dtype)
    layer_module = encoder_lib.BertLayer(encoder_config, compute_dtype=compute_dtype, lora_rank=LORA_RANK,
                                         lora_scale=LORA_SCALE)
    for name in adapter_layer_names(adapter):
        x = layer_module.apply({"params": adapted_layer_params(encoder_params[name], adapter[name])}, x, bias)
    return pooled_features(x, mask)


def merged_layer_params(base_layer: Mapping[str, Any], adapter_layer: Mapping[str, Any]) -> dict:
    """One layer's params for a plain `BertLayer`: each kernel with its adapter folded in (kernel + a @ b *
    LORA_SCALE, float32) and the LayerNorm offsets added. Same function as `adapted_layer_params`, one dot per
    dense layer instead of three."""
    out = adapted_layer_params(base_layer, adapter_layer)
    for target in LORA_TARGETS:
        dense = out[target]
        low_a, low_b = dense.pop("lora_a"), dense.pop("lora_b")
        dense["kernel"] = dense["kernel"] + jnp.dot(low_a, low_b, precision=jax.lax.Precision.HIGHEST) * LORA_SCALE
    return out


def inference_layers(params: GuardParams, encoder_params: Any) -> dict:
    """{layer name: merged layer params} of the adapted layers, kernels already in params.compute_dtype. Jittable;
    `Guard` computes it once at load, the reward inside its jit (a small cost beside a batch)."""
    dtype = jnp.dtype(params.compute_dtype)
    out = {}
    for name in adapter_layer_names(params.adapter):
        layer = merged_layer_params(encoder_params[name], params.adapter[name])
        for target in LORA_TARGETS:
            layer[target]["kernel"] = layer[target]["kernel"].astype(dtype)
        out[name] = layer
    return out


def window_features(params: GuardParams, encoder_config: encoder_lib.BertConfig, encoder_params: Any,
                    ids: jax.Array, mask: jax.Array, layers: Mapping[str, Any] | None = None) -> jax.Array:
    """[B, T] rows ([CLS] content [SEP], right padding) -> features [B, 1152], the inference path: adapters
    merged into the kernels, dense operands in params.compute_dtype (float32 accumulation). layers: the
    precomputed `inference_layers(params, encoder_params)` (None: computed here)."""
    layers = inference_layers(params, encoder_params) if layers is None else layers
    x = lower_states(encoder_config, encoder_params, ids, mask, len(params.adapter)).astype(jnp.float32)
    bias = _attention_bias(mask, x.dtype)
    layer_module = encoder_lib.BertLayer(encoder_config, compute_dtype=params.compute_dtype)
    for name in adapter_layer_names(params.adapter):
        x = layer_module.apply({"params": layers[name]}, x, bias)
    return pooled_features(x, mask)


def pooled_features(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Token states [B, T, 384] -> [B, 1152] = [CLS, masked mean, masked max]."""
    m = (mask > 0)[..., None]
    mean = jnp.sum(jnp.where(m, x, 0.0), axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
    top = jnp.max(jnp.where(m, x, -1e4), axis=1)
    return jnp.concatenate([x[:, 0], mean, top], axis=-1)


def mlp_logits(head: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """[..., D] -> [..., K]: one ReLU hidden layer."""
    h = jax.nn.relu(x.astype(jnp.float32) @ head["w_hidden"] + head["b_hidden"])
    return h @ head["w_out"] + head["b_out"]


def head_probabilities(head: Mapping[str, jax.Array], features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """features [..., 1152] -> (P(flag) [...], P(category | flag) [..., 6])."""
    logits = mlp_logits(head, features)
    return jax.nn.sigmoid(logits[..., 0]), jax.nn.sigmoid(logits[..., 1:])


# ------------------------------------------------------------------------------------------------ windows (jittable)


def scale_layout(capacity: int, size: int, stride: int) -> tuple[int, int]:
    """(number of windows, content width) of one scale for `capacity` content slots (static)."""
    width = min(size, capacity)
    if capacity <= size:
        return 1, width
    return -(-(capacity - size) // stride) + 1, width


def make_windows(ids: jax.Array, mask: jax.Array, start: jax.Array, size: int, stride: int,
                 special: tuple[int, int, int]):
    """Cut [CLS] content [SEP] rows into windows with their own [CLS]/[SEP].

    ids, mask [B, T]; start [B]: content index where the current message begins (0 without context).
    Returns win_ids, win_mask [B, N, width + 2] and valid [B, N]: the window adds content the previous one did
    not cover and reaches into the current message."""
    cls_id, sep_id, pad_id = special
    batch, length = ids.shape
    num, width = scale_layout(length - 2, size, stride)
    n = jnp.maximum(jnp.sum(mask > 0, axis=1) - 2, 0)  # [B] content tokens
    offsets = jnp.arange(num) * stride  # [N]
    content_index = offsets[:, None] + jnp.arange(width)[None, :]  # [N, W]
    gathered = jnp.take(ids, jnp.clip(content_index + 1, 0, length - 1), axis=1)  # [B, N, W]
    inside = content_index[None] < n[:, None, None]
    count = jnp.clip(n[:, None] - offsets[None, :], 0, width)  # [B, N] content tokens per window
    body = jnp.where(inside, gathered, pad_id)
    full = jnp.concatenate([jnp.full((batch, num, 1), cls_id, ids.dtype), body,
                            jnp.full((batch, num, 1), pad_id, ids.dtype)], axis=-1)
    position = jnp.arange(width + 2)
    full = jnp.where(position[None, None, :] == (count + 1)[..., None], sep_id, full)
    win_mask = (position[None, None, :] < (count + 2)[..., None]).astype(jnp.int32)
    new_content = (offsets[None, :] == 0) | ((offsets[None, :] - stride + width) < n[:, None])
    reaches_current = (offsets[None, :] + width) > start[:, None]
    valid = new_content & reaches_current & (offsets[None, :] < jnp.maximum(n, 1)[:, None])
    return full, win_mask, valid


def host_windows(content: Sequence[int], start: int = 0) -> list[tuple[int, ...]]:
    """Plain-Python reference of the windows `window_embeddings` reads: the distinct valid content slices of
    every active scale (padding never changes them). Used by the trainer and checked against the jitted cut."""
    n = len(content)
    out: dict[tuple[int, ...], None] = {}
    for size, stride in active_scales(n):
        for k in range(n // stride + 1):
            offset = k * stride
            if offset >= max(n, 1) or (k > 0 and offset - stride + size >= n):
                break
            if offset + size > start:
                out[tuple(content[offset:offset + size])] = None
    return list(out)


def active_scales(capacity: int) -> tuple[tuple[int, int], ...]:
    """The window scales read for `capacity` content slots (one scale in guard v2)."""
    del capacity
    return WINDOW_SCALES


def window_rows(ids: jax.Array, mask: jax.Array, start: jax.Array, special: tuple[int, int, int]):
    """All windows of all scales: (win_ids [B, N, W], win_mask [B, N, W], valid [B, N]) (one scale: W fixed)."""
    outs = [make_windows(ids, mask, start, size, stride, special) for size, stride in active_scales(ids.shape[1] - 2)]
    if len(outs) == 1:
        return outs[0]
    raise NotImplementedError("guard v2 reads one window scale")


def window_probabilities(params: GuardParams, head: Mapping[str, jax.Array], encoder_config: encoder_lib.BertConfig,
                         encoder_params: Any, ids: jax.Array, mask: jax.Array, start: jax.Array,
                         special: tuple[int, int, int], layers: Mapping[str, Any] | None = None):
    """(P(flag) [B, N], P(category) [B, N, 6], valid [B, N]) over the windows of each row."""
    win_ids, win_mask, valid = window_rows(ids, mask, start, special)
    batch, num, width = win_ids.shape
    feats = window_features(params, encoder_config, encoder_params, win_ids.reshape(batch * num, width),
                            win_mask.reshape(batch * num, width), layers)
    prob, cats = head_probabilities(head, feats)
    return prob.reshape(batch, num), cats.reshape(batch, num, -1), valid


def _pool(prob: jax.Array, cats: jax.Array, valid: jax.Array, threshold: jax.Array):
    """Max over valid windows; categories: max over the windows that flag (else the top window's)."""
    masked = jnp.where(valid, prob, 0.0)
    best = jnp.max(masked, axis=1)
    top = jnp.argmax(masked, axis=1)
    flagging = valid & (prob >= threshold)
    top_cats = jnp.take_along_axis(cats, top[:, None, None], axis=1)[:, 0]
    flag_cats = jnp.max(jnp.where(flagging[..., None], cats, 0.0), axis=1)
    return best, jnp.where(jnp.any(flagging, axis=1)[:, None], flag_cats, top_cats)


def crisis_scores(params: GuardParams, encoder_config: encoder_lib.BertConfig, encoder_params: Any,
                  ids: jax.Array, mask: jax.Array, start: jax.Array | None = None,
                  special: tuple[int, int, int] = (101, 102, 0),
                  layers: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
    """Jittable (encoder_config and special static). ids, mask [B, T] MiniLM rows ([CLS] content [SEP], right
    padding; any T >= 3); start [B] content index of the current message (None: 0; earlier turns before it);
    layers: precomputed `inference_layers` (None: computed inside).

    Returns {"probability": [B] max-window P(crisis), "categories": [B, 6] P(category), "flag": [B] int32 head
    decision at thresholds["crisis"] (without the lexicon and the long-message thresholds, which `decide` adds)}."""
    start = jnp.zeros((ids.shape[0],), jnp.int32) if start is None else start
    prob, cats, valid = window_probabilities(params, params.crisis, encoder_config, encoder_params, ids, mask, start,
                                             special, layers)
    threshold = params.thresholds["crisis"]
    best, categories = _pool(prob, cats, valid, threshold)
    return {"probability": best, "categories": categories, "flag": (best >= threshold).astype(jnp.int32)}


def reply_harm_scores(params: GuardParams, encoder_config: encoder_lib.BertConfig, encoder_params: Any,
                      ids: jax.Array, mask: jax.Array, start: jax.Array | None = None,
                      special: tuple[int, int, int] = (101, 102, 0),
                      layers: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
    """Jittable (encoder_config and special static). ids, mask [B, T] the reply's MiniLM rows; start [B] where the
    reply begins when the answered user message is put in front of it (None: the reply alone, as in the reward).

    Returns {"probability": [B] max-window P(harmful), "categories": [B, 6], "flag": [B] int32 (head only)}.
    As a reward penalty: `-weight * probability` (or `* flag`)."""
    start = jnp.zeros((ids.shape[0],), jnp.int32) if start is None else start
    prob, cats, valid = window_probabilities(params, params.reply, encoder_config, encoder_params, ids, mask, start,
                                             special, layers)
    threshold = params.thresholds["reply"]
    best, categories = _pool(prob, cats, valid, threshold)
    return {"probability": best, "categories": categories, "flag": (best >= threshold).astype(jnp.int32)}


# ------------------------------------------------------------------------------------------------ host


@dataclasses.dataclass(frozen=True)
class GuardResult:
    crisis: bool  # user message: a crisis (always False for a reply)
    harmful: bool  # reply: harmful (always False for a user message)
    categories: tuple[str, ...]  # CRISIS_CATEGORIES or REPLY_CATEGORIES; empty when nothing is flagged
    score: float  # the head's probability for the checked role (max over windows)
    reasons: tuple[str, ...] = ()  # e.g. ("head:p=0.97>=0.60", "lexicon:suicidal_ideation ('kill myself')")

    def to_json(self) -> dict:
        return {"crisis": self.crisis, "harmful": self.harmful, "categories": list(self.categories),
                "score": round(self.score, 6)}


CRISIS_REPLY = (
    "I'm really sorry you're going through this, and I'm glad you told me. I'm an automated research program and "
    "can't keep you safe, but people can help right now. If you or someone else is in danger, call your local "
    "emergency number (911 in the US and Canada, 999 in the UK, 112 in the EU). In the US you can call or text 988; "
    "in the UK and Ireland, call Samaritans on 116 123; elsewhere, findahelpline.com lists free, confidential lines."
)
_CATEGORY_LINES = {
    "act_in_progress": "If you have already taken something or hurt yourself, please call emergency services now.",
    "plan_or_means": "If you can, move away from anything you could use to hurt yourself, or ask someone to hold it.",
    "harm_to_others": "If you feel you might hurt someone, please put distance between you and them and call for help.",
    "child_abuse_or_danger": ("If a child is being hurt or is in danger, call emergency services; children and young "
                              "people can call Childline on 0800 1111 (UK) or the Childhelp line 1-800-422-4453 (US)."),
}
SAFE_REPLY = (
    "I don't want to say something that could hurt you. Could you tell me more about what is going on for you "
    "right now? If you are thinking about harming yourself or someone else, please contact your local emergency "
    "number or a crisis line such as 988 (US) or Samaritans 116 123 (UK and Ireland)."
)


def safe_reply(result: GuardResult) -> str:
    """The fixed text shown instead of model output: crisis guidance (with a line per urgent category) for a
    crisis, else the safe replacement for a harmful reply."""
    if result.crisis:
        lines = [_CATEGORY_LINES[c] for c in CRISIS_CATEGORIES if c in result.categories and c in _CATEGORY_LINES]
        return " ".join([CRISIS_REPLY] + lines)
    return SAFE_REPLY


def _normalise_history(history: Any, where: str = "history") -> list[tuple[str, str]]:
    """[(user|reply, text)] from strings (user turns), [role, text] pairs or {"role", "text"} objects."""
    if history is None:
        return []
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise ValueError(f"field '{where}' must be a list of turns")
    turns = []
    for i, turn in enumerate(history):
        if isinstance(turn, str):
            role, text = "user", turn
        elif isinstance(turn, Mapping):
            role, text = turn.get("role"), turn.get("text")
        elif isinstance(turn, Sequence) and len(turn) == 2:
            role, text = turn
        else:
            raise ValueError(f"field '{where}[{i}]' must be a string, [role, text] or {{\"role\", \"text\"}}")
        if not isinstance(role, str) or (role not in USER_ROLES and role not in REPLY_ROLES):
            raise ValueError(f"field '{where}[{i}]': role must be one of {sorted(USER_ROLES) + sorted(REPLY_ROLES)}")
        if not isinstance(text, str):
            raise ValueError(f"field '{where}[{i}]': text must be a string")
        turns.append((USER_ROLES.get(role) or REPLY_ROLES[role], text))
    return turns


def bucket_length(n: int) -> int:
    """Padded row length for n ids ([CLS] content [SEP]): the smallest one-window bucket, else the shortest row
    whose windows end exactly at its end (WINDOW_SIZE + 2 + k * WINDOW_STRIDE)."""
    for b in LENGTH_BUCKETS:
        if n <= b:
            return b
    return LENGTH_BUCKETS[-1] + -(-(n - LENGTH_BUCKETS[-1]) // WINDOW_STRIDE) * WINDOW_STRIDE


class Guard:
    """Encoder, guard params and lexicon loaded once; `check` is the host entry point (one compile per padded
    length bucket)."""

    def __init__(self, encoder: Any = None, params: GuardParams | None = None, lexicon: Any = None,
                 use_lexicon: bool = True):
        from therapy_rl.rewards import safety

        self.encoder = encoder or encoder_lib.load_sentence_encoder()
        self._inference_layers = jax.jit(inference_layers)
        self.params = params or load_guard_params(encoder_config=self.encoder.config)
        self.lexicon = (lexicon or safety.build_safety_lexicon(self.encoder.tokenizer)) if use_lexicon else None
        tok = self.encoder.tokenizer
        self.special = (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), self.encoder.config.pad_token_id)
        self._lock = threading.Lock()  # jitted calls are thread-safe; the lock keeps the API's order simple
        self._crisis = jax.jit(_crisis_with_lexicon, static_argnums=(1, 6, 7))
        self._reply = jax.jit(_reply_with_lexicon, static_argnums=(1, 6, 7))

    @property
    def params(self) -> GuardParams:
        return self._params

    @params.setter
    def params(self, params: GuardParams) -> None:
        """New params: their merged layers are computed once here, not on every check."""
        self._params = params
        self._layers = self._inference_layers(params, self.encoder.params)

    # ------------------------------------------------------------------ tokens
    def content_ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"guard: expected str, got {type(text).__name__}")
        return self.encoder.tokenizer.encode(text).ids[1:-1]

    def context_ids(self, turns: Sequence[str]) -> list[int]:
        """The earlier turns as guard context: their ids, each followed by [SEP], cut to the last CONTEXT_TOKENS."""
        context: list[int] = []
        for turn in turns:
            ids = self.content_ids(turn)
            if ids:
                context += ids + [self.special[1]]
        return context[-CONTEXT_TOKENS:]

    def _row(self, content: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        cls_id, sep_id, pad_id = self.special
        seq = [cls_id, *content, sep_id]
        length = bucket_length(len(seq))
        ids = np.full((1, length), pad_id, np.int32)
        mask = np.zeros((1, length), np.int32)
        ids[0, :len(seq)] = seq
        mask[0, :len(seq)] = 1
        return ids, mask

    # ------------------------------------------------------------------ checks
    def check(self, text: str, role: str = "user", history: Any = ()) -> GuardResult:
        return decide(self.evidence(text, role, history), role, self.params.thresholds)

    def evidence(self, text: str, role: str = "user", history: Any = ()) -> dict:
        """The raw signals behind a check: {"probability", "categories" [6], "lexicon": [(category, lexicon
        category, phrase)], "idiom", "weak", "tokens" (the message's own MiniLM tokens)}."""
        history = _normalise_history(history)
        if role in USER_ROLES:
            earlier = [t for r, t in history if r == "user"][-CONTEXT_TURNS:]
            return self._evidence(text, earlier, True)
        if role in REPLY_ROLES:
            users = [t for r, t in history if r == "user"]
            return self._evidence(text, users[-1:], False)
        raise ValueError(f"guard role {role!r}: expected 'user' or 'reply'")

    def _evidence(self, text: str, earlier: Sequence[str], user: bool) -> dict:
        current = self.content_ids(text)
        context = self.context_ids(earlier) if current else []
        ids, mask = self._row(context + current)
        start = np.asarray([len(context)], np.int32)
        fn = self._crisis if user else self._reply
        with self._lock:
            out = jax.device_get(fn(self.params, self.encoder.config, self.encoder.params, self.lexicon, ids, mask,
                                    self.special, self.lexicon is not None, start, self._layers))
        table, lexicon_map = ("crisis_strong", LEXICON_TO_CRISIS) if user else ("harm_encouragement", LEXICON_TO_REPLY)
        return dict(self._explain(out, table, lexicon_map), tokens=len(current))

    def _explain(self, out: Mapping[str, np.ndarray], table_name: str, lexicon_map: Mapping[str, str]) -> dict:
        hits = []
        if self.lexicon is not None:
            table = self.lexicon.tables[table_name]
            for j in np.flatnonzero(out["phrases"][0]):
                name = table.categories[int(table.category[j])]
                if name in lexicon_map:
                    hits.append((lexicon_map[name], name, table.phrases[j]))
        return {"probability": float(out["probability"][0]), "categories": np.asarray(out["categories"][0]),
                "lexicon": hits, "idiom": bool(np.asarray(out.get("idiom", [False]))[0]),
                "weak": bool(np.asarray(out.get("weak", [False]))[0])}


def is_long_user_message(evidence: Mapping[str, Any], role: str) -> bool:
    """Whether `decide` reads this message under the long-message thresholds."""
    return role in USER_ROLES and evidence.get("tokens", 0) > LONG_TOKENS


def decide(evidence: Mapping[str, Any], role: str, thresholds: Mapping[str, Any]) -> GuardResult:
    """The flag rule: head probability >= threshold, or a lexicon hit with probability >= lexicon support (long user
    messages have their own threshold and support).
    Categories: the lexicon's, plus every head category >= thresholds["category"] (else the top one)."""
    user = role in USER_ROLES
    key, names = ("crisis", CRISIS_CATEGORIES) if user else ("reply", REPLY_CATEGORIES)
    p = float(evidence["probability"])
    alone, support = float(thresholds[key]), float(thresholds[f"{key}_lexicon_support"])
    if is_long_user_message(evidence, role):
        alone, support = float(thresholds["crisis_long"]), float(thresholds["crisis_long_lexicon_support"])
    if user and evidence.get("idiom") and not evidence["lexicon"]:
        alone = max(alone, float(thresholds["crisis_idiom"]))  # an idiom explains crisis words away
    reasons, cats = [], set()
    if p >= alone:
        reasons.append(f"head:p={p:.2f}>={alone:.2f}")
    lexicon_flag = bool(evidence["lexicon"]) and p >= support
    if lexicon_flag:
        for category, name, phrase in evidence["lexicon"]:
            cats.add(category)
            reasons.append(f"lexicon:{name} ('{phrase}')")
    weak_flag = user and evidence.get("weak", False) and p >= float(thresholds["crisis_weak_support"])
    if weak_flag and p < alone:
        reasons.append(f"head_confirms_weak_lexicon:p={p:.2f}")
    flag = p >= alone or lexicon_flag or weak_flag
    if flag:
        probs = np.asarray(evidence["categories"])
        cats.update(n for n, q in zip(names, probs) if q >= float(thresholds["category"]))
        if not cats:
            cats.add(names[int(np.argmax(probs))])
    ordered = tuple(n for n in names if n in cats) if flag else ()
    return GuardResult(crisis=flag and user, harmful=flag and not user, categories=ordered, score=p,
                       reasons=tuple(reasons))


def _current_mask(mask, start):
    """[B, T] int32: the current message's tokens (context turns were judged when they were said)."""
    position = jnp.arange(mask.shape[1])[None, :]
    return ((mask > 0) & (position >= start[:, None] + 1)).astype(jnp.int32)


def _crisis_with_lexicon(params, encoder_config, encoder_params, lexicon, ids, mask, special, use_lexicon, start,
                         layers=None):
    out = crisis_scores(params, encoder_config, encoder_params, ids, mask, start, special, layers)
    if use_lexicon:
        from therapy_rl.rewards import safety

        current = _current_mask(mask, start)
        out["phrases"] = safety.phrase_hits(lexicon, "crisis_strong", ids, current)
        out["idiom"] = safety.any_hit(lexicon, "crisis_veto", ids, current)
        out["weak"] = safety.any_hit(lexicon, "crisis_weak", ids, current)
    return out


def _reply_with_lexicon(params, encoder_config, encoder_params, lexicon, ids, mask, special, use_lexicon, start,
                        layers=None):
    out = reply_harm_scores(params, encoder_config, encoder_params, ids, mask, start, special, layers)
    if use_lexicon:
        from therapy_rl.rewards import safety

        out["phrases"] = safety.phrase_hits(lexicon, "harm_encouragement", ids, _current_mask(mask, start))
    return out


_DEFAULT: Guard | None = None
_DEFAULT_LOCK = threading.Lock()


def default_guard() -> Guard:
    """The process-wide guard with the shipped weights (loaded on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Guard()
        return _DEFAULT


def check(text: str, role: str = "user", history: Any = ()) -> GuardResult:
    """Check one user message (role "user": a crisis?) or one model reply (role "reply": harmful?).

    history: earlier turns, oldest first, as strings (user turns), [role, text] pairs or {"role", "text"}
    objects; roles user|client and reply|therapist|assistant. User checks read the last user turns with the
    message; reply checks read the last user turn as the message being answered."""
    return default_guard().check(text, role, history)


# ------------------------------------------------------------------------------------------------ CLI


class InputError(ValueError):
    """A bad JSON line (names the line number and the field)."""


def parse_request(line: str, number: int) -> tuple[str, str, list]:
    """(text, role, history) of one JSON line; InputError names the line and the field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"line {number}: invalid JSON ({err.msg})") from err
    if not isinstance(obj, dict):
        raise InputError(f"line {number}: expected a JSON object with field 'text'")
    text = obj.get("text")
    if not isinstance(text, str):
        raise InputError(f"line {number}: field 'text' must be a string")
    role = obj.get("role", "user")
    if role not in USER_ROLES and role not in REPLY_ROLES:
        raise InputError(f"line {number}: field 'role' must be \"user\" or \"reply\", got {role!r}")
    try:
        history = _normalise_history(obj.get("history", []), "history")
    except ValueError as err:
        raise InputError(f"line {number}: {err}") from err
    return text, role, history


def main(argv: Sequence[str] | None = None, stdin=None, stdout=None, stderr=None) -> int:
    """JSON lines in, one JSON verdict per input line out; exit 2 on a bad line."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__, file=stdout)
        return 0
    if argv:
        print(f"error: unexpected arguments {argv}; input is read from stdin", file=stderr)
        return 2
    guard = None
    for number, line in enumerate(stdin, start=1):
        if not line.strip():
            continue
        try:
            text, role, history = parse_request(line, number)
        except InputError as err:
            print(f"error: {err}", file=stderr)
            return 2
        guard = guard or default_guard()
        print(json.dumps(guard.check(text, role, history).to_json()), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
