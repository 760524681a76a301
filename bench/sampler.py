"""Sampler throughput: our jitted prefill + while-loop decode vs Hugging Face PyTorch `generate`.

Both run the same random GPT-2 small weights (124M, built from a config: no download), in float32 on
CPU, in the same process, interleaved so that machine load hits both alike. Warm-up and compile time
are excluded from the timed runs (compile time is reported on its own). Tokens/s counts new tokens
over the whole call, prefill included, for both. Then our per-step decode cost for several response
lengths: (time(N) - time(1)) / (N - 1), where time(1) is prefill plus the first token.

    python bench/sampler.py                      # batch 16, prompt 64, 64 new tokens, top-k 50
    python bench/sampler.py --repeats 5 --lengths 32,64,128,256
    python bench/sampler.py --dtype bfloat16 --hf-dtype bfloat16   # mixed precision on both sides
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64, help="new tokens per row in the head-to-head")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", default="32,64,128,256", help="new-token lengths for the per-step sweep")
    parser.add_argument("--top-k", type=int, default=50, help="HF's default top_k; used by both sides")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="gpt2", help="GPT2Config.named size ('tiny' for a smoke run)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="ours: model.dtype (bfloat16 = bf16 weights and cache, f32 accumulation)")
    parser.add_argument("--hf-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="HF: the torch model's dtype (bfloat16 = model.to(torch.bfloat16))")
    return parser.parse_args()


def timed(fn, cpu_log=None):
    """Wall seconds of fn(); its process CPU seconds go to cpu_log (less sensitive to other users' load)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    if cpu_log is not None:
        cpu_log.append(time.process_time() - cpu_start)
    return time.perf_counter() - start


def cache_copies_in_loop(compiled_text: str, cache_shape, dtype: str = "f32") -> int:
    """How many HLO copy ops produce a whole KV-cache-shaped buffer (0 = updated in place)."""
    shape = dtype + "[" + ",".join(str(d) for d in cache_shape) + "]"
    return len(re.findall(re.escape(shape) + r"\{[^}]*\} copy(?:-start)?\(", compiled_text))


def main():
    args = parse_args()
    import torch
    import transformers

    from therapy_rl.models.gpt2 import GPT2Config
    from therapy_rl.models.hf_io import params_from_hf_tensors
    from therapy_rl.sampling import SamplingConfig, make_generate_fn

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"jax {jax.__version__} devices={jax.devices()}  torch {torch.__version__} threads={torch.get_num_threads()}"
          f"  transformers {transformers.__version__}")
    print(f"load average at start: {os.getloadavg()}  cpus: {os.cpu_count()}")

    config = GPT2Config.named(args.size, dropout_rate=0.0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_dict(
        bos_token_id=None, eos_token_id=None, pad_token_id=0))).eval()
    tensors = {k.removeprefix("transformer."): v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = jax.device_put(params_from_hf_tensors(config, tensors, source=f"random {args.size}"))
    config = config.replace(dtype=args.dtype)  # the same float32 weights; bfloat16 rounds them once per call
    if args.hf_dtype == "bfloat16":
        hf_model = hf_model.to(torch.bfloat16)
    print(f"ours: model.dtype={args.dtype}; HF: torch dtype {args.hf_dtype}")

    rng = np.random.default_rng(args.seed)
    batch, prompt_len = args.batch, args.prompt
    prompt_ids = rng.integers(0, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
    prompt_mask = np.ones((batch, prompt_len), np.int32)
    ids_j, mask_j = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    ids_t, mask_t = torch.tensor(prompt_ids, dtype=torch.long), torch.tensor(prompt_mask)

    def compile_ours(new_tokens):
        sampling = SamplingConfig(max_new_tokens=new_tokens, top_k=args.top_k, top_p=args.top_p, eos_id=None)
        jitted = make_generate_fn(config, sampling)
        start = time.perf_counter()
        compiled = jitted.lower(params, ids_j, mask_j, jax.random.PRNGKey(0)).compile()
        return compiled, time.perf_counter() - start

    key_counter = iter(range(1, 10**6))

    def run_ours(compiled, new_tokens):
        out = compiled(params, ids_j, mask_j, jax.random.PRNGKey(next(key_counter)))
        jax.block_until_ready(out.tokens)
        assert out.tokens.shape == (batch, new_tokens)

    def run_hf(new_tokens):
        with torch.no_grad():
            out = hf_model.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=True, top_k=args.top_k,
                                    top_p=args.top_p, temperature=1.0, max_new_tokens=new_tokens, use_cache=True,
                                    pad_token_id=0, eos_token_id=None)
        assert out.shape == (batch, prompt_len + new_tokens)

    head_to_head, compile_s = compile_ours(args.new)
    cache_shape = (batch, config.n_head, prompt_len + args.new, config.head_dim)
    copies = cache_copies_in_loop(head_to_head.as_text(), cache_shape, "bf16" if args.dtype == "bfloat16" else "f32")
    print(f"\nours: compile {compile_s:.1f} s; whole-cache copies in compiled HLO: {copies}")

    run_ours(head_to_head, args.new)  # warm-up
    if not args.skip_hf:
        run_hf(args.new)  # warm-up
    ours_s, hf_s, ours_cpu, hf_cpu = [], [], [], []
    for _ in range(args.repeats):  # interleaved so that load falls on both alike
        ours_s.append(timed(lambda: run_ours(head_to_head, args.new), ours_cpu))
        if not args.skip_hf:
            hf_s.append(timed(lambda: run_hf(args.new), hf_cpu))
    new_tokens = batch * args.new
    ours_med = statistics.median(ours_s)
    print(f"batch {batch}, prompt {prompt_len}, new {args.new}, top_k {args.top_k}, top_p {args.top_p}, "
          f"{args.repeats} repeats (median)")
    print(f"ours: {new_tokens / ours_med:8.1f} new tokens/s  ({ours_med:.2f} s/call, "
          f"{1000 * ours_med / args.new:.1f} ms per step incl. prefill)  runs: {[round(t, 2) for t in ours_s]}  "
          f"cpu s: {[round(t, 2) for t in ours_cpu]}")
    if not args.skip_hf:
        hf_med = statistics.median(hf_s)
        print(f"HF:   {new_tokens / hf_med:8.1f} new tokens/s  ({hf_med:.2f} s/call, "
              f"{1000 * hf_med / args.new:.1f} ms per step incl. prefill)  runs: {[round(t, 2) for t in hf_s]}  "
              f"cpu s: {[round(t, 2) for t in hf_cpu]}")
        print(f"ours/HF = {hf_med / ours_med:.2f}x  (wall-clock tokens/s; CPU-seconds ratio "
              f"{statistics.median(hf_cpu) / statistics.median(ours_cpu):.2f}x)")

    lengths = [int(x) for x in args.lengths.split(",") if x]
    print(f"\nper-step decode cost, ours: (time(N) - time(1)) / (N - 1), median of {args.repeats}")
    prefill_fn, _ = compile_ours(1)
    run_ours(prefill_fn, 1)
    prefill_s = statistics.median([timed(lambda: run_ours(prefill_fn, 1)) for _ in range(args.repeats)])
    print(f"N=1 (prefill + first token): {1000 * prefill_s:.0f} ms")
    for n in lengths:
        fn, c_s = compile_ours(n)
        run_ours(fn, n)
        total = statistics.median([timed(lambda: run_ours(fn, n)) for _ in range(args.repeats)])
        print(f"N={n:4d}: {1000 * (total - prefill_s) / (n - 1):6.1f} ms/step  "
              f"({batch * n / total:7.1f} new tokens/s overall, compile {c_s:.1f} s)")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
