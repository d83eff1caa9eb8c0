"""K-fold cross-validation of one run directory: data and folds, the fold loop, the run's report.

e1min train --config configs/demo.yaml [--set training.epochs=3] [--folds 1,3] [--resume | --restart-fold]
torchrun --nproc_per_node=4 -m e1min.train --config configs/e1_binding.yaml
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from e1min.checkpoint import state_dir
from e1min.data.dataset import ion_stats, load_ion_records
from e1min.data.fasta import DataError, Record
from e1min.data.folds import assign_folds, check_assignment, load_folds, save_folds
from e1min.data.homology import Homology, fold_leakage, format_leakage, grouping_meta, make_folds
from e1min.data.mmseqs import MMseqsError
from e1min.data.msa import ContextProvider
from e1min.dist import DistContext, init_distributed, launcher_warning
from e1min.errors import E1minError
from e1min.io import atomic_write_json, atomic_write_text
from e1min.pages import build_run_report
from e1min.recipe import Recipe
from e1min.report import report_run
from e1min.run import STATE_NAMES, RunDir, RunLock, RunLockError, RunStateError, remove_temporaries
from e1min.runtime import set_matmul_precision, training_precision
from e1min.stop import GracefulStop, StopRequested
from e1min.trainer import FoldTrainer, RunData, as_recipe

log = logging.getLogger("e1min")


def prepare_run(cfg: Recipe | dict, ctx: DistContext, out: Path) -> RunData:
    """Load records, assign (or reuse) folds, write config.yaml / folds.json / data_stats.json."""
    cfg = as_recipe(cfg)
    d, t, g = cfg.data, cfg.training, cfg.general
    records = load_ion_records(d.fasta_path, t.ions, d.fasta_pattern)
    folds_file = RunDir(out).folds_file
    fold_meta = {"num_folds": t.num_folds, "seed": g.seed, "ions": list(t.ions), "data": data_fingerprint(records)}
    grouping = grouping_meta(d.fold_grouping, d.split_min_seq_id, d.split_coverage)
    if grouping is not None:
        fold_meta["grouping"] = grouping
    extra, homology = {}, None
    if folds_file.exists():
        assignment, saved = load_folds(folds_file)
        check_fold_meta(folds_file, saved, fold_meta)
        check_grouping(folds_file, saved.get("grouping"), grouping)
        problems = check_assignment(assignment, records)
        if problems:
            raise DataError(f"{folds_file}: does not match the data ({'; '.join(problems[:5])}); use a new output_dir")
        log.info("reusing fold assignment from %s", folds_file)
    elif grouping is None:
        assignment = assign_folds(records, t.num_folds, g.seed)
    else:
        # Rank 0 runs MMseqs2 and writes folds.json; the others read it (every rank learns of a failure).
        assignment, error = {}, None
        if ctx.is_main:
            try:
                assignment, extra, homology = make_folds(
                    records, t.num_folds, g.seed, d.fold_grouping, d.split_min_seq_id, d.split_coverage, _mmseqs_threads()
                )
            except E1minError as e:
                error = e
        if ctx.any(error is not None, "identity_folds"):
            raise error or DataError(f"{folds_file}: rank 0 could not assign identity-grouped folds")
    stats = {ion: ion_stats(recs) for ion, recs in records.items()}
    provider = ContextProvider(d.msa_dir) if d.msa_dir else None
    if provider is not None:  # for the report: the share of proteins that have an MSA file
        for ion, recs in records.items():
            stats[ion]["msa_coverage"] = sum(provider.find(ion, r.id) is not None for r in recs) / max(len(recs), 1)
    if ctx.is_main:
        atomic_write_text(out / "config.yaml", cfg.dump_yaml())
        if not folds_file.exists():
            save_folds(folds_file, assignment, {**fold_meta, **extra})
        fold_sizes = {str(k + 1): sum(1 for f in assignment.values() if f == k) for k in range(t.num_folds)}
        data_stats = {"ions": stats, "fold_sizes": fold_sizes}
        if d.homology_report:
            data_stats["homology"] = _homology_report(records, assignment, homology)
        atomic_write_json(out / "data_stats.json", data_stats)
        for ion, s in stats.items():
            log.info(
                "%s: %d proteins (%d labelled), %d residues, positive rate %.4f",
                ion,
                s["proteins"],
                s["labelled_proteins"],
                s["residues"],
                s["positive_rate"],
            )
    ctx.barrier("prepare_run")
    if not assignment:
        assignment, _ = load_folds(folds_file)
    return RunData(
        records=records,
        assignment=assignment,
        provider=provider,
        train_sampling=t.msa_sampling,
        val_sampling=t.validation_msa_sampling,
    )


def _mmseqs_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


def _homology_report(records: dict[str, list[Record]], assignment: dict[str, int], homology: Homology | None) -> dict[str, Any] | None:
    """The cross-fold homology report for data_stats.json (None, with a log line, when MMseqs2 is unavailable)."""
    try:
        report = fold_leakage(records, assignment, homology, threads=_mmseqs_threads())
    except MMseqsError as e:
        log.info("homology report skipped (data.homology_report: false silences this): %s", e)
        return None
    log.info("%s", format_leakage(report))
    return report


def check_grouping(path: Path, saved: dict[str, Any] | None, wanted: dict[str, Any] | None) -> None:
    """A reused folds.json must have been grouped as the config says (no grouping recorded = sequence)."""
    if (saved or None) != (wanted or None):
        have = saved or {"method": "sequence"}
        want = wanted or {"method": "sequence"}
        raise DataError(
            f"{path}: fold grouping is {have} there but {want} in the config; use a new training.output_dir "
            "(or set data.fold_grouping / split_min_seq_id / split_coverage back to continue this run)"
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
            raise DataError(
                f"{path}: {key} is {have!r} there but {want!r} in the config; use a new training.output_dir "
                f"(or set {key} back to {have!r} to continue this run)"
            )


def run_cross_validation(
    cfg: Recipe | dict, ctx: DistContext, resume: bool = False, restart_folds: bool = False, stop: GracefulStop | None = None
) -> dict[str, Any] | None:
    """Train every requested fold (skipping completed ones), then summarise. Returns the summary (rank 0).

    A fold with a partial state (``fold_K/last`` or ``best`` without ``fold_result.json``) continues only
    with ``resume`` and starts over only with ``restart_folds``; otherwise this refuses, naming the fold.
    ``stop``: a signal flag; once raised, the fold trainer saves ``last/`` and raises ``StopRequested``.
    """
    cfg = as_recipe(cfg)
    t = cfg.training
    run = RunDir(Path(t.output_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    data = prepare_run(cfg, ctx, run.root)
    folds = [f - 1 for f in (t.folds or range(1, t.num_folds + 1))]
    for fold in folds:
        k = fold + 1
        if run.fold_result(k).exists():
            log.info("fold %d already complete: skipped (delete %s to retrain)", k, run.fold(k))
            continue
        partial = ctx.is_main and any(state_dir(run.state(k, w)) is not None for w in STATE_NAMES)
        if ctx.any(partial, "partial_fold") and not resume:
            if not restart_folds:
                raise RunStateError(
                    f"{run.fold(k)}: holds an unfinished fold {k}; rerun with --resume to continue it "
                    f"or with --restart-fold to train it from scratch"
                )
            if ctx.is_main:
                log.info("fold %d: --restart-fold: removing its previous state", k)
                shutil.rmtree(run.fold(k))
            ctx.barrier("restart_fold")
        FoldTrainer(cfg, ctx, data, fold, run.root, stop=stop).run(resume)
    if data.provider is not None and data.provider.missing and ctx.is_main:
        log.info("%d proteins had no MSA and ran single-sequence", len(data.provider.missing))
    summary = None
    if ctx.is_main:
        summary = report_run(run.root, cfg, only_missing_plots=True)
        if summary:
            log.info("\n%s", (run.root / "summary.md").read_text())
        log.info("report: %s", build_run_report(run.root).resolve())
    ctx.barrier("run_end")
    return summary


def train_run(
    cfg: Recipe | dict, notes: list[str] = (), label: str = "", resume: bool = False, restart_folds: bool = False
) -> dict[str, Any] | None:
    """``e1min train`` after argument parsing: join the process group, lock the run directory, log, run.

    Rank 0 locks ``output_dir`` before anything (even ``training.log``) is written; every rank agrees on
    the outcome, so a refused lock stops all of them with the same error. SIGTERM, SIGINT and SIGUSR1
    stop the run at the next step boundary with ``last/`` saved (``StopRequested``); a second one at once.
    """
    cfg = as_recipe(cfg)
    if resume and restart_folds:
        raise RunStateError("--resume and --restart-fold exclude each other")
    set_matmul_precision(cfg.model.matmul_precision)
    ctx = init_distributed(cfg.general.dist_timeout_seconds, cfg.general.device)
    out = Path(cfg.training.output_dir)
    lock = RunLock(out, "training.output_dir")
    with ctx.session(), GracefulStop() as stop:
        try:
            error, removed = None, []
            if ctx.is_main:
                try:
                    lock.acquire()
                    removed = remove_temporaries(out)
                except (E1minError, OSError) as e:  # every rank must hear of it, not wait in the next collective
                    error = e if isinstance(e, E1minError) else RunLockError(f"{out}: {e}")
            if ctx.any(error is not None, "run_lock"):
                raise error or RunLockError(f"{out}: rank 0 could not lock the run directory")
            setup_logging(out, ctx.is_main)
            for n in notes:
                log.info(n)
            if ctx.is_main and (warning := launcher_warning()):
                log.warning("%s", warning)
            if lock.took_over:
                h = lock.took_over
                log.info(
                    "took over the run lock left by process %s on %s (started %s), no longer running", h["pid"], h["host"], h["started"]
                )
            if removed:
                log.info("removed %d temporary file(s) left by an interrupted save, e.g. %s", len(removed), removed[0])
            log.info(
                "e1min train: %s, %d process(es) on %s, precision %s, float32 matmul precision %s",
                label,
                ctx.world_size,
                ctx.device,
                training_precision(ctx.device, cfg.training.bf16),
                cfg.model.matmul_precision,
            )
            try:
                summary = run_cross_validation(cfg, ctx, resume=resume, restart_folds=restart_folds, stop=stop)
            except StopRequested as e:
                log.info("%s", e)
                raise
            if stop.requested:
                log.info("%s arrived after the last training step: the run finished anyway", stop.name)
            return summary
        finally:
            lock.release()
            close_run_log()


def close_run_log() -> None:
    """Detach and close the run's training.log handler: later messages of this process belong to no run."""
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()


def setup_logging(out: Path, is_main: bool) -> None:
    """Console (rank 0) + the run's training.log; called when a run starts, never at import."""
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
