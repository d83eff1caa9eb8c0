"""Device and numeric precision: one explicit choice, honoured everywhere, recorded in every output.

Precision is ``"float32"`` or ``"bf16"`` (bf16 autocast for the backbone; ion heads, losses and
probabilities stay float32). It is never picked from CPU flags: inference defaults to float32 on the
CPU and to bf16 on CUDA, training follows ``training.bf16``. CPU flags only decide whether a bf16
request gets a "this will be slow" note (emulated bf16 on AVX2-only CPUs is far slower than float32).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
from typing import Literal

import torch

log = logging.getLogger("e1min")

Precision = Literal["float32", "bf16"]
PRECISIONS: tuple[str, ...] = ("float32", "bf16")
# Spellings accepted for a precision (CLI, API, config): bfloat16 is torch's name for bf16.
_ALIASES = {"float32": "float32", "fp32": "float32", "bf16": "bf16", "bfloat16": "bf16"}
MATMUL_PRECISIONS: tuple[str, ...] = ("highest", "high", "medium")

_warned: set[str] = set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). Without them, bf16 matmuls are
    emulated and far slower than float32 (measured ~100x on an AVX2-only EPYC: tools/bench_model.py)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 runs at least as fast as float32 here: CUDA, or a CPU with native bf16."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def parse_precision(value: str | None, what: str = "precision") -> Precision | None:
    """``float32`` / ``bf16`` (also ``fp32``, ``bfloat16``) -> canonical name; None stays None."""
    if value is None:
        return None
    canonical = _ALIASES.get(str(value).strip().lower())
    if canonical is None:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {str(value)[:80]!r}")
    return canonical  # type: ignore[return-value]


def inference_precision(device: torch.device, requested: str | None = None) -> Precision:
    """Precision of predict / evaluate / embed: as requested, else bf16 on CUDA and float32 elsewhere.

    A bf16 request on a CPU without native bf16 is honoured (same numbers as on any other CPU) with
    one note that it will be slow.
    """
    precision = parse_precision(requested) or ("bf16" if device.type == "cuda" else "float32")
    if precision == "bf16" and not bf16_is_fast(device):
        _note_once("bf16-slow", f"note: bf16 on {device} without native bf16 instructions is emulated and much slower than float32")
    return precision


def training_precision(device: torch.device, bf16_requested: bool) -> Precision:
    """Precision of training and validation: bf16 when ``training.bf16`` and the device runs it fast.

    On a CPU without native bf16, the request is ignored with a note (emulated bf16 would make an epoch
    several times slower); the precision that ran is recorded in every checkpoint.json.
    """
    if not bf16_requested:
        return "float32"
    if bf16_is_fast(device):
        return "bf16"
    _note_once(
        "bf16-train",
        f"note: training.bf16 ignored on {device} (no native bf16: emulated bf16 is far slower than float32); training runs float32",
    )
    return "float32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision == "bf16"``, otherwise a no-op."""
    if parse_precision(precision) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def float32_island(device_type: str) -> contextlib.AbstractContextManager:
    """Switch autocast off for a block that must run in float32 (ion heads, losses, probabilities)."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def set_matmul_precision(value: str) -> None:
    """``torch.set_float32_matmul_precision``: ``highest`` (exact float32, the default), ``high``/``medium``
    (TF32 on recent GPUs, oneDNN's reduced-precision float32 where the CPU has it)."""
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {str(value)[:80]!r}")
    torch.set_float32_matmul_precision(value)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (None: CUDA when available); asking for CUDA without one is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "meta") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {text[:80]!r}")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def describe(device: torch.device, precision: str, compiled: bool = False) -> dict[str, str | float | bool]:
    """What ran, for checkpoint.json / evaluation.json / log lines; on CUDA also the GPU and its peak memory so far."""
    out: dict[str, str | float | bool] = {
        "precision": str(precision),
        "device": str(device),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "compiled": bool(compiled),  # decoder layers compiled (e1min.compile_model)
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["peak_gpu_memory_gb"] = round(peak_gpu_memory_gb(device), 3)
        out["torch"] = torch.__version__
        out["cuda"] = str(torch.version.cuda)
    return out


def peak_gpu_memory_gb(device: torch.device) -> float:
    """Peak memory allocated by torch on a CUDA device since the last reset (0 elsewhere), in GB."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0


def strict_recompiles(limit: int) -> None:
    """torch.compile, process-wide: at least ``limit`` graphs per function, and hitting the limit raises instead of
    silently running the function uncompiled. Set once, not per call: a config patch around every call costs
    milliseconds."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, limit)
    cfg.fail_on_recompile_limit_hit = True


def _note_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``); False where there is no such call.

    glibc keeps freed tensor memory mapped, and eager PyTorch's mix of tensor sizes fragments it so that
    much of it is never reused: a checkpointed step over a long context row otherwise holds ~2x its live
    memory (README, Performance, "The allocator"). Numbers are unaffected; only where pages come from.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
