"""Forward throughput (tokens/s) and peak memory of an E1-150m-shaped model (random weights) on CPU.

    python tools/bench_model.py [--preset e1-150m] [--repeats 3] [--dtypes float32] [--compile] [--device cuda]
                                [--e1jax-path DIR]

Rows: batch x length, single sequence or with context (context sequences of the same length + the query),
float32 weights and bfloat16 weights; with --compile each row also compiled (e1min.compile_model). When e1jax
(the JAX/Equinox E1, single sequence, float32; never a dependency) is importable, one more row runs its jitted
1 x 256 forward of the same shape. Each row runs in a fresh process (peak RSS is that row's own).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import (  # noqa: E402
    attention_pairs,
    default_bf16_rows,
    forward_flops,
    machine_line,
    measure_peaks,
    peak_memory_mb,
    peak_rss_mb,
    print_table,
    run_child,
    timed,
)

SETTINGS = [
    {"batch": 1, "length": 256, "context": 0},
    {"batch": 8, "length": 256, "context": 0},
    {"batch": 2, "length": 1024, "context": 0},
    {"batch": 1, "length": 256, "context": 7},
]


def e1jax_child(s: dict) -> dict:
    """The other independent E1 (e1jax: JAX/Equinox, float32, one sequence per call, jitted), same shape, random weights."""
    if s.get("e1jax_path"):
        sys.path.insert(0, s["e1jax_path"])
    import e1jax
    import equinox as eqx
    import jax

    from e1min.config import preset

    config = preset(s["preset"])
    model = e1jax.E1(
        config.hidden_size, config.num_attention_heads, config.intermediate_size, config.num_hidden_layers, key=jax.random.PRNGKey(0)
    )
    seq = "".join("ACDEFGHIKLMNPQRSTVWY"[i % 20] for i in range(s["length"]))
    tokens = e1jax.pad_and_mask(e1jax.tokenize(seq), pad_length=0)
    forward = eqx.filter_jit(lambda m, t: m(**t._asdict()))
    sec = timed(lambda: jax.block_until_ready(forward(model, tokens)), s["repeats"], warmup=2)
    n = len(tokens.tokens)
    row = {**s, "dtype": "float32 (e1jax)", "compile": "jax.jit", "tokens": n, "tok_s": n / sec, "ms": sec * 1000}
    return {**row, "rss_mb": peak_rss_mb(), "mfu": float("nan")}


def child(s: dict) -> dict:
    if s.get("e1jax"):
        return e1jax_child(s)
    from e1min.config import preset
    from e1min.random_checkpoint import random_model
    from e1min.tokenizer import prepare_batch

    torch.manual_seed(0)
    config = preset(s["preset"])
    device = torch.device(s.get("device", "cpu"))
    model = random_model(config, seed=0, dtype=getattr(torch, s["dtype"])).to(device)
    if s.get("compile"):
        from e1min.compile import compile_model

        compile_model(model)
    seq = "".join("ACDEFGHIKLMNPQRSTVWY"[i % 20] for i in range(s["length"]))
    row = ",".join([seq] * (s["context"] + 1))
    batch = {k: v.to(device) for k, v in prepare_batch([row] * s["batch"]).items()}
    tokens = int((batch["sequence_ids"] >= 0).sum())
    with torch.no_grad():  # (not inference_mode: compiled graphs are the ones predict uses)
        sec = timed(lambda: model(**batch), s["repeats"], warmup=2 if s.get("compile") else 1, device=device)
    flops = forward_flops(config, tokens, attention_pairs(model, batch["sequence_ids"]))
    return {
        **s,
        "tokens": tokens,
        "tok_s": tokens / sec,
        "ms": sec * 1000,
        "rss_mb": peak_memory_mb(device),
        "mfu": 100 * flops / sec / (s["peak"] * 1e9),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="e1-150m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=None, help="default: float32, plus bfloat16 where the CPU has native bf16")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the memory column is then peak GPU memory)")
    p.add_argument("--compile", action="store_true", help="each row also with compiled decoder layers, side by side")
    p.add_argument(
        "--e1jax-path", default=None, help="where e1jax is installed, if not importable (pip install --target DIR e1jax jax equinox ...)"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    dtypes = a.dtypes or (["float32", "bfloat16"] if default_bf16_rows() else ["float32"])
    peaks = measure_peaks(a.device)
    print(f"bench_model: {a.preset} forward (no_grad), {machine_line(peaks, a.device)}")
    print("MFU: model FLOPs (2 x matmul weights x real tokens + attention pairs computed) / time / the dtype's measured matmul peak")
    rows = [
        run_child(__file__, {**s, "dtype": d, "preset": a.preset, "device": a.device, "repeats": a.repeats, "peak": peaks[d], "compile": c})
        for d in dtypes
        for s in SETTINGS
        for c in ((False, True) if a.compile else (False,))
    ]
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path[:0] = sys.argv[1:]; import e1jax", *([a.e1jax_path] if a.e1jax_path else [])],
        capture_output=True,
    )
    if probe.returncode == 0:  # optional row: the other independent E1, single-sequence float32 forward
        one = {"batch": 1, "length": 256, "context": 0, "preset": a.preset, "repeats": a.repeats, "e1jax": True, "e1jax_path": a.e1jax_path}
        rows.append(run_child(__file__, one))
    else:
        print("e1jax row skipped: e1jax is not importable (optional; --e1jax-path DIR)")
    print_table(
        rows,
        [
            ("dtype", "dtype", ""),
            ("batch", "batch", "d"),
            ("length", "length", "d"),
            ("context", "context seqs", "d"),
            ("compile", "compiled", ""),
            ("tokens", "tokens", "d"),
            ("ms", "ms/forward", ".0f"),
            ("tok_s", "tokens/s", ".0f"),
            ("mfu", "MFU %", ".1f"),
            ("rss_mb", "peak RSS MB", ".0f"),
        ],
    )


if __name__ == "__main__":
    main()
