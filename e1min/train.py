"""Joint training with K-fold cross-validation: folds -> epochs -> optimiser steps.

    e1min train --config configs/demo.yaml [--set training.epochs=3] [--folds 1,3] [--resume]
    torchrun --nproc_per_node=4 -m e1min.train --config configs/e1_binding.yaml

Per fold: a fresh E1 + LoRA + ion heads, trained on the other folds with one backbone forward per
batch (ion-head BCE + MLM through E1's own head), validated after every epoch on the held-out fold,
early-stopped on the selection metric. Every cross-process operation goes through ``e1min.dist``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from e1min import metrics
from e1min.checkpoint import load_state, save_state, state_dir
from e1min.data.batching import fixed_size_batches, interleave, padding_fraction, shard, shard_eval, token_budget_batches
from e1min.data.collate import MaskingConfig, collate
from e1min.data.dataset import Example, ion_stats, load_ion_records, make_eval_examples, make_train_examples, pos_weight
from e1min.data.fasta import DataError, Record
from e1min.data.folds import assign_folds, check_assignment, load_folds, save_folds, split
from e1min.data.msa import ContextProvider, MSASampling
from e1min.data.seeding import stable_seed
from e1min.dist import DistContext, init_distributed
from e1min.heads import BindingModel, joint_loss, loss_sums
from e1min.io import atomic_write_json, atomic_write_text, dumps_json, read_json_object
from e1min.run import STATE_NAMES, RunDir, RunLock, RunLockError, RunStateError, remove_temporaries
from e1min.runtime import autocast, describe, set_matmul_precision, training_precision
from e1min.scoring import _precision, iter_scored, to_device
from e1min.train_config import dump_config, load_config

log = logging.getLogger("e1min")


# ---------------------------------------------------------------------------------------------
# Run data: records, folds, context sampling
# ---------------------------------------------------------------------------------------------
@dataclass
class RunData:
    records: dict[str, list[Record]]
    assignment: dict[str, int]
    provider: ContextProvider | None
    train_sampling: MSASampling
    val_sampling: MSASampling


def prepare_run(cfg: dict, ctx: DistContext, out: Path) -> RunData:
    """Load records, assign (or reuse) folds, write config.yaml / folds.json / data_stats.json."""
    d, t, g = cfg["data"], cfg["training"], cfg["general"]
    records = load_ion_records(d["fasta_path"], t["ions"], d["fasta_pattern"])
    folds_file = out / "folds.json"
    fold_meta = {"num_folds": t["num_folds"], "seed": g["seed"], "ions": list(t["ions"]), "data": data_fingerprint(records)}
    if folds_file.exists():
        assignment, saved = load_folds(folds_file)
        check_fold_meta(folds_file, saved, fold_meta)
        problems = check_assignment(assignment, records)
        if problems:
            raise DataError(f"{folds_file}: does not match the data ({'; '.join(problems[:5])}); use a new output_dir")
        log.info("reusing fold assignment from %s", folds_file)
    else:
        assignment = assign_folds(records, t["num_folds"], g["seed"])
    stats = {ion: ion_stats(recs) for ion, recs in records.items()}
    if ctx.is_main:
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        if not folds_file.exists():
            save_folds(folds_file, assignment, fold_meta)
        fold_sizes = {str(k + 1): sum(1 for f in assignment.values() if f == k) for k in range(t["num_folds"])}
        atomic_write_json(out / "data_stats.json", {"ions": stats, "fold_sizes": fold_sizes})
        for ion, s in stats.items():
            log.info(
                "%s: %d proteins (%d labelled), %d residues, positive rate %.4f",
                ion, s["proteins"], s["labelled_proteins"], s["residues"], s["positive_rate"],
            )
    ctx.barrier("prepare_run")
    provider = ContextProvider(d["msa_dir"]) if d["msa_dir"] else None
    return RunData(
        records=records,
        assignment=assignment,
        provider=provider,
        train_sampling=MSASampling.from_dict({**MSASampling().__dict__, **t["msa_sampling"]}),
        val_sampling=MSASampling.from_dict({**MSASampling(128, 12288).__dict__, **t["validation_msa_sampling"]}),
    )


def data_fingerprint(records: dict[str, list[Record]]) -> dict[str, Any]:
    """What a fold assignment was built from: per ion the protein count, and a hash of (id, length)."""
    out = {}
    for ion, recs in sorted(records.items()):
        h = hashlib.sha256()
        for r in sorted(recs, key=lambda r: r.id):
            h.update(f"{r.id}\t{len(r.sequence)}\n".encode())
        out[ion] = {"proteins": len(recs), "sha256": h.hexdigest()[:16]}
    return out


def check_fold_meta(path: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """A reused folds.json must describe this run: same num_folds, seed, ions and data, else DataError."""
    for key, want in expected.items():
        if key not in saved:
            continue  # written by an older e1min that did not record it; the assignment check still runs
        have = saved[key]
        if key == "data":
            changed = sorted(ion for ion in set(have) | set(want) if have.get(ion) != want.get(ion))
            if changed:
                detail = "; ".join(f"{ion}: {have.get(ion)} there, {want.get(ion)} now" for ion in changed[:3])
                raise DataError(f"{path}: built from other data ({detail}); use a new training.output_dir for new data")
        elif have != want:
            raise DataError(f"{path}: {key} is {have!r} there but {want!r} in the config; use a new training.output_dir "
                            f"(or set {key} back to {have!r} to continue this run)")


# ---------------------------------------------------------------------------------------------
# Model and optimiser
# ---------------------------------------------------------------------------------------------
def build_model(cfg: dict, ctx: DistContext) -> BindingModel:
    """Base E1 (frozen, in the configured dtype) + LoRA + float32 ion heads on this rank's device."""
    from e1min.hub import load_model
    from e1min.lora import apply_lora

    m, lo = cfg["model"], cfg["lora"]
    backbone = load_model(m["checkpoint"], dtype=getattr(torch, m["dtype"]), device=ctx.device, revision=m["revision"])
    torch.manual_seed(cfg["general"]["seed"])  # identical LoRA init on every rank (also broadcast below)
    apply_lora(
        backbone, r=lo["r"], alpha=lo["alpha"], dropout=lo["lora_dropout"], target_modules=tuple(lo["target_modules"]),
        layers=lo["layers"], use_rslora=lo["use_rslora"], train_mlm_head=lo["train_mlm_head"],
    )
    backbone.set_gradient_checkpointing(m["gradient_checkpointing"])
    model = BindingModel(backbone, list(cfg["training"]["ions"]), head_dropout=m["dropout"])
    model.heads.to(ctx.device)
    return model


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on trainable parameters; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in trainable(model):
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from lr/warmup to lr, then cosine decay to min_lr (per optimiser step)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def epoch_plan(cfg: dict, data: RunData, train: dict[str, list[Record]], epoch: int) -> list[tuple[str, list[Example]]]:
    """Every ion's training batches for one epoch, interleaved in a shuffled order (same on every rank)."""
    d, t, seed = cfg["data"], cfg["training"], cfg["general"]["seed"]
    batches_by_ion, examples_by_ion = {}, {}
    for ion, recs in train.items():
        examples = make_train_examples(
            recs, ion, data.provider, data.train_sampling, seed, epoch, d["max_query_length"], d["max_example_tokens"]
        )
        lengths = [ex.num_tokens for ex in examples]
        ion_seed = stable_seed(seed, epoch, ion, "batches")
        if t["max_tokens_per_batch"]:
            batches_by_ion[ion] = token_budget_batches(lengths, t["max_tokens_per_batch"], seed=ion_seed)
        else:
            batches_by_ion[ion] = fixed_size_batches(lengths, t["batch_size"], seed=ion_seed)
        examples_by_ion[ion] = examples
    plan = interleave(batches_by_ion, stable_seed(seed, epoch, "interleave"))
    return [(ion, [examples_by_ion[ion][i] for i in idx]) for ion, idx in plan]


def plan_padding(plan: Sequence[tuple[str, list[Example]]]) -> float:
    lengths = [ex.num_tokens for _, exs in plan for ex in exs]
    batches, i = [], 0
    for _, exs in plan:
        batches.append(list(range(i, i + len(exs))))
        i += len(exs)
    return padding_fraction(batches, lengths)


# ---------------------------------------------------------------------------------------------
# One optimiser step's forward/backward
# ---------------------------------------------------------------------------------------------
@dataclass
class LossSpec:
    pos_weight: dict[str, float]
    mlm_weight: float
    focal_gamma: float = 0.0
    use_mlm: bool = True


def backward_window(
    model: BindingModel,
    batches: Sequence[tuple[dict, str] | None],
    ctx: DistContext,
    spec: LossSpec,
    precision: str | bool = "float32",
    *,
    bf16: bool | None = None,
    seeds: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Forward + backward every micro-batch of one optimiser step (this rank's share of it).

    Both loss terms are divided by the step's *global* token counts (all micro-batches, all ranks,
    all-reduced before any backward), so the summed gradients equal the big-batch gradient.
    ``None`` entries are empty steps (a rank short of batches). Returns detached per-ion statistics
    (n_ions, 4): BCE sum, BCE tokens, MLM sum, MLM tokens. ``precision`` ``"bf16"`` autocasts the
    backbone only: heads and both loss terms are float32 (a bool is read as the old ``bf16`` flag).
    ``seeds``: one RNG seed per entry of ``batches``, set before its forward, so dropout depends on the
    global micro-batch and not on which rank runs it (world-size invariance).
    """
    precision = _precision(bf16 if bf16 is not None else precision)
    real = [b for b in batches if b is not None]
    local = [sum(int(b["binding_mask"].sum()) for b, _ in real), sum(int((b["mlm_labels"] != -100).sum()) for b, _ in real)]
    bce_tokens, mlm_tokens = ctx.sum_ints(local, "token_counts")
    ions = model.ions
    stats = torch.zeros(len(ions), 4, dtype=torch.float64, device=ctx.device)
    seeds = list(seeds) if seeds is not None else [None] * len(batches)
    for item, seed in zip(batches, seeds):
        if item is None:
            continue
        batch, ion = item
        if seed is not None:
            torch.manual_seed(seed)
        batch = to_device(batch, ctx.device)
        mlm_pos = batch["mlm_labels"] != -100 if spec.use_mlm else None
        with autocast(ctx.device, precision):
            out = model(batch, ion, mlm_pos)
        terms = loss_sums(out, batch, spec.pos_weight.get(ion, 1.0), spec.focal_gamma)
        loss = joint_loss(terms, bce_tokens, mlm_tokens, spec.mlm_weight)
        loss.backward()
        i = ions.index(ion)
        stats[i] += torch.stack([terms.bce_sum.detach().double(), torch.tensor(float(terms.bce_tokens), device=ctx.device, dtype=torch.float64),
                                 terms.mlm_sum.detach().double(), torch.tensor(float(terms.mlm_tokens), device=ctx.device, dtype=torch.float64)])
    return stats.cpu()


def optimizer_step(
    params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, ctx: DistContext, max_grad_norm: float | None, lr: float
) -> int:
    """Sum gradients over ranks (one flat all-reduce), clip, step, clear. Returns bytes all-reduced per rank."""
    comm = ctx.sync_gradients(params)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return comm


# ---------------------------------------------------------------------------------------------
# One fold
# ---------------------------------------------------------------------------------------------
@dataclass
class FoldState:
    epoch: int = 0  # next epoch to run
    step: int = 0  # optimiser steps taken
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class FoldTrainer:
    """Trains and validates one fold; owns the model, optimiser and the fold's output directory."""

    def __init__(self, cfg: dict, ctx: DistContext, data: RunData, fold: int, out: Path):
        self.cfg, self.ctx, self.data, self.fold = cfg, ctx, data, fold  # fold is 0-based
        self.dir = out / f"fold_{fold + 1}"
        t = cfg["training"]
        self.ions = list(t["ions"])
        split_by_ion = {ion: split(recs, data.assignment, fold) for ion, recs in data.records.items()}
        self.train_records = {ion: s[0] for ion, s in split_by_ion.items()}
        self.val_records = {ion: [r for r in s[1] if r.labels is not None] for ion, s in split_by_ion.items()}
        self.pos_weight = {ion: pos_weight(recs, t["pos_weight_mode"]) for ion, recs in self.train_records.items()}
        self.model = build_model(cfg, ctx)
        self.params = [p for _, p in trainable(self.model)]
        ctx.broadcast_parameters(self.params)
        self.optimizer = build_optimizer(self.model, t["learning_rate"], t["weight_decay"])
        self.masking = MaskingConfig(probability=t["mlm_probability"], mask_context=t["mask_context"]) if t["mlm_weight"] > 0 and t["mlm_probability"] > 0 else None
        self.precision = training_precision(ctx.device, t["bf16"])
        self.loss_spec = LossSpec(self.pos_weight, t["mlm_weight"], t["focal_gamma"], self.masking is not None)
        self.state = FoldState()
        self._last_val: dict[str, Any] | None = None
        self.val_examples = {
            ion: make_eval_examples(
                recs, ion, data.provider, data.val_sampling, cfg["general"]["seed"], cfg["data"]["max_query_length"], cfg["data"]["max_example_tokens"]
            )
            for ion, recs in self.val_records.items()
        }
        steps_per_epoch = math.ceil(math.ceil(len(epoch_plan(cfg, data, self.train_records, 0)) / ctx.world_size) / t["accum_steps"])
        self.total_steps = steps_per_epoch * t["epochs"]
        self.warmup_steps = max(1, round(steps_per_epoch * t["warmup_epochs"]))
        self.comm_bytes = 0

    @property
    def bf16(self) -> bool:
        """Whether this fold trains under bf16 autocast (kept for callers of the old attribute)."""
        return self.precision == "bf16"

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict[str, Any]:
        t = self.cfg["training"]
        if resume and state_dir(self.dir / "last") is not None:
            meta = load_state(self.dir / "last", self.model, self.optimizer)
            self.state = FoldState(**meta["trainer_state"])
            if self.state.best_metric is None:  # strict JSON wrote -inf (nothing selected yet) as null
                self.state.best_metric = -math.inf
            log.info("fold %d: resumed from %s at epoch %d", self.fold + 1, self.dir / "last", self.state.epoch + 1)
        while self.state.epoch < t["epochs"]:
            epoch = self.state.epoch
            train_stats = self.train_epoch(epoch)
            val = self.validate()
            self.end_epoch(epoch, train_stats, val)
            if self.ctx.any(self.state.bad_epochs >= t["early_stop_patience"], "early_stop"):
                log.info("fold %d: early stop after epoch %d (best epoch %d)", self.fold + 1, epoch + 1, self.state.best_epoch + 1)
                break
        result = {"fold": self.fold + 1, "best_epoch": self.state.best_epoch + 1, "best_metric": self.state.best_metric,
                  "selection_metric": t["selection_metric"], "complete": True}
        if self.state.best_epoch < 0:
            # The selection metric was undefined (NaN) at every epoch: no positive residue in the held-out
            # fold, or an empty one. Keep the last epoch as best/ so the fold stays loadable, and say so.
            log.warning("fold %d: %s undefined at every epoch (no positive residue in the validation fold?); "
                        "best/ holds the last epoch", self.fold + 1, t["selection_metric"])
            result.update(best_epoch=None, best_metric=None, selection="last epoch: selection metric undefined at every epoch")
            if self.ctx.is_main and self._last_val is not None:
                save_state(self.dir / "best", self.model, self.meta({ion: v["metrics"] for ion, v in self._last_val.items()}))
                write_oof(self.dir / "oof_predictions.tsv", self.val_records, {ion: v["probs"] for ion, v in self._last_val.items()})
        if self.ctx.is_main:
            atomic_write_json(self.dir / "fold_result.json", result)
            write_plots(self.dir.parent / "plots", self.fold + 1, self.state.history, self.ions)
        self.ctx.barrier("fold_end")
        return result

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, ctx, t = self.cfg, self.ctx, self.cfg["training"]
        plan = epoch_plan(cfg, self.data, self.train_records, epoch)
        mine = shard(plan, ctx.rank, ctx.world_size)
        n_windows = ctx.max_int(math.ceil(len(mine) / t["accum_steps"]), "steps_per_epoch")
        self.model.train()
        stats = torch.zeros(len(self.ions), 4, dtype=torch.float64)  # per ion: bce sum, bce tokens, mlm sum, mlm tokens
        tokens, t0 = 0, time.time()
        for w in range(n_windows):
            window = mine[w * t["accum_steps"] : (w + 1) * t["accum_steps"]]
            batches = [self.collate_train(item, epoch) for item in window]
            # Dropout RNG per global micro-batch (shard() deals plan entry j * world + rank to this rank's
            # j-th slot): NGPU=2 with accum 1 draws what one process with accum 2 draws, and a resumed
            # run draws what an uninterrupted one would.
            seeds = [stable_seed(cfg["general"]["seed"], self.fold, epoch, "dropout", (w * t["accum_steps"] + j) * ctx.world_size + ctx.rank)
                     for j in range(len(window))]
            tokens += sum(int((b["sequence_ids"] >= 0).sum()) for b, _ in filter(None, batches))
            stats += backward_window(self.model, batches, ctx, self.loss_spec, self.precision, seeds=seeds)
            self.optimizer_step()
            if cfg["general"]["check_replicas_every"] and self.state.step % cfg["general"]["check_replicas_every"] == 0:
                ctx.check_replicas(self.params, self.state.step)
            if ctx.is_main and ((w + 1) % cfg["general"]["log_every"] == 0 or w + 1 == n_windows):
                elapsed = time.time() - t0
                s = stats.sum(0)
                log.info(
                    "fold %d epoch %d/%d step %d/%d | bce %.4f mlm %.4f (rank 0) | lr %.2e | %.0f tok/s | ETA %s",
                    self.fold + 1, epoch + 1, t["epochs"], w + 1, n_windows, s[0] / max(1.0, s[1]), s[2] / max(1.0, s[3]),
                    self.optimizer.param_groups[0]["lr"], tokens * ctx.world_size / max(elapsed, 1e-9),
                    _fmt_time(elapsed / (w + 1) * (n_windows - w - 1)),
                )
        ctx.all_reduce(stats, "sum", "train_loss_stats")
        return {
            "train_bce": {ion: float(stats[i, 0] / max(1.0, float(stats[i, 1]))) for i, ion in enumerate(self.ions)},
            "train_mlm": float(stats[:, 2].sum() / max(1.0, float(stats[:, 3].sum()))),
            "padding_fraction": plan_padding(plan),
            "seconds": time.time() - t0,
            "comm_bytes_per_step": self.comm_bytes,
        }

    def collate_train(self, item: tuple[str, list[Example]] | None, epoch: int) -> tuple[dict, str] | None:
        if item is None:
            return None  # this rank has fewer batches: an empty step that still joins the all-reduce
        ion, examples = item
        t = self.cfg["training"]
        batch = collate(examples, masking=self.masking, seed=self.cfg["general"]["seed"], epoch=epoch, label_smoothing=t["label_smoothing"])
        return batch, ion

    def optimizer_step(self) -> None:
        t = self.cfg["training"]
        lr = lr_at(self.state.step, self.total_steps, self.warmup_steps, t["learning_rate"], t["min_lr"])
        self.comm_bytes = optimizer_step(self.params, self.optimizer, self.ctx, t["max_grad_norm"], lr)
        self.state.step += 1

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, dict[str, Any]]:
        """Per-ion metrics over every validation residue (all ranks compute the same numbers)."""
        out = {}
        for ion in self.ions:
            probs = predict_records(self.model, self.val_records[ion], self.val_examples[ion], ion, self.ctx,
                                    self.cfg["training"]["eval_max_tokens_per_batch"], self.precision)
            y = np.concatenate([r.labels for r in self.val_records[ion]]) if self.val_records[ion] else np.zeros(0)
            p = np.concatenate(probs) if probs else np.zeros(0)
            m = metrics.binary_metrics(y, p)
            m["val_bce"] = float(-np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))) if len(y) else float("nan")
            out[ion] = {"metrics": m, "probs": probs}
        return out

    def end_epoch(self, epoch: int, train_stats: dict, val: dict) -> None:
        t, st = self.cfg["training"], self.state
        self._last_val = val
        key = "auprc" if t["selection_metric"] == "auprc" else "hra"
        per_ion = {ion: v["metrics"] for ion, v in val.items()}
        values = [m[key] for m in per_ion.values() if not math.isnan(m[key])]
        score = float(np.mean(values)) if values else float("nan")
        improved = not math.isnan(score) and score > st.best_metric + t["min_delta"]
        record = {"fold": self.fold + 1, "epoch": epoch + 1, "step": st.step, f"mean_{key}": score, "improved": improved,
                  **train_stats, "val": {ion: _json_metrics(m) for ion, m in per_ion.items()}}
        st.history.append(record)
        if improved:
            st.best_metric, st.best_epoch, st.bad_epochs = score, epoch, 0
        else:
            st.bad_epochs += 1
        st.epoch = epoch + 1
        if self.ctx.is_main:
            summary = " ".join(f"{ion} auprc {m['auprc']:.3f} hra {m['hra']:.3f}" for ion, m in per_ion.items())
            log.info("fold %d epoch %d: %s | mean %s %.4f%s | padding %.1f%% | %.0fs (F1/MCC at a threshold fitted on this fold are optimistic)",
                     self.fold + 1, epoch + 1, summary, key, score, " *best*" if improved else "",
                     100 * train_stats["padding_fraction"], train_stats["seconds"])
            meta = self.meta(per_ion)
            if improved:
                save_state(self.dir / "best", self.model, meta)
                write_oof(self.dir / "oof_predictions.tsv", self.val_records, {ion: v["probs"] for ion, v in val.items()})
            save_state(self.dir / "last", self.model, {**meta, "trainer_state": st.__dict__}, self.optimizer)
            atomic_write_text(self.dir / "metrics.jsonl", "".join(dumps_json(r) + "\n" for r in st.history))
        self.ctx.barrier("checkpoint_written")

    def meta(self, per_ion: dict) -> dict[str, Any]:
        c = self.cfg
        return {
            "fold": self.fold + 1, "epoch": self.state.epoch, "ions": self.ions, "seed": c["general"]["seed"],
            "base_model": _base_model_id(c["model"]["checkpoint"]), "base_revision": c["model"]["revision"],
            "base_config": self.model.backbone.config.to_dict(),
            "lora": {k: c["lora"][k] for k in ("r", "alpha", "lora_dropout", "target_modules", "train_mlm_head", "use_rslora", "layers")},
            "head_dropout": c["model"]["dropout"], "max_query_length": c["data"]["max_query_length"],
            "max_example_tokens": c["data"]["max_example_tokens"], "validation_msa_sampling": self.data.val_sampling.__dict__,
            "metrics": {ion: _json_metrics(m) for ion, m in per_ion.items()},
            "runtime": describe(self.ctx.device, self.precision),
        }


def predict_records(model, records: Sequence[Record], examples: Sequence[Example], ion: str, ctx: DistContext,
                    max_tokens: int, precision: str | bool = "float32") -> list[np.ndarray]:
    """Per-protein probabilities (in ``records`` order); each rank scores a shard, results are gathered."""
    index = {r.id: i for i, r in enumerate(records)}
    mine = shard_eval(list(range(len(examples))), ctx.rank, ctx.world_size)
    rows = []
    for j, p in iter_scored(model, [examples[i] for i in mine], ion, ctx.device, max_tokens, precision):
        ex = examples[mine[j]]
        a, b = ex.keep_start - ex.offset, ex.keep_end - ex.offset
        pos = torch.arange(ex.keep_start, ex.keep_end, dtype=torch.float64)
        rows.append(torch.stack([torch.full_like(pos, index[ex.protein_id]), pos, torch.from_numpy(p[a:b]).double()], 1))
    local = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
    allrows = ctx.gather_cat(local, "validation_predictions").numpy()
    order = np.lexsort((allrows[:, 1], allrows[:, 0]))
    allrows = allrows[order]
    lengths = np.array([len(r.sequence) for r in records], dtype=np.int64)
    expected = np.concatenate([np.stack([np.full(n, i), np.arange(n)], 1) for i, n in enumerate(lengths)]) if len(records) else np.zeros((0, 2))
    if allrows.shape[0] != expected.shape[0] or not np.array_equal(allrows[:, :2].astype(np.int64), expected):
        raise RuntimeError(f"{ion}: validation did not score every residue exactly once ({allrows.shape[0]} of {expected.shape[0]})")
    return np.split(allrows[:, 2].astype(np.float32), np.cumsum(lengths)[:-1]) if len(records) else []


def _base_model_id(checkpoint: str) -> str:
    """Hub ids as given; local directories as absolute paths, so predictions work from any directory."""
    path = Path(checkpoint).expanduser()
    return str(path.resolve()) if path.is_dir() else checkpoint


def _json_metrics(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# Run outputs: OOF predictions, thresholds, summary, plots
# ---------------------------------------------------------------------------------------------
OOF_HEADER = "id\tposition\tresidue\tion\tprobability\tlabel\n"


def write_oof(path: Path, records: dict[str, list[Record]], probs: dict[str, list[np.ndarray]]) -> None:
    """Out-of-fold predictions, one line per residue and ion (position 1-based)."""
    lines = [OOF_HEADER]
    for ion, recs in records.items():
        for r, p in zip(recs, probs[ion]):
            lines.extend(f"{r.id}\t{i + 1}\t{aa}\t{ion}\t{q:.6g}\t{y}\n" for i, (aa, q, y) in enumerate(zip(r.sequence, p.tolist(), r.labels.tolist())))
    atomic_write_text(path, "".join(lines))


def read_oof(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ion -> (labels, probabilities) from an oof_predictions.tsv."""
    by_ion: dict[str, tuple[list, list]] = {}
    with open(path) as fh:
        header = fh.readline()
        if header != OOF_HEADER:
            raise ValueError(f"{path}: unexpected header {header.strip()!r}")
        for line in fh:
            _, _, _, ion, prob, label = line.rstrip("\n").split("\t")
            ys, ps = by_ion.setdefault(ion, ([], []))
            ys.append(int(label))
            ps.append(float(prob))
    return {ion: (np.array(ys, dtype=np.int64), np.array(ps)) for ion, (ys, ps) in by_ion.items()}


def summarise(out: Path, ions: Sequence[str], num_folds: int, method: str) -> dict[str, Any] | None:
    """thresholds.json, summary.json and summary.md from every completed fold's OOF predictions."""
    notes: list[str] = []
    folds = []
    for k in range(1, num_folds + 1):
        if not (out / f"fold_{k}" / "fold_result.json").exists():
            continue
        if not (out / f"fold_{k}" / "oof_predictions.tsv").exists():
            notes.append(f"fold {k}: no oof_predictions.tsv (left out of the summary)")
            continue
        folds.append(k)
    for n in notes:
        log.warning("summary: %s", n)
    if not folds:
        return None
    oof = {k: read_oof(out / f"fold_{k}" / "oof_predictions.tsv") for k in folds}
    thresholds, ions_out = {}, {}
    for ion in ions:
        per_fold = {k: oof[k][ion] for k in folds if ion in oof[k] and len(oof[k][ion][0])}
        if not per_fold:
            continue
        y_all = np.concatenate([v[0] for v in per_fold.values()])
        p_all = np.concatenate([v[1] for v in per_fold.values()])
        thr, value = metrics.best_threshold(y_all, p_all, method)
        thresholds[ion] = {"threshold": thr, "method": method, "value": value, "fitted_on": "pooled out-of-fold predictions", "folds": list(per_fold)}
        cols: dict[str, list[float]] = {k: [] for k in ("auprc", "auroc", "hra", "hra_raw", "f1", "mcc", "precision", "recall")}
        for k, (y, p) in per_fold.items():
            # F1/MCC at a threshold fitted on the *other* folds' predictions (honest); own fold only if alone.
            others = [v for kk, v in per_fold.items() if kk != k]
            if others:
                t_k, _ = metrics.best_threshold(np.concatenate([o[0] for o in others]), np.concatenate([o[1] for o in others]), method)
            else:
                t_k = thr
            m = metrics.binary_metrics(y, p, threshold=t_k)
            if math.isnan(m["auprc"]):
                notes.append(f"fold {k}, {ion}: metrics undefined (no positive residue among {len(y)} validation residues)")
                log.warning("summary: %s", notes[-1])
            for key in cols:
                cols[key].append(m[key])
        ions_out[ion] = {"positive_rate": float(y_all.mean()), **{k: metrics.mean_std(v) for k, v in cols.items()}}
    fold_results = [read_json_object(out / f"fold_{k}" / "fold_result.json", DataError) for k in folds]
    summary = {"ions": ions_out, "folds": fold_results, "config": "config.yaml", "notes": notes}
    atomic_write_json(out / "thresholds.json", thresholds)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(ions_out, folds, notes))
    return summary


def summary_markdown(ions_out: dict, folds: list[int], notes: Sequence[str] = ()) -> str:
    cols = ("auprc", "auroc", "hra", "f1", "mcc")
    lines = [f"Cross-validation summary over folds {', '.join(map(str, folds))} (mean ± std; F1/MCC at out-of-fold thresholds)", "",
             "| ion | positive rate | " + " | ".join(c.upper() for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for ion, m in ions_out.items():
        lines.append(f"| {ion} | {m['positive_rate']:.4f} | " + " | ".join(f"{m[c]['mean']:.3f} ± {m[c]['std']:.3f}" for c in cols) + " |")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_plots(plot_dir: Path, fold: int, history: list[dict], ions: Sequence[str]) -> None:
    """Loss and AUPRC curves per ion: PNG with matplotlib, else CSV (and one note)."""
    rows = [(h["epoch"], ion, h["train_bce"].get(ion), h["val"][ion].get("val_bce"), h["val"][ion].get("auprc")) for h in history for ion in ions]
    plot_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plot_dir / f"curves_fold_{fold}.csv", "epoch,ion,train_bce,val_bce,val_auprc\n" + "".join(",".join("" if v is None else str(v) for v in r) + "\n" for r in rows))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: curves written as %s only (pip install 'e1min[plot]' for PNGs)", plot_dir / f"curves_fold_{fold}.csv")
        return
    from e1min.io import atomic_path

    for ion in ions:
        mine = [r for r in rows if r[1] == ion]
        epochs = [r[0] for r in mine]
        for name, series, ylabel in (("loss", [(2, "train BCE"), (3, "validation BCE")], "BCE"), ("auprc", [(4, "validation AUPRC")], "AUPRC")):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for col, label in series:
                ax.plot(epochs, [np.nan if r[col] is None else r[col] for r in mine], marker="o", label=label)
            ax.set(xlabel="epoch", ylabel=ylabel, title=f"{ion}, fold {fold}")
            ax.legend()
            fig.tight_layout()
            with atomic_path(plot_dir / f"{name}_fold_{fold}_{ion}.png") as tmp:
                fig.savefig(tmp, format="png", dpi=100)
            plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def run_cross_validation(cfg: dict, ctx: DistContext, resume: bool = False, restart_folds: bool = False) -> dict[str, Any] | None:
    """Train every requested fold (skipping completed ones), then summarise. Returns the summary (rank 0).

    A fold with a partial state (``fold_K/last`` or ``best`` without ``fold_result.json``) continues only
    with ``resume`` and starts over only with ``restart_folds``; otherwise this refuses, naming the fold.
    """
    t = cfg["training"]
    run = RunDir(Path(t["output_dir"]))
    run.root.mkdir(parents=True, exist_ok=True)
    data = prepare_run(cfg, ctx, run.root)
    folds = [f - 1 for f in (t["folds"] or range(1, t["num_folds"] + 1))]
    for fold in folds:
        k = fold + 1
        if run.fold_result(k).exists():
            log.info("fold %d already complete: skipped (delete %s to retrain)", k, run.fold(k))
            continue
        partial = ctx.is_main and any(state_dir(run.state(k, w)) is not None for w in STATE_NAMES)
        if ctx.any(partial, "partial_fold") and not resume:
            if not restart_folds:
                raise RunStateError(f"{run.fold(k)}: holds an unfinished fold {k}; rerun with --resume to continue it "
                                    f"or with --restart-fold to train it from scratch")
            if ctx.is_main:
                log.info("fold %d: --restart-fold: removing its previous state", k)
                shutil.rmtree(run.fold(k))
            ctx.barrier("restart_fold")
        FoldTrainer(cfg, ctx, data, fold, run.root).run(resume)
    if data.provider is not None and data.provider.missing and ctx.is_main:
        log.info("%d proteins had no MSA and ran single-sequence", len(data.provider.missing))
    summary = None
    if ctx.is_main:
        summary = report_run(run.root, cfg, only_missing_plots=True)
        if summary:
            log.info("\n%s", (run.root / "summary.md").read_text())
    ctx.barrier("run_end")
    return summary


def report_run(out: str | os.PathLike, cfg: dict | None = None, only_missing_plots: bool = False) -> dict[str, Any] | None:
    """Plots of every complete fold (from its metrics.jsonl) and the run summary, from what is on disk.

    ``e1min report RUN_DIR`` calls this, so a run killed after a fold still gets its plots and summary.
    """
    out = Path(out)
    if cfg is None:
        cfg_file = out / "config.yaml"
        if not cfg_file.exists():
            raise RunStateError(f"{out}: no config.yaml (not an e1min run directory)")
        cfg, _ = load_config(cfg_file, check_files=False)
    t = cfg["training"]
    run = RunDir(out)
    for k in range(1, t["num_folds"] + 1):
        history_file = run.fold(k) / "metrics.jsonl"
        if not run.fold_result(k).exists() or not history_file.exists():
            continue
        if only_missing_plots and (out / "plots" / f"curves_fold_{k}.csv").exists():
            continue
        history = [json.loads(line) for line in history_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_plots(out / "plots", k, history, t["ions"])
    return summarise(out, t["ions"], t["num_folds"], t["threshold_method"])


def setup_logging(out: Path, is_main: bool) -> None:
    """Console (rank 0) + training.log; called by the entry point only, never at import."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    if not is_main:
        log.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    out.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(out / "training.log")
    fh.setFormatter(fmt)
    log.addHandler(fh)


def main(argv: Sequence[str] | None = None) -> int:
    """``e1min train`` / ``python -m e1min.train``."""
    p = argparse.ArgumentParser(prog="e1min train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (YAML)")
    p.add_argument("--folds", default=None, help="comma-separated 1-based folds to run, e.g. 1,3")
    p.add_argument("--resume", action="store_true", help="continue interrupted folds from their last epoch checkpoint")
    p.add_argument("--restart-fold", action="store_true", help="train unfinished folds from scratch, deleting their previous state")
    args = p.parse_args(argv)
    if args.resume and args.restart_fold:
        raise RunStateError("--resume and --restart-fold exclude each other")
    overrides = list(args.set)
    if args.folds:
        overrides.append(f"training.folds=[{args.folds}]")
    cfg, notes = load_config(args.config, overrides)
    set_matmul_precision(cfg["model"]["matmul_precision"])
    ctx = init_distributed(cfg["general"]["dist_timeout_seconds"], cfg["general"]["device"])
    out = Path(cfg["training"]["output_dir"])
    lock = RunLock(out)
    try:
        # One writer per run directory: rank 0 locks it before anything (even training.log) is written.
        error, removed = None, []
        if ctx.is_main:
            try:
                lock.acquire()
                removed = remove_temporaries(out)
            except RunLockError as e:
                error = e
        if ctx.any(error is not None, "run_lock"):
            raise error or RunLockError(f"{out}: rank 0 could not lock the run directory")
        setup_logging(out, ctx.is_main)
        for n in notes:
            log.info(n)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted save, e.g. %s", len(removed), removed[0])
        log.info("e1min train: %s, %d process(es) on %s, precision %s, float32 matmul precision %s", args.config, ctx.world_size,
                 ctx.device, training_precision(ctx.device, cfg["training"]["bf16"]), cfg["model"]["matmul_precision"])
        run_cross_validation(cfg, ctx, resume=args.resume, restart_folds=args.restart_fold)
    finally:
        lock.release()
        ctx.destroy()
    return 0


def report_main(argv: Sequence[str] | None = None) -> int:
    """``e1min report RUN_DIR``: regenerate plots, thresholds and the summary of a run from its files."""
    p = argparse.ArgumentParser(prog="e1min report", description="Regenerate plots/, thresholds.json and summary.{json,md} "
                                "of a training run from what is on disk (e.g. after a run was killed after a fold).")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    out = Path(args.run_dir)
    with RunLock(out):
        summary = report_run(out)
    if summary is None:
        print(f"{out}: no complete fold with out-of-fold predictions yet", file=sys.stderr)
        return 0
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    from e1min.cli import run_guarded
    from e1min.dist import exit_code_for_launcher

    sys.exit(exit_code_for_launcher(run_guarded("train", main, sys.argv[1:])))
