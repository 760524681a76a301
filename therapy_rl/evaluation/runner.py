"""Evaluation mode: ``python -m therapy_rl.main --config configs/eval_mesc.py --workdir OUT --config.checkpoint=RUN``.

Reads a run (SFT or PPO workdir, or one of its checkpoint folders), generates a reply for every prompt of
``config.split`` in fixed-shape batches on the jitted sampler, scores the replies (`metrics.evaluate_generations`),
adds bootstrap CIs and optional LLM-judge scores, and writes into the eval workdir:
``generations.jsonl``, ``report.json``, ``report.md``, ``plots/`` (training curves from the run's metrics.jsonl),
and ``decoding.json`` when a decoding search ran.

Decoding settings (top_p, top_k, temperature), first match wins:
1. a search on the VALIDATION split (``decoding_search.enabled``), saved to ``<workdir>/decoding.json``
   (an existing file there is reused unless ``decoding_search.redo``);
2. ``decoding.json`` of the eval workdir, then of the checkpoint's run workdir (``use_saved_decoding``);
3. ``config.sampling``.
PRNG keys derive from ``config.seed`` only: the search uses ``fold_in(seed, 1)`` for every candidate (common random
numbers), the evaluation ``fold_in(seed, 2)``, and batch ``b`` folds in ``b``.

Mesh: params are sharded on ``config.mesh`` by the GPT-2 partition rules, prompt batches on its batch axes, with the
sampler of SFT and PPO, so any device count or number of processes gives the same tokens for the same seed (and
``eval_batch_size``). Generated tokens are gathered to every process; the per-sample text scores (and the emotion
classifier) run on each process's block of rows and are gathered; process 0 alone computes the report (bootstrap,
judge) and writes files. The other processes return ``{"paths": {}, "results": None, "meta": None}``.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from therapy_rl import errors, workdir_lock
from therapy_rl import run as run_lib, run_files
from therapy_rl.evaluation import decoding_search, metrics as metrics_lib

# Data options that belong to the evaluation, never inherited from the run (which may have trimmed them for speed).
EVAL_OWN_FIELDS = ("max_eval_samples", "max_train_samples")
SPLITS = ("val", "test")
EMOTION_SOURCES = ("auto", "tag", "classifier")
GENERATIONS_FILE = "generations.jsonl"
SEARCH_KEY, EVAL_KEY = 1, 2  # fold_in constants of the two sampling streams


# ------------------------------------------------------------------------------------------ data options


def resolve_data_config(eval_data, run_data: Mapping[str, Any],
                        where: str = "config.data") -> ml_collections.ConfigDict:
    """The run's data options overlaid with every eval data field that is set (not None)
    (`run_files.inherit_data_options`); EVAL_OWN_FIELDS always come from the eval config."""

    return run_files.inherit_data_options(eval_data, dict(run_data), where, always_from_request=EVAL_OWN_FIELDS)


def paper_table_for(setting: str, source: str) -> str | None:
    """Which of the paper's tables to print beside ours."""
    if setting == "auto":
        return {"mesc": "mesc", "esconv": "esconv"}.get(source)
    if setting in ("none", "", None):
        return None
    if setting not in ("mesc", "esconv"):
        raise errors.ConfigError(f"config.report.paper_table={setting!r}: expected auto, mesc, esconv or none")
    return setting


# ------------------------------------------------------------------------------------------ generation


def reply_fields(tok, ids: Sequence[int]) -> dict:
    """The generated reply of one row of token ids: text, emotion label (None when missing or invalid), the raw
    token after ``<therapist_emotion>`` (for the report), whether the tag is present, strategy."""
    from therapy_rl.data import labels, tokenize

    ids = [int(i) for i in ids]
    text, emotion, strategy = tokenize.decode_reply(tok, ids)
    eos, tag = tok.marker_ids[labels.EOS], tok.marker_ids[labels.THERAPIST_EMOTION]
    end = ids.index(eos) if eos in ids else len(ids)
    has_tag = tag in ids[:end]
    raw = emotion
    if has_tag and emotion is None:
        after = ids.index(tag) + 1
        raw = tok.decode(ids[after:after + 1]).strip() if after < end else ""
    return {"generated": text, "pred_emotion": raw, "tag_emotion": emotion, "has_emotion_tag": has_tag,
            "pred_strategy": strategy}


def mesh_of(config, devices: Sequence[jax.Device] | None = None):
    """The ``(data, expert, fsdp, tensor)`` mesh of ``config.mesh`` (all data-parallel when the config has none)
    over ``devices`` (default: every global device)."""
    from therapy_rl import parallel

    shape = parallel.mesh_shape_of(config.get("mesh"))
    try:
        return parallel.make_mesh(shape, devices)
    except ValueError as err:
        raise errors.ConfigError(f"config.mesh {shape}: {err}") from err


def shard_params(params: Any, mesh, rules=None) -> Any:
    """Host numpy params (the same on every process) as global arrays sharded by ``rules`` (default GPT-2's)."""
    from therapy_rl import parallel

    shardings = parallel.named_shardings(params, parallel.GPT2_PARTITION_RULES if rules is None else rules, mesh)
    return jax.tree.map(lambda x, sh: jax.make_array_from_callback(np.shape(x), sh, lambda index: np.asarray(x)[index]),
                        params, shardings)


class Generator:
    """Generates replies for prompts of one model with any decoding settings, on the mesh of its params."""

    def __init__(self, model_config, params, tok, sampling_cfg, batch_size: int, mesh=None):
        self.model_config, self.params, self.tok = model_config, params, tok
        self.sampling_cfg, self.batch_size, self.mesh = sampling_cfg, batch_size, mesh
        if mesh is not None:
            from therapy_rl import parallel

            shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
            if batch_size % shards or batch_size % jax.process_count():
                raise errors.ConfigError(
                    f"config.eval_batch_size={batch_size}: must be a multiple of the {jax.process_count()} "
                    f"process(es) and of the mesh's batch shards (data x expert x fsdp = {shards})")

    def sampling_config(self, settings: Mapping[str, Any]):
        from therapy_rl import replies

        return replies.sampling_config_from(self.sampling_cfg, self.tok, **dict(settings))

    def token_rows(self, prompts: Mapping[str, np.ndarray], settings: Mapping[str, Any],
                   rng: jax.Array) -> list[np.ndarray]:
        from therapy_rl import replies

        generate_fn = jitted_sampler(self.model_config, self.sampling_config(settings), self.mesh,
                                     _sharding_key(self.params))
        return replies.generate_token_rows(generate_fn, self.params, dict(prompts), self.batch_size, rng,
                                           mesh=self.mesh)


def _sharding_key(params) -> Any:
    """A hashable description of the params' layout (tree structure and each leaf's sharding)."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple(getattr(x, "sharding", None) for x in leaves)


@functools.lru_cache(maxsize=32)
def _mesh_sampler(model_config, plan, mesh, sharding_key) -> Callable:
    from therapy_rl import parallel, sampling

    treedef, leaf_shardings = sharding_key
    b1, b2 = parallel.batch_sharding(mesh, 1), parallel.batch_sharding(mesh, 2)
    param_sh = jax.tree.unflatten(treedef, leaf_shardings)
    any_config = sampling.SamplingConfig(max_new_tokens=plan.max_new_tokens, greedy=plan.greedy,
                                         top_k=plan.top_k_candidates, top_p=0.5 if plan.top_p else 1.0,
                                         eos_id=plan.eos_id, pad_id=plan.pad_id)
    assert sampling.split_sampling(any_config)[0] == plan
    return sampling.make_generate_fn(model_config, any_config,
                                     in_shardings=(param_sh, b2, b2, parallel.replicated(mesh), b1),
                                     out_shardings=sampling.SampleOutput(b2, b2, b1, b2, b2)).jitted


def jitted_sampler(model_config, sampling_config, mesh=None, sharding_key=None) -> Callable:
    """The sampler of (model config, sampling config), on ``mesh`` with params laid out as ``sharding_key``
    (`_sharding_key`) when given. Compiled programs are shared by every sampling config with the same plan
    (`sampling.split_sampling`), so a decoding grid, or a search then the test split, compiles a few times."""
    from therapy_rl import sampling

    if mesh is None:
        return sampling.make_generate_fn(model_config, sampling_config)
    plan, knobs = sampling.split_sampling(sampling_config)
    return sampling.Sampler(_mesh_sampler(model_config, plan, mesh, sharding_key), knobs)


# ------------------------------------------------------------------------------------------ host-local work


def host_block(n: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous block of ``n`` rows (the last blocks may be short or empty)."""
    per = -(-n // jax.process_count())
    start = min(n, jax.process_index() * per)
    return start, min(n, start + per)


def gather_blocks(local: np.ndarray, n: int) -> np.ndarray:
    """[n, ...]: every process's `host_block` rows of one array, in row order, on every process (a collective).
    Bit-exact for float64 (sent as int32 words, which the collective keeps)."""
    local = np.ascontiguousarray(local)
    if jax.process_count() == 1:
        return local
    per = -(-n // jax.process_count())
    words = local.reshape(len(local), int(np.prod(local.shape[1:], dtype=np.int64))).view(np.int32)
    padded = np.zeros((per, words.shape[1]), np.int32)
    padded[:len(words)] = words
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, per, words]
    return gathered.reshape(-1, words.shape[1])[:n].copy().view(local.dtype).reshape(n, *local.shape[1:])


def from_process_0(values: np.ndarray) -> np.ndarray:
    """Process 0's ``values`` on every process (a collective; bit-exact for float64)."""
    values = np.ascontiguousarray(values)
    if jax.process_count() == 1:
        return values
    words = multihost_utils.broadcast_one_to_all(values.reshape(-1).view(np.int32))
    return np.asarray(words).view(values.dtype).reshape(values.shape)


def text_scores_on_hosts(records: Sequence[Mapping], meteor_variant: str,
                         token_embed_fn=None) -> dict[str, np.ndarray]:
    """`metrics.text_scores_of` of every record, each process scoring its `host_block` (a collective)."""
    start, stop = host_block(len(records))
    names = metrics_lib.text_scores_names(token_embed_fn is not None)
    local = metrics_lib.text_scores_of([r["reference"] for r in records[start:stop]],
                                       [r["generated"] for r in records[start:stop]], meteor_variant, token_embed_fn)
    matrix = np.stack([np.asarray(local[k], np.float64) for k in names], axis=1).reshape(stop - start, len(names))
    full = gather_blocks(matrix, len(records))
    return {k: full[:, i] for i, k in enumerate(names)}


def build_records(tok, split_samples: Sequence, sample_index: np.ndarray,
                  token_rows: Sequence[np.ndarray]) -> list[dict]:
    """One `evaluate_generations` record per prompt row (sample_id = "dialogue_id:turn_index")."""
    if len(sample_index) != len(token_rows):
        raise ValueError(f"{len(sample_index)} prompts but {len(token_rows)} generated rows")
    records = []
    for row, ids in zip(sample_index, token_rows):
        s = split_samples[int(row)]
        records.append({
            "sample_id": f"{s.dialogue_id}:{s.turn_index}", "problem": s.problem, "user_text": s.user_text,
            "user_emotion": s.user_emotion, "reference": s.therapist_text, "gold_emotion": s.therapist_emotion,
            "gold_strategy": s.strategy, "num_tokens": int(len(ids)), **reply_fields(tok, ids),
        })
    return records


# ------------------------------------------------------------------------------------------ emotion classifier


def load_emotion_classifier(heads_dir: str = "") -> Callable[[Sequence[str]], list[str]]:
    """``classify(texts) -> labels``: the rewards room's emotion head on MiniLM sentence embeddings.

    Raises ImportError / FileNotFoundError / ValueError when the rewards modules or weights are unavailable."""
    from therapy_rl.data.labels import EMOTIONS
    from therapy_rl.rewards import encoder as encoder_lib, heads as heads_lib

    heads = heads_lib.load_reward_heads(heads_dir or None)
    encoder = encoder_lib.load_sentence_encoder()

    def classify(texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        emb = encoder.embed(list(texts))
        probs = np.asarray(heads_lib.emotion_probabilities(heads, emb))
        return [EMOTIONS[i] for i in probs.argmax(axis=-1)]

    return classify


def apply_emotion_source(records: list[dict], mode: str, trained_with_tags: bool, heads_dir: str,
                         log: Callable[[str], None] = print) -> dict:
    """Sets each record's pred_emotion from the tag or from the classifier; returns the report's description
    {"emotion_source": "tag" | "classifier", "emotion_classifier": {...}}."""
    if mode not in EMOTION_SOURCES:
        raise errors.ConfigError(f"config.emotion.source={mode!r}: expected one of {EMOTION_SOURCES}")
    want = mode == "classifier" or (mode == "auto" and not trained_with_tags)
    info: dict[str, Any] = {"emotion_source": "tag", "emotion_classifier": {"requested": want, "used": False}}
    if not want:
        return info
    try:
        classify = load_emotion_classifier(heads_dir)
    except (ImportError, AttributeError, FileNotFoundError, OSError, ValueError) as err:
        reason = f"{type(err).__name__}: {err}"
        log(f"[eval] emotion classifier unavailable, emotions are read from tags only ({reason})")
        info["emotion_classifier"]["skipped_because"] = reason
        return info
    t = time.perf_counter()
    from therapy_rl.data.labels import EMOTIONS

    start, stop = host_block(len(records))  # each process classifies its block
    local = np.asarray([EMOTIONS.index(x) for x in classify([r["generated"] for r in records[start:stop]])],
                       np.int32)
    labels = [EMOTIONS[i] for i in gather_blocks(local, len(records))]
    for record, label in zip(records, labels):
        record["classifier_emotion"] = label
        record["pred_emotion"] = label
    info["emotion_source"] = "classifier"
    info["emotion_classifier"].update(
        used=True, method="therapy_rl.rewards emotion head on all-MiniLM-L6-v2 sentence embeddings of the reply "
                          "(the paper used a go_emotions RoBERTa mapped to the 7 labels)",
        heads_dir=heads_dir or "(shipped weights)", seconds=round(time.perf_counter() - t, 2))
    log(f"[eval] emotions of {len(records)} replies from the classifier ({info['emotion_classifier']['seconds']}s)")
    return info


# ------------------------------------------------------------------------------------------ decoding


def search_scores(records: Sequence[Mapping], meteor_variant: str) -> dict[str, float]:
    """Flat scores of one decoding candidate: per-sample means, distinct-n, emotion accuracy and macro-F1; the
    per-sample text scores split over the processes (a collective), the same on every process."""
    result = metrics_lib.evaluate_generations(records, meteor_variant=meteor_variant,
                                              text_scores=text_scores_on_hosts(records, meteor_variant))
    scores = dict(result["means"])
    scores.update(result["corpus"])
    scores["emotion_accuracy"] = result["emotion"]["accuracy"]
    scores["emotion_macro_f1"] = result["emotion"]["macro_f1"]
    return scores


def search_metric(search_cfg) -> decoding_search.Metric:
    weights = search_cfg.metric_weights.to_dict() if search_cfg.get("metric_weights") else {}
    return {k: float(v) for k, v in weights.items()} if weights else search_cfg.metric


def check_search_split(search_cfg) -> None:
    """Refuse a test split before any work (search_decoding refuses it too)."""
    if search_cfg.split not in SPLITS:
        raise errors.ConfigError(f"config.decoding_search.split={search_cfg.split!r}: expected val (or test, "
                                 "refused unless allow_test_split)")
    if decoding_search.is_test_split(search_cfg.split) and not search_cfg.allow_test_split:
        raise errors.ConfigError(f"refusing to search decoding settings on split {search_cfg.split!r}: use the "
                                 "validation split (config.decoding_search.allow_test_split=True forces it, and the "
                                 "report says so)")


def run_search(config, workdir: str, generator: Generator, tok, split_arrays, meteor_variant: str) -> dict:
    """Searches the grid on the search split's first `limit` prompts (every process: a collective) and saves
    decoding.json (process 0); returns its content."""
    search_cfg = config.decoding_search
    prompts = dict(split_arrays.prompts)
    if search_cfg.limit:
        prompts = {k: v[:search_cfg.limit] for k, v in prompts.items()}
    grid = decoding_search.decoding_grid(tuple(search_cfg.top_p), tuple(search_cfg.top_k),
                                         tuple(search_cfg.temperature))
    rng = jax.random.fold_in(jax.random.key(config.seed), SEARCH_KEY)
    log = print if jax.process_index() == 0 else (lambda *_: None)
    log(f"[eval] decoding search: {len(grid)} settings on {search_cfg.split} "
          f"({len(prompts['prompt_ids'])} prompts), metric {search_metric(search_cfg)}")

    def generate(settings):
        rows = generator.token_rows(prompts, settings, rng)
        return build_records(tok, split_arrays.samples, prompts["sample_index"], rows)

    result = decoding_search.search_decoding(generate, lambda records: search_scores(records, meteor_variant), grid,
                                             search_cfg.split, metric=search_metric(search_cfg),
                                             allow_test_split=search_cfg.allow_test_split, log_fn=log)
    from therapy_rl import sampling

    # temperature, top-k and top-p are traced: only the static plans (filters on/off) compile a sampler
    result["compiled_samplers"] = len({sampling.split_sampling(generator.sampling_config(s))[0] for s in grid})
    payload = decoding_search.decoding_payload(result)
    if jax.process_index() == 0:
        path = decoding_search.save_decoding(workdir, result)
        log(f"[eval] decoding search chose {result['best']['settings']} on {search_cfg.split} "
            f"({result['metric']} {result['best']['objective']:.4f}) in {result['search_seconds']:.0f}s, "
            f"{len(grid)} settings on {result['compiled_samplers']} compiled sampler(s); saved {path}")
    return json.loads(json.dumps(payload))  # as load_decoding would read it back


def saved_decoding(workdir: str, run: run_lib.Run) -> tuple[dict | None, str | None]:
    """(decoding.json content, its path) of the eval workdir, else of the run workdir; (None, None) if neither."""
    payload = decoding_search.load_decoding(workdir)
    if payload is not None:
        return payload, os.path.join(workdir, decoding_search.DECODING_FILE)
    if run.decoding is not None:
        return run.decoding, os.path.join(run.workdir, run_lib.DECODING_FILE)
    return None, None


def decoding_settings(payload: Mapping[str, Any] | None, sampling_cfg) -> dict:
    """top_p/top_k/temperature from a decoding.json payload, else from config.sampling."""
    if payload is None:
        return {"top_p": float(sampling_cfg.top_p), "top_k": int(sampling_cfg.top_k),
                "temperature": float(sampling_cfg.temperature)}
    return run_lib.decoding_settings(payload)


def choose_decoding(config, workdir: str, run: run_lib.Run, generator: Generator, data_cfg,
                    meteor_variant: str) -> tuple[dict | None, str, dict]:
    """(decoding.json content or None, where the settings come from, the settings): a validation search, a saved
    decoding.json, or config.sampling (None), in that order (see the module docstring). Process 0 reads the files
    and decides; every process gets its settings."""
    payload, source = _choose_decoding(config, workdir, run, generator, data_cfg, meteor_variant)
    settings = decoding_settings(payload, config.sampling)
    agreed = from_process_0(np.asarray([settings["top_p"], settings["top_k"], settings["temperature"]], np.float64))
    settings = {"top_p": float(agreed[0]), "top_k": int(agreed[1]), "temperature": float(agreed[2])}
    return payload, source, settings


def _choose_decoding(config, workdir, run, generator, data_cfg, meteor_variant) -> tuple[dict | None, str]:
    from therapy_rl.data import pipeline

    search = config.decoding_search
    search_now, saved, failure = _process_0_reads_decoding(config, workdir, run)
    # Every process learns process 0's decision, and whether its reading failed (none waits on a later collective).
    search_now, failed = (bool(x) for x in from_process_0(np.asarray([search_now, failure is not None], np.int32)))
    if failed:
        if failure is not None:
            raise failure
        raise errors.InputError("process 0 could not read the saved decoding settings (its log names the file)")
    if search_now:
        samples = pipeline.load_samples(data_cfg, (search.split,))[search.split]
        arrays = pipeline.encode_split(generator.tok, data_cfg, samples, with_sft=False, name=search.split)
        payload = run_search(config, workdir, generator, generator.tok, arrays, meteor_variant)
        return payload, f"a decoding search in this run ({os.path.join(workdir, decoding_search.DECODING_FILE)})"
    payload, path = saved
    if payload is not None:
        print(f"[eval] decoding settings {payload['settings']} from {path}, chosen on split "
              f"{payload['chosen_on_split']}" + ("; set decoding_search.redo=True to search again"
                                                 if search.enabled else ""))
        return payload, f"{path} (reused)"
    return None, "config.sampling"


def _process_0_reads_decoding(config, workdir, run) -> tuple[bool, tuple[dict | None, str | None], Exception | None]:
    """(search now?, (saved decoding.json, its path), the error reading it): process 0 reads the files; the others
    only know whether a search is forced (decoding_search.redo)."""
    search = config.decoding_search
    if jax.process_index() != 0:
        return search.enabled and search.redo, (None, None), None
    try:
        search_now = search.enabled and (search.redo or decoding_search.load_decoding(workdir) is None)
        if search_now or not (search.enabled or config.use_saved_decoding):
            return search_now, (None, None), None
        return False, saved_decoding(workdir, run), None
    except (errors.InputError, OSError, ValueError) as e:
        return False, (None, None), e


# ------------------------------------------------------------------------------------------ outputs


def write_generations(path: str, records: Sequence[Mapping], emotion_source: str,
                      strategies_used: bool = False) -> None:
    """One JSON line per evaluated sample, in evaluation order (strategies only when the format has them)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            row = {
                "sample_id": r["sample_id"], "problem": r["problem"], "user_text": r["user_text"],
                "reference": r["reference"], "generated": r["generated"], "num_tokens": r["num_tokens"],
                "emotions": {"user": r["user_emotion"], "gold": r["gold_emotion"],
                             "predicted": metrics_lib.valid_emotion(r["pred_emotion"]),
                             "tag": r["tag_emotion"], "tag_present": r["has_emotion_tag"],
                             "classifier": r.get("classifier_emotion"), "source": emotion_source},
            }
            if strategies_used:
                row["strategy"] = {"gold": r.get("gold_strategy"), "predicted": r.get("pred_strategy")}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def notes_markdown(meta: Mapping[str, Any]) -> str:
    """A short section appended to report.md: where the model, emotions and decoding settings came from."""
    lines = ["## Evaluation notes", "",
             f"- model: `{meta['run_workdir']}` ({meta['run_mode']}), checkpoint `{meta['checkpoint']}`",
             f"- emotion source: **{meta['emotion_source']}**"
             + (" (the reply's `<therapist_emotion>` tag; a missing tag counts as wrong)"
                if meta["emotion_source"] == "tag" else " (a classifier applied to the reply text: "
                + meta["emotion_classifier"].get("method", "") + ")")]
    skipped = meta["emotion_classifier"].get("skipped_because")
    if skipped:
        lines.append(f"- emotion classifier requested but unavailable: {skipped}")
    if meta["emotion_source"] == "classifier":
        lines.append(f"- read from the tags instead: emotion accuracy {meta['tag_emotion_accuracy']:.4f}, tag coverage "
                     f"{meta['tag_coverage']:.4f} (the coverage above counts the classifier's labels)")
    lines.append(f"- decoding settings `{json.dumps(meta['decoding_settings'])}` from {meta['decoding_source']}")
    if meta.get("decoding_warning"):
        lines.append(f"- **{meta['decoding_warning']}**")
    lines.append(f"- BERTScore-MiniLM: {'computed' if meta['bertscore'] else 'off (config.metrics.bertscore)'}")
    lines.append(f"- seed {meta['seed']}; generation {meta['generation_seconds']:.1f}s for {meta['n_samples']} "
                 f"prompts ({meta['prompts_at_length_limit']} fill the {meta['max_prompt_tokens']}-token prompt "
                 "window: longer ones lose the start of the user text)")
    lines.append(f"- generations: `{GENERATIONS_FILE}`")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the mode


def _judge_config(config, workdir: str):
    """The JudgeConfig of config.judge, checked before any generation (None when the judge is off)."""
    from therapy_rl.evaluation import judge as judge_lib

    j = config.judge
    if not j.enabled:
        return None
    judge_config = judge_lib.judge_config_from_dict({
        "base_url": j.base_url, "model": j.model, "api_key_env": j.api_key_env or None, "mode": j.mode,
        "temperature": float(j.temperature), "timeout_s": float(j.timeout_s), "max_retries": int(j.max_retries),
        "jitter_seed": int(config.seed),
        "cache_path": j.cache_path or os.path.join(workdir, "judge_cache.jsonl")})
    if judge_config.api_key_env and not os.environ.get(judge_config.api_key_env):
        raise errors.ConfigError(f"config.judge.api_key_env={judge_config.api_key_env!r}: that environment variable "
                                 "is not set (set it, or --config.judge.api_key_env='' for an endpoint without auth)")
    return judge_config


def _train_gold_emotions(run_data: Mapping[str, Any]) -> list[str] | None:
    """Therapist emotions of the run's whole training split (for the training-majority baseline)."""
    from therapy_rl.data import pipeline

    data_cfg = ml_collections.ConfigDict({**dict(run_data), "max_train_samples": 0})
    try:
        return [s.therapist_emotion for s in pipeline.load_samples(data_cfg, ("train",))["train"]]
    except (OSError, ValueError) as err:
        print(f"[eval] training-split majority baseline skipped: {err}")
        return None


@workdir_lock.locked  # one writer per eval workdir
def evaluate(config, workdir: str, devices: Sequence[jax.Device] | None = None) -> dict:
    """Runs the evaluation described in the module docstring on the mesh of ``config.mesh`` over ``devices``
    (default: all); returns {"paths", "results", "meta"} (on processes other than 0: {"paths": {}, "results": None,
    "meta": None})."""
    from therapy_rl.data import pipeline
    from therapy_rl.evaluation import bootstrap, judge as judge_lib, report

    started = time.perf_counter()
    first = jax.process_index() == 0
    log = print if first else (lambda *_: None)
    if config.split not in SPLITS:
        raise errors.ConfigError(f"config.split={config.split!r}: expected one of {SPLITS}")
    if config.decoding_search.enabled:
        check_search_split(config.decoding_search)
        if config.sampling.greedy:
            raise errors.ConfigError("config.decoding_search.enabled with config.sampling.greedy=True: greedy "
                                     "decoding ignores top_p/top_k/temperature")
    os.makedirs(workdir, exist_ok=True)
    judge_config = _judge_config(config, workdir)

    run = run_lib.open_run(config.checkpoint, run_lib.checkpoint_choice(config.checkpoint_which,
                                                                         config.checkpoint_step),
                           where="config.checkpoint")
    run_info, model_config, tok = run.info, run.model_config, run.tokenizer
    data_cfg = resolve_data_config(config.data, run_info["data"])
    total = data_cfg.max_prompt_tokens + config.sampling.max_new_tokens
    if total > model_config.n_positions:
        raise errors.ConfigError(f"config.data.max_prompt_tokens ({data_cfg.max_prompt_tokens}) + "
                                 f"config.sampling.max_new_tokens ({config.sampling.max_new_tokens}) = {total} exceeds "
                                 f"the model's n_positions {model_config.n_positions}")
    mesh = mesh_of(config, devices)
    from therapy_rl.models import families

    params = shard_params(run.read_params(), mesh, families.partition_rules(model_config))
    generator = Generator(model_config, params, tok, config.sampling, config.eval_batch_size, mesh)
    log(f"[eval] {run.mode} run {run.workdir}: {run.label}; data {data_cfg.source}/{config.split}; "
        f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es)")
    meteor_variant = metrics_lib.resolve_meteor_variant(config.metrics.meteor_variant)

    payload, source, settings = choose_decoding(config, workdir, run, generator, data_cfg, meteor_variant)
    sampling_config = generator.sampling_config(settings)

    # Generate for the evaluated split.
    split_samples = pipeline.load_samples(data_cfg, (config.split,))[config.split]
    arrays = pipeline.encode_split(tok, data_cfg, split_samples, with_sft=False, name=config.split)
    prompts = arrays.prompts
    t = time.perf_counter()
    rows = generator.token_rows(prompts, settings, jax.random.fold_in(jax.random.key(config.seed), EVAL_KEY))
    generation_seconds = time.perf_counter() - t
    records = build_records(tok, arrays.samples, prompts["sample_index"], rows)
    log(f"[eval] generated {len(records)} replies in {generation_seconds:.1f}s "
          f"(batch {config.eval_batch_size}, {settings})")

    tag_accuracy = float(np.mean([r["tag_emotion"] == r["gold_emotion"] for r in records]))
    tag_coverage = float(np.mean([r["tag_emotion"] is not None for r in records]))
    emotion_info = apply_emotion_source(records, config.emotion.source, bool(data_cfg.include_therapist_emotion),
                                        config.emotion.heads_dir, log=log)

    embed_fn = None
    if config.metrics.bertscore:
        embed_fn = metrics_lib.make_minilm_token_embedder(batch_size=config.metrics.bertscore_batch_size)
    t = time.perf_counter()
    text_scores = text_scores_on_hosts(records, meteor_variant, embed_fn)  # the last collective
    if not first:
        return {"paths": {}, "results": None, "meta": None}
    results = metrics_lib.evaluate_generations(
        records, train_gold_emotions=_train_gold_emotions(run_info["data"]), meteor_variant=meteor_variant,
        token_embed_fn=embed_fn, strategies_used=bool(data_cfg.include_strategy), text_scores=text_scores)
    results = bootstrap.add_confidence_intervals(results, n_resamples=config.metrics.bootstrap_resamples,
                                                 seed=config.seed, confidence=config.metrics.confidence)
    print(f"[eval] metrics and {config.metrics.bootstrap_resamples} bootstrap resamples in "
          f"{time.perf_counter() - t:.1f}s")

    judge = None
    if judge_config is not None:
        items = judge_lib.items_from_results(results, limit=config.judge.limit or None)
        t = time.perf_counter()
        judge = judge_lib.judge_items(items, judge_config)
        print(f"[eval] judge {judge_config.model}: {len(items)} replies in {time.perf_counter() - t:.1f}s, "
              f"overall {judge['overall']}, counts {judge['counts']}")

    decoding_warning = None
    if payload is not None and payload.get("chosen_on_split") == config.split:
        decoding_warning = (f"the decoding settings were chosen on the evaluated split ({config.split}): "
                            "these scores are optimistic")
    lengths = prompts["prompt_mask"].sum(axis=1)
    meta = {
        "name": config.name or os.path.basename(run.workdir.rstrip("/")),
        "dataset": data_cfg.source, "split": config.split,
        "checkpoint": run.label, "run_workdir": run.workdir, "checkpoint_step": run.step,
        "run_mode": run_info.get("mode"), "seed": int(config.seed),
        "decoding_settings": {**settings, "max_new_tokens": sampling_config.max_new_tokens,
                              "greedy": sampling_config.greedy},
        "decoding_source": source, "decoding_warning": decoding_warning,
        **emotion_info,
        "tag_emotion_accuracy": tag_accuracy, "tag_coverage": tag_coverage,
        "bertscore": bool(config.metrics.bertscore), "n_samples": len(records),
        "max_prompt_tokens": int(data_cfg.max_prompt_tokens),
        "prompts_at_length_limit": int((lengths >= data_cfg.max_prompt_tokens).sum()),
        "generation_seconds": generation_seconds,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "processes": jax.process_count(),
        "data": {k: data_cfg[k] for k in ("source", "max_eval_samples", *run_files.FORMAT_FIELDS)},
        **({"esconv_emotion_map": dict(data_cfg.esconv_emotion_map) or "the data room's default",
            "esconv_supporter_emotion": data_cfg.esconv_supporter_emotion} if data_cfg.source == "esconv" else {}),
    }
    write_generations(os.path.join(workdir, GENERATIONS_FILE), records, emotion_info["emotion_source"],
                      bool(data_cfg.include_strategy))
    paths = report.write_report(
        workdir, results, meta=meta, decoding=payload, judge=judge,
        paper_table=paper_table_for(config.report.paper_table, data_cfg.source),
        n_sample_rows=config.report.n_sample_rows, n_resamples=config.metrics.bootstrap_resamples,
        seed=config.seed, confidence=config.metrics.confidence,
        metrics_jsonl=os.path.join(run.workdir, "metrics.jsonl"))
    with open(paths["markdown"], "a", encoding="utf-8") as f:
        f.write("\n" + notes_markdown(meta))
    paths["generations"] = os.path.join(workdir, GENERATIONS_FILE)
    print(report.console_summary(results))
    if emotion_info["emotion_source"] == "classifier":
        print(f"(emotions from the classifier; read from the tags the accuracy is {tag_accuracy:.4f})")
    chosen = f" (chosen on {payload['chosen_on_split']})" if payload else ""
    print(f"[eval] decoding {settings}{chosen}; report {paths['markdown']}; "
          f"{time.perf_counter() - started:.0f}s in all")
    return {"paths": paths, "results": results, "meta": meta}
