"""One fold's training: model and optimiser, the schedule, one optimiser step's forward/backward, the epoch loop.

Per fold: a fresh E1 + LoRA + ion heads, trained on the other folds with one backbone forward per
batch (ion-head BCE + MLM through E1's own head), validated after every epoch on the held-out fold,
early-stopped on the selection metric. Every cross-process operation goes through ``e1min.dist``.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e1min import metrics
from e1min.checkpoint import load_state, save_state, state_dir
from e1min.compile import compile_model, graph_count
from e1min.data.batching import fixed_size_batches, interleave, padding_fraction, shard, token_budget_batches
from e1min.data.collate import MaskingConfig, collate
from e1min.data.dataset import Example, make_eval_examples, make_train_examples, pos_weight
from e1min.data.fasta import Record
from e1min.data.folds import split
from e1min.data.msa import ContextProvider, MSASampling
from e1min.data.seeding import stable_seed
from e1min.dist import DistContext
from e1min.heads import BindingModel
from e1min.hub import load_model
from e1min.io import atomic_write_json, atomic_write_text, dumps_json, format_duration
from e1min.lora import apply_lora
from e1min.recipe import Recipe
from e1min.report import write_oof, write_plots
from e1min.run import FoldState, RunDir, RunStateError
from e1min.runtime import describe, peak_gpu_memory_gb, training_precision
from e1min.scoring import score_records
from e1min.steps import LossSpec, backward_window, build_optimizer, lr_at, optimizer_step, trainable  # noqa: F401 (re-exported)
from e1min.stop import GracefulStop, StopRequested

log = logging.getLogger("e1min")


def as_recipe(cfg: Recipe | dict) -> Recipe:
    """A Recipe, from a Recipe or from the dict ``train_config.load_config`` returns (already validated)."""
    return cfg if isinstance(cfg, Recipe) else Recipe.from_dict(cfg, check_files=False)[0]


@dataclass
class RunData:
    records: dict[str, list[Record]]
    assignment: dict[str, int]
    provider: ContextProvider | None
    train_sampling: MSASampling
    val_sampling: MSASampling


def build_model(cfg: Recipe | dict, ctx: DistContext) -> BindingModel:
    """Base E1 (frozen, in the configured dtype) + LoRA + float32 ion heads on this rank's device."""

    cfg = as_recipe(cfg)
    m = cfg.model
    backbone = load_model(m.checkpoint, dtype=getattr(torch, m.dtype), device=ctx.device, revision=m.revision)
    torch.manual_seed(cfg.general.seed)  # identical LoRA init on every rank (also broadcast below)
    apply_lora(backbone, **cfg.lora.apply_kwargs())
    backbone.set_gradient_checkpointing(m.gradient_checkpointing)
    if m.compile:
        compile_model(backbone)
    model = BindingModel(backbone, list(cfg.training.ions), head_dropout=m.head_dropout)
    model.heads.to(ctx.device)
    return model


def epoch_plan(cfg: Recipe | dict, data: RunData, train: dict[str, list[Record]], epoch: int) -> list[tuple[str, list[Example]]]:
    """Every ion's training batches for one epoch, interleaved in a shuffled order (same on every rank)."""
    cfg = as_recipe(cfg)
    d, t, seed = cfg.data, cfg.training, cfg.general.seed
    batches_by_ion, examples_by_ion = {}, {}
    for ion, recs in train.items():
        examples = make_train_examples(recs, ion, data.provider, data.train_sampling, seed, epoch, d.max_query_length, d.max_example_tokens)
        lengths = [ex.num_tokens for ex in examples]
        ion_seed = stable_seed(seed, epoch, ion, "batches")
        if t.max_tokens_per_batch:
            batches_by_ion[ion] = token_budget_batches(lengths, t.max_tokens_per_batch, seed=ion_seed)
        else:
            batches_by_ion[ion] = fixed_size_batches(lengths, t.batch_size, seed=ion_seed)
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


class FoldTrainer:
    """Trains and validates one fold; owns the model, optimiser and the fold's output directory."""

    def __init__(self, cfg: Recipe | dict, ctx: DistContext, data: RunData, fold: int, out: Path, stop: GracefulStop | None = None):
        cfg = as_recipe(cfg)
        self.cfg, self.ctx, self.data, self.fold = cfg, ctx, data, fold  # fold is 0-based
        self.stop = stop  # a signal's flag: checked (and agreed by all ranks) at every optimiser-step boundary
        self.rundir = RunDir(out)
        self.dir = self.rundir.fold(fold + 1)
        t = cfg.training
        self.ions = list(t.ions)
        split_by_ion = {ion: split(recs, data.assignment, fold) for ion, recs in data.records.items()}
        self.train_records = {ion: s[0] for ion, s in split_by_ion.items()}
        self.val_records = {ion: [r for r in s[1] if r.labels is not None] for ion, s in split_by_ion.items()}
        self.pos_weight = {ion: pos_weight(recs, t.pos_weight_mode) for ion, recs in self.train_records.items()}
        self.model = build_model(cfg, ctx)
        self.params = [p for _, p in trainable(self.model)]
        ctx.broadcast_parameters(self.params)
        self.optimizer = build_optimizer(self.model, t.learning_rate, t.weight_decay)
        self.masking = (
            MaskingConfig(probability=t.mlm_probability, mask_context=t.mask_context)
            if t.mlm_weight > 0 and t.mlm_probability > 0
            else None
        )
        self.precision = training_precision(ctx.device, t.bf16)
        self.loss_spec = LossSpec(self.pos_weight, t.mlm_weight, t.focal_gamma, self.masking is not None)
        self.state = FoldState()
        self._last_val: dict[str, Any] | None = None
        self.val_examples = {
            ion: make_eval_examples(
                recs, ion, data.provider, data.val_sampling, cfg.general.seed, cfg.data.max_query_length, cfg.data.max_example_tokens
            )
            for ion, recs in self.val_records.items()
        }
        steps_per_epoch = math.ceil(math.ceil(len(epoch_plan(cfg, data, self.train_records, 0)) / ctx.world_size) / t.accum_steps)
        self.total_steps = steps_per_epoch * t.epochs
        self.warmup_steps = max(1, round(steps_per_epoch * t.warmup_epochs))
        self.comm_bytes = 0
        self._graphs = 0  # compiled-layer graphs last logged

    @property
    def bf16(self) -> bool:
        """Whether this fold trains under bf16 autocast (kept for callers of the old attribute)."""
        return self.precision == "bf16"

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict[str, Any]:
        t = self.cfg.training
        if resume and state_dir(self.rundir.state(self.fold + 1, "last")) is not None:
            meta = load_state(self.rundir.state(self.fold + 1, "last"), self.model, self.optimizer)
            self.state = FoldState.from_json(meta["trainer_state"])
            log.info("fold %d: resumed from %s at epoch %d", self.fold + 1, self.rundir.state(self.fold + 1, "last"), self.state.epoch + 1)
        while self.state.epoch < t.epochs:
            epoch = self.state.epoch
            train_stats = self.train_epoch(epoch)
            val = self.validate()
            if self.cfg.model.compile:
                self._log_graphs(epoch)
            self.end_epoch(epoch, train_stats, val)
            if self.ctx.any(self.state.bad_epochs >= t.early_stop_patience, "early_stop"):
                log.info("fold %d: early stop after epoch %d (best epoch %d)", self.fold + 1, epoch + 1, self.state.best_epoch + 1)
                break
            if self.stop_agreed():
                raise StopRequested(
                    self.stop.signum or signal.SIGTERM,
                    f"stopped by {self._signal_name()} after fold {self.fold + 1} epoch {epoch + 1}; resume with --resume",
                )
        result = {
            "fold": self.fold + 1,
            "best_epoch": self.state.best_epoch + 1,
            "best_metric": self.state.best_metric,
            "selection_metric": t.selection_metric,
            "complete": True,
        }
        if self.state.best_epoch < 0:
            # The selection metric was undefined (NaN) at every epoch: no positive residue in the held-out
            # fold, or an empty one. Keep the last epoch as best/ so the fold stays loadable, and say so.
            log.warning(
                "fold %d: %s undefined at every epoch (no positive residue in the validation fold?); best/ holds the last epoch",
                self.fold + 1,
                t.selection_metric,
            )
            result.update(best_epoch=None, best_metric=None, selection="last epoch: selection metric undefined at every epoch")
            if self.ctx.is_main and self._last_val is not None:
                save_state(
                    self.rundir.state(self.fold + 1, "best"),
                    self.model,
                    self.meta({ion: v["metrics"] for ion, v in self._last_val.items()}),
                )
                write_oof(self.rundir.oof(self.fold + 1), self.val_records, {ion: v["probs"] for ion, v in self._last_val.items()})
        if self.ctx.is_main:
            atomic_write_json(self.rundir.fold_result(self.fold + 1), result)
            write_plots(self.dir.parent / "plots", self.fold + 1, self.state.history, self.ions)
        self.ctx.barrier("fold_end")
        return result

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.training
        plan = epoch_plan(cfg, self.data, self.train_records, epoch)
        mine = shard(plan, ctx.rank, ctx.world_size)
        n_windows = ctx.max_int(math.ceil(len(mine) / t.accum_steps), "steps_per_epoch")
        self.model.train()
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)  # the epoch's own peak
        # Per ion: bce sum, bce tokens, mlm sum, mlm tokens. Kept on the device, read only when a line is logged.
        stats = torch.zeros(len(self.ions), 4, dtype=torch.float64, device=ctx.device)
        tokens, t0 = 0, time.time()
        start = self.state.window
        if start:  # resuming an epoch a signal stopped: its first `start` steps are done
            partial = self.state.partial or {}
            if (partial.get("world_size"), partial.get("accum_steps")) != (ctx.world_size, t.accum_steps):
                raise RunStateError(
                    f"{self.rundir.state(self.fold + 1, 'last')}: stopped mid-epoch with {partial.get('world_size')} process(es) and "
                    f"accum_steps {partial.get('accum_steps')}; resume with the same, or use --restart-fold"
                )
            if ctx.is_main:  # the saved sums are already over all ranks
                stats += torch.tensor(partial["stats"], dtype=torch.float64).to(ctx.device)
            tokens, t0 = int(partial["tokens"]), t0 - float(partial["seconds"])
            log.info("fold %d epoch %d: continuing at step %d/%d", self.fold + 1, epoch + 1, start + 1, n_windows)
        for w in range(start, n_windows):
            window = mine[w * t.accum_steps : (w + 1) * t.accum_steps]
            batches = [self.collate_train(item, epoch) for item in window]
            # Dropout RNG per global micro-batch (shard() deals plan entry j * world + rank to this rank's
            # j-th slot): NGPU=2 with accum 1 draws what one process with accum 2 draws, and a resumed
            # run draws what an uninterrupted one would.
            seeds = [
                stable_seed(cfg.general.seed, self.fold, epoch, "dropout", (w * t.accum_steps + j) * ctx.world_size + ctx.rank)
                for j in range(len(window))
            ]
            tokens += sum(int((b["sequence_ids"] >= 0).sum()) for b, _ in filter(None, batches))
            stats += backward_window(self.model, batches, ctx, self.loss_spec, self.precision, seeds=seeds, host_stats=False)
            self.optimizer_step()
            if cfg.general.check_replicas_every and self.state.step % cfg.general.check_replicas_every == 0:
                ctx.check_replicas(self.params, self.state.step)
            if ctx.is_main and ((w + 1) % cfg.general.log_every == 0 or w + 1 == n_windows):
                elapsed = time.time() - t0
                s = stats.sum(0).tolist()
                log.info(
                    "fold %d epoch %d/%d step %d/%d | bce %.4f mlm %.4f (rank 0) | lr %.2e | %.0f tok/s | ETA %s",
                    self.fold + 1,
                    epoch + 1,
                    t.epochs,
                    w + 1,
                    n_windows,
                    s[0] / max(1.0, s[1]),
                    s[2] / max(1.0, s[3]),
                    self.optimizer.param_groups[0]["lr"],
                    tokens * ctx.world_size / max(elapsed, 1e-9),
                    format_duration(elapsed / (w + 1 - start) * (n_windows - w - 1)),
                )
            if self.stop_agreed():
                self.stop_mid_epoch(epoch, w + 1, n_windows, stats, tokens, time.time() - t0)
        stats = ctx.all_reduce(stats, "sum", "train_loss_stats").cpu()
        seconds = time.time() - t0
        return {
            "tokens_per_s": tokens * ctx.world_size / max(seconds, 1e-9),
            "peak_gpu_memory_gb": peak_gpu_memory_gb(ctx.device),
            "train_bce": {ion: float(stats[i, 0] / max(1.0, float(stats[i, 1]))) for i, ion in enumerate(self.ions)},
            "train_mlm": float(stats[:, 2].sum() / max(1.0, float(stats[:, 3].sum()))),
            "padding_fraction": plan_padding(plan),
            "seconds": seconds,
            "comm_bytes_per_step": self.comm_bytes,
        }

    def _log_graphs(self, epoch: int) -> None:
        """The compiled layers' graph count, whenever an epoch (training + validation) added graphs."""
        n = graph_count()
        if n != self._graphs and self.ctx.is_main:
            log.info("fold %d epoch %d: compiled layers hold %d graph(s) (training and validation shapes)", self.fold + 1, epoch + 1, n)
        self._graphs = n

    def stop_agreed(self) -> bool:
        """True on every rank once any rank got a stop signal (one tiny all-reduce; none without a ``stop``)."""
        return self.stop is not None and self.ctx.any(self.stop.requested, "stop_signal")

    def _signal_name(self) -> str:
        return self.stop.name if self.stop is not None and self.stop.requested else "a signal on another rank"

    def stop_mid_epoch(self, epoch: int, window: int, n_windows: int, stats: torch.Tensor, tokens: int, seconds: float) -> None:
        """Save ``last/`` at this step boundary, with what a resume needs to finish the epoch, then raise StopRequested.

        Model, optimiser, schedule and every seed depend only on (epoch, step), so the resumed epoch equals
        an uninterrupted one; its training-loss sums are saved over all ranks.
        """
        total = self.ctx.all_reduce(stats.clone(), "sum", "stop_stats")
        st = self.state
        st.window = window
        st.partial = {
            "stats": total.tolist(),
            "tokens": tokens,
            "seconds": seconds,
            "world_size": self.ctx.world_size,
            "accum_steps": self.cfg.training.accum_steps,
        }
        if self.ctx.is_main:
            meta = self.meta({ion: m for ion, m in (st.history[-1]["val"].items() if st.history else [])})
            save_state(self.rundir.state(self.fold + 1, "last"), self.model, {**meta, "trainer_state": st.__dict__}, self.optimizer)
        self.ctx.barrier("stop_saved")
        raise StopRequested(
            self.stop.signum or signal.SIGTERM,
            f"stopped by {self._signal_name()} in fold {self.fold + 1} epoch {epoch + 1} after step {window}/{n_windows} "
            f"({self.rundir.state(self.fold + 1, 'last')} saved); resume with --resume",
        )

    def collate_train(self, item: tuple[str, list[Example]] | None, epoch: int) -> tuple[dict, str] | None:
        if item is None:
            return None  # this rank has fewer batches: an empty step that still joins the all-reduce
        ion, examples = item
        t = self.cfg.training
        batch = collate(examples, masking=self.masking, seed=self.cfg.general.seed, epoch=epoch, label_smoothing=t.label_smoothing)
        return batch, ion

    def optimizer_step(self) -> None:
        t = self.cfg.training
        lr = lr_at(self.state.step, self.total_steps, self.warmup_steps, t.learning_rate, t.min_lr)
        self.comm_bytes = optimizer_step(self.params, self.optimizer, self.ctx, t.max_grad_norm, lr)
        self.state.step += 1

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, dict[str, Any]]:
        """Per-ion metrics over every validation residue (all ranks compute the same numbers)."""
        out = {}
        for ion in self.ions:
            probs = predict_records(
                self.model,
                self.val_records[ion],
                self.val_examples[ion],
                ion,
                self.ctx,
                self.cfg.training.eval_max_tokens_per_batch,
                self.precision,
            )
            y = np.concatenate([r.labels for r in self.val_records[ion]]) if self.val_records[ion] else np.zeros(0)
            p = np.concatenate(probs) if probs else np.zeros(0)
            m = metrics.binary_metrics(y, p)
            m["val_bce"] = (
                float(-np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))) if len(y) else float("nan")
            )
            out[ion] = {"metrics": m, "probs": probs}
        return out

    def end_epoch(self, epoch: int, train_stats: dict, val: dict) -> None:
        t, st = self.cfg.training, self.state
        self._last_val = val
        key = "auprc" if t.selection_metric == "auprc" else "hra"
        per_ion = {ion: v["metrics"] for ion, v in val.items()}
        values = [m[key] for m in per_ion.values() if not math.isnan(m[key])]
        score = float(np.mean(values)) if values else float("nan")
        improved = not math.isnan(score) and score > st.best_metric + t.min_delta
        record = {
            "fold": self.fold + 1,
            "epoch": epoch + 1,
            "step": st.step,
            f"mean_{key}": score,
            "improved": improved,
            **train_stats,
            "val": {ion: _json_metrics(m) for ion, m in per_ion.items()},
        }
        st.history.append(record)
        st.window, st.partial = 0, None
        if improved:
            st.best_metric, st.best_epoch, st.bad_epochs = score, epoch, 0
        else:
            st.bad_epochs += 1
        st.epoch = epoch + 1
        if self.ctx.is_main:
            summary = " ".join(f"{ion} auprc {m['auprc']:.3f} hra {m['hra']:.3f}" for ion, m in per_ion.items())
            log.info(
                "fold %d epoch %d: %s | mean %s %.4f%s | padding %.1f%% | %.0fs, %.0f tok/s%s (F1/MCC at a threshold fitted on this fold are optimistic)",
                self.fold + 1,
                epoch + 1,
                summary,
                key,
                score,
                " *best*" if improved else "",
                100 * train_stats["padding_fraction"],
                train_stats["seconds"],
                train_stats["tokens_per_s"],
                f", peak GPU memory {train_stats['peak_gpu_memory_gb']:.1f} GB" if self.ctx.device.type == "cuda" else "",
            )
            meta = self.meta(per_ion)
            if improved:
                save_state(self.rundir.state(self.fold + 1, "best"), self.model, meta)
                write_oof(self.rundir.oof(self.fold + 1), self.val_records, {ion: v["probs"] for ion, v in val.items()})
            save_state(self.rundir.state(self.fold + 1, "last"), self.model, {**meta, "trainer_state": st.__dict__}, self.optimizer)
            atomic_write_text(self.rundir.metrics(self.fold + 1), "".join(dumps_json(r) + "\n" for r in st.history))
        self.ctx.barrier("checkpoint_written")

    def meta(self, per_ion: dict) -> dict[str, Any]:
        c = self.cfg
        return {
            "fold": self.fold + 1,
            "epoch": self.state.epoch,
            "ions": self.ions,
            "seed": c.general.seed,
            "base_model": _base_model_id(c.model.checkpoint),
            "base_revision": c.model.revision,
            "base_config": self.model.backbone.config.to_dict(),
            "lora": c.to_dict()["lora"],
            "head_dropout": c.model.head_dropout,
            "max_query_length": c.data.max_query_length,
            "max_example_tokens": c.data.max_example_tokens,
            "validation_msa_sampling": self.data.val_sampling.__dict__,
            "metrics": {ion: _json_metrics(m) for ion, m in per_ion.items()},
            "runtime": describe(self.ctx.device, self.precision, compiled=self.cfg.model.compile),
        }


def predict_records(
    model,
    records: Sequence[Record],
    examples: Sequence[Example],
    ion: str,
    ctx: DistContext,
    max_tokens: int,
    precision: str | bool = "float32",
) -> list[np.ndarray]:
    """Per-protein probabilities in ``records`` order (``scoring.score_records``: ranks share the work)."""
    scores = score_records(model, examples, ion, ctx.device, max_tokens, precision, ctx)
    return [scores[r.id] for r in records]


def _base_model_id(checkpoint: str) -> str:
    """Hub ids as given; local directories as absolute paths, so predictions work from any directory."""
    path = Path(checkpoint).expanduser()
    return str(path.resolve()) if path.is_dir() else checkpoint


def _json_metrics(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
