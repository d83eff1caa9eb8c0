"""Optimiser-step throughput and peak memory of joint LoRA training, E1-150m shape (random weights), CPU.

    python tools/bench_train.py [--preset e1-150m] [--steps 3] [--warmup 1] [--lengths 300]

One step = forward + backward of the joint loss (ion-head BCE + MLM through mlm_head) on one batch,
gradient sync (a no-op in one process), clipping and AdamW. Rows vary batch x length, context,
float32 vs bfloat16 autocast, and activation checkpointing. Each row runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import (  # noqa: E402
    attention_pairs,
    default_bf16_rows,
    lora_params,
    lora_step_flops,
    machine_line,
    measure_peaks,
    peak_memory_mb,
    print_table,
    run_child,
    timed,
)

SETTINGS = [
    {"batch": 2, "length": 256, "context": 0, "precision": "float32", "ckpt": False},
    {"batch": 2, "length": 256, "context": 0, "precision": "bf16-autocast", "ckpt": False},
    {"batch": 2, "length": 256, "context": 0, "precision": "bf16-base+autocast", "ckpt": False},
    {"batch": 2, "length": 256, "context": 0, "precision": "float32", "ckpt": True},
    {"batch": 2, "length": 300, "context": 0, "precision": "float32", "ckpt": False},
    {"batch": 2, "length": 300, "context": 0, "precision": "float32", "ckpt": True},
    {"batch": 2, "length": 300, "context": 0, "precision": "bf16-base+autocast", "ckpt": False},
    {"batch": 8, "length": 256, "context": 0, "precision": "float32", "ckpt": False},
    {"batch": 8, "length": 256, "context": 0, "precision": "bf16-autocast", "ckpt": False},
    {"batch": 1, "length": 256, "context": 3, "precision": "float32", "ckpt": False},
    {"batch": 1, "length": 256, "context": 3, "precision": "bf16-autocast", "ckpt": False},
    {"batch": 1, "length": 256, "context": 3, "precision": "bf16-autocast", "ckpt": True},
]


def child(s: dict) -> dict:
    from e1min.config import preset
    from e1min.data.collate import MaskingConfig, collate
    from e1min.data.dataset import Example
    from e1min.dist import DistContext
    from e1min.heads import BindingModel
    from e1min.lora import apply_lora
    from e1min.random_checkpoint import random_model
    from e1min.train import LossSpec, backward_window, build_optimizer, optimizer_step

    torch.manual_seed(0)
    device = torch.device(s.get("device", "cpu"))
    base_dtype = torch.bfloat16 if s["precision"] == "bf16-base+autocast" else torch.float32
    config = preset(s["preset"])
    backbone = random_model(config, seed=0, dtype=base_dtype)
    apply_lora(backbone, r=16, alpha=32)
    backbone.set_gradient_checkpointing(s["ckpt"])
    if s.get("compile"):
        from e1min.compile import compile_model

        compile_model(backbone)
    model = BindingModel(backbone, ["ZN"], head_dropout=0.3).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, 1e-4, 0.035)
    rng = np.random.default_rng(0)
    alphabet = list("ACDEFGHIKLMNPQRSTVWY")

    def seq():
        return "".join(rng.choice(alphabet, s["length"]))

    examples = [
        Example(f"p{i}", "ZN", seq(), (rng.random(s["length"]) < 0.02).astype(np.uint8), context=[seq() for _ in range(s["context"])])
        for i in range(s["batch"])
    ]
    batch = collate(examples, masking=MaskingConfig(0.15), seed=0, epoch=0)
    tokens = int((batch["sequence_ids"] >= 0).sum())
    ctx = DistContext(device=device)
    precision = "float32" if s["precision"] == "float32" else "bf16"

    def step():
        backward_window(model, [(batch, "ZN")], ctx, LossSpec({"ZN": 5.0}, 1.0), precision)
        optimizer_step(params, opt, ctx, 1.0, 1e-4)

    sec = timed(step, s["steps"], s.get("warmup", 1), device)
    # Model FLOPs only: activation checkpointing's recomputed forward is not counted (it lowers MFU, as it should).
    flops = lora_step_flops(
        config,
        tokens,
        attention_pairs(backbone, batch["sequence_ids"].to(device)),
        lora_params(backbone),
        int((batch["mlm_labels"] != -100).sum()),
    )
    peak = s["peaks"]["float32" if s["precision"] == "float32" else "bfloat16"]
    return {
        **s,
        "tokens": tokens,
        "tok_s": tokens / sec,
        "prot_s": s["batch"] / sec,
        "s_step": sec,
        "rss_mb": peak_memory_mb(device),
        "mfu": 100 * flops / sec / (peak * 1e9),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="e1-150m")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="only the rows of these lengths")
    p.add_argument("--bf16", action="store_true", help="also the bf16 rows on a CPU without native bf16 (very slow)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the memory column is then peak GPU memory)")
    p.add_argument("--compile", action="store_true", help="each row also with compiled decoder layers (e1min.compile_model), side by side")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    peaks = measure_peaks(a.device)
    print(f"bench_train: {a.preset} + LoRA r=16 (7 targets) + ion head, joint BCE+MLM, AdamW; {machine_line(peaks, a.device)}")
    print(
        "MFU: step model FLOPs (4 x frozen matmul weights x tokens + 6 x LoRA weights x tokens + MLM head on masked "
        "tokens + 3 x attention) / time / the precision's measured matmul peak"
    )
    settings = SETTINGS if (a.bf16 or default_bf16_rows()) else [s for s in SETTINGS if s["precision"] == "float32"]
    if len(settings) < len(SETTINGS):
        print("bf16 rows skipped: no native bf16 on this CPU (emulated bf16 is far slower; --bf16 runs them anyway)")
    if a.lengths:
        settings = [s for s in settings if s["length"] in a.lengths]
    if a.compile:  # warm-up steps then include the compile: the timed steps measure the compiled graphs
        settings = [{**s, "compile": c} for s in settings for c in (False, True)]
        a.warmup = max(a.warmup, 2)
    print(f"steps: median of {a.steps} timed step(s) after {a.warmup} warm-up step(s); LoRA dropout 0 (apply_lora default)")
    rows = []
    for s in settings:
        rows.append(
            run_child(__file__, {**s, "preset": a.preset, "device": a.device, "steps": a.steps, "warmup": a.warmup, "peaks": peaks})
        )
        print(f"  done: {rows[-1]}", file=sys.stderr, flush=True)
    print_table(
        rows,
        [
            ("batch", "batch", "d"),
            ("length", "length", "d"),
            ("context", "context seqs", "d"),
            ("precision", "precision", ""),
            ("ckpt", "act. ckpt", ""),
            ("compile", "compiled", ""),
            ("tokens", "tokens", "d"),
            ("s_step", "s/step", ".2f"),
            ("tok_s", "tokens/s", ".0f"),
            ("prot_s", "proteins/s", ".2f"),
            ("mfu", "MFU %", ".1f"),
            ("rss_mb", "peak RSS MB", ".0f"),
            ("load", "load avg", ".1f"),
            ("other_cpu", "other CPU %", ".0f"),
        ],
    )


if __name__ == "__main__":
    main()
