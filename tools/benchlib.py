"""Shared helpers of the bench_* scripts: run one setting in a fresh process, read its peak RSS, print a table.

Each setting runs in its own subprocess so that its peak RSS belongs to that setting alone.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

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


def sync(device: str | torch.device = "cpu") -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; a timer must not stop before them)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str | torch.device = "cpu") -> list[float]:
    """Seconds of each of ``repeats`` runs of ``fn`` after ``warmup`` untimed runs (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    s, n = sorted(xs), len(xs)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str | torch.device = "cpu") -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    return median(timed_steps(fn, repeats, warmup, device))


def peak_memory_mb(device: str | torch.device = "cpu") -> float:
    """Peak GPU memory allocated by torch (CUDA) or this process's peak RSS (CPU), in MB."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (Linux /proc/stat; (0, 0) elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return 0, 0
    user, nice, system, idle, iowait, irq, softirq, steal = v
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def machine_busy(window: float = 2.0) -> float:
    """Fraction of all CPUs busy over the next ``window`` seconds (this process sleeps meanwhile)."""
    b0, t0 = _cpu_jiffies()
    time.sleep(window)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_for_quiet(max_busy: float = 0.15, timeout: float = 300) -> float:
    """Wait (up to ``timeout`` s) until other processes use < ``max_busy`` of the CPUs; returns the last reading."""
    deadline = time.monotonic() + timeout
    busy = machine_busy()
    while busy >= max_busy and time.monotonic() < deadline:
        time.sleep(3)
        busy = machine_busy()
    return busy


def run_child(
    script: str,
    setting: dict,
    timeout: float = 1800,
    env: dict[str, str] | None = None,
    retry_if_other_cpu: float = 20.0,
    retry_max_seconds: float = 120.0,
    quiet_timeout: float = 60.0,
) -> dict:
    """Run ``script --child JSON`` and return the JSON dict it prints last.

    ``env``: extra environment variables of the child (e.g. glibc's MALLOC_* settings, which glibc reads only
    at process start, so they must be in the child's environment rather than set from Python).

    Before the child starts, waits until the machine is quiet. The result gains ``other_cpu``: the CPU
    time of *other* processes during the row, in % of all cores (machine busy time from /proc/stat minus
    the child's own CPU time). With 2 cores, any other busy process slows a 2-thread torch step severalfold,
    so a row with ``other_cpu`` above ``retry_if_other_cpu`` % that took under ``retry_max_seconds`` is run
    once more and the less disturbed of the two runs is kept.
    """
    child_env = {**os.environ, **env} if env else None
    best = None
    for _ in range(2):
        wait_for_quiet(timeout=quiet_timeout)
        ru0, (b0, _), w0 = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_jiffies(), time.monotonic()
        r = subprocess.run(
            [sys.executable, script, "--child", json.dumps(setting)], capture_output=True, text=True, timeout=timeout, env=child_env
        )
        ru1, (b1, _), w1 = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_jiffies(), time.monotonic()
        if r.returncode != 0:
            return {**setting, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
        out = json.loads(r.stdout.strip().splitlines()[-1])
        own = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        machine = (b1 - b0) / os.sysconf("SC_CLK_TCK")
        out["other_cpu"] = max(0.0, 100 * (machine - own) / ((w1 - w0) * (os.cpu_count() or 1)))
        if best is None or out["other_cpu"] < best["other_cpu"]:
            best = out
        if out["other_cpu"] <= retry_if_other_cpu or w1 - w0 > retry_max_seconds:
            break
        print(f"  row disturbed (other processes used {out['other_cpu']:.0f}% of the CPUs): running it again", file=sys.stderr, flush=True)
    return best


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


def matmul_peak_gflops(dtype: torch.dtype, repeats: int = 10, device: str | torch.device = "cpu") -> float:
    """The best matmul GFLOP/s in ``dtype`` over square and transformer-shaped (tokens x 768 x 2304) products.

    The MFU denominator: measured in the same run as the rows it divides, not taken from a datasheet.
    A peak is a best case, so each shape counts its fastest of ``repeats`` calls (after one warm-up): a
    median over a few calls is pulled down by any other process that runs at the same moment.
    Emulated bf16 (no native support) is probed on a small shape only: it is ~100x slower.
    """
    cuda = torch.device(device).type == "cuda"
    fast = cuda or dtype == torch.float32 or _cpu_has_native_bf16()
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (2048, 768, 2304), (2048, 2304, 768)] if fast else [(256, 256, 256)]
    if cuda:
        shapes = [(8192, 8192, 8192), (8192, 1280, 3840), (8192, 3840, 1280)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
        a @ b
        sync(device)
        for _ in range(repeats if fast else 3):
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def cpu_flags() -> str:
    """The matmul-relevant CPU flags this machine reports (Linux /proc/cpuinfo)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        flags = []
    have = [f for f in wanted if f in flags]
    return " ".join(have) if have else "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


def measure_peaks(device: str | torch.device = "cpu") -> dict[str, float]:
    """Matmul peaks (GFLOP/s) per precision, measured now on a quiet machine (bf16: small probe unless native)."""
    if torch.device(device).type == "cpu":
        wait_for_quiet(timeout=30)
    return {"float32": matmul_peak_gflops(torch.float32, device=device), "bfloat16": matmul_peak_gflops(torch.bfloat16, device=device)}


def machine_line(peaks: dict[str, float] | None = None, device: str | torch.device = "cpu") -> str:
    """CPU (or GPU), flags, threads, torch, and the measured matmul peaks (pass ``peaks`` to reuse a measurement)."""
    peaks = peaks or measure_peaks(device)
    if torch.device(device).type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, float32 matmul "
            f"precision {torch.get_float32_matmul_precision()}; measured matmul peak GFLOP/s: float32 {peaks['float32']:.0f}, "
            f"bfloat16 {peaks['bfloat16']:.0f}"
        )
    return (
        f"{cpu_model()} [{cpu_flags()}], {torch.get_num_threads()} threads, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), native bf16: {_cpu_has_native_bf16()}; measured matmul peak "
        f"GFLOP/s: float32 {peaks['float32']:.0f}, bfloat16 {peaks['bfloat16']:.1f}"
    )


def _cpu_has_native_bf16() -> bool:
    from e1min.scoring import cpu_has_native_bf16

    return cpu_has_native_bf16()


# ---------------------------------------------------------------------------------------------
# Model FLOPs and MFU
#
# Linear layers: a forward costs 2 FLOPs per weight per token. A LoRA step with a frozen base still
# needs the activation gradients (another 2 per weight per token) but no weight gradients, so a step is
# ~4 x N x tokens (the small LoRA matrices get both: 6 x N_lora x tokens). Attention adds what the chosen
# path actually computes: 4 x d_head x heads FLOPs per (query, key) pair in the forward and twice that
# in the backward (dV, dP, dQ, dK). Linear FLOPs count real tokens only (padding is not model work);
# the flash kernel's recomputation of the scores in backward is not counted either.
# MFU = model FLOPs / seconds / the same precision's measured matmul peak.
# ---------------------------------------------------------------------------------------------
def matmul_params(config, with_head: bool = True) -> int:
    """Weights used in matmuls per token: q/k/v/o and the gated MLP of every layer, plus the MLM head."""
    h, kv, i = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    head = h * h + h * config.vocab_size if with_head else 0
    return config.num_hidden_layers * per_layer + head


def lora_params(model: torch.nn.Module) -> int:
    """Trainable LoRA weights (lora_A + lora_B) of a model."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def attention_pairs(model, sequence_ids: torch.Tensor) -> int:
    """(query, key) pairs the model's attention path computes for this batch, summed over layers."""
    from e1min.attention import BlockRanges, layer_masks, sequence_spans

    backbone = model.model if hasattr(model, "model") else model
    within, glob = layer_masks(sequence_ids.cpu(), backbone.attn_impl if backbone.attn_impl != "flex" else "structured")
    b, n = sequence_ids.shape
    if backbone.attn_impl == "flex" or (backbone.attn_impl == "structured" and sequence_ids.device.type == "cuda"):
        # FlexAttention skips masked tiles: count the pairs E1's masks allow (its partial tiles' waste is not model work).
        spans = sequence_spans(sequence_ids.cpu()) or []
        w, g = sum((e - s) ** 2 for _, s, e in spans), sum((e - s) * e for _, s, e in spans)
        return sum(g if layer.is_global else w for layer in backbone.layers)

    def pairs(mask) -> int:
        if isinstance(mask, BlockRanges):
            return sum((q1 - q0) * (k1 - k0) for _, q0, q1, k0, k1, _ in mask.blocks)
        return b * n * n  # SDPA over the full (padded) row, with or without a dense mask

    return sum(pairs(glob if layer.is_global else within) for layer in backbone.layers)


def forward_flops(config, tokens: int, pairs: int) -> float:
    """Model FLOPs of one forward: linear layers (MLM head on every token) + attention pairs."""
    return 2 * matmul_params(config) * tokens + 4 * config.hidden_size * pairs


def lora_step_flops(config, tokens: int, pairs: int, n_lora: int, head_tokens: int) -> float:
    """Model FLOPs of one LoRA step (frozen base): 4 N T + 6 N_lora T + MLM head on ``head_tokens`` + 3 x attention."""
    backbone = matmul_params(config, with_head=False)
    head = matmul_params(config) - backbone
    return 4 * backbone * tokens + 6 * n_lora * tokens + 4 * head * head_tokens + 3 * 4 * config.hidden_size * pairs


def default_bf16_rows() -> bool:
    """bf16 rows by default only where bf16 is fast (native CPU support); emulated bf16 rows take hours."""
    return _cpu_has_native_bf16() or torch.cuda.is_available()
