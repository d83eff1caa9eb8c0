"""Attention with MSA context: training step and forward vs context size, dense vs structured attention.

    python tools/bench_context.py [--contexts 8 16 32 64] [--dense-max-context 16] [--steps 2 --warmup 1]
        [--ckpt-contexts 64] [--malloc-contexts 0 64]

E1-150m shape (random weights), float32 and, where the CPU has native bf16, bf16 (a bf16 base under
bf16 autocast, float32 LoRA weights, as ``training.bf16``). Rows: a 300-residue query with 8/16/32/64 context sequences of
110-150 residues (one row per batch), plus the 2 x 300 single-sequence batch as the baseline. Training
step = LoRA r=16 on the 7 targets (dropout 0.2, the real recipe's) + ion head, joint BCE + MLM loss, AdamW (as
bench_train.py). Columns: real tokens, s/iter (median of --steps timed iterations after --warmup),
tokens/s, MFU (model FLOPs of the chosen attention path / time / the row precision's matmul peak
measured in this run), peak RSS, load average at the end of the row. Each row runs in a fresh process.

--malloc-contexts: the structured training rows of these context sizes again with
MALLOC_MMAP_THRESHOLD_=131072 in the child's environment (glibc reads it at process start), to show how
much of the peak RSS is freed memory that glibc keeps rather than live tensors.
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
    forward_flops,
    lora_params,
    lora_step_flops,
    machine_line,
    measure_peaks,
    median,
    peak_memory_mb,
    print_table,
    run_child,
    timed_steps,
)

QUERY_LENGTH = 300


def make_examples(context: int, seed: int = 0):
    """The bench rows: context 0 -> two 300-residue queries; else one query with ``context`` rows of 110-150."""
    from e1min.data.dataset import Example

    rng = np.random.default_rng(seed)
    alphabet = list("ACDEFGHIKLMNPQRSTVWY")

    def seq(n):
        return "".join(rng.choice(alphabet, n))

    def example(i, ctx):
        labels = (rng.random(QUERY_LENGTH) < 0.02).astype(np.uint8)
        return Example(f"p{i}", "ZN", seq(QUERY_LENGTH), labels, context=[seq(int(rng.integers(110, 151))) for _ in range(ctx)])

    return [example(0, 0), example(1, 0)] if context == 0 else [example(0, context)]


def child(s: dict) -> dict:
    from e1min.config import preset
    from e1min.data.collate import MaskingConfig, collate
    from e1min.dist import DistContext
    from e1min.heads import BindingModel
    from e1min.lora import apply_lora
    from e1min.random_checkpoint import random_model
    from e1min.runtime import autocast
    from e1min.train import LossSpec, backward_window, build_optimizer, optimizer_step

    torch.manual_seed(0)
    device = torch.device(s.get("device", "cpu"))
    config = preset(s["preset"])
    bf16 = s.get("precision", "float32") == "bf16"
    backbone = random_model(config, seed=0, dtype=torch.bfloat16 if bf16 else torch.float32).to(device)
    backbone.set_attn_impl(s["impl"])
    backbone.set_gradient_checkpointing(s.get("ckpt", False))
    if s.get("compile"):
        from e1min.compile import compile_model

        compile_model(backbone)
    batch = collate(make_examples(s["context"]), masking=MaskingConfig(0.15), seed=0, epoch=0)
    tokens = int((batch["sequence_ids"] >= 0).sum())
    pairs = attention_pairs(backbone, batch["sequence_ids"].to(device))
    precision = "bf16" if bf16 else "float32"
    if s["mode"] == "forward":
        ids = {k: batch[k].to(device) for k in ("input_ids", "within_seq_position_ids", "global_position_ids", "sequence_ids")}
        with torch.inference_mode(), autocast(device, precision):
            times = timed_steps(lambda: backbone(**ids), s["steps"], s["warmup"], device)
        flops = forward_flops(config, tokens, pairs)
    else:
        apply_lora(backbone, r=16, alpha=32, dropout=0.2)
        model = BindingModel(backbone, ["ZN"], head_dropout=0.3).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(model, 1e-4, 0.035)
        ctx = DistContext(device=device)

        def step():
            backward_window(model, [(batch, "ZN")], ctx, LossSpec({"ZN": 5.0}, 1.0), precision)
            optimizer_step(params, opt, ctx, 1.0, 1e-4)

        times = timed_steps(step, s["steps"], s["warmup"], device)
        flops = lora_step_flops(config, tokens, pairs, lora_params(backbone), int((batch["mlm_labels"] != -100).sum()))
    sec = median(times)
    return {
        **s,
        "rows": len(batch["input_ids"]),
        "tokens": tokens,
        "s": sec,
        "s_min": min(times),
        "times": times,
        "tok_s": tokens / sec,
        "mfu": 100 * flops / sec / (s["peak"] * 1e9),
        "rss_mb": peak_memory_mb(device),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="e1-150m")
    p.add_argument("--contexts", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument(
        "--dense-max-context",
        type=int,
        default=16,
        help="dense rows only up to this many context sequences (dense memory grows quadratically)",
    )
    p.add_argument(
        "--plain-max-context",
        type=int,
        default=16,
        help="structured training rows without activation checkpointing only up to this many context "
        "sequences (default malloc: peak RSS grows by several MB per token; see the rows)",
    )
    p.add_argument(
        "--ckpt-contexts",
        type=int,
        nargs="*",
        default=[8, 16, 32, 64],
        help="context sizes that also get a structured training row with activation checkpointing",
    )
    p.add_argument(
        "--malloc-contexts",
        type=int,
        nargs="*",
        default=[0, 64],
        help="structured training rows repeated with MALLOC_MMAP_THRESHOLD_ (see above)",
    )
    p.add_argument("--mmap-threshold", default="131072")
    p.add_argument(
        "--malloc-ckpt-from", type=int, default=32, help="malloc rows of this many context sequences or more use activation checkpointing"
    )
    p.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        choices=["float32", "bf16"],
        help="default: float32, plus bf16 where the CPU has native bf16 (emulated bf16 rows take hours)",
    )
    p.add_argument("--impls", nargs="+", default=["structured", "dense"], choices=["structured", "flex", "dense"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (structured = FlexAttention there)")
    p.add_argument("--compile", action="store_true", help="each structured row also with compiled decoder layers, side by side")
    p.add_argument("--no-baseline", action="store_true", help="skip the 2 x 300 no-context rows (context 0)")
    p.add_argument("--modes", nargs="+", default=["train", "forward"], choices=["train", "forward"])
    p.add_argument("--forward-contexts", type=int, nargs="+", default=None, help="context sizes of forward rows (default: --contexts)")
    p.add_argument("--steps", type=int, default=3, help="timed iterations per row (median)")
    p.add_argument("--long-steps", type=int, default=2, help="timed iterations of rows with >= --long-context context sequences")
    p.add_argument("--long-context", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before them")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    peaks = measure_peaks(a.device)
    precisions = a.precisions or (["float32", "bf16"] if default_bf16_rows() else ["float32"])
    print(
        f"bench_context: {a.preset}, {' and '.join(precisions)}, query {QUERY_LENGTH} + context rows of 110-150 residues; "
        f"{machine_line(peaks, a.device)}{'; memory column: peak GPU memory (MB)' if a.device != 'cpu' else ''}"
    )
    if a.precisions is None and not default_bf16_rows():
        print("bf16 rows skipped: this CPU has no native bf16 (emulated bf16 matmuls run at ~1% of float32)")
    print(
        f"dense rows only up to {a.dense_max_context} context sequences: the dense path computes L x L attention in "
        f"all 20 layers and saves L x L float masks/probabilities for backward, so its memory and time grow "
        f"quadratically with the row length (extrapolate from the dense rows below)"
    )
    print(
        f"steps: median of {a.steps} timed iteration(s) ({a.long_steps} from {a.long_context} context sequences) after "
        f"{a.warmup} untimed warm-up iteration(s) per row; s min = the fastest timed iteration"
    )
    env_mmap = {"MALLOC_MMAP_THRESHOLD_": a.mmap_threshold}
    jobs = []  # (setting, env)
    for precision in precisions:
        for mode in a.modes:
            contexts = a.contexts if mode == "train" or a.forward_contexts is None else a.forward_contexts
            for context in contexts if a.no_baseline else [0, *contexts]:
                for impl in a.impls:
                    # the dense reference is compared in float32 only (its bf16 rows would repeat the story)
                    if impl == "dense" and (context > a.dense_max_context or precision != "float32"):
                        continue
                    if mode == "train" and context > a.plain_max_context:
                        continue
                    jobs.append(({"mode": mode, "precision": precision, "impl": impl, "ckpt": False, "context": context}, None))
                if mode == "train" and context in a.ckpt_contexts and "structured" in a.impls:
                    jobs.append(({"mode": mode, "precision": precision, "impl": "structured", "ckpt": True, "context": context}, None))
    if "train" in a.modes:
        for context in a.malloc_contexts:
            # the plain step of the largest contexts does not fit in RAM: compare malloc settings with checkpointing
            ckpt = context >= a.malloc_ckpt_from
            jobs.append(({"mode": "train", "precision": "float32", "impl": "structured", "ckpt": ckpt, "context": context}, env_mmap))
    if a.compile:  # compiled twins of the structured rows (two warm-up iterations: the compile happens there)
        jobs = [
            j
            for setting, env in jobs
            for j in ([(setting, env)] + ([({**setting, "compile": True}, env)] if setting["impl"] == "structured" else []))
        ]
        a.warmup = max(a.warmup, 2)
    rows = []
    for setting, env in jobs:
        malloc = "default" if env is None else f"mmap_thr={a.mmap_threshold}"
        r = run_child(
            __file__,
            {
                **setting,
                "malloc": malloc,
                "preset": a.preset,
                "device": a.device,
                "warmup": a.warmup,
                "peak": peaks["bfloat16" if setting["precision"] == "bf16" else "float32"],
                "steps": a.long_steps if setting["context"] >= a.long_context else a.steps,
            },
            timeout=7200,
            env=env,
        )
        print(f"  done: {r}", file=sys.stderr, flush=True)
        rows.append(r)
    print_table(
        rows,
        [
            ("mode", "mode", ""),
            ("precision", "precision", ""),
            ("impl", "attention", ""),
            ("ckpt", "act. ckpt", ""),
            ("compile", "compiled", ""),
            ("malloc", "malloc", ""),
            ("context", "context seqs", "d"),
            ("rows", "rows", "d"),
            ("tokens", "tokens", "d"),
            ("s", "s/iter", ".2f"),
            ("s_min", "s min", ".2f"),
            ("tok_s", "tokens/s", ".0f"),
            ("mfu", "MFU %", ".1f"),
            ("rss_mb", "peak RSS MB", ".0f"),
            ("load", "load avg", ".1f"),
            ("other_cpu", "other CPU %", ".0f"),
        ],
    )


if __name__ == "__main__":
    main()
