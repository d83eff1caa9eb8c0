"""The prepared GPU check: is e1min's CUDA path correct, compiled once, and fast? One script, one run.

    make gpu-check                        # = PYTHONPATH=. python3 tools/gpu_check.py (installs nothing, no network)
    PYTHONPATH=. python3 tools/gpu_check.py --dry-run    # every phase that can run without CUDA, on the CPU

Random weights only, no downloads. Each check prints one line

    [PASS|FAIL|WARN] phase/check: value (limit) seconds

and each goes to a JSON file as it is made (--out; on the lent machine ``make gpu-check ARGS="--out $OUT/gpu_check.json"``
so it comes back even if the run is cut short). The exit code is 1 when any check FAILs: FAIL is for correctness;
a speed target that is missed is a WARN that says so (the targets have not been calibrated on a GPU yet). Phases:

- env:        torch / CUDA / GPU, the attention path ``layer_masks`` picks for a context batch, measured bf16 matmul peak
- parity:     tiny and E1-150m shapes, LoRA with non-zero B: CUDA float32 dense and flex, CUDA bf16 flex, each against
              the CPU float32 reference (embeddings, loss, every LoRA gradient; finite everywhere, padding included)
- recompiles: 15 batch shapes, forward and backward: graphs compiled, none added on a second pass, no fallback
- speed:      E1-600m, bf16 base + float32 LoRA (r16, 7 targets, dropout 0.2), joint loss, AdamW: 2 x 300 step,
              300 + 64 context rows with flex / dense / checkpointing, 1024 + 12288 validation forward (tokens/s, MFU, memory)
- e2e:        ``e1min train`` on the demo config, ``torchrun --nproc_per_node=1`` with a forced NCCL group,
              ``e1min predict`` on the device in bf16 and float32 against the CPU

In ``--dry-run`` the device is the CPU: flex runs forward only (torch has no CPU flex backward), the speed phase runs
the tiny shape (its figures say nothing about a GPU and are WARN, never PASS), and e2e uses gloo.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import lora_step_flops, matmul_params  # noqa: E402

from e1min.attention import flex_graph_count, layer_masks, sequence_spans  # noqa: E402
from e1min.config import preset  # noqa: E402
from e1min.data.collate import MaskingConfig, collate  # noqa: E402
from e1min.data.dataset import Example  # noqa: E402
from e1min.dist import DistContext, init_distributed  # noqa: E402
from e1min.heads import BindingModel  # noqa: E402
from e1min.lora import apply_lora  # noqa: E402
from e1min.runtime import autocast, set_matmul_precision  # noqa: E402
from e1min.steps import LossSpec, backward_window, build_optimizer, optimizer_step  # noqa: E402
from e1min.tokenizer import prepare_batch  # noqa: E402
from e1min.weights import random_model  # noqa: E402

AA = "ACDEFGHIKLMNPQRSTVWY"


class Report:
    """Collects check lines, rewriting ``out`` after each one; ``FAIL`` anywhere makes the exit code 1."""

    def __init__(self, dry_run: bool, out: Path):
        self.rows: list[dict] = []
        self.dry_run, self.out = dry_run, out
        self.info: dict = {}
        self.start = time.time()

    def add(self, phase: str, check: str, status: str, value, limit: str = "", seconds: float = 0.0) -> None:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"[{status}] {phase}/{check}: {text}{f' ({limit})' if limit else ''} {seconds:.1f}s", flush=True)
        self.rows.append({"status": status, "phase": phase, "check": check, "value": value, "limit": limit, "seconds": round(seconds, 2)})
        self.save()

    def check(self, phase: str, check: str, value, ok: bool, limit: str, t0: float, target: bool = False) -> None:
        """PASS/FAIL against ``limit``; a speed ``target`` that is missed (or measured in a dry run) is a WARN."""
        status = "PASS" if ok else ("WARN" if target else "FAIL")
        if target and self.dry_run:
            status = "WARN"
        self.add(phase, check, status, value, limit + ("" if ok or not target else ": target missed"), time.time() - t0)

    def save(self) -> None:
        summary = {"dry_run": self.dry_run, "seconds": round(time.time() - self.start, 1), "failed": self.failed, "info": self.info}
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps({**summary, "checks": self.rows}, indent=2, default=str) + "\n")
        tmp.replace(self.out)

    @property
    def failed(self) -> int:
        return sum(r["status"] == "FAIL" for r in self.rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seq(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(AA), n))


def lora_model(config, seed: int = 1, dropout: float = 0.0) -> torch.nn.Module:
    """Float32 E1 with LoRA on the 7 targets and non-zero B (so every LoRA matrix gets a gradient)."""
    model = random_model(config, seed=seed, dtype=torch.float32)
    apply_lora(model, r=8, alpha=16, dropout=dropout)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.train()


def bf16_base(model: torch.nn.Module) -> torch.nn.Module:
    """The training recipe's dtypes: the frozen base in bf16, LoRA float32."""
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    return model


def parity_batch(rng: np.random.Generator) -> dict:
    """Context rows of uneven lengths, a padded single sequence, a short row: every mask situation."""
    rows = [
        ",".join(seq(rng, int(n)) for n in (23, 140, 7, 61, 90)),
        seq(rng, 200),
        ",".join(seq(rng, int(n)) for n in (5, 11)),
    ]
    return prepare_batch(rows)


def forward_backward(model, batch, device, precision):
    """Embeddings, a loss over every valid position, and every LoRA gradient, all as float32 CPU tensors."""
    b = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    model.zero_grad(set_to_none=True)
    with autocast(device, precision):
        out = model(b["input_ids"], b["within_seq_position_ids"], b["global_position_ids"], b["sequence_ids"])
    valid = b["sequence_ids"] >= 0
    w = torch.linspace(0.5, 1.5, out.logits.shape[-1], device=device)
    # Squares weighted differently per vocabulary entry: every position matters, and no terms cancel out.
    loss = (out.logits[valid].float() * w).square().mean() + out.embeddings[valid].float().square().mean()
    grads = {}
    if torch.is_grad_enabled():
        loss.backward()
        grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if "lora_" in n}
    finite = bool(torch.isfinite(out.embeddings.float()).all()) and bool(torch.isfinite(out.logits).all())
    finite = finite and all(bool(torch.isfinite(g).all()) for g in grads.values())
    return out.embeddings.detach().float().cpu()[valid.cpu()], float(loss.detach()), grads, finite


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# -- phases ---------------------------------------------------------------------------------------------------
def phase_env(r: Report, device: torch.device) -> dict:
    t0 = time.time()
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    r.add("env", "torch", "PASS", f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}", "", 0)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mem = torch.cuda.get_device_properties(device).total_memory / 2**30
        info.update(gpu=name, gpu_memory_gib=round(mem, 1))
        r.add("env", "gpu", "PASS", f"{name}, {mem:.0f} GiB, {torch.cuda.device_count()} visible", "", time.time() - t0)
    else:
        r.add("env", "gpu", "WARN" if r.dry_run else "FAIL", "no CUDA device: dry run on the CPU", "a CUDA GPU", time.time() - t0)
    t0 = time.time()
    sid = parity_batch(np.random.default_rng(0))["sequence_ids"].to(device)
    within, _ = layer_masks(sid, "structured")
    path = type(within).__name__
    want = "BlockMask" if device.type == "cuda" else "BlockRanges"
    info["attention_path"] = path
    r.check("env", "attention_path", path, path == want, f"{want} for a context batch", t0)
    t0 = time.time()
    peak = matmul_peak_tflops(device, torch.bfloat16)
    info["bf16_peak_tflops"] = peak
    r.add("env", "bf16_matmul_peak_tflops", "PASS" if peak > 0 else "FAIL", peak, "measured now: the MFU denominator", time.time() - t0)
    return info


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best TFLOP/s of large matmuls in ``dtype`` (best of several calls, after warm-up)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        a @ b
    sync(device)
    for _ in range(10):
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


def phase_parity(r: Report, device: torch.device, shapes: list[tuple[str, object]]) -> None:
    set_matmul_precision("highest")  # float32 parity needs exact float32 matmuls (no TF32)
    for name, config in shapes:
        batch = parity_batch(np.random.default_rng(1))
        ref_model = lora_model(config)
        t0 = time.time()
        ref_emb, ref_loss, ref_grads, ok = forward_backward(ref_model, batch, torch.device("cpu"), "float32")
        r.check("parity", f"{name}/cpu_reference_finite", ok, ok, "finite", t0)
        variants = [("float32_dense", "dense", "float32"), ("float32_flex", "structured", "float32"), ("bf16_flex", "structured", "bf16")]
        for label, impl, precision in variants:
            if device.type == "cpu" and impl == "structured":
                impl = "flex"  # the dry run checks flex itself, forward only
            t0 = time.time()
            model = copy.deepcopy(ref_model)
            if precision == "bf16":
                bf16_base(model)
            model.to(device).set_attn_impl(impl)
            grad_ok = not (device.type == "cpu" and impl == "flex")
            with torch.set_grad_enabled(grad_ok):
                emb, loss, grads, finite = forward_backward(model, batch, device, precision)
            r.check("parity", f"{name}/{label}/finite", finite, finite, "finite everywhere, padding included", t0)
            if precision == "float32":
                err = float((emb - ref_emb).abs().max())
                r.check("parity", f"{name}/{label}/embeddings_max_abs", err, err <= 1e-4, "<= 1e-4 vs CPU float32", t0)
                lerr = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
                r.check("parity", f"{name}/{label}/loss_rel", lerr, lerr <= 1e-4, "<= 1e-4", t0)
                if grads:
                    worst = max(rel_err(grads[k], ref_grads[k]) for k in ref_grads)
                    r.check("parity", f"{name}/{label}/lora_grads_rel_max", worst, worst <= 1e-3, f"<= 1e-3 over {len(grads)} tensors", t0)
            else:
                cos = cosine(emb, ref_emb)
                r.check("parity", f"{name}/{label}/embeddings_cosine", cos, cos >= 0.999, ">= 0.999 vs float32", t0)
                if grads:
                    worst = min(cosine(grads[k], ref_grads[k]) for k in ref_grads)
                    r.check("parity", f"{name}/{label}/lora_grads_cosine_min", worst, worst >= 0.99, ">= 0.99 vs float32", t0, target=True)
            del model


def phase_recompiles(r: Report, device: torch.device) -> None:
    torch._dynamo.reset()
    model = lora_model(preset("tiny", num_hidden_layers=3)).to(device)
    model.set_attn_impl("flex")
    grad = device.type == "cuda"  # no CPU flex backward
    rng = np.random.default_rng(3)
    shapes = [(1 + i % 4, 30 + 70 * i) for i in range(15)]

    def one_pass() -> None:
        for rows, length in shapes:
            batch = prepare_batch([",".join(seq(rng, int(n)) for n in rng.integers(5, 80, size=max(1, length // 60))) for _ in range(rows)])
            with torch.set_grad_enabled(grad):
                forward_backward(model, batch, device, "float32")

    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            one_pass()
            first = flex_graph_count()
            mode = "forward+backward" if grad else "forward"
            r.check("recompiles", "graphs_first_pass", first, first <= 8, f"<= 8 for 15 shapes, {mode}", t0)
            t0 = time.time()
            one_pass()
            added = flex_graph_count() - first
            r.check("recompiles", "graphs_added_second_pass", added, added == 0, "0 after warm-up", t0)
        except Exception as e:  # noqa: BLE001 - a recompile-limit error or a compile failure is this check's result
            r.add("recompiles", "no_fallback", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "no error", time.time() - t0)
            return
    # flex's unfused fallback warns that it materialises the full scores matrix
    fallback = [str(w.message)[:200] for w in caught if "materializ" in str(w.message).lower()]
    r.check("recompiles", "no_fallback", fallback[0] if fallback else "no unfused-flex warning", not fallback, "no fallback", t0)


def useful_pairs(config, sequence_ids: torch.Tensor) -> int:
    """(query, key) pairs E1's masks allow, summed over layers: the attention work any exact path must do."""
    spans = sequence_spans(sequence_ids.cpu())
    within = sum((e - s) ** 2 for _, s, e in spans)
    glob = sum((e - s) * e for _, s, e in spans)  # a sequence's queries see the row's prefix up to its own end
    n_global = sum(config.is_global_layer(i) for i in range(config.num_hidden_layers))
    return (config.num_hidden_layers - n_global) * within + n_global * glob


def phase_speed(r: Report, device: torch.device, name: str, peak_tflops: float) -> None:
    config = preset(name)
    gpu_target = device.type == "cuda"
    t0 = time.time()
    backbone = random_model(config, seed=0, dtype=torch.float32)
    backbone = backbone.to(torch.bfloat16)
    apply_lora(backbone, r=16, alpha=32, dropout=0.2)
    model = BindingModel(backbone, ["ZN"], head_dropout=0.3).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, 1e-4, 0.01)
    ctx = DistContext(device=device)
    spec = LossSpec({"ZN": 5.0}, 1.0)
    r.add("speed", f"{name}/setup", "PASS", f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", "", time.time() - t0)
    rng = np.random.default_rng(0)
    scale = 1 if device.type == "cuda" else 8  # the dry run's shapes are small

    def examples(batch: int, length: int, context: int, ctx_len: int) -> list[Example]:
        return [
            Example(
                f"p{i}", "ZN", seq(rng, length), (rng.random(length) < 0.03).astype(np.uint8), [seq(rng, ctx_len) for _ in range(context)]
            )
            for i in range(batch)
        ]

    def train_row(label: str, exs: list[Example], impl: str, ckpt: bool, steps: int = 3) -> float | None:
        batch = collate(exs, masking=MaskingConfig(0.15), seed=0, epoch=0)
        tokens = int((batch["sequence_ids"] >= 0).sum())
        backbone.set_attn_impl(impl)
        backbone.set_gradient_checkpointing(ckpt)

        def step() -> None:
            backward_window(model, [(batch, "ZN")], ctx, spec, "bf16")
            optimizer_step(params, opt, ctx, 1.0, 1e-4)

        t0 = time.time()
        try:
            step()  # warm-up (compiles flex on first use)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            sec = (time.perf_counter() - t) / steps
        except Exception as e:  # noqa: BLE001 - an OOM or a kernel failure is this row's result
            r.add("speed", f"{name}/{label}", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "runs", time.time() - t0)
            return None
        pairs = useful_pairs(config, batch["sequence_ids"])
        flops = lora_step_flops(
            config, tokens, pairs, sum(p.numel() for n, p in model.named_parameters() if "lora_" in n), batch["num_mlm"]
        )
        mfu = flops / sec / (peak_tflops * 1e12)
        mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
        r.add(
            "speed",
            f"{name}/{label}",
            "PASS",
            f"{tokens} tokens, {tokens / sec:.0f} tok/s, {sec:.3f} s/step, MFU {mfu:.3f}, peak {mem:.1f} GB",
            "",
            time.time() - t0,
        )
        return tokens / sec, mfu, mem

    plain = train_row("train_2x300", examples(2, 300 // scale, 0, 0), "structured", False)
    ctx_rows = 64 // scale
    fast = "flex" if device.type == "cuda" else "blocks"  # what "structured" is on this device
    flex = train_row(f"train_300+{ctx_rows}ctx_{fast}", examples(1, 300 // scale, ctx_rows, 132 // scale), "structured", False)
    dense = train_row(f"train_300+{ctx_rows}ctx_dense", examples(1, 300 // scale, ctx_rows, 132 // scale), "dense", False, steps=2)
    train_row(f"train_300+{ctx_rows}ctx_{fast}_ckpt", examples(1, 300 // scale, ctx_rows, 132 // scale), "structured", True)
    t0 = time.time()
    if flex:
        r.check("speed", "context_step_mfu", flex[1], flex[1] >= 0.45, ">= 0.45 of the measured bf16 peak", t0, target=True)
        r.check("speed", "context_step_memory_gb", flex[2], not flex[2] > 24, "<= 24 GB without checkpointing", t0, target=True)
    if flex and dense:
        ratio = flex[0] / dense[0]
        r.check("speed", "flex_over_dense_tokens_per_s", ratio, ratio >= 2.5, ">= 2.5x", t0, target=True)
    if plain:
        r.add("speed", "plain_step_mfu", "PASS" if gpu_target else "WARN", plain[1], "reported", 0)
    # Compiled decoder layers (e1min.compile_model) against the same eager rows: target >= 1.3x.
    if device.type == "cuda":
        from e1min.compile import compile_model, graph_count, uncompile_model

        compile_model(backbone)
        c_plain = train_row("train_2x300_compiled", examples(2, 300, 0, 0), "structured", False)
        c_flex = train_row(f"train_300+{ctx_rows}ctx_{fast}_compiled", examples(1, 300, ctx_rows, 132), "structured", False)
        uncompile_model(backbone)
        t0 = time.time()
        for label, eager, comp in (("2x300", plain, c_plain), (f"300+{ctx_rows}ctx", flex, c_flex)):
            if eager and comp:
                ratio = comp[0] / eager[0]
                r.check("speed", f"compiled_over_eager_{label}", ratio, ratio >= 1.3, ">= 1.3x tokens/s", t0, target=True)
        r.add("speed", "compiled_graphs", "PASS", graph_count(), "per region: batch 1 or more, grad or not, first layer or not", 0)
    else:
        r.add("speed", "compiled_rows", "WARN", "skipped in the dry run (GPU rows; tests/test_compile.py covers the CPU)", "", 0)
    # Validation forward: a 1024-residue query with 12288 tokens of context, no grad.
    t0 = time.time()
    backbone.set_gradient_checkpointing(False)
    backbone.set_attn_impl("structured")
    n_ctx = 12288 // (scale * 128)
    batch = collate(examples(1, 1024 // scale, n_ctx, 128), masking=None, seed=0, epoch=0)
    tokens = int((batch["sequence_ids"] >= 0).sum())
    model.eval()
    try:
        b = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        with torch.no_grad(), autocast(device, "bf16"):
            model(b, "ZN")
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            model(b, "ZN")
            sync(device)
            sec = time.perf_counter() - t
        mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
        flops = 2 * matmul_params(config) * tokens + 4 * config.hidden_size * useful_pairs(config, batch["sequence_ids"])
        mfu = flops / sec / (peak_tflops * 1e12)
        r.add(
            "speed",
            f"{name}/validation_forward",
            "PASS",
            f"{tokens} tokens, {tokens / sec:.0f} tok/s, MFU {mfu:.3f}, peak {mem:.1f} GB",
            "",
            time.time() - t0,
        )
    except Exception as e:  # noqa: BLE001
        r.add(
            "speed", f"{name}/validation_forward", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "runs", time.time() - t0
        )
    finally:
        model.train()
    # Host syncs per training step, as the trainer runs it in a process group (NCCL + the gloo host group on CUDA).
    t0 = time.time()
    try:
        batch = collate(examples(2, 300 // scale, 0, 0), masking=MaskingConfig(0.15), seed=0, epoch=0)
        per_step, sites = host_syncs_per_step(model, params, opt, spec, batch, device)
        where = ", ".join(f"{site} x{sites.count(site)}" for site in sorted(set(sites))) or "none"
        if gpu_target:
            status = "PASS" if per_step <= 1 else "WARN"
            r.add(
                "speed",
                "host_syncs_per_step",
                status,
                f"{per_step:g} ({where})",
                "<= 1 per forward (the attention layout check)",
                time.time() - t0,
            )
        else:
            r.add(
                "speed", "host_syncs_per_step", "WARN", "not counted on the CPU; the step ran in a gloo group of one", "", time.time() - t0
            )
    except Exception as e:  # noqa: BLE001
        r.add("speed", "host_syncs_per_step", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "runs", time.time() - t0)


def host_syncs_per_step(model, params, opt, spec, batch, device: torch.device, steps: int = 2) -> tuple[float, list[str]]:
    """Synchronising CUDA calls per optimiser step (file:line of each) of the trainer's step in a process group of
    one: backward_window with the statistics left on the device, the gradient all-reduce, the stop-flag
    agreement. The first step warms up and is not counted. On the CPU the step runs (gloo) but nothing is counted."""
    previous = os.environ.get("E1MIN_FORCE_DIST")
    os.environ["E1MIN_FORCE_DIST"] = "1"
    try:
        ctx = init_distributed(600.0, str(device))
    finally:
        if previous is None:
            del os.environ["E1MIN_FORCE_DIST"]
        else:
            os.environ["E1MIN_FORCE_DIST"] = previous
    sites: list[str] = []
    with ctx.session():
        for i in range(steps + 1):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    backward_window(model, [(batch, "ZN")], ctx, spec, "bf16", host_stats=False)
                    optimizer_step(params, opt, ctx, 1.0, 1e-4)
                    ctx.any(False, "stop_signal")
                finally:
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            if i:
                sites += [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
        sync(device)
    return len(sites) / steps, sites


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def phase_e2e(r: Report, device: torch.device, work: Path, quick: bool) -> None:
    py = sys.executable
    t0 = time.time()
    data, ckpt = work / "demo" / "data", work / "demo" / "tiny-e1"
    for cmd in (
        [py, "tools/make_demo_dataset.py", "--out", str(data), *(["--proteins-per-ion", "40"] if quick else [])],
        [py, "tools/make_random_checkpoint.py", str(ckpt), "--preset", "tiny", "--seed", "0"],
    ):
        p = run_cli(cmd)
        if p.returncode:
            r.add("e2e", "demo_data", "FAIL", p.stderr.strip().splitlines()[-1:] or p.returncode, "builds", time.time() - t0)
            return
    dev = "cuda" if device.type == "cuda" else "cpu"
    sets = [
        f"data.fasta_path={data}",
        f"data.msa_dir={data / 'msa'}",
        f"model.checkpoint={ckpt}",
        f"general.device={dev}",
        f"training.epochs={1 if quick else 2}",
        "training.folds=[1]",
        f"training.ions={'[ZN]' if quick else '[ZN, CA]'}",
        f"training.bf16={str(dev == 'cuda').lower()}",
    ]

    def train(out: Path, launcher: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
        args = [*launcher, "--config", "configs/demo.yaml", *[x for s in [*sets, f"training.output_dir={out}"] for x in ("--set", s)]]
        return run_cli(args, env)

    t0 = time.time()
    run = work / "run"
    p = train(run, [py, "-m", "e1min.cli", "train"])
    ok = p.returncode == 0 and (run / "fold_1" / "fold_result.json").exists()
    r.check("e2e", "train_demo", "ok" if ok else (p.stderr.strip().splitlines() or ["?"])[-1][:200], ok, f"e1min train on {dev}", t0)
    t0 = time.time()
    p = train(
        work / "run_torchrun",
        [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "e1min.train"],
        {"E1MIN_FORCE_DIST": "1"},
    )
    backend = "NCCL" if dev == "cuda" else "gloo"
    r.check(
        "e2e",
        "torchrun_forced_group",
        "ok" if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1][:200],
        p.returncode == 0,
        f"one process, {backend} group",
        t0,
    )
    if not ok:
        return
    fasta = data / "ZN_test.fasta"
    preds = {}
    for label, d, prec in (("cpu_float32", "cpu", "float32"), (f"{dev}_float32", dev, "float32"), (f"{dev}_bf16", dev, "bf16")):
        t0 = time.time()
        out = work / f"pred_{label}.tsv"
        p = run_cli(
            [
                py,
                "-m",
                "e1min.cli",
                "predict",
                "--checkpoint",
                str(run),
                "--fasta",
                str(fasta),
                "--out",
                str(out),
                "--device",
                d,
                "--precision",
                prec,
                "--quiet",
            ]
        )
        if p.returncode:
            r.add("e2e", f"predict_{label}", "FAIL", (p.stderr.strip().splitlines() or ["?"])[-1][:200], "runs", time.time() - t0)
            return
        preds[label] = np.loadtxt(out, delimiter="\t", skiprows=1, usecols=4, dtype=np.float64)
    t0 = time.time()
    err = float(np.abs(preds[f"{dev}_float32"] - preds["cpu_float32"]).max())
    r.check("e2e", "predict_float32_vs_cpu_max_abs", err, err <= 1e-4, "<= 1e-4", t0)
    err = float(np.abs(preds[f"{dev}_bf16"] - preds["cpu_float32"]).max())
    r.check("e2e", "predict_bf16_vs_cpu_max_abs", err, err <= 0.05, "<= 0.05 (bf16 round-off)", t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="run every phase that can run without CUDA, on the CPU")
    p.add_argument("--out", default="gpu_check.json", help="JSON file of every check (default gpu_check.json)")
    p.add_argument("--phases", default="env,parity,recompiles,speed,e2e", help="comma-separated subset")
    p.add_argument("--speed-preset", default=None, help="model shape of the speed phase (default e1-600m; tiny in a dry run)")
    a = p.parse_args()
    phases = [s.strip() for s in a.phases.split(",") if s.strip()]
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run to check what the CPU can", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if not a.dry_run else torch.device("cpu")
    torch.manual_seed(0)
    r = Report(a.dry_run, Path(a.out))
    start = time.time()
    print(f"gpu_check: {'dry run on the CPU' if a.dry_run else 'CUDA'}; e1min at {ROOT}", flush=True)
    info = {}
    with tempfile.TemporaryDirectory(prefix="e1min-gpu-check-") as tmp:
        for phase in phases:
            try:
                if phase == "env":
                    info = r.info = phase_env(r, device)
                elif phase == "parity":
                    shapes = [("tiny", preset("tiny", num_hidden_layers=6))]
                    shapes.append(("e1-150m", preset("e1-150m", num_hidden_layers=3 if a.dry_run else 20)))
                    phase_parity(r, device, shapes)
                elif phase == "recompiles":
                    phase_recompiles(r, device)
                elif phase == "speed":
                    peak = info.get("bf16_peak_tflops") or matmul_peak_tflops(device, torch.bfloat16)
                    phase_speed(r, device, a.speed_preset or ("tiny" if a.dry_run else "e1-600m"), peak)
                elif phase == "e2e":
                    phase_e2e(r, device, Path(tmp), quick=a.dry_run)
                else:
                    r.add(phase, "known_phase", "FAIL", phase, "env, parity, recompiles, speed, e2e", 0)
            except Exception as e:  # noqa: BLE001 - one broken phase must not hide the others' results
                r.add(phase, "phase_error", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", "no error", 0)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    total = time.time() - start
    r.save()
    print(f"gpu_check: {len(r.rows)} checks, {r.failed} failed, {total:.0f}s; results in {a.out}", flush=True)
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
