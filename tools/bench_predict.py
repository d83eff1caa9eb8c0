"""Throughput of `e1min predict` (proteins/s, residues/s) on CPU or GPU.

    python tools/bench_predict.py [--fasta ../shared/data/metal/ZN_train.fasta] [--limit 200] [--models tiny,e1-150m]
                                  [--dtype float32|bfloat16] [--max-tokens 16384] [--threads N] [--folds 1]

For each model shape (``tiny`` = the demo model, ``e1-150m`` = E1-150m-shaped) it writes a random base
checkpoint and a one-fold run checkpoint with random LoRA (r=16, all 7 projections) and random ZN head
into --work-dir (reused on later runs), then times ``predict_file`` (the code path of `e1min predict`:
length-sorted token-budget batches, streamed TSV, merged LoRA for one fold, unmerged + switched for
several) on the first --limit proteins of the FASTA. Random weights: throughput only, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_FASTA = Path(__file__).resolve().parents[2] / "shared/data/metal/ZN_train.fasta"


def make_run(work: Path, shape: str, folds: int, max_query_length: int) -> Path:
    """A random base E1 of ``shape`` plus a run directory with ``folds`` random fold checkpoints."""
    from e1min.checkpoint import save_state
    from e1min.config import preset
    from e1min.heads import BindingModel
    from e1min.hub import load_model
    from e1min.io import atomic_write_json
    from e1min.lora import apply_lora, lora_modules
    from e1min.random_checkpoint import write_random_checkpoint
    from e1min.run import RunDir

    base = work / f"{shape}-base"
    if not (base / "config.json").exists():
        print(f"writing random {shape} base checkpoint to {base} ...", file=sys.stderr)
        write_random_checkpoint(base, preset(shape), seed=0)
    run = RunDir(work / f"{shape}-run-{folds}fold-q{max_query_length}")
    if all(run.fold_result(k).exists() for k in range(1, folds + 1)):
        return run.root
    for k in range(1, folds + 1):
        backbone = load_model(base, dtype=torch.float32)
        torch.manual_seed(k)
        apply_lora(backbone, r=16, alpha=32)
        with torch.no_grad():
            for m in lora_modules(backbone).values():
                m.lora_B.normal_(0, 0.01)
        model = BindingModel(backbone, ["ZN"])
        meta = {
            "fold": k,
            "epoch": 1,
            "ions": ["ZN"],
            "base_model": str(base.resolve()),
            "base_revision": None,
            "base_config": backbone.config.to_dict(),
            "lora": {
                "r": 16,
                "alpha": 32,
                "lora_dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
                "train_mlm_head": False,
                "use_rslora": False,
                "layers": None,
            },
            "head_dropout": 0.0,
            "max_query_length": max_query_length,
            "max_example_tokens": 16384,
            "validation_msa_sampling": {},
            "metrics": {},
        }
        save_state(run.state(k, "best"), model, meta)
        atomic_write_json(run.fold_result(k), {"fold": k, "complete": True})
    atomic_write_json(run.thresholds, {"ZN": {"threshold": 0.5, "method": "fixed"}})
    return run.root


def bench(run: Path, records, args, label: str) -> dict:
    from e1min.predict import load_predictor, predict_file

    t0 = time.time()
    dtype = getattr(torch, args.dtype)
    predictor = load_predictor(run, device=args.device, dtype=dtype, bf16=args.bf16 or None)
    load_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up on a few proteins (first-call allocations), then the timed run.
        predict_file(predictor, records[:4], Path(tmp) / "warm.tsv", ["ZN"], max_tokens=args.max_tokens, progress=False)
        t0 = time.time()
        predict_file(predictor, records, Path(tmp) / "preds.tsv", ["ZN"], max_tokens=args.max_tokens, progress=not args.quiet)
        el = time.time() - t0
    residues = sum(len(r.sequence) for r in records)
    row = {
        "model": label,
        "folds": predictor.num_folds,
        "dtype": args.dtype,
        "device": str(predictor.device),
        "threads": torch.get_num_threads(),
        "proteins": len(records),
        "residues": residues,
        "load_s": round(load_s, 2),
        "predict_s": round(el, 2),
        "proteins_per_s": round(len(records) / el, 2),
        "residues_per_s": round(residues / el, 1),
        "max_tokens": args.max_tokens,
    }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fasta", default=str(DEFAULT_FASTA))
    p.add_argument("--limit", type=int, default=200, help="first N proteins (0 = all)")
    p.add_argument("--models", default="tiny,e1-150m", help="comma-separated presets")
    p.add_argument("--folds", type=int, default=1, help="folds in the benchmark run (1 = merged LoRA; >1 = ensemble)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="base weights dtype")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default on CUDA only)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--max-query-length", type=int, default=1022)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "e1min_bench_predict"))
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from e1min.predict import read_input_fasta

    records, skipped = read_input_fasta(args.fasta, skip_invalid=True)
    if args.limit:
        records = records[: args.limit]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in [m.strip() for m in args.models.split(",") if m.strip()]:
        run = make_run(work, shape, args.folds, args.max_query_length)
        rows.append(bench(run, records, args, shape))
        print(json.dumps(rows[-1]), file=sys.stderr)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(
        f"\n`e1min predict` throughput on {Path(args.fasta).name} (first {len(records)} proteins, "
        f"{sum(len(r.sequence) for r in records)} residues, 1 ion; load average {load:.1f} at the end)\n"
    )
    print("| model | folds | dtype | device | threads | proteins/s | residues/s | predict s | load s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['folds']} | {r['dtype']} | {r['device']} | {r['threads']} | {r['proteins_per_s']} | {r['residues_per_s']} | {r['predict_s']} | {r['load_s']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
