"""Shared helpers of the bench_* scripts: run one setting in a fresh process, read its peak RSS, print a table.

Each setting runs in its own subprocess so that its peak RSS belongs to that setting alone.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    VmHWM from /proc (Linux), not ru_maxrss: the latter survives exec, so a child would inherit
    the parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_child(script: str, setting: dict, timeout: float = 1800) -> dict:
    """Run ``script --child JSON`` and return the JSON dict it prints last."""
    r = subprocess.run([sys.executable, script, "--child", json.dumps(setting)], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        return {**setting, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    widths = [max(len(h), 10) for _, h, _ in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        if "error" in r:
            print(f"  {r} -> ERROR {r['error']}")
            continue
        print("  ".join(format(r[k], f).rjust(w) for (k, _, f), w in zip(columns, widths)))


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` on this CPU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / timed(lambda: a @ b, repeats) / 1e9


def machine_line() -> str:
    from e1min.scoring import cpu_has_native_bf16

    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16: {cpu_has_native_bf16()}; matmul GFLOP/s float32 {matmul_gflops(torch.float32):.0f}, "
        f"bfloat16 {matmul_gflops(torch.bfloat16, 256):.1f}"
    )


def default_bf16_rows() -> bool:
    """bf16 rows by default only where bf16 is fast (native CPU support); emulated bf16 rows take hours."""
    from e1min.scoring import cpu_has_native_bf16

    return cpu_has_native_bf16() or torch.cuda.is_available()
