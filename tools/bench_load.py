"""Peak RSS while loading a checkpoint with e1min.load_model, against the checkpoint's file size.

    python tools/bench_load.py [--preset e1-150m] [--dtype float32] [--dir /tmp/e1min_bench_ckpt]

Writes a random checkpoint of that shape once (reused on later runs), then loads it in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import peak_rss_mb, print_table, run_child  # noqa: E402


def child(s: dict) -> dict:
    import time

    from e1min.hub import load_model

    base = peak_rss_mb()  # interpreter + torch, before any weight is touched
    t0 = time.perf_counter()
    model = load_model(s["dir"], dtype=getattr(torch, s["load_dtype"]))
    sec = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(s["dir"]).glob("*.safetensors")) / 2**20
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    after_load = peak_rss_mb()
    # Same-dtype tensors stay backed by the file's memory map until read; read every weight so the
    # figure includes them all.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    peak = peak_rss_mb()
    return {
        **s,
        "file_mb": size,
        "weights_mb": params,
        "base_mb": base,
        "load_mb": after_load,
        "peak_mb": peak,
        "ratio": (peak - base) / size,
        "seconds": sec,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="e1-150m")
    p.add_argument("--dtype", default="float32", help="checkpoint dtype on disk")
    p.add_argument("--dir", default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    directory = Path(a.dir or f"/tmp/e1min_bench_{a.preset}_{a.dtype}")
    if not (directory / "config.json").exists():
        from e1min.config import preset
        from e1min.random_checkpoint import write_random_checkpoint

        write_random_checkpoint(directory, preset(a.preset), seed=0, dtype=getattr(torch, a.dtype))
    rows = [run_child(__file__, {"dir": str(directory), "load_dtype": d}) for d in ("float32", "bfloat16")]
    print(f"bench_load: {a.preset} checkpoint stored as {a.dtype} in {directory}")
    print("base = interpreter + torch; after load = peak right after load_model; peak = after reading every weight;")
    print("added/file = (peak - base) / file size (the issue's target: <= ~1.3)")
    print_table(
        rows,
        [
            ("load_dtype", "load dtype", ""),
            ("file_mb", "file MB", ".0f"),
            ("weights_mb", "weights MB", ".0f"),
            ("base_mb", "base MB", ".0f"),
            ("load_mb", "after load MB", ".0f"),
            ("peak_mb", "peak MB", ".0f"),
            ("ratio", "added/file", ".2f"),
            ("seconds", "seconds", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
