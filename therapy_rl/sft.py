"""Supervised fine-tuning: masked LM loss, the jitted train/eval steps, and the SFT loop."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from therapy_rl import nonfinite, ops, optim, workdir_lock
from therapy_rl.models import families, gpt2

# What the step's `nonfinite.KEY` bitmask watches, bit by bit.
GUARDED = ("training loss", "gradient norm", "parameter norm after the update")


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``rng`` is raw key data so orbax can save it; per-step keys are
    ``fold_in(rng, step)``, so a resumed run draws the same keys."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def masked_lm_sums(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> dict[str, jax.Array]:
    """Summed next-token NLL, target count and correct count over supervised targets.

    ``loss_mask[b, t] = 1`` marks token ``t`` as a target, predicted from position ``t - 1``. Sums (not means)
    are returned so micro-batches and devices can be aggregated before dividing. ``logits`` are [B, T, V];
    the train and eval steps compute only the logits they need (`_lm_sums`).
    """
    return token_sums(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def token_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """NLL, weight and correct-prediction sums of ``logits [..., V]`` against ``targets [...]``, weighted."""
    weights = weights.astype(jnp.float32)
    stats = ops.softmax_token_stats(logits.astype(jnp.float32), targets)
    return {
        "nll_sum": jnp.sum(stats.nll * weights),
        "target_count": jnp.sum(weights),
        "correct_count": jnp.sum(stats.correct * weights),
    }


def _lm_sums(model, params, batch, deterministic: bool, dropout_key) -> dict[str, jax.Array]:
    """`masked_lm_sums` of the model on ``batch``, computing only the logits that predict a token.

    The tied LM head is applied to the hidden states of positions 0 .. T-2 flattened to [B * (T-1), D]:
    the [B, T, V] logits are never sliced (a copy), and with 2-D operands XLA:CPU computes the embedding
    gradient without a transposed copy of the [N, V] logit gradient.
    """
    rngs = None if deterministic else {"dropout": dropout_key}
    out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      deterministic=deterministic, rngs=rngs, compute_logits=False)
    hidden = out.hidden_states[:, :-1].reshape(-1, out.hidden_states.shape[-1])  # [B * (T-1), D]
    logits = families.lm_logits(params, hidden, model.config)
    sums = token_sums(logits, batch["input_ids"][:, 1:].reshape(-1), batch["loss_mask"][:, 1:].reshape(-1))
    if getattr(out, "aux_loss", None) is not None:  # MoE load balancing, token-weighted across micro-batches
        sums["aux_sum"] = out.aux_loss * sums["target_count"]
    return sums


def make_train_step(model, optimizer: optax.GradientTransformation, grad_accum_steps: int = 1,
                    dropout: bool = True) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``.

    With ``grad_accum_steps = k`` the batch is split into k micro-batches scanned in order; summed gradients
    are divided by the total target count, so the update equals the one of the whole batch. ``metrics`` holds
    `nonfinite.KEY`, the bitmask of GUARDED quantities that are NaN or Inf (a parameter norm overflows once
    weights pass ~1e19, so it also catches an update that blew them up without an Inf yet).
    """

    def loss_fn(params, micro_batch, key):
        sums = _lm_sums(model, params, micro_batch, not dropout, key)
        if "aux_sum" in sums:
            return sums["nll_sum"] + families.aux_loss_coef(model.config) * sums["aux_sum"], sums
        return sums["nll_sum"], sums

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if grad_accum_steps == 1:  # dropout keys: the step's key, or fold_in(step key, i) for micro-batch i
            keys = step_key[None]
        else:
            keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(grad_accum_steps))
        _, grads, sums = ops.accumulate_gradients(loss_fn, state.params, batch, grad_accum_steps, keys,
                                                  families.trainable_mask(model.config, state.params))
        denominator = jnp.maximum(sums["target_count"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm, param_norm = sums["nll_sum"] / denominator, optax.tree.norm(grads), optax.tree.norm(params)
        metrics = {
            "train/loss": loss,
            "train/token_accuracy": sums["correct_count"] / denominator,
            "train/target_tokens": sums["target_count"],
            "train/grad_norm": grad_norm,
            "train/param_norm": param_norm,
            nonfinite.KEY: nonfinite.code(loss, grad_norm, param_norm),
        }
        if "aux_sum" in sums:
            metrics["train/aux_loss"] = sums["aux_sum"] / denominator
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model) -> Callable:
    """``eval_step(params, batch) -> sums`` (deterministic, no dropout)."""

    def eval_step(params, batch):
        return _lm_sums(model, params, batch, True, None)

    return eval_step


def create_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def evaluate_loss(eval_step_fn: Callable, params: Any, batches) -> dict[str, float]:
    """Mean validation loss and token accuracy over every supervised token of the split."""
    totals = {"nll_sum": 0.0, "target_count": 0.0, "correct_count": 0.0}
    for batch in batches:
        sums = jax.device_get(eval_step_fn(params, batch))
        for key in totals:
            totals[key] += float(sums[key])
    count = max(totals["target_count"], 1.0)
    return {"val/loss": totals["nll_sum"] / count, "val/token_accuracy": totals["correct_count"] / count,
            "val/perplexity": float(np.exp(min(totals["nll_sum"] / count, 50.0)))}


def state_shardings(abstract_state: TrainState, mesh, rules) -> TrainState:
    """Shardings of a train state: params and optimizer moments by ``rules``; step and key replicated."""
    from therapy_rl import parallel

    return parallel.named_shardings(abstract_state, rules, mesh)


def init_train_state(params_or_fn, optimizer: optax.GradientTransformation, seed: int, mesh, rules):
    """A train state born sharded: jit with ``out_shardings`` from the state's abstract shapes.

    ``params_or_fn`` is a params pytree (e.g. loaded from HF) or a function of a key that initialises them.
    Returns (state, state_shardings).
    """
    if callable(params_or_fn):
        key = jax.random.key(seed)
        make = lambda k: create_train_state(params_or_fn(k), optimizer, seed)  # noqa: E731
        shardings = state_shardings(jax.eval_shape(make, key), mesh, rules)
        return jax.jit(make, out_shardings=shardings)(key), shardings
    make = lambda p: create_train_state(p, optimizer, seed)  # noqa: E731
    shardings = state_shardings(jax.eval_shape(make, params_or_fn), mesh, rules)
    return jax.jit(make, out_shardings=shardings)(params_or_fn), shardings


def jit_train_step(train_step: Callable, mesh, shardings: TrainState, batch_example: dict) -> Callable:
    """The train step jitted with explicit in/out shardings and a donated state."""
    from therapy_rl import parallel

    batch_sh = parallel.batch_shardings_like(batch_example, mesh)
    return jax.jit(train_step, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_step: Callable, mesh, params_shardings, batch_example: dict) -> Callable:
    from therapy_rl import parallel

    batch_sh = parallel.batch_shardings_like(batch_example, mesh)
    return jax.jit(eval_step, in_shardings=(params_shardings, batch_sh), out_shardings=parallel.replicated(mesh))


# ----------------------------------------------------------------------------------------------- the SFT loop


@workdir_lock.locked
def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Runs (or resumes) SFT in ``workdir``, holding its lock; returns the final validation metrics.

    Raises `RunBusyError` when another run holds the workdir, `IncompatibleResumeError` when the config changes a
    field the saved run fixes (before anything is written), `NonFiniteError` at the first step whose loss,
    gradients or updated parameters hold a NaN or Inf (nothing of that step is saved).
    """
    import math
    import os

    from therapy_rl import checkpoint, parallel, run_files
    from therapy_rl.data import batches, pipeline
    from therapy_rl.metrics_writer import MetricsWriter
    from therapy_rl.models import build, gpt2

    resume = run_files.check_resume(workdir, config)  # first: a refused resume leaves the workdir untouched
    no_val_ok = bool(config.data.get("allow_empty_validation", False))  # else an empty val split is an error
    splits = pipeline.load_samples(config.data, ("train", "val", "test"), allow_empty_validation=no_val_ok)
    tok = pipeline.build_tokenizer(config.tokenizer, config.model, config.data, splits["train"], workdir)
    train = pipeline.encode_split(tok, config.data, splits["train"], with_prompts=False, name="train")
    val = pipeline.encode_split(tok, config.data, splits["val"], name="val", allow_empty=no_val_ok)
    validating = bool(val.samples)  # False: no val/loss, no best/
    model_config = build.model_config_from(config.model, tok.vocab_size)
    run_files.write_run_info(workdir, config, model_config, resume)

    mesh = parallel.make_mesh(parallel.mesh_shape_of(config.mesh))
    iterator = batches.BatchIterator(train.sft, config.global_batch_size, seed=config.seed)
    total_steps = config.max_steps or int(math.ceil(config.num_epochs * iterator.steps_per_epoch))
    optimizer = families.trainable_optimizer(  # with LoRA: the adapters only
        model_config, optim.make_optimizer(optim.optimizer_config_from(config, total_steps)))
    model = families.module(model_config)
    state, shardings = init_train_state(build.initial_params(config.model, model_config, config.seed, mesh),
                                        optimizer, config.seed, mesh, families.partition_rules(model_config))
    print(f"[sft] model {gpt2.count_params(state.params) / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
          f"{iterator.steps_per_epoch} steps/epoch, {total_steps} steps")

    last_ckpt, best_ckpt = checkpoint.run_checkpointers(workdir, config.keep_checkpoints)
    tracker = checkpoint.BestTracker("min", config.early_stopping_patience_evals)
    if last_ckpt.latest_step() is not None:
        state, extras = last_ckpt.restore(state)
        iterator.set_state(extras["data_iterator"])
        tracker.load_json(extras["best"])
        print(f"[sft] resumed from step {int(state.step)} in {last_ckpt.directory}")

    batch_example = next(iter(batches.eval_batches(train.sft, iterator.local_batch_size)))
    train_step = jit_train_step(make_train_step(model, optimizer, config.grad_accum_steps,
                                                dropout=model_config.dropout_rate > 0), mesh, shardings, batch_example)
    eval_step = jit_eval_step(make_eval_step(model), mesh, shardings.params, batch_example)

    def validation_metrics():
        eval_iter = (parallel.global_batch_from_host(b, mesh) for b in batches.eval_batches(val.sft, config.eval_batch_size))
        return evaluate_loss(eval_step, state.params, eval_iter)

    step = int(state.step)
    logged_config = config.to_dict()
    writer = MetricsWriter(workdir, total_steps, initial_step=step, description="sft",
                           enable_progress_bar=config.progress_bar, wandb_settings=config.get("wandb"),
                           config=logged_config)
    writer.write_config(logged_config, ("val/loss",))
    sample_replies = None
    if config.num_sample_replies and validating:  # written to TensorBoard at each eval
        from therapy_rl import replies

        sample_replies = replies.SampleReplies(model_config, tok, val, config, config.num_sample_replies)
    lr_at = optim.learning_rate_schedule(optim.optimizer_config_from(config, total_steps))
    val_metrics: dict[str, float] = {}
    stop = tracker.should_stop
    guard = nonfinite.StepGuard(GUARDED, lambda: nonfinite.advice(last_ckpt, config.learning_rate))
    try:
        while step < total_steps and not stop:
            state, metrics = train_step(state, parallel.global_batch_from_host(next(iterator), mesh))
            step += 1
            guard.push(step, metrics.pop(nonfinite.KEY))  # reads the previous step's flag: dispatch stays async
            last = step == total_steps
            if last or not (step % config.log_every_steps and step % config.eval_every_steps
                            and step % config.checkpoint_every_steps):
                guard.flush()  # this step's flag, before its metrics, eval or checkpoint are used
            if step % config.log_every_steps == 0 or last:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                metrics.update({"train/learning_rate": float(lr_at(step - 1)),
                                "train/epoch": step / iterator.steps_per_epoch})
                writer.write(step, metrics)
                writer.advance(0, {"loss": metrics["train/loss"]})
            writer.advance(1)
            if validating and (step % config.eval_every_steps == 0 or last):
                val_metrics = validation_metrics()
                if not math.isfinite(val_metrics["val/loss"]):  # checked before best/ could take it
                    raise nonfinite.error(f"validation loss ({val_metrics['val/loss']})", f"step {step}",
                                          nonfinite.advice(last_ckpt, config.learning_rate))
                if tracker.update(val_metrics["val/loss"]):
                    best_ckpt.save(step, {"params": state.params}, {"val/loss": val_metrics["val/loss"]})
                stop = tracker.should_stop
                writer.write(step, {**val_metrics, "val/best_loss": tracker.best})
                if sample_replies is not None:
                    texts = sample_replies.generate(state.params)
                    writer.write_texts(step, {"sample_replies": sample_replies.markdown(texts)})
            if step % config.checkpoint_every_steps == 0 or last or stop:
                last_ckpt.save(step, state, {"data_iterator": iterator.get_state(), "best": tracker.to_json()})
    finally:
        writer.close()
    if stop and step < total_steps:
        print(f"[sft] early stop at step {step}: no val/loss improvement in {tracker.patience_evals} evals")
    if not val_metrics and validating:
        val_metrics = validation_metrics()
    if validating:
        print(f"[sft] step {step}: val/loss {val_metrics['val/loss']:.4f} (best {tracker.best:.4f}), "
              f"checkpoints in {workdir}")
    else:
        print(f"[sft] step {step}: no validation split, so no best/; checkpoints in {workdir}")
    if sample_replies is not None:
        best_params = best_ckpt.restore({"params": state.params})[0]["params"]
        sample_replies.print_replies(best_params, title=f"[sft] replies of the best checkpoint (step "
                                                f"{best_ckpt.latest_step()}) for validation prompts:")
    if config.export_hf and jax.process_index() == 0:
        from therapy_rl import export

        export.export_run(workdir, os.path.join(workdir, "hf_export"), "best" if validating else "last",
                          overwrite=True)
    return val_metrics
