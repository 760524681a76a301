"""SFT train-step throughput: our jitted step against HF PyTorch, in the same run, plus MFU.

Ours: ``sft.make_train_step`` with ``optim.make_optimizer`` (AdamW + warm-up/decay + global-norm clipping),
state created by ``sft.init_train_state`` and jitted by ``sft.jit_train_step`` on a 1-device mesh, i.e. the
exact functions the SFT loop runs. Torch: ``transformers.GPT2LMHeadModel`` (same config, train mode, so the
same dropout) + ``torch.optim.AdamW`` + ``clip_grad_norm_`` + the same masked next-token loss and token
accuracy. Both see the same batches (right-padded rows, loss on the later part of each row).

Timing: compile and warm-up steps are excluded from the step timings (compile time is printed apart); the
timed steps of the two frameworks alternate, round by round, with square-matmul peak measurements of both
frameworks in every round, so a change of machine load hits all of them alike. Step times are medians;
the peaks are the best sample. MFU = flops_per_token(config, seq_len) x tokens/s / matmul peak.

On a machine shared with other jobs the wall-clock numbers depend on the share of the CPU each call got,
so the process CPU time of every step and matmul is reported too: "GFLOP per CPU-second" and an MFU by
CPU time (step FLOP per CPU-second over the matmul's FLOP per CPU-second), which are steadier under load.

    python bench/sft_step.py --small              # quick smoke run (tiny shape)
    python bench/sft_step.py                      # GPT-2 small (124M), B=8, T=128, float32
    python bench/sft_step.py --dtype bfloat16     # bf16 compute (torch: autocast), bf16 matmul peak
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py, next to this file)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default 8; 4 with --small)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 128; 64 with --small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per framework (default 5; 3 with --small)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per framework after compilation")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout rate of both models (GPT-2's 0.1)")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul for the peak")
    p.add_argument("--torch-adamw", choices=("default", "foreach", "fused"), default="fused",
                   help="torch.optim.AdamW implementation (fused: the least CPU time measured here)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (profiling only)")
    p.add_argument("--no-torch", action="store_true", help="time only our step (profiling)")
    p.add_argument("--small", action="store_true", help="tiny model and batch, for a quick smoke run")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    defaults = {"batch_size": (8, 4), "seq_len": (128, 64), "steps": (5, 3)}  # (full, --small)
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0 or (args.layers is not None and args.layers <= 0):
        p.error("--warmup must be >= 0 and --layers > 0")
    if args.seq_len < 2:
        p.error("--seq-len must be at least 2 (one input and one target token)")
    return args


def model_config(args):
    from therapy_rl.models import gpt2

    if args.small:
        config = gpt2.GPT2Config(vocab_size=2048, n_positions=max(128, args.seq_len), n_embd=128, n_layer=2,
                                 n_head=4, dropout_rate=args.dropout, dtype=args.dtype)
    else:
        config = gpt2.GPT2Config.gpt2_small(n_positions=max(1024, args.seq_len), dropout_rate=args.dropout,
                                            dtype=args.dtype)
    return config.replace(n_layer=args.layers) if args.layers else config


def make_batches(num: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """SFT batches in the contract's layout: right-padded rows of random length in [T/2, T], the loss on the
    tokens after the first quarter of each row (a prompt)."""
    rng = np.random.default_rng(seed)
    positions = np.arange(seq_len)[None]
    out = []
    for _ in range(num):
        ids = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int32)
        lengths = rng.integers(seq_len // 2, seq_len + 1, size=(batch_size, 1))
        attention = (positions < lengths).astype(np.int32)
        loss_mask = (attention * (positions >= seq_len // 4)).astype(np.float32)
        out.append({"input_ids": ids * attention, "attention_mask": attention, "loss_mask": loss_mask})
    return out


def optimizer_config(total_steps: int = 1000):
    """The paper's SFT optimiser: AdamW 2e-5, 10% linear warm-up then linear decay, clip 1.0, no decay."""
    from therapy_rl import optim

    return optim.OptimizerConfig(learning_rate=2e-5, warmup_steps=total_steps // 10, total_steps=total_steps,
                                 schedule="linear", weight_decay=0.0, grad_clip_norm=1.0)


class OursStep:
    """Our jitted SFT step on a 1-device mesh; ``__call__`` runs one step and blocks."""

    def __init__(self, config, batches: list[dict], seed: int = 0):
        import jax

        from therapy_rl import optim, parallel, sft
        from therapy_rl.models import gpt2

        self.jax = jax
        model = gpt2.GPT2LMHeadModel(config)
        optimizer = optim.make_optimizer(optimizer_config())
        mesh = parallel.make_mesh(parallel.MeshShape(1, 1, 1), jax.devices()[:1])
        self.state, shardings = sft.init_train_state(lambda k: gpt2.init_params(config, k), optimizer, seed,
                                                     mesh, parallel.GPT2_PARTITION_RULES)
        jax.block_until_ready(self.state)
        self.num_params = gpt2.count_params(self.state.params)
        step = sft.jit_train_step(sft.make_train_step(model, optimizer, dropout=config.dropout_rate > 0),
                                  mesh, shardings, batches[0])
        self.batches = [parallel.global_batch_from_host(b, mesh) for b in batches]
        self.compiled, self.compile_seconds = common.timed(lambda: step.lower(self.state, self.batches[0]).compile())
        self.calls = 0
        self.last_metrics = None

    def __call__(self) -> None:
        batch = self.batches[self.calls % len(self.batches)]
        self.state, self.last_metrics = self.compiled(self.state, batch)
        self.jax.block_until_ready((self.state, self.last_metrics))
        self.calls += 1

    def loss(self) -> float:
        return float(self.last_metrics["train/loss"])


class TorchStep:
    """HF ``GPT2LMHeadModel`` + ``torch.optim.AdamW`` + ``clip_grad_norm_`` with the same loss and schedule."""

    def __init__(self, config, batches: list[dict], adamw_impl: str, seed: int = 0):
        import torch
        import transformers

        torch.manual_seed(seed)
        last_id = config.vocab_size - 1  # HF's default bos/eos 50256 lies outside a small vocabulary
        hf_config = transformers.GPT2Config(**config.to_hf_dict(bos_token_id=last_id, eos_token_id=last_id))
        hf_config._attn_implementation = "sdpa"
        self.torch = torch
        self.model = transformers.GPT2LMHeadModel(hf_config).train()
        opt = optimizer_config()
        kwargs = {"foreach": adamw_impl == "foreach", "fused": adamw_impl == "fused"} if adamw_impl != "default" else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2),
                                           eps=opt.eps, weight_decay=opt.weight_decay, **kwargs)

        def lr_factor(step: int) -> float:  # the same warm-up + linear decay as optim.learning_rate_schedule
            if step < opt.warmup_steps:
                return step / max(opt.warmup_steps, 1)
            decay_steps = max(opt.total_steps - opt.warmup_steps, 1)
            return max(0.0, 1.0 - (step - opt.warmup_steps) / decay_steps)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.clip = opt.grad_clip_norm
        self.autocast = config.dtype == "bfloat16"
        self.batches = [{k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
                         for k, v in b.items()} for b in batches]
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.calls = 0
        self.last_loss = math.nan

    def __call__(self) -> None:
        torch = self.torch
        batch = self.batches[self.calls % len(self.batches)]
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        weights = batch["loss_mask"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="none")
        count = weights.sum().clamp_min(1.0)
        loss = (nll * weights.reshape(-1)).sum() / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():  # token accuracy, as our step reports it
            self.last_accuracy = float(((logits.argmax(-1) == targets).float() * weights).sum() / count)
        self.last_loss = float(loss.detach())
        self.calls += 1

    def loss(self) -> float:
        return self.last_loss


def _summary(name: str, walls: list[float], cpus: list[float], tokens: int, flops_token: float) -> dict:
    wall, cpu = common.median(walls), common.median(cpus)
    out = {"step_s": walls, "step_cpu_s": cpus, "tokens_per_s": tokens / wall, "flops_per_s": tokens * flops_token / wall,
           "tokens_per_cpu_s": tokens / cpu, "flops_per_cpu_s": tokens * flops_token / cpu}
    print(f"[{name:5s}] median {wall:.3f} s/step (min {min(walls):.3f}), {out['tokens_per_s']:.1f} tokens/s, "
          f"{out['flops_per_s'] / 1e9:.1f} GFLOP/s; CPU time {cpu:.3f} s/step, "
          f"{out['flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU-second")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    import jax

    from therapy_rl.models import gpt2

    config = model_config(args)
    tokens_per_step = args.batch_size * args.seq_len
    flops_token = gpt2.flops_per_token(config, args.seq_len)
    batches = make_batches(4, args.batch_size, args.seq_len, config.vocab_size)
    started = datetime.datetime.now().astimezone()
    print(f"[bench] {started:%Y-%m-%d %H:%M %Z}; {common.machine_summary()}")
    print(f"[bench] jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    ours = OursStep(config, batches)
    print(f"[bench] model {config.n_layer} layers, D={config.n_embd}, H={config.n_head}, V={config.vocab_size}: "
          f"{ours.num_params / 1e6:.2f}M params; B={args.batch_size} T={args.seq_len} ({tokens_per_step} tokens/step), "
          f"{args.dtype}, dropout {args.dropout}; {flops_token / 1e6:.1f} MFLOP/token")
    print(f"[ours ] compile {ours.compile_seconds:.1f} s")
    torch_step = None if args.no_torch else TorchStep(config, batches, args.torch_adamw)
    if torch_step is not None and torch_step.num_params != ours.num_params:
        raise RuntimeError(f"parameter counts differ: ours {ours.num_params}, torch {torch_step.num_params}")
    runners = [("ours", ours)] + ([("torch", torch_step)] if torch_step is not None else [])

    for i in range(args.warmup):
        for name, runner in runners:
            _, wall = common.timed(runner)
            print(f"[{name:5s}] warm-up step {i + 1}: {wall:.2f} s, loss {runner.loss():.4f}")

    matmuls = {"jax": common.JaxMatmul(args.peak_size, args.dtype), "torch": common.TorchMatmul(args.peak_size, args.dtype)}
    peaks = {name: [] for name in matmuls}  # (per wall second, per CPU second)
    walls = {name: [] for name, _ in runners}
    cpus = {name: [] for name, _ in runners}

    def sample_peaks():
        for name, mm in matmuls.items():
            peaks[name] += [mm.measure() for _ in range(2)]

    for r in range(args.steps):
        sample_peaks()
        line = []
        for name, runner in (runners if r % 2 == 0 else runners[::-1]):  # alternate who goes first
            _, wall, cpu = common.timed_cpu(runner)
            walls[name].append(wall)
            cpus[name].append(cpu)
            line.append(f"{name} {wall:.3f} s (cpu {cpu:.2f} s, loss {runner.loss():.4f})")
        print(f"[round {r + 1}] " + ", ".join(line) + f"; matmul GFLOP/s jax {peaks['jax'][-1][0] / 1e9:.0f}, "
              f"torch {peaks['torch'][-1][0] / 1e9:.0f}; load {common.load_average()}")
    sample_peaks()

    round_peak = [max(p[0] for p in peaks["jax"][2 * r: 2 * r + 2]) for r in range(args.steps)]  # just before
    peak = {name: max(p[0] for p in values) for name, values in peaks.items()}
    peak_cpu = {name: max(p[1] for p in values) for name, values in peaks.items()}
    results = {"date": f"{started:%Y-%m-%d %H:%M %Z}", "machine": common.machine_summary(), "argv": sys.argv[1:],
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "params": ours.num_params, "n_layer": config.n_layer,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype, "dropout": args.dropout,
               "flops_per_token": flops_token, "ours_compile_s": ours.compile_seconds,
               "matmul_peak_flops": peak, "matmul_peak_flops_per_cpu_s": peak_cpu, "matmul_samples": peaks}
    results["ours"] = _summary("ours", walls["ours"], cpus["ours"], tokens_per_step, flops_token)
    results["mfu"] = results["ours"]["flops_per_s"] / peak["jax"]
    # Paired by round: each step against the JAX matmul measured just before it (same machine load).
    results["mfu_by_round"] = common.median(
        [tokens_per_step * flops_token / wall / p for wall, p in zip(walls["ours"], round_peak)])
    results["mfu_cpu_time"] = results["ours"]["flops_per_cpu_s"] / peak_cpu["jax"]
    if torch_step is not None:
        results["torch"] = _summary("torch", walls["torch"], cpus["torch"], tokens_per_step, flops_token)
        results["torch_mfu"] = results["torch"]["flops_per_s"] / peak["torch"]
        results["ratio"] = results["ours"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        results["ratio_cpu_time"] = results["ours"]["tokens_per_cpu_s"] / results["torch"]["tokens_per_cpu_s"]
        # Paired by round: the two steps of a round ran back to back, so their ratio sees the same load.
        results["ratio_by_round"] = common.median([t / o for o, t in zip(walls["ours"], walls["torch"])])
    print(f"[peak ] {args.peak_size}^3 {args.dtype} matmul, best of {len(peaks['jax'])}: jax {peak['jax'] / 1e9:.1f}, "
          f"torch {peak['torch'] / 1e9:.1f} GFLOP/s (per CPU-second: jax {peak_cpu['jax'] / 1e9:.1f}, "
          f"torch {peak_cpu['torch'] / 1e9:.1f})")
    if torch_step is not None:
        print(f"[torch] MFU {100 * results['torch_mfu']:.1f}% of the torch matmul peak")
        print(f"ours/torch = {results['ratio']:.2f}x  (ratio of medians; median of per-round ratios "
              f"{results['ratio_by_round']:.2f}x; by CPU time {results['ratio_cpu_time']:.2f}x)")
    print(f"MFU = {100 * results['mfu']:.1f}%  (median step over the best JAX matmul; per round, over the matmul "
          f"just before: {100 * results['mfu_by_round']:.1f}%; by CPU time: {100 * results['mfu_cpu_time']:.1f}%)")
    results["load_end"] = common.load_average()
    print(f"[bench] load average at the end: {results['load_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
