"""One jitted reward: `(total [B], {component: [B]})`, with weights, switches, clipping and whitening from config.

    base  = 1.1·quality + 1.2·emotion + 1.1·relevance + 0.7·sentiment + 0.7·empathy + 1·penalty   (paper)
    total = clip(base, -10, 10) + safety            (safety_after_clip=True: saturation cannot hide it)
          | clip(base + safety, -10, 10)            (safety_after_clip=False)
    total = whiten(total over rows with valid=1)   (whiten=True; padding rows give 0; PPO uses ppo.whiten_* instead)

Components are logged unweighted; `total_raw` is the total before whitening. A switched-off component is 0 and
is not computed (e.g. with relevance, sentiment and empathy off the reply is never encoded).

`after_clip` is the part of `total_raw` added after the clip (the safety penalty with safety_after_clip, else 0).
A consumer that clips the total again must clip only `total_raw - after_clip` and add it back, or it hides the
penalty again: the PPO step does (`ppo/core.clip_scores`; `rewards/protocol.AFTER_CLIP`).

The only host step is in `RewardModel.score`: the reply's policy ids are cut to the text region, decoded with
the caller's `decode_fn`, and re-tokenized for MiniLM at a fixed length, so `reward_fn_jit` compiles once
per batch shape.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from therapy_rl import ops
from therapy_rl.rewards import components as C
from therapy_rl.rewards.encoder import BertConfig, SentenceEncoder, encode_ids


# =========================================================================================== config

@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward settings (hashable: a static jit argument). Defaults: the paper's weights and tables with the
    project's choices (quality formula, additive emotion conflict, raw relevance texts), plus safety; the paper's
    code is quality.formula="paper_code", emotion_scores.conflict_absolute=True, relevance_text="paper_clean"."""

    quality_weight: float = 1.1
    emotion_weight: float = 1.2
    relevance_weight: float = 1.1
    sentiment_weight: float = 0.7
    empathy_weight: float = 0.7
    penalty_weight: float = 1.0
    use_quality: bool = True
    use_emotion: bool = True
    use_relevance: bool = True
    use_sentiment: bool = True
    use_empathy: bool = True
    use_penalty: bool = True
    use_safety: bool = True
    missing_resources_weight: float = 5.0   # crisis input answered without crisis-resource guidance
    encourages_harm_weight: float = 10.0    # reply that encourages harm
    use_guard: bool = False                 # the learned guard also flags replies (off by default: see defaults.py)
    safety_after_clip: bool = True
    clip_min: float = -10.0
    clip_max: float = 10.0
    whiten: bool = True
    whiten_eps: float = 1e-8
    relevance_mode: str = "steps"           # "steps" (paper) | "smooth" (piecewise-linear through the same points)
    relevance_text: str = "raw"             # "raw" (project: texts as they are) | "paper_clean" (paper's code:
                                            # lower-cased, punctuation removed, -8/-5 for empty; rewards/paper_code.py)
    probability_scale: float = 1.1          # empathy/sentiment: p·scale + offset
    probability_offset: float = -0.5
    quality: C.QualityConfig = C.QualityConfig()
    emotion_scores: C.EmotionScores = C.EmotionScores()

    def __post_init__(self):
        if self.relevance_text not in ("raw", "paper_clean"):
            raise ValueError(f"RewardConfig: field 'relevance_text' is {self.relevance_text!r}; "
                             "expected 'raw' or 'paper_clean'")
        if self.relevance_mode not in ("steps", "smooth"):
            raise ValueError(f"RewardConfig: field 'relevance_mode' is {self.relevance_mode!r}; "
                             "expected 'steps' or 'smooth'")
        if not self.clip_min < self.clip_max:
            raise ValueError(f"RewardConfig: fields 'clip_min' ({self.clip_min}) and 'clip_max' ({self.clip_max}) "
                             "must satisfy clip_min < clip_max")

    @property
    def needs_reply_embedding(self) -> bool:
        return self.use_relevance or self.use_sentiment or self.use_empathy


_NESTED = {"quality": C.QualityConfig, "emotion_scores": C.EmotionScores}


def _build(cls, d: Mapping[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in dict(d).items():
        if key not in fields:
            raise ValueError(f"{where}: unknown field {key!r}; known: {sorted(fields)}")
        if cls is RewardConfig and key in _NESTED:
            value = value if isinstance(value, _NESTED[key]) else _build(_NESTED[key], _as_dict(value),
                                                                           f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        default = fields[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{where}: field {key!r} must be a bool, got {value!r}")
        if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _as_dict(value) -> dict:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"expected a mapping, got {type(value).__name__}")


def reward_config_from_dict(d, where: str = "reward config") -> RewardConfig:
    """RewardConfig from a dict or ml_collections ConfigDict (nested `quality` / `emotion_scores` dicts);
    an unknown or mistyped field raises ValueError naming it."""
    return _build(RewardConfig, _as_dict(d), where)


# =========================================================================================== plumbing

@dataclasses.dataclass(frozen=True)
class RewardBackends:
    """The heads' and safety module's jittable functions (static; swapped for stand-ins in tests)."""

    empathy_probability: Callable          # (heads, emb [B,384]) -> [B]
    sentiment_positive_probability: Callable
    mentions_crisis_resources: Callable    # (lexicon, minilm_ids, minilm_mask) -> [B] {0,1}
    encourages_harm: Callable              # (lexicon, minilm_ids, minilm_mask) -> [B] {0,1}
    crisis_flags: Optional[Callable] = None  # (lexicon, heads, ids, mask, emb) -> [B] {0,1}; user side, host


def default_backends() -> RewardBackends:
    """The real heads and safety functions (`therapy_rl.rewards.heads`, `.safety`)."""
    from therapy_rl.rewards import heads, safety
    return RewardBackends(empathy_probability=heads.empathy_probability,
                          sentiment_positive_probability=heads.sentiment_positive_probability,
                          mentions_crisis_resources=safety.mentions_crisis_resources,
                          encourages_harm=safety.encourages_harm,
                          crisis_flags=safety.crisis_flags)


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """Everything static about the reward: config, encoder architecture and backends."""

    config: RewardConfig
    encoder_config: BertConfig
    backends: RewardBackends


@struct.dataclass
class RewardParams:
    """Array inputs that stay fixed during training: policy tables, MiniLM params, heads, safety lexicon."""

    tables: C.PolicyTables
    encoder_params: Any
    heads: Any
    lexicon: Any
    guard: Any = None  # guard.GuardParams (the learned reply guard), or None: lexicon-only harm flags


def reward_fn(spec: RewardSpec, params: RewardParams, response_ids, response_mask, reply_minilm_ids,
              reply_minilm_mask, user_embedding, user_crisis, user_emotion, therapist_emotion, valid,
              host_quality=None, relevance_ids=None, relevance_mask=None, relevance_fallback=None):
    """Pure reward. Shapes: response_* [B,N] (policy ids of the generated continuation, right-padded),
    reply_minilm_* [B,L] (the decoded reply text re-tokenized for MiniLM), user_embedding [B,384] (L2-normalised
    MiniLM embedding of the user text), user_crisis/user_emotion/therapist_emotion/valid [B] int.
    Returns (total [B] float32, {name: [B] float32})."""
    cfg = spec.config
    batch = response_ids.shape[0]
    zeros = jnp.zeros((batch,), jnp.float32)
    valid_f = valid.astype(jnp.float32)
    comps = {}

    if cfg.use_quality and cfg.quality.formula == "paper_code":  # the paper's code on the reply text (host)
        comps["quality"] = jnp.asarray(host_quality, jnp.float32)
    elif cfg.use_quality:
        parts = C.quality_parts(params.tables, response_ids, response_mask, cfg.quality)
        comps["quality"] = parts.score
        comps["degenerate"] = parts.degenerate.astype(jnp.float32)
        comps["num_chars"] = parts.num_chars.astype(jnp.float32)
    else:
        comps["quality"] = zeros

    tag = C.read_emotion_tag(params.tables, response_ids, response_mask)
    comps["tag_missing"] = (tag == C.MISSING_TAG).astype(jnp.float32)
    comps["tag_valid"] = (tag >= 0).astype(jnp.float32)
    comps["emotion"] = C.emotion_alignment(tag, therapist_emotion, cfg.emotion_scores) if cfg.use_emotion else zeros
    comps["penalty"] = (C.joy_after_negative_penalty(tag, user_emotion, cfg.emotion_scores.joy_after_negative)
                        if cfg.use_penalty else zeros)

    if cfg.needs_reply_embedding:
        _, reply_emb = encode_ids(spec.encoder_config, params.encoder_params, reply_minilm_ids, reply_minilm_mask)
    if cfg.use_relevance:
        rel_emb = reply_emb
        if cfg.relevance_text == "paper_clean":  # the reply re-encoded from its cleaned text
            _, rel_emb = encode_ids(spec.encoder_config, params.encoder_params, relevance_ids, relevance_mask)
        cosine = C.cosine_similarity(rel_emb, user_embedding.astype(jnp.float32))
        comps["cosine"] = cosine.astype(jnp.float32)
        comps["relevance"] = C.relevance_score(cosine, cfg.relevance_mode)
        if cfg.relevance_text == "paper_clean":
            comps["relevance"] = jnp.where(jnp.isnan(relevance_fallback), comps["relevance"], relevance_fallback)
    else:
        comps["relevance"] = zeros
    scale = lambda p: C.scaled_probability(p, cfg.probability_scale, cfg.probability_offset)  # noqa: E731
    comps["sentiment"] = (scale(spec.backends.sentiment_positive_probability(params.heads, reply_emb))
                          if cfg.use_sentiment else zeros)
    comps["empathy"] = scale(spec.backends.empathy_probability(params.heads, reply_emb)) if cfg.use_empathy else zeros

    if cfg.use_safety:
        resources = spec.backends.mentions_crisis_resources(params.lexicon, reply_minilm_ids, reply_minilm_mask)
        harm = spec.backends.encourages_harm(params.lexicon, reply_minilm_ids, reply_minilm_mask)
        if cfg.use_guard and params.guard is not None:
            from therapy_rl import guard as guard_lib

            verdict = guard_lib.reply_harm_scores(params.guard, spec.encoder_config, params.encoder_params,
                                                  reply_minilm_ids, reply_minilm_mask)
            comps["guard_harm_probability"] = verdict["probability"]
            harm = jnp.maximum(jnp.asarray(harm).astype(jnp.int32), verdict["flag"])
        comps["safety"] = C.safety_penalty(user_crisis, resources, harm,
                                           cfg.missing_resources_weight, cfg.encourages_harm_weight)
        comps["user_crisis"] = user_crisis.astype(jnp.float32)
        comps["reply_harm"] = jnp.asarray(harm).astype(jnp.float32)
    else:
        comps["safety"] = zeros

    base = (cfg.quality_weight * comps["quality"] + cfg.emotion_weight * comps["emotion"]
            + cfg.relevance_weight * comps["relevance"] + cfg.sentiment_weight * comps["sentiment"]
            + cfg.empathy_weight * comps["empathy"] + cfg.penalty_weight * comps["penalty"])
    if cfg.safety_after_clip:
        total = jnp.clip(base, cfg.clip_min, cfg.clip_max) + comps["safety"]
        comps["after_clip"] = comps["safety"]
    else:
        total = jnp.clip(base + comps["safety"], cfg.clip_min, cfg.clip_max)
        comps["after_clip"] = zeros
    total = total * valid_f
    comps["total_raw"] = total
    if cfg.whiten:
        total = ops.masked_whiten(total, valid, unbiased=False, eps=cfg.whiten_eps, masked_value=0.0)
    comps = {k: (v.astype(jnp.float32) * valid_f) for k, v in comps.items()}
    return total.astype(jnp.float32), comps


reward_fn_jit = jax.jit(reward_fn, static_argnums=0)


def masked_component_means(components: Mapping[str, jax.Array], valid) -> dict:
    """{name: mean over valid rows} for logging (jittable)."""
    v = valid.astype(jnp.float32)
    n = jnp.maximum(v.sum(), 1.0)
    return {k: jnp.sum(x * v) / n for k, x in components.items()}


# =========================================================================================== host helper

_region_jit = jax.jit(C.text_region_mask)


def region_token_ids(tables: C.PolicyTables, response_ids, response_mask) -> list:
    """Each row's ids inside `components.text_region_mask` (the same device function, so the decoded reply is
    exactly the text the lexical components scored)."""
    ids = np.asarray(response_ids)
    region = np.asarray(_region_jit(tables, jnp.asarray(ids, jnp.int32), jnp.asarray(response_mask, jnp.int32)))
    return [ids[b][region[b]].tolist() for b in range(ids.shape[0])]


@dataclasses.dataclass
class RewardModel:
    """Host wrapper: owns the spec and params and does the one host step (decode → MiniLM ids)."""

    spec: RewardSpec
    params: RewardParams
    encoder: SentenceEncoder
    reply_max_length: int = 128
    last_timing: dict = dataclasses.field(default_factory=dict)  # seconds per step of the last `score`

    @classmethod
    def create(cls, config: RewardConfig, policy_tokenizer=None, *, tables: Optional[C.PolicyTables] = None,
               encoder: Optional[SentenceEncoder] = None, heads=None, lexicon=None,
               backends: Optional[RewardBackends] = None, vocab_size: Optional[int] = None,
               reply_max_length: int = 128, guard=None) -> "RewardModel":
        """Build tables from the policy tokenizer (unless given), load MiniLM (gt package) unless given, and load
        the shipped heads and safety lexicon when the enabled components need them. The learned guard
        (`guard.GuardParams`) is loaded with the real safety backends when config.use_safety and use_guard (pass
        `guard=` to use other params; stand-in backends get none unless given)."""
        if tables is None:
            if policy_tokenizer is None:
                raise ValueError("RewardModel.create: pass policy_tokenizer or tables")
            tables = C.build_policy_tables(policy_tokenizer, vocab_size=vocab_size)
        if encoder is None:
            from therapy_rl.rewards.encoder import load_sentence_encoder
            encoder = load_sentence_encoder()
        needs_heads = config.use_sentiment or config.use_empathy or config.use_safety
        if backends is None:
            backends = default_backends() if (needs_heads or config.use_safety) else _unused_backends()
        if heads is None and needs_heads:
            from therapy_rl.rewards.heads import load_reward_heads
            heads = load_reward_heads()
        if lexicon is None and config.use_safety:
            lexicon = _load_default_lexicon(encoder)
        if guard is None and config.use_safety and config.use_guard and backends == default_backends():
            from therapy_rl import guard as guard_lib
            guard = guard_lib.load_guard_params(encoder_config=encoder.config)
        spec = RewardSpec(config=config, encoder_config=encoder.config, backends=backends)
        params = RewardParams(tables=tables, encoder_params=encoder.params, heads=heads, lexicon=lexicon,
                              guard=guard if (config.use_safety and config.use_guard) else None)
        return cls(spec=spec, params=params, encoder=encoder, reply_max_length=int(reply_max_length))

    # ---------------------------------------------------------------- user side (once per dataset)
    def user_features(self, user_texts: Sequence[str], batch_size: int = 64) -> dict:
        """{"user_embedding": float32 [N,384], "user_crisis": int32 [N]} for the prompts' user texts."""
        emb = self.encoder.embed(list(user_texts), batch_size=batch_size)
        crisis = np.zeros((len(user_texts),), np.int32)
        if self.spec.config.use_safety and self.spec.backends.crisis_flags is not None and len(user_texts):
            flags = []
            for start in range(0, len(user_texts), batch_size):
                chunk = list(user_texts[start:start + batch_size])
                ids, mask = self.encoder.tokenize(chunk + [""] * (batch_size - len(chunk)), self.reply_max_length)
                e = np.zeros((batch_size, emb.shape[1]), np.float32)
                e[:len(chunk)] = emb[start:start + len(chunk)]
                f = _crisis_jit(self.spec.backends.crisis_flags, self.params.lexicon, self.params.heads, ids, mask, e)
                flags.append(np.asarray(f)[:len(chunk)])
            crisis = np.concatenate(flags).astype(np.int32)
        if self.spec.config.use_safety and self.params.guard is not None and len(user_texts):
            crisis = np.maximum(crisis, self._guard_crisis(user_texts))
        if self.spec.config.use_relevance and self.spec.config.relevance_text == "paper_clean" and len(user_texts):
            from therapy_rl.rewards import paper_code  # relevance compares cleaned texts; crisis flags read raw ones
            emb = self.encoder.embed([paper_code.clean_for_relevance(t) for t in user_texts], batch_size=batch_size)
        return {"user_embedding": emb, "user_crisis": crisis}

    def _guard_crisis(self, user_texts: Sequence[str]) -> np.ndarray:
        """[N] int32: the learned guard's crisis verdict on each whole user text (every token; lexicon included)."""
        from therapy_rl import guard as guard_lib

        if getattr(self, "_guard_host", None) is None:
            self._guard_host = guard_lib.Guard(encoder=self.encoder, params=self.params.guard)
        return np.asarray([self._guard_host.check(t, "user").crisis for t in user_texts], np.int32)

    # ---------------------------------------------------------------- per batch
    def reply_texts(self, response_ids, response_mask, decode_fn: Callable[[list], str]) -> list:
        return [decode_fn(row) for row in region_token_ids(self.params.tables, response_ids, response_mask)]

    def score(self, prompt_batch_fields: Mapping[str, Any], response_ids, response_mask,
              decode_fn: Callable[[list], str]):
        """(total [B], {component: [B]}) as device arrays. `prompt_batch_fields` needs `user_embedding` [B,384],
        `user_emotion`, `therapist_emotion` and optionally `user_crisis` (default 0) and `valid` (default 1)."""
        f = prompt_batch_fields
        for key in ("user_embedding", "user_emotion", "therapist_emotion"):
            if key not in f:
                raise KeyError(f"RewardModel.score: prompt_batch_fields lacks {key!r}")
        response_ids, response_mask = np.asarray(response_ids), np.asarray(response_mask)
        if response_ids.ndim != 2 or response_ids.shape != response_mask.shape:
            raise ValueError(f"RewardModel.score: response_ids {response_ids.shape} and response_mask "
                             f"{response_mask.shape} must be the same [B, N] shape")
        batch = response_ids.shape[0]
        want = {"user_embedding": (batch, self.spec.encoder_config.hidden_size)}
        for key in ("user_emotion", "therapist_emotion", "user_crisis", "valid"):
            want[key] = (batch,)
        for key, shape in want.items():
            if key in f and tuple(np.shape(f[key])) != shape:
                raise ValueError(f"RewardModel.score: field {key!r} has shape {tuple(np.shape(f[key]))}, "
                                 f"expected {shape}")
        t0 = time.perf_counter()
        texts = self.reply_texts(response_ids, response_mask, decode_fn)
        t1 = time.perf_counter()
        minilm_ids, minilm_mask = self.encoder.tokenize(texts, self.reply_max_length)
        t2 = time.perf_counter()
        host = self.host_inputs(texts)
        t3 = time.perf_counter()
        user_crisis = f.get("user_crisis", np.zeros((batch,), np.int32))
        valid = f.get("valid", np.ones((batch,), np.int32))
        out = reward_fn_jit(self.spec, self.params, jnp.asarray(response_ids, jnp.int32),
                            jnp.asarray(response_mask, jnp.int32), minilm_ids, minilm_mask,
                            jnp.asarray(f["user_embedding"], jnp.float32), jnp.asarray(user_crisis, jnp.int32),
                            jnp.asarray(f["user_emotion"], jnp.int32), jnp.asarray(f["therapist_emotion"], jnp.int32),
                            jnp.asarray(valid, jnp.int32), **host)
        jax.block_until_ready(out)
        self.last_timing = {"decode": t1 - t0, "minilm_tokenize": t2 - t1, "host_pieces": t3 - t2,
                            "device": time.perf_counter() - t3}
        return out

    def host_inputs(self, texts: Sequence[str]) -> dict:
        """The paper-code pieces computed on the reply text (rewards/paper_code.py), when the config asks."""
        from therapy_rl.rewards import paper_code

        cfg, out = self.spec.config, {}
        texts = [t.strip() for t in texts]
        if cfg.use_quality and cfg.quality.formula == "paper_code":
            out["host_quality"] = jnp.asarray(paper_code.quality_batch(texts))
        if cfg.use_relevance and cfg.relevance_text == "paper_clean":
            ids, mask = self.encoder.tokenize([paper_code.clean_for_relevance(t) for t in texts],
                                              self.reply_max_length)
            out.update(relevance_ids=ids, relevance_mask=mask,
                       relevance_fallback=jnp.asarray(paper_code.relevance_fallback_batch(texts)))
        return out


def _unused_backends() -> RewardBackends:
    def unused(*_):
        raise RuntimeError("RewardBackends: this component is switched off; no backend was configured")
    return RewardBackends(unused, unused, unused, unused, None)


_crisis_jit = jax.jit(lambda fn, lexicon, heads, ids, mask, emb: fn(lexicon, heads, ids, mask, emb), static_argnums=0)


def _load_default_lexicon(encoder: SentenceEncoder):
    """The safety module's curated lexicon, tokenized with the MiniLM tokenizer."""
    from therapy_rl.rewards import safety
    return safety.build_safety_lexicon(encoder.tokenizer)
