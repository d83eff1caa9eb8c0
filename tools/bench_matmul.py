"""Which float32 GEMM path torch takes on this CPU, and what torch.set_float32_matmul_precision changes.

    python tools/bench_matmul.py [--repeats 20] [--forward-repeats 3]

(a) A (608 x 768) @ (768 x 2304) float32 product (the 2 x 300-token batch through E1-150m's fused-width
q/k/v-sized projection) via torch.mm and F.linear, with torch.backends.mkldnn enabled (default) and
disabled; GFLOP/s (median of --repeats) and max abs error vs a float64 reference. Also prints the BLAS
torch was built with (torch.__config__.show()), torch.backends.mkl / mkldnn availability.
(b) torch.set_float32_matmul_precision "highest" / "high" / "medium": the same product, and an
E1-150m-shape forward (random weights) on 1 x 300 residues: tokens/s and max abs error of the logits
vs "highest".
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import machine_line, print_table, timed  # noqa: E402

M, K, N = 608, 768, 2304


def blas_lines() -> list[str]:
    """What torch.__config__.show() says about BLAS / LAPACK / oneDNN (the Build settings line cut to those keys)."""
    keys = ("blas", "lapack", "mkl", "mkldnn", "onednn", "openblas", "cpu capability", "openmp")
    out = []
    for line in torch.__config__.show().splitlines():
        line = line.strip()
        if line.startswith("- Build settings:"):
            items = [kv.strip() for kv in line.split(":", 1)[1].split(",")]
            out.append("- Build settings: " + ", ".join(kv for kv in items if any(k in kv.split("=")[0].lower() for k in keys)))
        elif any(k in line.lower() for k in keys):
            out.append(line)
    return out


def gemm_rows(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    a, b = torch.randn(M, K), torch.randn(K, N)
    w = b.t().contiguous()  # F.linear's weight layout (out x in)
    ref = a.double() @ b.double()
    rows = []
    for mkldnn in (True, False):
        for name, fn in (("torch.mm", lambda: torch.mm(a, b)), ("F.linear", lambda: F.linear(a, w))):
            with torch.backends.mkldnn.flags(enabled=mkldnn):
                sec = timed(fn, repeats, warmup=3)
                err = (fn().double() - ref).abs().max().item()
            rows.append(
                {
                    "op": name,
                    "mkldnn": mkldnn,
                    "precision": torch.get_float32_matmul_precision(),
                    "ms": sec * 1e3,
                    "gflops": 2 * M * K * N / sec / 1e9,
                    "err": err,
                }
            )
    return rows


def precision_rows(repeats: int, forward_repeats: int) -> list[dict]:
    from e1min.config import preset
    from e1min.random_checkpoint import random_model
    from e1min.tokenizer import prepare_batch

    torch.manual_seed(0)
    model = random_model(preset("e1-150m"), seed=0, dtype=torch.float32).eval()
    seq = "".join("ACDEFGHIKLMNPQRSTVWY"[(7 * i) % 20] for i in range(300))
    batch = prepare_batch([seq])
    tokens = int((batch["sequence_ids"] >= 0).sum())
    a, w = torch.randn(M, K), torch.randn(N, K)
    ref_mm = a.double() @ w.double().t()
    rows, ref_logits = [], None
    old = torch.get_float32_matmul_precision()
    try:
        for prec in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(prec)
            mm_sec = timed(lambda: F.linear(a, w), repeats, warmup=3)
            mm_err = (F.linear(a, w).double() - ref_mm).abs().max().item()
            with torch.inference_mode():
                t0 = time.perf_counter()
                logits = model(**batch).logits.float()  # first call doubles as warm-up
                first = time.perf_counter() - t0
                # A very slow path (emulated bf16) gets its single timed call; otherwise the median of the repeats.
                sec = first if first > 30 else timed(lambda: model(**batch), forward_repeats, warmup=0)
            if ref_logits is None:
                ref_logits = logits
            rows.append(
                {
                    "precision": prec,
                    "mm_gflops": 2 * M * K * N / mm_sec / 1e9,
                    "mm_err": mm_err,
                    "fwd_s": sec,
                    "tok_s": tokens / sec,
                    "logit_err": (logits - ref_logits).abs().max().item(),
                    "logit_scale": ref_logits.abs().max().item(),
                }
            )
    finally:
        torch.set_float32_matmul_precision(old)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="timed matmuls per setting (median)")
    p.add_argument("--forward-repeats", type=int, default=3, help="timed forwards per precision (median)")
    a = p.parse_args()
    print(f"bench_matmul: {machine_line()}")
    print(
        f"torch.backends.mkldnn.is_available(): {torch.backends.mkldnn.is_available()}; "
        f"torch.backends.mkl.is_available(): {torch.backends.mkl.is_available()}; "
        f"float32 matmul precision default: {torch.get_float32_matmul_precision()}"
    )
    print("torch.__config__.show() (BLAS-related lines):")
    for line in blas_lines():
        print(f"    {line}")
    print(f"\n(a) ({M} x {K}) @ ({K} x {N}) float32, median of {a.repeats}; err = max abs vs float64 reference")
    print_table(
        gemm_rows(a.repeats),
        [
            ("op", "op", ""),
            ("mkldnn", "mkldnn", ""),
            ("precision", "precision", ""),
            ("ms", "ms", ".2f"),
            ("gflops", "GFLOP/s", ".1f"),
            ("err", "max abs err", ".2e"),
        ],
    )
    print(
        f"\n(b) set_float32_matmul_precision: F.linear ({M} x {K}) x ({N} x {K})^T and an E1-150m forward on 1 x 300 "
        f"residues (random weights); logit err = max abs vs 'highest'"
    )
    print_table(
        precision_rows(a.repeats, a.forward_repeats),
        [
            ("precision", "precision", ""),
            ("mm_gflops", "GEMM GFLOP/s", ".1f"),
            ("mm_err", "GEMM err", ".2e"),
            ("fwd_s", "s/forward", ".3f"),
            ("tok_s", "tokens/s", ".0f"),
            ("logit_err", "logit err", ".2e"),
            ("logit_scale", "max |logit|", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
