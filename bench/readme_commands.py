"""Runs the README's commands in order in a scratch folder and prints their wall times as a markdown table.

    python bench/readme_commands.py [--out /tmp/readme_runs] [--real]   # --real: the MESC commands too

Without --real it needs nothing beyond the package (the quickstart, eval, chat, API example, export). With --real
it needs $THERAPY_RL_DATA and runs the real-data commands at the README's smoke sizes, plus a few PPO iterations
of configs/ppo_mesc.py, from which it extrapolates the full run (its iteration count comes from the config and the
data). The load average is printed at start and end: times measured above 1.5 are not references.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = [sys.executable, "-m", "therapy_rl.main"]
CHAT_INPUT = "I had a long week and I feel drained.\nMy sister never calls me back.\n"


def readme_python_example() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    if not blocks:
        raise SystemExit("README.md has no python block")
    return blocks[0]


def quickstart_commands(runs: str) -> list[tuple[str, list[str], str | None]]:
    r = lambda name: os.path.join(runs, name)  # noqa: E731
    return [
        ("quickstart SFT", MAIN + ["--config", "configs/quickstart.py", "--workdir", r("qs_sft")], None),
        ("quickstart PPO", MAIN + ["--config", "configs/quickstart_ppo.py", "--workdir", r("qs_ppo"),
                                   f"--config.init_from={r('qs_sft')}"], None),
        ("eval (quickstart, with decoding search)",
         MAIN + ["--config", "configs/eval_quickstart.py", "--workdir", r("qs_eval"),
                 f"--config.checkpoint={r('qs_ppo')}"], None),
        ("chat, 2 piped messages", [sys.executable, "-m", "therapy_rl.chat", "--workdir", r("qs_ppo")], CHAT_INPUT),
        ("Python API example", [sys.executable, "-c",
                                readme_python_example().replace('"runs/qs_ppo"', repr(r("qs_ppo")))], None),
        ("export to HF", [sys.executable, "-m", "therapy_rl.export", "--workdir", r("qs_ppo"),
                          "--out", r("qs_ppo_hf"), "--overwrite"], None),
    ]


def real_commands(runs: str, ppo_iterations: int) -> list[tuple[str, list[str], str | None]]:
    r = lambda name: os.path.join(runs, name)  # noqa: E731
    small = ["--config.model.n_layer=2", "--config.model.n_embd=128", "--config.model.n_head=4"]
    return [
        ("SFT on MESC, smoke size (50 steps)", MAIN + ["--config", "configs/sft_mesc.py", "--workdir", r("sft_mesc"),
                                                       *small, "--config.max_steps=50"], None),
        (f"PPO on MESC, full reward, {ppo_iterations} iterations",
         MAIN + ["--config", "configs/ppo_mesc.py", "--workdir", r("ppo_mesc"), f"--config.init_from={r('sft_mesc')}",
                 f"--config.max_iterations={ppo_iterations}"], None),
        ("eval of the SFT run on MESC test", MAIN + ["--config", "configs/eval_mesc.py", "--workdir", r("eval_sft"),
                                                     f"--config.checkpoint={r('sft_mesc')}"], None),
        ("eval of the PPO run on MESC test", MAIN + ["--config", "configs/eval_mesc.py", "--workdir", r("eval_mesc"),
                                                     f"--config.checkpoint={r('ppo_mesc')}"], None),
        ("eval on ESConv (cross-domain)", MAIN + ["--config", "configs/eval_esconv.py", "--workdir",
                                                  r("eval_esconv"), f"--config.checkpoint={r('ppo_mesc')}"], None),
        ("compare (paired bootstrap)", [sys.executable, "-m", "therapy_rl.evaluation.compare", r("eval_sft"),
                                        r("eval_mesc"), "--out", r("compare")], None),
    ]


def ppo_iterations_of_full_run(runs: str) -> int | None:
    """The iteration count configs/ppo_mesc.py runs without max_iterations, from the run's own log line."""
    info = os.path.join(runs, "ppo_mesc", "run_info.json")
    if not os.path.exists(info):
        return None
    config = json.load(open(info))["config"]
    log = os.path.join(runs, "ppo_mesc.log")
    match = re.search(r"(\d+) iterations/epoch", open(log).read()) if os.path.exists(log) else None
    return int(math.ceil(config["num_epochs"] * int(match.group(1)))) if match else None


def run(label: str, argv: list[str], stdin: str | None, log_path: str) -> float:
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(argv, cwd=REPO, input=stdin, text=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{label}: exit {done.returncode}, see {log_path}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/readme_runs")
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--ppo_iterations", type=int, default=3)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    load_start = os.getloadavg()[0]
    commands = quickstart_commands(args.out)
    if args.real:
        commands += real_commands(args.out, args.ppo_iterations)
    rows = []
    for label, argv, stdin in commands:
        log = os.path.join(args.out, re.sub(r"\W+", "_", label).strip("_").lower() + ".log")
        if label.startswith("PPO on MESC"):
            log = os.path.join(args.out, "ppo_mesc.log")
        seconds = run(label, argv, stdin, log)
        rows.append((label, seconds))
        print(f"{label}: {seconds:.0f} s", flush=True)
    print(f"\nload average: start {load_start:.2f}, end {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs\n")
    print("| command | wall time |\n|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.0f} s |")
    if args.real:
        full = ppo_iterations_of_full_run(args.out)
        ppo_seconds = dict(rows)[f"PPO on MESC, full reward, {args.ppo_iterations} iterations"]
        rows_ = [json.loads(line) for line in open(os.path.join(args.out, "ppo_mesc", "metrics.jsonl"))]
        steady = [sum(v for k, v in row.items() if k.startswith("time/")) for row in rows_
                  if row.get("time/rollout_s") is not None and row["step"] > 1]  # the first one compiles
        if full and steady:
            per_iteration = sum(steady) / len(steady)
            print(f"\nPPO on MESC: {per_iteration:.1f} s per iteration after the first (the command took "
                  f"{ppo_seconds:.0f} s for {args.ppo_iterations}); the full run is {full} iterations, about "
                  f"{per_iteration * full / 3600:.1f} h plus its evals")


if __name__ == "__main__":
    main()
