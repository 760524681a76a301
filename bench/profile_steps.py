"""XLA profile of our three hot steps: share of op time per op class, the top ops, and the gap to the limit.

    python bench/profile_steps.py --step sft                 # GPT-2-small SFT step, batch 8 x 128
    python bench/profile_steps.py --step sampler             # GPT-2-small decode: batch 16, prompt 64, 64 new, top-k 50
    python bench/profile_steps.py --step ppo --preset small  # one PPO iteration (separate critic), bench/ppo_iter shapes
    python bench/profile_steps.py --step all --markdown profile.md

How: the step is compiled with `--xla_dump_to` (to map each profiled op back to its HLO instruction), warmed up,
then traced with `jax.profiler` for `--calls` calls. Each XLA:CPU thunk event carries its module and instruction
name; its self time (its duration minus the ops nested in it, e.g. a while loop's body) is put in one class by
what the instruction computes (a dot, a fusion holding a reduce, a copy...). Shares are of the summed op time,
which on this 2-core machine is close to the wall time of the step (an op's own threads are inside its event).

The limit beside each table: training and prefill are bound by the matmul peak measured in the same process (a
2048^3 f32 matmul); a decode step is bound by max(bytes it must read / read bandwidth, FLOPs / matmul peak),
with the read bandwidth measured here by a jitted sum over a 1 GiB array.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_DUMP_DIR = tempfile.mkdtemp(prefix="therapy_rl_hlo_")  # main() points XLA's dumps here before jax starts

OP_CLASSES = ("matmul (dot)", "element-wise", "reductions (softmax, norms, loss, sums)", "copies and transposes",
              "gather / scatter / cache update", "top-k and sort", "random bits", "loop control (while self time)",
              "other")
_LAYOUT_OPS = {"copy", "transpose", "bitcast", "parameter", "reshape", "broadcast", "slice", "concatenate", "pad",
               "tuple", "get-tuple-element", "constant", "iota"}
_INDEX_OPS = {"scatter", "gather", "dynamic-update-slice", "dynamic-slice"}


# ------------------------------------------------------------------------------------------------------ HLO

@dataclasses.dataclass
class Instruction:
    opcode: str
    called: tuple[str, ...]
    op_name: str
    text: str


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"(?<![\w\-])([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo_module(text: str) -> tuple[dict[str, Instruction], dict[str, set[str]]]:
    """(instruction name -> Instruction, computation name -> the opcodes in it) of one HLO text dump."""
    instructions, computations, current = {}, collections.defaultdict(set), None
    for line in text.splitlines():
        if line.endswith("{") and " = " not in line.split("(")[0]:
            header = line.split("(")[0].replace("ENTRY", "").strip().lstrip("%")
            current = header.split()[0] if header else None
            continue
        match = _INSTR.match(line)
        if not match or current is None:
            continue
        name, rest = match.groups()
        opcode = _OPCODE.search(rest.split(", metadata=")[0])
        opcode = opcode.group(1) if opcode else "unknown"
        op_name = _OP_NAME.search(rest)
        instructions[name] = Instruction(opcode, tuple(_CALLS.findall(rest)), op_name.group(1) if op_name else "",
                                         rest[:160])
        computations[current].add(opcode)
    return instructions, computations


def load_dumped_modules(dump_dir: str) -> dict[tuple[int, str], tuple[dict, dict]]:
    """(module id, module name) -> parsed module, for every optimised module XLA dumped."""
    modules = {}
    for path in glob.glob(os.path.join(dump_dir, "module_*.cpu_after_optimizations.txt")):
        base = os.path.basename(path)
        match = re.match(r"module_(\d+)\.(.+)\.cpu_after_optimizations\.txt$", base)
        if match:
            with open(path) as f:
                modules[(int(match.group(1)), match.group(2))] = parse_hlo_module(f.read())
    return modules


def body_opcodes(instruction: Instruction, computations: dict[str, set[str]]) -> set[str]:
    ops = set()
    for called in instruction.called:
        ops |= computations.get(called, set())
    return ops


def classify(instruction: Instruction, computations: dict[str, set[str]], name: str) -> str:
    op = instruction.opcode
    inner = body_opcodes(instruction, computations) if op == "fusion" else set()
    ops = inner | {op}
    if op == "while" or op == "conditional" or op == "call":
        return "loop control (while self time)"
    if ops & {"dot", "convolution"} or (op == "custom-call" and re.search(r"matmul|onednn", instruction.text, re.I)):
        return "matmul (dot)"  # YNNPACK fusions hold dots, and also reductions and element-wise ops (below)
    if "sort" in ops or (op == "custom-call" and "TopK" in instruction.text):
        return "top-k and sort"
    if "rng-bit-generator" in ops or {"shift-right-logical", "xor"} <= ops:
        return "random bits"
    if ops & _INDEX_OPS:
        return "gather / scatter / cache update"
    if ops & {"reduce", "reduce-window"}:
        return "reductions (softmax, norms, loss, sums)"
    if (inner if op == "fusion" else ops) <= _LAYOUT_OPS or op in {"copy", "transpose"}:
        return "copies and transposes"
    if op == "fusion" or op in {"add", "multiply", "subtract", "divide", "exponential", "log", "select", "convert",
                                "maximum", "minimum", "compare", "tanh", "negate", "sqrt", "rsqrt", "power"}:
        return "element-wise"
    return "other"


# --------------------------------------------------------------------------------------------- the trace

def op_self_times(xplane_path: str) -> list[dict]:
    """One row per profiled XLA op event: module id/name, instruction, self time (ns)."""
    from jax._src.lib import _profile_data

    rows = []
    data = _profile_data.ProfileData.from_file(xplane_path)
    for plane in data.planes:
        for line in plane.lines:
            events = []
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    events.append((event.start_ns, event.start_ns + event.duration_ns, stats))
            events.sort(key=lambda e: (e[0], -e[1]))
            stack: list[list] = []  # [end, row]
            for start, end, stats in events:
                while stack and stack[-1][0] <= start:
                    stack.pop()
                row = {"module_id": int(stats.get("program_id", -1)), "module": str(stats.get("hlo_module", "")),
                       "op": str(stats["hlo_op"]), "self_ns": end - start}
                if stack and end <= stack[-1][0] + 1:
                    stack[-1][1]["self_ns"] -= end - start
                rows.append(row)
                stack.append([end, row])
    return rows


def profile_table(rows: list[dict], modules: dict, calls: int, top_ops: int = 12) -> dict:
    by_class = collections.Counter()
    by_op = collections.Counter()
    by_where = collections.Counter()
    described = {}
    key_by_name = {key[1]: key for key in modules}
    for row in rows:
        module = modules.get((row["module_id"], row["module"]))
        if module is None:  # the profiler's program id is not always the dump's module id: match by name
            key = key_by_name.get(row["module"])
            module = modules.get(key) if key else None
        instruction = module[0].get(row["op"]) if module else None
        op_class = classify(instruction, module[1], row["op"]) if instruction else "other"
        by_class[op_class] += row["self_ns"]
        key = (row["module"], row["op"])
        by_op[key] += row["self_ns"]
        if instruction is not None:
            described[key] = (op_class, instruction.opcode, instruction.op_name, instruction.text)
        by_where[(op_class, _short_op_name(instruction.op_name) if instruction else row["op"])] += row["self_ns"]
    total = sum(by_class.values()) or 1
    classes = [{"class": c, "ms_per_call": by_class[c] / 1e6 / calls, "share": by_class[c] / total}
               for c in OP_CLASSES if by_class[c]]
    top = []
    for (module, op), ns in by_op.most_common(top_ops):
        op_class, opcode, op_name, text = described.get((module, op), ("other", "?", "", ""))
        top.append({"module": module, "op": op, "class": op_class, "opcode": opcode, "hlo": text,
                    "where": _short_op_name(op_name), "ms_per_call": ns / 1e6 / calls, "share": ns / total})
    where = [{"class": c, "where": w, "ms_per_call": ns / 1e6 / calls, "share": ns / total}
             for (c, w), ns in by_where.most_common(15)]
    return {"op_ms_per_call": total / 1e6 / calls, "classes": classes, "top_ops": top, "top_places": where}


def _short_op_name(op_name: str) -> str:
    """The last components of a JAX op name, layer indices dropped (so the 12 layers' ops add up)."""
    parts = [re.sub(r"^h_\d+$", "h_*", p) for p in op_name.split("/") if p and not p.startswith("jit(")]
    return "/".join(parts[-3:])[:90]


def trace_calls(fn, calls: int) -> tuple[list[dict], float]:
    """Trace `calls` blocking calls of fn; (op rows, wall seconds per call)."""
    import jax

    trace_dir = tempfile.mkdtemp(prefix="therapy_rl_trace_")
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    wall = (time.perf_counter() - start) / calls
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    return op_self_times(path), wall


# ------------------------------------------------------------------------------------------------ limits

def read_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second of a jitted sum over a `gib` GiB float32 array (the best of 5)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(gib * 2 ** 30) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = min(common.timed(lambda: total(x).block_until_ready())[1] for _ in range(5))
    return x.size * 4 / best


def matmul_peak(n: int = 2048, dtype: str = "float32") -> float:
    mm = common.JaxMatmul(n, dtype)
    return max(mm.measure()[0] for _ in range(5))


# ------------------------------------------------------------------------------------------------- steps

def profile_sft(args, peak: float) -> dict:
    import sft_step

    bench_args = sft_step.parse_args(["--no-torch", "--dtype", args.dtype])
    config = sft_step.model_config(bench_args)
    batch, seq = 8, 128
    batches = sft_step.make_batches(2, batch, seq, config.vocab_size)
    step = sft_step.OursStep(config, batches)
    for _ in range(2):
        step()
    rows, wall = trace_calls(step, args.calls)
    from therapy_rl.models import gpt2

    flops = gpt2.flops_per_token(config, seq) * batch * seq
    return {"step": f"SFT step, GPT-2-small, batch {batch} x {seq}, {args.dtype}, dropout 0.1", "wall_ms": wall * 1e3,
            "limit_ms": flops / peak * 1e3, "limit": f"{flops / 1e9:.0f} GFLOP / {peak / 1e9:.0f} GFLOP/s matmul peak",
            "table": profile_table(rows, load_dumped_modules(_DUMP_DIR), args.calls, args.top_ops)}


def profile_sampler(args, peak: float, bandwidth: float) -> dict:
    import jax
    import jax.numpy as jnp

    from therapy_rl.models import gpt2
    from therapy_rl.sampling import SamplingConfig, make_generate_fn

    config = gpt2.GPT2Config.named("gpt2", dropout_rate=0.0, dtype=args.dtype)
    params = gpt2.init_params(config, jax.random.key(0))
    batch, prompt, new = 16, 64, args.new_tokens
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt)), jnp.int32)
    mask = jnp.ones((batch, prompt), jnp.int32)
    fn = make_generate_fn(config, SamplingConfig(max_new_tokens=new, top_k=50, eos_id=None))
    keys = iter(range(1, 10 ** 6))

    def call():
        jax.block_until_ready(fn(params, ids, mask, jax.random.PRNGKey(next(keys))).tokens)

    call()
    call()
    rows, wall = trace_calls(call, args.calls)
    n_params = gpt2.count_params(params)
    width = 2 if args.dtype == "bfloat16" else 4  # bytes per weight and cache entry read each step
    kv_bytes_per_slot = 2 * config.n_layer * config.n_embd * width * batch
    mean_slots = prompt + new / 2
    step_bytes = n_params * width + kv_bytes_per_slot * mean_slots
    step_flops = 2 * n_params * batch
    limit_step = max(step_bytes / bandwidth, step_flops / peak)
    prefill_flops = 2 * n_params * batch * prompt
    return {"step": f"sampler, GPT-2-small, batch {batch}, prompt {prompt}, {new} new tokens, top-k 50, {args.dtype}",
            "wall_ms": wall * 1e3, "limit_ms": (limit_step * (new - 1) + prefill_flops / peak) * 1e3,
            "limit": (f"per decode step max({step_bytes / 1e6:.0f} MB / {bandwidth / 1e9:.1f} GB/s, "
                      f"{step_flops / 1e9:.1f} GFLOP / {peak / 1e9:.0f} GFLOP/s) = {limit_step * 1e3:.1f} ms; "
                      f"prefill {prefill_flops / 1e9:.0f} GFLOP"),
            "limit_ms_per_decode_step": limit_step * 1e3,
            "table": profile_table(rows, load_dumped_modules(_DUMP_DIR), args.calls, args.top_ops)}


def profile_ppo(args, peak: float, bandwidth: float) -> dict:
    import ppo_iter

    from therapy_rl.models import gpt2

    with tempfile.TemporaryDirectory() as model_dir:
        ppo_iter.build_checkpoint(args.preset, model_dir)
        iterate, info = ppo_iter.make_jax_iteration(model_dir, separate_critic=True, dtype=args.dtype)
        iterate()
        iterate()
        rows, wall = trace_calls(iterate, args.calls)
    config, tokens = info["config"], info["tokens"]
    policy = gpt2.flops_per_token(config, 0) / 6  # matmul weights, tied LM head included
    critic = policy - config.vocab_size * config.n_embd  # the critic trunk has a value head, no LM head
    # per epoch forward + backward of both trunks (6N per token); the reference (policy) and old values (critic)
    # forwards (2N); old log-probs come from the sampler. Rollout: each decode step reads the policy's weights.
    update_flops = ppo_iter.EPOCHS * 6 * (policy + critic) * tokens + 2 * (policy + critic) * tokens
    width = 2 if args.dtype == "bfloat16" else 4
    step_s = max(policy * width / bandwidth, 2 * policy * ppo_iter.BATCH / peak)
    rollout_s = 2 * policy * ppo_iter.BATCH * ppo_iter.PROMPT / peak + ppo_iter.NEW * step_s
    limit_s = update_flops / peak + rollout_s
    return {"step": f"PPO iteration, preset {args.preset}, separate critic, batch {ppo_iter.BATCH}, "
                    f"{ppo_iter.NEW} new tokens, {ppo_iter.EPOCHS} epochs, {args.dtype}", "wall_ms": wall * 1e3,
            "limit_ms": limit_s * 1e3,
            "limit": (f"update {update_flops / 1e12:.1f} TFLOP / {peak / 1e9:.0f} GFLOP/s = {update_flops / peak:.1f} s, "
                      f"rollout {rollout_s:.1f} s ({1e3 * step_s:.1f} ms per decode step)"),
            "table": profile_table(rows, load_dumped_modules(_DUMP_DIR), args.calls, args.top_ops)}


# ---------------------------------------------------------------------------------------------- printing

def markdown(result: dict) -> str:
    lines = [f"**{result['step']}**: {result['wall_ms']:.0f} ms per call (op time "
             f"{result['table']['op_ms_per_call']:.0f} ms); limit {result['limit_ms']:.0f} ms "
             f"({result['limit']}); ours / limit = {result['wall_ms'] / result['limit_ms']:.2f}", "",
             "| op class | ms per call | share of op time |", "|---|---:|---:|"]
    for row in result["table"]["classes"]:
        lines.append(f"| {row['class']} | {row['ms_per_call']:.1f} | {100 * row['share']:.1f}% |")
    lines += ["", "| where (JAX op name, layers summed) | class | ms per call | share |", "|---|---|---:|---:|"]
    for row in result["table"]["top_places"]:
        lines.append(f"| {row['where']} | {row['class']} | {row['ms_per_call']:.1f} | {100 * row['share']:.1f}% |")
    lines += ["", "| top op | class | ms per call | share | where (JAX op name) |", "|---|---|---:|---:|---|"]
    for row in result["table"]["top_ops"]:
        lines.append(f"| `{row['op']}` ({row['opcode']}) | {row['class']} | {row['ms_per_call']:.1f} | "
                     f"{100 * row['share']:.1f}% | {row['where']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", choices=("sft", "sampler", "ppo", "all"), default="all")
    parser.add_argument("--calls", type=int, default=2, help="traced calls per step (after 2 warm-up calls)")
    parser.add_argument("--new_tokens", type=int, default=64, help="sampler: new tokens per row")
    parser.add_argument("--preset", default="small", help="ppo: a bench/ppo_iter.py preset (tiny, small, gpt2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model.dtype (bfloat16 = bf16 operands, f32 accumulation and weights)")
    parser.add_argument("--top_ops", type=int, default=12, help="how many single HLO ops the tables list")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--markdown", default="", help="write the tables here")
    args = parser.parse_args(argv)
    if "jax" in sys.modules:
        raise SystemExit("profile_steps: run it as a script (XLA's HLO dump must be set before jax starts)")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP_DIR} "
                               "--xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$").strip()

    print(f"{common.machine_summary()}; load at start {common.load_average()}")
    peak = matmul_peak(dtype=args.dtype)
    bandwidth = read_bandwidth()
    print(f"f32 matmul peak {peak / 1e9:.0f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    results = []
    steps = ("sft", "sampler", "ppo") if args.step == "all" else (args.step,)
    for step in steps:
        for path in glob.glob(os.path.join(_DUMP_DIR, "*")):  # each step's modules only
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if step == "sft":
            results.append(profile_sft(args, peak))
        elif step == "sampler":
            results.append(profile_sampler(args, peak, bandwidth))
        else:
            results.append(profile_ppo(args, peak, bandwidth))
        print(markdown(results[-1]))
    print(f"load at end {common.load_average()}")
    text = "".join(markdown(r) + "\n" for r in results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "read_bandwidth": bandwidth, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
