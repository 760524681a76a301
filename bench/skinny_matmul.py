"""The decode step's matmuls alone: x [16, K] times each GPT-2-small weight in the layout both models store it
(kernels W [K, N]; the tied LM head's embedding E [V, D], so x @ E^T), JAX (XLA:CPU) beside torch and NumPy, in
weight bytes read per second. This is the kernel throughput a batch-16 sampler can reach at best.

    python bench/skinny_matmul.py                    # float32
    python bench/skinny_matmul.py --dtype bfloat16   # bf16 operands, f32 accumulation (JAX); torch bf16 matmul

Each shape is timed by the best of `--rounds` rounds of `--reps` back-to-back calls, the libraries alternating
round by round. The last lines turn the measured throughput into a floor for one decode step of GPT-2 small
(every weight read once per step at the best library's throughput for its shape), beside the step time that
bench/sampler.py measures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROWS = 16
# (K, N, uses per decode step, weight stored [N, K]): c_attn, attn c_proj, c_fc, mlp c_proj (x 12 layers; kernels
# stored [K, N] in both models), then the tied LM head, whose weight is the embedding [V, D] in both (x @ E^T).
SHAPES = ((768, 2304, 12, False), (768, 768, 12, False), (768, 3072, 12, False), (3072, 768, 12, False),
          (768, 50257, 1, True))


def best_seconds(fn, block, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    block(out)
    return (time.perf_counter() - start) / reps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--out", default="", help="write the results (JSON) here")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    print(f"{common.machine_summary()}; load at start {common.load_average()}", flush=True)
    width = 2 if args.dtype == "bfloat16" else 4
    names = ("jax", "torch") + (("numpy",) if args.dtype == "float32" else ())
    rows, step_floor = [], {**{name: 0.0 for name in names}, "best": 0.0}
    for k, n, uses, stored_nk in SHAPES:
        rng = np.random.default_rng(k + n)
        x32 = rng.standard_normal((ROWS, k), np.float32)
        w32 = rng.standard_normal((n, k) if stored_nk else (k, n), np.float32)
        contract = (((1,), (1 if stored_nk else 0,)), ((), ()))  # x [M, K] against W's K axis
        jdtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        xj, wj = jnp.asarray(x32, jdtype), jnp.asarray(w32, jdtype)
        jax_fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, contract, preferred_element_type=jnp.float32))
        xt, wt = torch.from_numpy(x32), torch.from_numpy(w32)
        if args.dtype == "bfloat16":
            xt, wt = xt.bfloat16(), wt.bfloat16()
        torch_fn = (lambda: torch.nn.functional.linear(xt, wt)) if stored_nk else (lambda: xt @ wt)
        sides = {"jax": (lambda: jax_fn(xj, wj), jax.block_until_ready), "torch": (torch_fn, lambda out: out)}
        if args.dtype == "float32":
            sides["numpy"] = ((lambda: x32 @ w32.T) if stored_nk else (lambda: x32 @ w32), lambda out: out)
        for fn, block in sides.values():
            block(fn())  # compile / warm up
        best = {name: float("inf") for name in sides}
        for _ in range(args.rounds):
            for name, (fn, block) in sides.items():
                best[name] = min(best[name], best_seconds(fn, block, args.reps))
        gbps = {name: k * n * width / s / 1e9 for name, s in best.items()}
        row = {"k": k, "n": n, "uses_per_step": uses, "weight_stored_nk": stored_nk,
               "ms": {name: s * 1e3 for name, s in best.items()}, "weight_gb_per_s": gbps,
               "jax_over_torch": best["torch"] / best["jax"]}
        rows.append(row)
        for name, s in best.items():
            step_floor[name] += uses * s
        step_floor["best"] += uses * min(best.values())
        shape = f"[{n} x {k}]^T" if stored_nk else f"[{k} x {n}]"
        print(f"[{ROWS} x {k}] @ {shape}: " + ", ".join(
            f"{name} {s * 1e3:.3f} ms ({gbps[name]:.1f} GB/s)" for name, s in best.items())
            + f"; jax / torch speed {row['jax_over_torch']:.2f}x", flush=True)
    print("GPT-2 small decode step, its matmuls alone (each weight read once per step): " + ", ".join(
        f"{name} {s * 1e3:.1f} ms" for name, s in step_floor.items()), flush=True)
    print(f"load at end {common.load_average()}", flush=True)
    result = {"dtype": args.dtype, "rows": rows, "step_matmul_ms": {k: v * 1e3 for k, v in step_floor.items()},
              "machine": common.machine_summary()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
