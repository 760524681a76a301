"""The full therapy reward's share of a PPO iteration, GPT-2-small policy shape, on MESC (needs $THERAPY_RL_DATA).

    python bench/reward_share.py --workdir /tmp/reward_share                 # float32 policy, 4 iterations
    python bench/reward_share.py --workdir /tmp/reward_share_bf16 --dtype bfloat16

Runs the real CLI twice: a 1-step SFT run of `configs/sft_mesc.py` (GPT-2-small shape, random init, its own BPE:
a policy that writes full-length replies, so the reward reads the longest texts it can get), then PPO with
`configs/ppo_mesc.py` (the full therapy reward: MiniLM emotion, relevance, empathy and sentiment, text quality,
safety). It reads the PPO run's metrics.jsonl: per iteration, `time/rollout_s`, `time/reward_s`, `time/update_s`
and the reward's own steps (`time/reward_<step>_s`). The first iteration (XLA compilation) is left out; the
numbers are medians over the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args: list[str]) -> None:
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--iterations", type=int, default=4, help="PPO iterations (the first is not counted)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model.dtype")
    parser.add_argument("--json", default="", help="also write the summary here")
    args = parser.parse_args(argv)

    sft_dir, ppo_dir = os.path.join(args.workdir, "sft"), os.path.join(args.workdir, "ppo")
    if not os.path.exists(os.path.join(sft_dir, "DONE")):
        run(["-m", "therapy_rl.main", "--config", "configs/sft_mesc.py", "--workdir", sft_dir,
             "--config.max_steps=1", "--config.eval_every_steps=1", "--config.checkpoint_every_steps=1",
             "--config.num_sample_replies=0", "--config.progress_bar=False", f"--config.model.dtype={args.dtype}"])
    run(["-m", "therapy_rl.main", "--config", "configs/ppo_mesc.py", "--workdir", ppo_dir,
         f"--config.init_from={sft_dir}", f"--config.max_iterations={args.iterations}",
         "--config.eval_at_start=False", f"--config.eval_every_iterations={10 ** 6}",
         "--config.num_sample_replies=0", "--config.progress_bar=False"])
    with open(os.path.join(ppo_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "time/reward_s" in r]
    steady = rows[1:] or rows
    med = lambda key: statistics.median(r.get(key, 0.0) for r in steady)  # noqa: E731
    total = med("time/rollout_s") + med("time/reward_s") + med("time/update_s")
    parts = sorted({k for r in steady for k in r if k.startswith("time/reward_") and k != "time/reward_s"})
    summary = {"dtype": args.dtype, "iterations_counted": len(steady), "iteration_s": total,
               "rollout_s": med("time/rollout_s"), "reward_s": med("time/reward_s"), "update_s": med("time/update_s"),
               "reward_share": med("time/reward_s") / total, "reward_parts_s": {k: med(k) for k in parts},
               "response_length_mean": med("rollout/length_mean")}
    print(f"iteration {total:.2f} s: rollout {summary['rollout_s']:.2f} s, reward {summary['reward_s']:.2f} s "
          f"({100 * summary['reward_share']:.1f}%), update {summary['update_s']:.2f} s; mean response "
          f"{summary['response_length_mean']:.0f} tokens")
    for k, v in summary["reward_parts_s"].items():
        print(f"  {k}: {v:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
