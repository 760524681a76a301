"""Small timing helpers shared by the benchmarks: wall-clock timing, medians, matmul peaks, machine load.

Every timed function must block until its work is done (``block_until_ready`` for JAX; torch CPU ops are
synchronous), so a wall-clock interval covers exactly one call.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of one blocking call."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def timed_cpu(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process, all threads) of one blocking call.

    On a machine shared with other jobs the wall time depends on the scheduler's share; the CPU time is
    closer to the work done (it also counts threads spinning while they wait for work).
    """
    cpu_start, start = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def median(values) -> float:
    return float(statistics.median(values))


def load_average() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_summary() -> str:
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, load average {load_average()}"


class JaxMatmul:
    """A jitted square ``n x n`` matmul (``dtype`` operands, float32 accumulation), to measure a FLOP/s ceiling."""

    def __init__(self, n: int, dtype: str):
        import jax
        import jax.numpy as jnp

        self.n = n
        dt = jnp.dtype(dtype)
        keys = jax.random.split(jax.random.key(1), 2)
        self.a = jax.random.normal(keys[0], (n, n), jnp.float32).astype(dt)
        self.b = jax.random.normal(keys[1], (n, n), jnp.float32).astype(dt)
        self.fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        self.fn(self.a, self.b).block_until_ready()  # compile outside the timings

    def measure(self) -> tuple[float, float]:
        """(FLOP per wall second, FLOP per CPU second) of one matmul."""
        _, wall, cpu = timed_cpu(lambda: self.fn(self.a, self.b).block_until_ready())
        return 2.0 * self.n ** 3 / wall, 2.0 * self.n ** 3 / max(cpu, 1e-9)


class TorchMatmul:
    """The same square matmul in PyTorch (``torch.mm``), the torch side's ceiling."""

    def __init__(self, n: int, dtype: str):
        import torch

        self.n = n
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        gen = torch.Generator().manual_seed(1)
        self.a = torch.randn(n, n, generator=gen).to(dt)
        self.b = torch.randn(n, n, generator=gen).to(dt)
        self.out = torch.empty(n, n, dtype=dt)
        torch.mm(self.a, self.b, out=self.out)

    def measure(self) -> tuple[float, float]:
        """(FLOP per wall second, FLOP per CPU second) of one matmul."""
        import torch

        _, wall, cpu = timed_cpu(lambda: torch.mm(self.a, self.b, out=self.out))
        return 2.0 * self.n ** 3 / wall, 2.0 * self.n ** 3 / max(cpu, 1e-9)
