"""One training epoch on real protein lengths: token-budget batches vs fixed batch_size 2.

    python tools/bench_epoch.py [--fasta ../shared/data/metal/ZN_train.fasta] [--proteins 200] [--max-tokens 4096]

E1-150m shape (random weights, float32), no context, LoRA r=16 on the 7 targets (dropout 0.2) + ion head, joint loss,
AdamW, one optimiser step per batch (as bench_train.py). Reports wall time per epoch, tokens/s over real
tokens only (padding excluded), padding fraction and peak RSS. Each batching mode runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import machine_line, peak_rss_mb, print_table, run_child  # noqa: E402

# the shared data folder beside the repository (as the Makefile's BENCH_FASTA)
DEFAULT_FASTA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "metal" / "ZN_train.fasta")


def child(s: dict) -> dict:
    from e1min.config import preset
    from e1min.data.batching import fixed_size_batches, token_budget_batches
    from e1min.data.collate import MaskingConfig, collate
    from e1min.data.dataset import Example
    from e1min.data.fasta import read_fasta
    from e1min.dist import DistContext
    from e1min.heads import BindingModel
    from e1min.lora import apply_lora
    from e1min.random_checkpoint import random_model
    from e1min.train import LossSpec, backward_window, build_optimizer, optimizer_step

    torch.manual_seed(0)
    records = [r for r in read_fasta(s["fasta"]) if r.labels is not None][: s["proteins"]]
    examples = [Example(r.id, "ZN", r.sequence, r.labels) for r in records]
    lengths = [ex.num_tokens for ex in examples]
    if s["batching"] == "token_budget":
        plan = token_budget_batches(lengths, s["max_tokens"], seed=0)
    else:
        plan = fixed_size_batches(lengths, s["batch_size"], seed=0)
    backbone = random_model(preset(s["preset"]), seed=0)
    apply_lora(backbone, r=16, alpha=32, dropout=0.2)
    model = BindingModel(backbone, ["ZN"], head_dropout=0.3).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, 1e-4, 0.035)
    ctx = DistContext()
    real = padded = 0
    t0 = time.perf_counter()
    for idx in plan:
        batch = collate([examples[i] for i in idx], masking=MaskingConfig(0.15), seed=0, epoch=0)
        real += int((batch["sequence_ids"] >= 0).sum())
        padded += batch["sequence_ids"].numel()
        backward_window(model, [(batch, "ZN")], ctx, LossSpec({"ZN": 5.0}, 1.0), bf16=False)
        optimizer_step(params, opt, ctx, 1.0, 1e-4)
    sec = time.perf_counter() - t0
    return {
        **s,
        "batches": len(plan),
        "tokens": real,
        "padding": 100 * (1 - real / padded),
        "epoch_s": sec,
        "tok_s": real / sec,
        "rss_mb": peak_rss_mb(),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fasta", default=DEFAULT_FASTA, help="labelled FASTA (3-line records)")
    p.add_argument("--proteins", type=int, default=200, help="first N labelled proteins of the file")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget per batch")
    p.add_argument("--batch-size", type=int, default=2, help="fixed batch size to compare with")
    p.add_argument("--preset", default="e1-150m")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    if not Path(a.fasta).is_file():
        sys.exit(f"bench_epoch: FASTA file not found: {a.fasta} (pass --fasta PATH)")
    print(f"bench_epoch: {a.preset}, float32, first {a.proteins} proteins of {a.fasta}, LoRA r=16 joint step per batch; {machine_line()}")
    common = {"fasta": str(a.fasta), "proteins": a.proteins, "preset": a.preset, "max_tokens": a.max_tokens, "batch_size": a.batch_size}
    rows = [run_child(__file__, {**common, "batching": b}, timeout=4 * 3600) for b in ("token_budget", "fixed")]
    print_table(
        rows,
        [
            ("batching", "batching", ""),
            ("batches", "batches", "d"),
            ("tokens", "real tokens", "d"),
            ("padding", "padding %", ".1f"),
            ("epoch_s", "s/epoch", ".0f"),
            ("tok_s", "tokens/s", ".0f"),
            ("rss_mb", "peak RSS MB", ".0f"),
            ("load", "load avg", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
