"""One PPO iteration (rollout + reward + update) of therapy_rl against TRL's PPOTrainer, same shapes and reward.

    python bench/ppo_iter.py --preset small --iterations 2            # both frameworks
    python bench/ppo_iter.py --preset gpt2 --framework jax             # only ours
    python bench/ppo_iter.py --preset gpt2 --isolate                   # each framework's round in a fresh process

Both sides get the same random GPT-2 weights (built locally, saved as safetensors and loaded by each side),
the same prompts (batch 16, left-padded, 64 slots), 128 sampled new tokens (temperature 1, no top-k/top-p, no EOS
stop, so every response has the full length and both sides do the same work), the same toy reward (share of a
target token in the response) and the paper's PPO settings: mini-batch 16, 4 PPO epochs, lr 1e-6, clip 0.2,
vf_coef 0.1, gamma 1, lambda 0.95. TRL 1.12's `trl.experimental.ppo.PPOTrainer` always has a separate value
model, so ours runs with a separate critic trunk too (`jax`); `jax-shared` is ours with the value head on the
policy trunk (the paper's TRL 0.11 set-up), reported for reference.

Wall and process CPU time are both reported (the CPU time is less sensitive to other jobs on a shared machine).
Time split: rollout = generation; reward = the reward function; update = everything else of the iteration
(reference/value/old log-prob forwards, GAE, the PPO epochs). The first iteration of each side is a warm-up
(XLA compilation for ours) and is reported separately; the steady-state numbers are the median of the rest.
`--isolate` runs each framework's round in its own fresh process (same environment, e.g. the same allocator), so
no memory, thread pool or allocator state carries over from one side to the other.
Needs `pip install trl==1.12.0` (the bench environment); runs offline on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

PRESETS = {
    "tiny": dict(vocab_size=1024, n_embd=128, n_layer=2, n_head=4),
    "small": dict(vocab_size=8000, n_embd=256, n_layer=4, n_head=4),
    "gpt2": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12),
}
BATCH, PROMPT, NEW, EPOCHS, TARGET, PAD = 16, 64, 128, 4, 7, 0


def make_prompts(seed: int, vocab: int, batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [B, PROMPT] of 32..64 real tokens, ids 2.. (never PAD)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(PROMPT // 2, PROMPT + 1, size=batch)
    mask = (np.arange(PROMPT)[None] >= PROMPT - lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(2, vocab, size=(batch, PROMPT)), PAD).astype(np.int32)
    return ids, mask


def build_checkpoint(preset: str, out_dir: str, seed: int = 0) -> None:
    """A random GPT-2 of the preset's shape saved as HF safetensors (torch init)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    shape = PRESETS[preset]
    config = GPT2Config(n_positions=PROMPT + NEW, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    GPT2LMHeadModel(config).save_pretrained(out_dir, safe_serialization=True)


# ---------------------------------------------------------------------------------------------------- ours


def make_jax_iteration(model_dir: str, separate_critic: bool, dtype: str = "float32"):
    """(iterate, info): `iterate()` runs one blocking PPO iteration of ours on the next prompts and returns the row
    the bench records; info has the trunk's parameter count and the tokens per iteration."""
    import jax

    from therapy_rl import optim, parallel, sampling
    from therapy_rl.models import gpt2, hf_io
    from therapy_rl.ppo import core, policy, step as ppo_step, trainer
    from therapy_rl.rewards import protocol as reward_protocol
    from therapy_rl.rewards import simple as simple_rewards

    model_config, params = hf_io.load_hf_gpt2(model_dir)
    model_config = model_config.replace(dropout_rate=0.0, dtype=dtype)
    mesh = parallel.make_mesh(parallel.MeshShape(-1, 1, 1))
    spec = policy.PolicySpec(model_config, separate_critic=separate_critic)
    hyper = ppo_step.PPOHyper(kl=core.KLControllerConfig(init_coef=0.2), num_epochs=EPOCHS, num_minibatches=1,
                              eos_id=-1)
    optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-6, total_steps=1000, schedule="constant",
                                                           grad_clip_norm=0.0))
    state, state_sh, ref, ref_sh = trainer.init_state(spec, optimizer, hyper.kl, params, mesh, jax.random.key(0))
    sampling_config = sampling.SamplingConfig(max_new_tokens=NEW, eos_id=None, pad_id=PAD)
    stages = trainer.build_stages(spec, hyper, sampling_config, optimizer, mesh, state_sh, ref_sh,
                                  simple_rewards.TargetTokenReward(TARGET), reward_protocol.ResponseIds(eos_id=-1),
                                  BATCH, PROMPT)
    holder = {"state": state, "iteration": 0}

    def iterate() -> dict:
        ids, mask = make_prompts(100 + holder["iteration"], model_config.vocab_size)
        holder["iteration"] += 1
        batch = parallel.global_batch_from_host(
            {"prompt_ids": ids, "prompt_mask": mask, "therapist_emotion": np.zeros(BATCH, np.int32),
             "valid": np.ones(BATCH, np.int32)}, mesh)
        t, cpu = time.perf_counter(), time.process_time()
        result = trainer.run_iteration(stages, holder["state"], ref, batch)
        total, cpu = time.perf_counter() - t, time.process_time() - cpu
        holder["state"] = result.state
        m = result.metrics
        return {"total_s": total, "cpu_s": cpu, "rollout_s": m["time/rollout_s"], "reward_s": m["time/reward_s"],
                "update_s": m["time/update_s"], "score": m["objective/scores"]}

    return iterate, {"num_params": gpt2.count_params(params), "tokens": BATCH * (PROMPT + NEW), "config": model_config}


def bench_jax(model_dir: str, iterations: int, separate_critic: bool, dtype: str = "float32") -> dict:
    iterate, _ = make_jax_iteration(model_dir, separate_critic, dtype)
    return summarise([iterate() for _ in range(iterations + 1)])


# ---------------------------------------------------------------------------------------------------- TRL


def bench_trl(model_dir: str, iterations: int, dtype: str = "float32") -> dict:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import (GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast,
                              TrainerCallback)
    from transformers.utils import ModelOutput
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    policy_model = GPT2LMHeadModel.from_pretrained(model_dir)
    ref_model = GPT2LMHeadModel.from_pretrained(model_dir)
    value_model = GPT2ForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    vocab = policy_model.config.vocab_size
    word_vocab = {"<pad>": PAD, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(word_vocab, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<eos>", padding_side="left")

    timings = {"rollout": 0.0, "reward": 0.0}

    class ShareBackbone(torch.nn.Module):
        """hidden[b, t] = share of TARGET among the response tokens up to t (a token-id reward, no weights)."""

        def __init__(self, context_length):
            super().__init__()
            self.context_length = context_length

        def forward(self, input_ids, attention_mask, **_):
            t0 = time.perf_counter()
            response = (torch.arange(input_ids.shape[1]) >= self.context_length)[None] & attention_mask.bool()
            hits = torch.cumsum(((input_ids == TARGET) & response).float(), 1)
            share = hits / torch.cumsum(response.float(), 1).clamp(min=1)
            timings["reward"] += time.perf_counter() - t0
            return ModelOutput(hidden_states=(share[..., None],))

    class ShareReward(torch.nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = ShareBackbone(PROMPT)
            self.score = torch.nn.Identity()

    original_generation = trl_ppo.batch_generation

    def timed_generation(*args, **kwargs):
        t0 = time.perf_counter()
        out = original_generation(*args, **kwargs)
        timings["rollout"] += time.perf_counter() - t0
        return out

    trl_ppo.batch_generation = timed_generation
    rows, marks = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), time.process_time(), dict(timings)))

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu, before = time.perf_counter(), time.process_time(), marks[-1]
            total = now - before[0]
            rollout = timings["rollout"] - before[2]["rollout"]
            reward = timings["reward"] - before[2]["reward"]
            rows.append({"total_s": total, "cpu_s": cpu - before[1], "rollout_s": rollout, "reward_s": reward,
                         "update_s": total - rollout - reward})
            marks.append((time.perf_counter(), time.process_time(), dict(timings)))

    prompts = []
    for it in range(iterations + 1):
        ids, mask = make_prompts(100 + it, vocab)
        prompts += [row[m == 1].tolist() for row, m in zip(ids, mask)]
    dataset = Dataset.from_dict({"input_ids": prompts})
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                         num_mini_batches=1, num_ppo_epochs=EPOCHS, learning_rate=1e-6, response_length=NEW,
                         temperature=1.0, kl_coef=0.2, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0,
                         lam=0.95, total_episodes=BATCH * (iterations + 1), local_rollout_forward_batch_size=BATCH,
                         stop_token=None, num_sample_generations=0, report_to=[], save_strategy="no",
                         logging_steps=1, use_cpu=True, bf16=dtype == "bfloat16", seed=0, disable_tqdm=True)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy_model, ref_model=ref_model,
                             reward_model=ShareReward(), train_dataset=dataset, value_model=value_model,
                             eval_dataset=dataset, callbacks=[Clock()])
        trainer.dataloader = torch.utils.data.DataLoader(  # in order, so both sides see the same prompts
            dataset, batch_size=BATCH, shuffle=False, collate_fn=trainer.data_collator, drop_last=True)
        trainer.train()
    trl_ppo.batch_generation = original_generation
    return summarise(rows)


def run_framework(name: str, model_dir: str, iterations: int, dtype: str) -> dict:
    if name == "trl":
        return bench_trl(model_dir, iterations, dtype)
    return bench_jax(model_dir, iterations, separate_critic=(name == "jax"), dtype=dtype)


def run_framework_isolated(name: str, model_dir: str, iterations: int, dtype: str) -> dict:
    """`run_framework` in a fresh spawned process (it inherits the environment, not the memory)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_framework, (name, model_dir, iterations, dtype))


def summarise(rows: list[dict]) -> dict:
    steady = rows[1:] or rows
    out = {"warmup_total_s": rows[0]["total_s"], "iterations_timed": len(steady)}
    for key in ("total_s", "cpu_s", "rollout_s", "reward_s", "update_s"):
        out[key] = statistics.median(r[key] for r in steady)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations after one warm-up")
    parser.add_argument("--framework", choices=("both", "jax", "jax-shared", "trl", "all"), default="both")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="ours: model.dtype (bf16 matmuls, f32 accumulation and weights); TRL: bf16=True (autocast)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the frameworks in turn this many times (alternating); medians over the rounds")
    parser.add_argument("--isolate", action="store_true", help="each framework's round in its own fresh process")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    results = {"preset": args.preset, "shape": PRESETS[args.preset], "batch": BATCH, "prompt": PROMPT,
               "new_tokens": NEW, "ppo_epochs": EPOCHS, "dtype": args.dtype, "load_average_start": os.getloadavg(),
               "cpu_count": os.cpu_count(), "isolated": args.isolate,
               "allocator": {k: os.environ.get(k, "") for k in ("LD_PRELOAD", "MALLOC_CONF")}}
    with tempfile.TemporaryDirectory() as model_dir:
        build_checkpoint(args.preset, model_dir)
        todo = {"both": ("jax", "trl"), "all": ("jax", "jax-shared", "trl")}.get(args.framework, (args.framework,))
        runs = {name: [] for name in todo}
        for round_index in range(args.rounds):
            for name in todo:
                run = run_framework_isolated if args.isolate else run_framework
                runs[name].append(run(name, model_dir, args.iterations, args.dtype))
                print(f"round {round_index + 1} {name}: {json.dumps(runs[name][-1])} (load {os.getloadavg()})",
                      flush=True)
        for name, rows in runs.items():
            results[name] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
            results[name]["rounds"] = rows
    results["load_average_end"] = os.getloadavg()
    if "jax" in results and "trl" in results:
        results["speedup_total"] = results["trl"]["total_s"] / results["jax"]["total_s"]
        results["speedup_cpu"] = results["trl"]["cpu_s"] / results["jax"]["cpu_s"]
        print(f"speed-up of one iteration (TRL / ours): {results['speedup_total']:.2f}x wall, "
              f"{results['speedup_cpu']:.2f}x CPU time")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
