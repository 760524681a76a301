"""The PPO loop: start from an SFT run, then rollout -> reward -> update per iteration, with validation reward,
the best checkpoint by it, early stopping and exact resume.

A PPO workdir reads like an SFT one (run_info.json, tokenizer/, checkpoints/, best/ holding {"params": the policy
trunk in SFT's layout}), so evaluation and chat load either. checkpoints/ holds the whole `PPOState` (policy,
value head, optimizer, KL coefficient, RNG) plus the data position and best-metric tracker as JSON extras; the
reference policy is re-read from the SFT checkpoint recorded in the extras (its exact step), never saved again.

Metric names (metrics.jsonl / TensorBoard): TRL's where they exist (`objective/kl`, `objective/scores`,
`objective/rlhf_reward`, `policy/approxkl_avg`, `policy/clipfrac_avg`, `loss/policy_avg`, `eps`, ...), except that
the value function's statistics are `value/...` (TRL: `val/...`, which means validation in SFT), plus
`reward/<component>`, `rollout/...` (EOS, repeated n-grams, emotion tags) and `time/...`. Validation on held-out
prompts is logged under `eval/...`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from therapy_rl import settings, workdir_lock
from therapy_rl.ppo import core, policy, step as ppo_step
from therapy_rl.rewards import protocol as reward_protocol
from therapy_rl.rewards import simple as simple_rewards



# ------------------------------------------------------------------------------------------ set-up helpers


def resolve_data_config(ppo_data, sft_data: Mapping[str, Any], where: str = "config.data") -> ml_collections.ConfigDict:
    """The SFT run's data options overlaid with every PPO data field that is set (not None); format fields must
    agree with the SFT run (`run_files.inherit_data_options`)."""
    from therapy_rl import run_files

    return run_files.inherit_data_options(ppo_data, dict(sft_data), where)


# config.ppo fields that are not PPOHyper's: the mini-batch split and the policy's build (PolicySpec).
PPO_FIELDS_READ_ELSEWHERE = ("minibatch_size", "separate_critic", "dropout", "value_dropout_rate",
                             "value_head_init", "reuse_rollout_logprobs")


def hyper_from_config(ppo_cfg, global_batch_size: int, eos_id: int) -> ppo_step.PPOHyper:
    """PPOHyper from `config.ppo` (checks the batch splits evenly)."""
    if ppo_cfg.minibatch_size <= 0 or global_batch_size % ppo_cfg.minibatch_size:
        raise ValueError(f"config.ppo.minibatch_size={ppo_cfg.minibatch_size} must divide "
                         f"config.global_batch_size={global_batch_size}")
    if ppo_cfg.grad_accum_steps <= 0 or ppo_cfg.minibatch_size % ppo_cfg.grad_accum_steps:
        raise ValueError(f"config.ppo.grad_accum_steps={ppo_cfg.grad_accum_steps} must divide "
                         f"config.ppo.minibatch_size={ppo_cfg.minibatch_size}")
    return settings.from_section(
        ppo_step.PPOHyper, ppo_cfg, "config.ppo", names=ppo_step.CONFIG_NAMES, ignore=PPO_FIELDS_READ_ELSEWHERE,
        num_minibatches=global_batch_size // ppo_cfg.minibatch_size, eos_id=eos_id,
        value_clip_eps=settings.positive_or_none(ppo_cfg.value_clip_eps),
        ratio_threshold=settings.positive_or_none(ppo_cfg.ratio_threshold))


# ------------------------------------------------------------------------------------------ state and stages


def init_state(spec: policy.PolicySpec, optimizer, kl: core.KLControllerConfig, trunk_params: Any, mesh,
               root_key: jax.Array, value_head_init: str = "torch_linear"):
    """(state, state_shardings, ref_params, ref_shardings), all born sharded by GPT2_PARTITION_RULES.

    The policy (and a separate critic) start from `trunk_params`; the reference is its own copy of them (never
    donated). Keys: value head fold_in(root_key, 1), the state's rng fold_in(root_key, 2).
    """
    from therapy_rl import parallel
    from therapy_rl.models import families

    rules = families.partition_rules(spec.model_config)
    if families.lora_config(spec.model_config) is not None:
        # LoRA: the SFT adapters are merged into the base and fresh ones (zero delta) trained; the reference is
        # the same trunk with its adapters off (`policy.reference_logprobs`), so ref_params is None.
        trunk_params = families.restart_adapters(spec.model_config, trunk_params, jax.random.fold_in(root_key, 4),
                                                 mesh)
        ref_shardings, ref_params = None, None
        trunk_shardings = parallel.named_shardings(trunk_params, rules, mesh)
    else:
        ref_shardings = trunk_shardings = parallel.named_shardings(trunk_params, rules, mesh)
        ref_params = jax.device_put(trunk_params, ref_shardings)

    def make_state(trunk):
        params = policy.init_policy_params(trunk, jax.random.fold_in(root_key, 1), spec, value_head_init)
        return ppo_step.create_state(params, optimizer, kl, jax.random.key_data(jax.random.fold_in(root_key, 2)))

    state_shardings = parallel.named_shardings(jax.eval_shape(make_state, trunk_params), rules, mesh)
    state = jax.jit(make_state, out_shardings=state_shardings)(jax.device_put(trunk_params, trunk_shardings))
    return state, state_shardings, ref_params, ref_shardings


@dataclasses.dataclass
class Stages:
    """The jitted pieces of one iteration, built once for a run (and by the tests)."""

    spec: policy.PolicySpec
    hyper: ppo_step.PPOHyper
    mesh: Any
    generate: Any  # (trunk params, prompt_ids, prompt_mask, key) -> SampleOutput, batch-sharded
    update: Any  # (state, ref_params, rollout) -> (state, metrics), state donated
    reward_fn: reward_protocol.RewardFn
    response_ids: reward_protocol.ResponseIds
    sequence_kl: Any  # (trunk, ref, batch) -> [B] summed k1 KL of each response
    reuse_rollout: bool = False  # the update takes old log-probs (and hidden states) from the sampler


def build_stages(spec: policy.PolicySpec, hyper: ppo_step.PPOHyper, sampling_config, optimizer, mesh,
                 state_shardings: ppo_step.PPOState, ref_shardings: Any, reward_fn: reward_protocol.RewardFn,
                 response_ids: reward_protocol.ResponseIds, batch_size: int, prompt_length: int,
                 reuse_rollout: bool = True) -> Stages:
    """`reuse_rollout`: the update reads the old log-probs from the sampler (and, with the shared trunk, the
    hidden states under the value head) instead of running the policy on the rollout again; only when the
    log-probs are the sampler's raw ones (logprob_temperature 1). The policy's entropy is then logged from the
    sampler too (`policy/entropy`, before the update) instead of in every mini-batch (`policy/entropy_avg`)."""
    from therapy_rl import parallel, sampling

    if sampling_config.max_new_tokens + prompt_length > spec.model_config.n_positions:
        raise ValueError(f"config.data.max_prompt_tokens ({prompt_length}) + config.sampling.max_new_tokens "
                         f"({sampling_config.max_new_tokens}) exceed the model's n_positions "
                         f"({spec.model_config.n_positions})")
    b1, b2, b3 = (parallel.batch_sharding(mesh, n) for n in (1, 2, 3))
    trunk_sh = state_shardings.params[policy.TRUNK_KEY]
    reuse_rollout = reuse_rollout and spec.logprob_temperature == 1.0
    with_hidden = reuse_rollout and not spec.separate_critic
    with_entropy = reuse_rollout and hyper.loss.entropy_coef == 0  # else the update's loss computes it
    generate = sampling.make_generate_fn(
        spec.model_config, sampling_config, with_hidden=with_hidden, with_entropy=with_entropy,
        in_shardings=(trunk_sh, b2, b2, parallel.replicated(mesh)),
        out_shardings=sampling.SampleOutput(b2, b2, b1, b2, b2, b3 if with_hidden else None,
                                            b2 if with_entropy else None))
    example = {"prompt_ids": np.zeros((batch_size, prompt_length), np.int32),
               "prompt_mask": np.zeros((batch_size, prompt_length), np.int32),
               "tokens": np.zeros((batch_size, sampling_config.max_new_tokens), np.int32),
               "response_mask": np.zeros((batch_size, sampling_config.max_new_tokens), np.int32),
               "valid": np.zeros((batch_size,), np.int32), "scores": np.zeros((batch_size,), np.float32),
               "scores_after_clip": np.zeros((batch_size,), np.float32)}
    if reuse_rollout:
        example["rollout_logp"] = np.zeros((batch_size, sampling_config.max_new_tokens), np.float32)
    if with_entropy:
        example["rollout_entropy"] = np.zeros((batch_size, sampling_config.max_new_tokens), np.float32)
    if with_hidden:
        example["rollout_hidden"] = np.zeros((batch_size, sampling_config.max_new_tokens,
                                              spec.model_config.n_embd), np.float32)
    update = ppo_step.jit_update_step(ppo_step.make_update_step(spec, hyper, optimizer), mesh, state_shardings,
                                      ref_shardings, example)

    def sequence_kl(trunk, ref, batch):
        logp = policy.response_logprobs(spec, trunk, batch)
        ref_logp = policy.reference_logprobs(spec, trunk, ref, batch)
        return core.sequence_sum(core.kl_k1(logp, ref_logp, batch["response_mask"]), batch["response_mask"])

    seq_kl = jax.jit(sequence_kl, in_shardings=(trunk_sh, ref_shardings, None), out_shardings=b1)
    return Stages(spec, hyper, mesh, generate, update, reward_fn, response_ids, seq_kl, reuse_rollout)


_response_stats = jax.jit(simple_rewards.response_stats, static_argnums=(3, 4))


@functools.lru_cache(maxsize=None)
def _batch_scores_fn(mesh):
    """jit: (total, after_clip or None) -> float32 [B] arrays sharded like the batch (after_clip: 0 if None)."""
    from therapy_rl import parallel

    def as_scores(total, after_clip):
        total = jnp.asarray(total, jnp.float32)
        return total, jnp.zeros_like(total) if after_clip is None else jnp.asarray(after_clip, jnp.float32)

    return jax.jit(as_scores, out_shardings=parallel.batch_sharding(mesh, 1))


@functools.lru_cache(maxsize=None)
def _valid_row_sums_fn(mesh):
    """jit: ({name: [B]}, valid [B]) -> ({name: sum over valid rows}, number of valid rows), replicated, so every
    process reads the global batch's sums (however its rows are spread over hosts)."""
    from therapy_rl import parallel

    def valid_row_sums(per_row, valid):
        real = valid != 0
        sums = {k: jnp.sum(jnp.where(real, jnp.asarray(x, jnp.float32), 0.0)) for k, x in per_row.items()}
        return sums, jnp.sum(real.astype(jnp.float32))

    return jax.jit(valid_row_sums, out_shardings=parallel.replicated(mesh))


def _score_reward(stages: Stages, batch, tokens, mask, reward_fn=None):
    """(total [B], after_clip [B], logged components): the reward's outputs split as the update wants them."""
    total, components = (stages.reward_fn if reward_fn is None else reward_fn)(batch, tokens, mask)
    components = dict(components)
    total, after_clip = _batch_scores_fn(stages.mesh)(total, components.pop(reward_protocol.AFTER_CLIP, None))
    return total, after_clip, components


@dataclasses.dataclass
class IterationResult:
    state: ppo_step.PPOState
    metrics: dict[str, float]  # host floats
    tokens: Any  # [B, N] device array of this iteration's responses


def run_iteration(stages: Stages, state: ppo_step.PPOState, ref_params: Any,
                  batch: Mapping[str, jax.Array]) -> IterationResult:
    """rollout (jit) -> reward -> update (jit) on one global prompt batch; timings per stage in the metrics.
    Nothing is gathered to a host: means over the global batch come from one jitted, replicated sum."""
    t0 = time.perf_counter()
    sample = stages.generate(state.params[policy.TRUNK_KEY], batch["prompt_ids"], batch["prompt_mask"],
                             ppo_step.rollout_key(state))
    valid = batch["valid"]
    mask = sample.response_mask * (valid[:, None] != 0).astype(sample.response_mask.dtype)
    mask.block_until_ready()
    t1 = time.perf_counter()
    reward_fn = stages.reward_fn
    if hasattr(reward_fn, "for_iteration"):  # a reward keyed by iteration (human ratings: rate/human_reward.py)
        reward_fn = reward_fn.for_iteration(int(state.step))
    raw_scores, after_clip, components = _score_reward(stages, batch, sample.tokens, mask, reward_fn)
    rated = components.pop(reward_protocol.RATED, None)
    if rated is not None:  # rows without a score are left out of the update and of the logged means
        valid = valid * (jnp.asarray(rated) != 0).astype(valid.dtype)
    raw_scores.block_until_ready()
    t2 = time.perf_counter()
    rollout = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"], "tokens": sample.tokens,
               "response_mask": mask, "valid": valid, "scores": raw_scores, "scores_after_clip": after_clip}
    if stages.reuse_rollout:
        rollout["rollout_logp"] = sample.logprobs
        if sample.entropy is not None:
            rollout["rollout_entropy"] = sample.entropy
        if sample.hidden is not None:
            rollout["rollout_hidden"] = sample.hidden
    state, update_metrics = stages.update(state, ref_params, rollout)
    stats = _response_stats(sample.tokens, mask, batch["therapist_emotion"], stages.response_ids, 3)
    per_row = {"objective/scores": raw_scores, **{f"reward/{k}": v for k, v in components.items()},
               **{(f"rollout/{k}_mean" if k == "length" else f"rollout/{k}_rate"): v for k, v in stats.items()}}
    sums, count = jax.device_get(_valid_row_sums_fn(stages.mesh)(per_row, valid))
    update_metrics = jax.device_get(update_metrics)
    t3 = time.perf_counter()
    metrics = {k: float(v) for k, v in update_metrics.items()}
    metrics.update({k: float(v) / max(float(count), 1.0) for k, v in sums.items()})
    metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2,
                    "eps": float(count) / max(t3 - t0, 1e-9)})
    for step_name, seconds in getattr(reward_fn, "last_timing", {}).items():  # the reward's own steps
        metrics[f"time/reward_{step_name}_s"] = seconds
    return IterationResult(state, metrics, sample.tokens)


def evaluate_policy(stages: Stages, trunk_params: Any, ref_params: Any, prompts: Mapping[str, np.ndarray],
                    batch_size: int, rng: jax.Array) -> dict[str, float]:
    """Validation on held-out prompts with a fixed key: mean raw reward, components, KL to the reference,
    response statistics (`eval/...`), over every real prompt row (each process holds its rows of each batch)."""
    from therapy_rl import parallel
    from therapy_rl.data import batches

    sums: dict[str, float] = {}
    count = 0.0
    for index, host_batch in enumerate(batches.eval_batches(prompts, batch_size)):
        batch = parallel.global_batch_from_host(host_batch, stages.mesh)
        sample = stages.generate(trunk_params, batch["prompt_ids"], batch["prompt_mask"],
                                 jax.random.fold_in(rng, index))
        valid = batch["valid"]
        mask = sample.response_mask * (valid[:, None] != 0).astype(sample.response_mask.dtype)
        raw, _, comps = _score_reward(stages, batch, sample.tokens, mask)
        kl = stages.sequence_kl(trunk_params, ref_params,
                                {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
                                 "tokens": sample.tokens, "response_mask": mask})
        stats = _response_stats(sample.tokens, mask, batch["therapist_emotion"], stages.response_ids, 3)
        per_row = {"scores": raw, "kl": kl, **{f"reward/{k}": v for k, v in comps.items()},
                   **{(f"{k}_mean" if k == "length" else f"{k}_rate"): v for k, v in stats.items()}}
        batch_sums, batch_count = jax.device_get(_valid_row_sums_fn(stages.mesh)(per_row, valid))
        for key, value in batch_sums.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        count += float(batch_count)
    return {f"eval/{k}": s / max(count, 1.0) for k, s in sums.items()}


# ------------------------------------------------------------------------------------------ the loop


@workdir_lock.locked
def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Runs (or resumes) PPO in `workdir` from the SFT run `config.init_from`, holding the workdir's lock; returns
    the last validation metrics.

    Raises `RunBusyError` when another run holds the workdir, `IncompatibleResumeError` when the config changes a
    field the saved run fixes (before anything is written), `NonFiniteError` at the first iteration whose reward
    scores, loss, gradients or updated parameters hold a NaN or Inf, or whose validation reward does (nothing of
    that iteration is saved).
    """
    from therapy_rl import checkpoint, nonfinite, optim, parallel, replies, run_files
    from therapy_rl import run as run_lib
    from therapy_rl.data import batches, pipeline, tokenize
    from therapy_rl import metrics_writer
    from therapy_rl.models import families, gpt2

    init_run = run_lib.open_run(config.init_from, run_lib.checkpoint_choice(config.init_checkpoint, config.init_step),
                                where="config.init_from")
    model_config = init_run.model_config
    data_cfg = resolve_data_config(config.data, init_run.data)
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.data = data_cfg
    resume = run_files.check_resume(workdir, run_config)  # before anything is written in the workdir

    last_ckpt, best_ckpt = checkpoint.run_checkpointers(workdir, config.keep_checkpoints)
    resuming = last_ckpt.latest_step() is not None
    if resuming:  # the reference is the exact SFT step this run started from
        init = last_ckpt.restore_extras()["init"]
        init_run = run_lib.open_run(init["directory"], int(init["step"]), where="the resumed run's init")
    tok = tokenize.load_tokenizer(init_run.copy_tokenizer(workdir))
    if tok.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer of {init_run.workdir} has {tok.vocab_size} ids but the model only "
                         f"{model_config.vocab_size}")
    run_files.write_run_info(workdir, run_config, model_config, resume)

    splits = pipeline.load_samples(data_cfg, ("train", "val"))
    train = pipeline.encode_split(tok, data_cfg, splits["train"], with_sft=False, name="train")
    val = pipeline.encode_split(tok, data_cfg, splits["val"], with_sft=False, name="val")
    val_prompts = val.prompts
    if config.num_eval_prompts:
        val_prompts = {k: v[:config.num_eval_prompts] for k, v in val_prompts.items()}

    if config.reward.kind in ("human", "learned_human"):  # the rating room's kinds (therapy_rl/rate)
        from therapy_rl.rate import human_reward
        reward_fn = human_reward.build_reward(config.reward, tok, model_config.vocab_size, workdir)
    else:
        reward_fn = reward_protocol.build_reward(config.reward, tok, vocab_size=model_config.vocab_size)
    train_prompts = train.prompts
    if isinstance(reward_fn, reward_protocol.TherapyReward):  # user texts for the reward's relevance/safety parts
        train_prompts = reward_fn.register_prompts(
            train_prompts, [train.samples[i].user_text for i in train_prompts["sample_index"]])
        val_prompts = reward_fn.register_prompts(
            val_prompts, [val.samples[i].user_text for i in val_prompts["sample_index"]])
    elif hasattr(reward_fn, "register_samples"):  # rewards that show or embed each prompt's sample (rate/)
        train_prompts = reward_fn.register_samples(
            train_prompts, [train.samples[i] for i in train_prompts["sample_index"]])
        val_prompts = reward_fn.register_samples(val_prompts, [val.samples[i] for i in val_prompts["sample_index"]])

    mesh = parallel.make_mesh(parallel.mesh_shape_of(config.mesh))
    iterator = batches.BatchIterator(train_prompts, config.global_batch_size, seed=config.seed)
    total_iterations = config.max_iterations or int(math.ceil(config.num_epochs * iterator.steps_per_epoch))
    hyper = hyper_from_config(config.ppo, config.global_batch_size, tok.eos_id)
    optimizer_config = optim.optimizer_config_from(config, total_iterations * hyper.num_epochs * hyper.num_minibatches)
    spec = policy.PolicySpec(model_config, separate_critic=config.ppo.separate_critic, dropout=config.ppo.dropout,
                             value_dropout_rate=config.ppo.value_dropout_rate,
                             logprob_temperature=config.sampling.temperature)
    optimizer = policy.trainable_optimizer(spec, optim.make_optimizer(optimizer_config))
    if config.sampling.greedy:
        raise ValueError("config.sampling.greedy=True: PPO needs sampled rollouts (greedy has no exploration)")
    if config.sampling.top_k or config.sampling.top_p < 1.0:
        print("[ppo] warning: top-k/top-p sampling is off-policy for PPO (its log-probs are the unfiltered "
              "policy's); the paper samples with top_k=0, top_p=1")
    sampling_config = replies.sampling_config_from(config.sampling, tok)

    root_key = jax.random.key(config.seed)
    sft_params = init_run.read_params()
    state, state_shardings, ref_params, ref_shardings = init_state(
        spec, optimizer, hyper.kl, sft_params, mesh, root_key, config.ppo.value_head_init)
    print(f"[ppo] policy {gpt2.count_params(state.params[policy.TRUNK_KEY]) / 1e6:.2f}M params from "
          f"{init_run.label}, mesh {dict(mesh.shape)}, {iterator.steps_per_epoch} iterations/epoch, "
          f"{total_iterations} iterations, reward {config.reward.kind}")

    tracker = checkpoint.BestTracker("max", config.early_stopping_patience_evals)
    if resuming:
        state, extras = last_ckpt.restore(state)
        iterator.set_state(extras["data_iterator"])
        tracker.load_json(extras["best"])
        print(f"[ppo] resumed from iteration {int(state.step)} in {last_ckpt.directory}")

    stages = build_stages(spec, hyper, sampling_config, optimizer, mesh, state_shardings, ref_shardings, reward_fn,
                          reward_protocol.ResponseIds.from_tokenizer(tok), config.global_batch_size,
                          data_cfg.max_prompt_tokens, reuse_rollout=config.ppo.reuse_rollout_logprobs)
    eval_key = jax.random.fold_in(root_key, 3)

    def advice() -> str:
        return nonfinite.advice(last_ckpt, config.learning_rate)

    def validate(step_now: int) -> dict[str, float]:
        metrics = evaluate_policy(stages, state.params[policy.TRUNK_KEY], ref_params, val_prompts,
                                  config.eval_batch_size, eval_key)
        bad = [f"{k} ({v})" for k, v in metrics.items() if not math.isfinite(v)]
        if bad:  # before best/ could take it
            raise nonfinite.error(f"validation {', '.join(bad)}", f"iteration {step_now}", advice())
        if tracker.update(metrics["eval/scores"]):
            best_ckpt.save(step_now, {"params": state.params[policy.TRUNK_KEY]},
                           {"eval/scores": metrics["eval/scores"], "step": step_now})
        metrics["eval/best_scores"] = tracker.best
        return metrics

    def extras():
        return {"data_iterator": iterator.get_state(), "best": tracker.to_json(),
                "init": {"directory": init_run.checkpoint_dir, "step": init_run.step}}

    lr_at = optim.learning_rate_schedule(optimizer_config)
    updates_per_iteration = hyper.num_epochs * hyper.num_minibatches
    iteration = int(state.step)
    if not resuming and jax.process_index() == 0:  # a run killed before its first checkpoint starts over cleanly
        metrics_writer.truncate_metrics(os.path.join(workdir, "metrics.jsonl"), -1)
    logged_config = run_config.to_dict()  # data options resolved against the SFT run
    writer = metrics_writer.MetricsWriter(workdir, total_iterations, initial_step=iteration, description="ppo",
                                          enable_progress_bar=config.progress_bar,
                                          wandb_settings=config.get("wandb"), config=logged_config)
    writer.write_config(logged_config, ("eval/scores",))
    sample_replies = None
    if config.num_sample_replies and val.samples:  # written to TensorBoard at each eval
        sample_replies = replies.SampleReplies(model_config, tok, val, config, config.num_sample_replies)

    def write_sample_replies(step_now: int) -> None:
        if sample_replies is not None:
            texts = sample_replies.generate(state.params[policy.TRUNK_KEY])
            writer.write_texts(step_now, {"sample_replies": sample_replies.markdown(texts)})
    eval_metrics: dict[str, float] = {}
    try:
        if iteration == 0 and config.eval_at_start:  # the SFT policy's validation reward: the baseline to beat
            eval_metrics = validate(0)
            writer.write(0, eval_metrics)
            write_sample_replies(0)
        stop = tracker.should_stop
        while iteration < total_iterations and not stop:
            result = run_iteration(stages, state, ref_params, parallel.global_batch_from_host(next(iterator), mesh))
            state = result.state
            iteration += 1
            bad = int(result.metrics.pop(nonfinite.KEY))  # run_iteration already read the metrics: no extra sync
            if bad:
                raise nonfinite.error(nonfinite.describe(bad, ppo_step.GUARDED), f"iteration {iteration}", advice())
            last = iteration == total_iterations
            if iteration % config.log_every_iterations == 0 or last:
                metrics = dict(result.metrics)
                metrics.update({"episode": iteration * config.global_batch_size,
                                "lr": float(lr_at((iteration - 1) * updates_per_iteration)),
                                "epoch": iteration / iterator.steps_per_epoch})
                writer.write(iteration, metrics)
                writer.advance(0, {"score": metrics["objective/scores"], "kl": metrics["objective/kl"]})
            writer.advance(1)
            if iteration % config.eval_every_iterations == 0 or last:
                eval_metrics = validate(iteration)
                stop = tracker.should_stop
                writer.write(iteration, eval_metrics)
                write_sample_replies(iteration)
            if iteration % config.checkpoint_every_iterations == 0 or last or stop:
                last_ckpt.save(iteration, state, extras())
    finally:
        writer.close()
    if stop and iteration < total_iterations:
        print(f"[ppo] early stop at iteration {iteration}: no eval/scores improvement in "
              f"{tracker.patience_evals} evals")
    if eval_metrics:
        print(f"[ppo] iteration {iteration}: eval/scores {eval_metrics['eval/scores']:.4f} "
              f"(best {tracker.best:.4f}), eval/kl {eval_metrics['eval/kl']:.3f}; run in {workdir}")
    if sample_replies is not None:
        sample_replies.print_replies(state.params[policy.TRUNK_KEY])
    return eval_metrics
