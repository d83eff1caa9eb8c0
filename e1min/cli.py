"""The ``e1min`` command: every subcommand's arguments, and how errors end the process.

    e1min train       --config CONFIG [--set section.key=value] [--folds 1,3] [--resume | --restart-fold]
    e1min report      RUN_DIR
    e1min predict     --checkpoint RUN --fasta proteins.fasta [--msa-dir DIR] [--ions ZN,CA] [--out preds.tsv]
    e1min evaluate    --checkpoint RUN --fasta test.fasta [--out-dir eval/] [--train-fasta train.fasta]
    e1min embed       --checkpoint RUN/fold_1 --fasta proteins.fasta --out emb/ [--per-residue]
    e1min check-data  --config CONFIG
    e1min verify-lora
    e1min info        CHECKPOINT
    e1min build-msa   --fasta proteins.fasta --db DB --out MSA_DIR [--ion ZN] [--threads N]

Library modules never parse argv: each subcommand here has ``_add_<name>`` (its arguments) and
``_run_<name>`` (argument checks, then one library call). An ``E1minError`` (bad file, config,
checkpoint, argument, dead peer rank) is printed as one line and exits 2 (``E1MIN_DEBUG=1`` shows the
traceback); anything else is a bug and shows its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from e1min.errors import E1minError


# ----------------------------------------------------------------------------------------- train
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (YAML)")
    p.add_argument("--folds", default=None, help="comma-separated 1-based folds to run, e.g. 1,3")
    p.add_argument("--resume", action="store_true", help="continue interrupted folds from their last epoch checkpoint")
    p.add_argument("--restart-fold", action="store_true", help="train unfinished folds from scratch, deleting their previous state")


def _run_train(args: argparse.Namespace) -> int:
    from e1min.crossval import train_run
    from e1min.recipe import load_recipe

    overrides = list(args.set) + ([f"training.folds=[{args.folds}]"] if args.folds else [])
    recipe, notes = load_recipe(args.config, overrides)
    train_run(recipe, notes, label=args.config, resume=args.resume, restart_folds=args.restart_fold)
    return 0


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run directory (results/<run>)")


def _run_report(args: argparse.Namespace) -> int:
    from e1min.pages import build_run_report
    from e1min.report import report_run
    from e1min.run import RunLock

    out = Path(args.run_dir)
    with RunLock(out):
        summary = report_run(out)
        page = build_run_report(out)
    if summary is None:
        print(f"{out}: no complete fold with out-of-fold predictions yet", file=sys.stderr)
    else:
        print((out / "summary.md").read_text())
    print(f"report: {page}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------ predict / evaluate / embed
def _add_inputs(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--fasta", required=True, help="FASTA file (labelled 3-line, unlabelled 2-line or wrapped)")
    p.add_argument("--skip-invalid", action="store_true", help="report and skip proteins that cannot be predicted instead of stopping")
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget per batch (padded tokens)")
    p.add_argument("--base-model", default=None, help="local base E1 directory to use instead of the one recorded in checkpoint.json")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype the base weights are stored in (default float32)"
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=["float32", "bf16"],
        help="compute precision: float32, or bf16 autocast for the backbone (heads and probabilities stay float32). "
        "Default: float32 on the CPU, bf16 on CUDA; never chosen from CPU flags",
    )
    p.add_argument("--no-bf16", action="store_true", help="same as --precision float32")
    p.add_argument(
        "--matmul-precision",
        default="highest",
        choices=["highest", "high", "medium"],
        help="float32 matmuls: highest (exact, default), high/medium (TF32 on GPUs, reduced-precision float32 on CPUs that have it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the decoder layers (e1min.compile_model): pays off on many proteins"
    )


def _add_model_inputs(p: argparse.ArgumentParser) -> None:
    _add_inputs(p, "run directory (all complete folds), fold directory or fold_K/best")
    p.add_argument("--chunk-size", type=int, default=256, help="proteins per streamed chunk (length-sorted within)")
    p.add_argument("--msa-dir", default=None, help="A3M directory ({msa_dir}/{ION}/{id}.a3m or {msa_dir}/{id}.a3m)")
    p.add_argument("--ions", default=None, help="comma-separated subset of the model's ions (default: all)")
    p.add_argument("--folds", default=None, help="comma-separated 1-based folds of a run directory (default: all complete)")
    p.add_argument("--seed", type=int, default=None, help="seed of MSA context sampling (default: the run's seed)")


def _positive(name: str, v: int) -> None:
    from e1min.predictor import PredictError

    if v <= 0:
        raise PredictError(f"{name} must be positive, got {v}")


def _precision(args: argparse.Namespace) -> str | None:
    """The precision asked for (None: the device's default); sets the float32 matmul precision."""
    from e1min.predictor import PredictError
    from e1min.runtime import set_matmul_precision

    set_matmul_precision(args.matmul_precision)
    if args.no_bf16 and args.precision == "bf16":
        raise PredictError("--no-bf16 contradicts --precision bf16")
    return "float32" if args.no_bf16 else args.precision


def _load_for_prediction(args: argparse.Namespace, device: torch.device | None = None, require_labels: bool = False):
    """Check every argument and input, then load the checkpoint: (predictor, ions, provider, records, skipped)."""
    from e1min.data.fasta import DataError
    from e1min.data.msa import ContextProvider
    from e1min.inputs import check_msas, read_input_fasta
    from e1min.predictor import PredictError, load_predictor
    from e1min.tokenizer import MAX_POSITIONS_WITHIN_SEQ, SPECIALS_PER_SEQUENCE

    _positive("--max-tokens", args.max_tokens)
    _positive("--chunk-size", args.chunk_size)
    folds = None
    if args.folds:
        try:
            folds = [int(f) for f in args.folds.split(",") if f.strip()]
        except ValueError:
            raise PredictError(f"--folds must be comma-separated integers, got {args.folds[:80]!r}") from None
    if not Path(args.fasta).exists():
        raise DataError(f"{args.fasta}: file not found")
    if args.msa_dir and not Path(str(args.msa_dir).split("{ION}")[0] or ".").is_dir():
        raise PredictError(f"--msa-dir {args.msa_dir}: no such directory")
    predictor = load_predictor(
        args.checkpoint,
        folds=folds,
        base_model=args.base_model,
        device=device or args.device,
        dtype=getattr(torch, args.dtype),
        precision=_precision(args),
    )
    if args.compile:
        from e1min.compile import compile_model

        compile_model(predictor.model)
    ions = predictor._check_ions([i.strip() for i in args.ions.split(",") if i.strip()] if args.ions else None)
    max_len = MAX_POSITIONS_WITHIN_SEQ - SPECIALS_PER_SEQUENCE if predictor.max_query_length is None else None
    records, skipped = read_input_fasta(args.fasta, args.skip_invalid, require_labels=require_labels, max_length=max_len)
    provider = ContextProvider(args.msa_dir) if args.msa_dir else None
    if provider is not None:
        records, more = check_msas(provider, ions, records, args.skip_invalid)
        skipped += more
        if not records:
            raise DataError(f"{args.fasta}: no valid records left after checking MSAs")
    return predictor, ions, provider, records, skipped


def _print_setup(predictor, ions: list[str], records: list, skipped: list) -> None:
    err = sys.stderr
    print(
        f"model: {', '.join(predictor.fold_names)} ({predictor.num_folds} fold(s){', LoRA merged' if predictor.merged else ''}) "
        f"on {predictor.device}, precision {predictor.precision}; ions {', '.join(ions)}; {len(records)} proteins, "
        f"{sum(len(r.sequence) for r in records)} residues",
        file=err,
    )
    for ion in ions:
        if predictor.threshold(ion) is None:
            print(f"note: no saved threshold for {ion} (no thresholds.json entry): the call column is left empty", file=err)
    if skipped:
        print(f"skipped {len(skipped)} invalid protein(s):", file=err)
        for s in skipped[:20]:
            print(f"  {s.id}: {s.reason}", file=err)
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more", file=err)


def _add_predict(p: argparse.ArgumentParser) -> None:
    _add_model_inputs(p)
    p.add_argument("--out", default=None, help="output file (default predictions.tsv, or predictions.jsonl with --format jsonl)")
    p.add_argument("--format", default=None, choices=["tsv", "jsonl"], help="default: from --out's extension (.jsonl -> jsonl), else tsv")
    p.add_argument(
        "--structures", default=None, metavar="DIR", help="paint predictions on structures DIR/{id}.pdb|.cif[.gz] (AlphaFold/PDB names)"
    )
    p.add_argument("--out-structures", default=None, metavar="OUT", help="directory for painted structures and ChimeraX/PyMOL scripts")
    p.add_argument(
        "--structure-pattern", default=None, help="structure file name under --structures, e.g. '{id}_relaxed.pdb' (glob allowed)"
    )
    p.add_argument("--min-identity", type=float, default=0.9, help="least sequence identity of a chain to be painted (default 0.9)")


def _run_predict(args: argparse.Namespace) -> int:
    from e1min.dist import init_distributed
    from e1min.io import check_output_file
    from e1min.outputs import output_format, predict_file

    fmt = output_format(args.out or "", args.format)
    out = check_output_file(args.out or f"predictions.{fmt}", [args.fasta])
    if args.structures or args.out_structures:
        _check_structure_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = init_distributed(timeout_s=float(os.environ.get("E1MIN_PREDICT_TIMEOUT", 24 * 3600)), device=args.device) if world > 1 else None
    with ctx.session() if ctx is not None else contextlib.nullcontext():
        predictor, ions, provider, records, skipped = _load_for_prediction(args, ctx.device if ctx else None)
        rank, ws = (ctx.rank, ctx.world_size) if ctx else (0, 1)
        if rank == 0:
            _print_setup(predictor, ions, records, skipped)
        stats = predict_file(
            predictor,
            records,
            out,
            ions,
            provider,
            fmt,
            args.max_tokens,
            args.chunk_size,
            args.seed,
            rank,
            ws,
            barrier=(ctx.barrier if ctx else None),
            progress=not args.quiet,
        )
        if rank == 0:
            print(
                f"wrote {out} ({len(records)} proteins, {len(ions)} ion(s)); {stats['proteins_per_s']:.1f} proteins/s, "
                f"{stats['residues_per_s']:.0f} residues/s",
                file=sys.stderr,
            )
            if args.structures:
                _paint(args, out)
    return 0


def _check_structure_args(args: argparse.Namespace) -> None:
    from e1min.io import check_output_dir
    from e1min.predictor import PredictError
    from e1min.structures import require_gemmi

    if not (args.structures and args.out_structures):
        raise PredictError("--structures and --out-structures go together")
    if not Path(args.structures).is_dir():
        raise PredictError(f"--structures {args.structures}: not a directory")
    if not 0 <= args.min_identity <= 1:
        raise PredictError(f"--min-identity must be in [0, 1], got {args.min_identity}")
    if Path(args.out_structures).resolve() == Path(args.structures).resolve():
        raise PredictError(f"--out-structures {args.out_structures}: is the --structures directory; give another one")
    check_output_dir(args.out_structures, [args.fasta], what="--out-structures")
    require_gemmi()


def _paint(args: argparse.Namespace, predictions: Path) -> None:
    from e1min.structures import paint_structures

    rows = paint_structures(predictions, args.structures, args.out_structures, args.structure_pattern, args.min_identity)
    for r in rows:
        if r["status"] != "painted":
            print(f"structure of {r['id']} ({r['ion']}): skipped: {r['message']}", file=sys.stderr)
    painted = sorted({r["id"] for r in rows if r["status"] == "painted"})
    print(
        f"painted {len(painted)} of {len({r['id'] for r in rows})} protein(s) in {args.out_structures} (structures.tsv lists each)",
        file=sys.stderr,
    )


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    _add_model_inputs(p)
    p.add_argument("--out-dir", default="evaluation", help="output directory (default ./evaluation)")
    p.add_argument("--min-recall", type=float, default=0.7, help="recall floor of the high-recall AUPRC (HRA)")
    p.add_argument(
        "--train-fasta",
        nargs="+",
        default=None,
        metavar="FASTA",
        help="training FASTA file(s): report test proteins with a training homolog (MMseqs2) at 30/50/90 %% identity",
    )
    p.add_argument("--threads", type=int, default=1, help="mmseqs threads of the --train-fasta check (default 1)")


def _run_evaluate(args: argparse.Namespace) -> int:
    from e1min.evaluation import EVALUATION_FILES, evaluate_records, evaluation_table
    from e1min.io import check_output_dir
    from e1min.predictor import PredictError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PredictError("evaluate runs in one process; launch it without torchrun")
    check_output_dir(args.out_dir, [args.fasta], EVALUATION_FILES)
    train = _read_train_fasta(args.train_fasta) if args.train_fasta else None
    predictor, ions, provider, records, skipped = _load_for_prediction(args, require_labels=True)
    _print_setup(predictor, ions, records, skipped)
    homology = None
    if train is not None:
        from e1min.data.homology import format_leakage, heldout_leakage

        homology = heldout_leakage(records, train, threads=args.threads)
        print(format_leakage(homology), file=sys.stderr)
    report = evaluate_records(
        predictor,
        records,
        args.out_dir,
        ions,
        provider,
        args.max_tokens,
        args.chunk_size,
        args.seed,
        args.min_recall,
        progress=not args.quiet,
        homology=homology,
    )
    print(evaluation_table(report["ions"]))
    print(f"wrote {Path(args.out_dir) / 'evaluation.html'}, evaluation.json, evaluation.md, predictions.tsv and curves", file=sys.stderr)
    return 0


def _read_train_fasta(paths: Sequence[str]) -> list:
    """Training proteins of ``--train-fasta`` (one per id), after MMseqs2 is found: both before any model work."""
    from e1min.data.fasta import DataError, read_fasta
    from e1min.data.mmseqs import find_mmseqs

    find_mmseqs()
    by_id = {}
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"--train-fasta {path}: file not found")
        for r in read_fasta(path):
            by_id.setdefault(r.id, r)
    return list(by_id.values())


def _add_embed(p: argparse.ArgumentParser) -> None:
    _add_inputs(p, "run dir, fold dir, fold_K/best, or a base E1 directory / Hub id")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--per-residue", action="store_true", help="also store per-residue embeddings (residues-*.safetensors)")
    p.add_argument("--shard-size", type=int, default=1000, help="proteins per safetensors shard (also capped at 1 GiB)")
    p.add_argument("--fold", type=int, default=None, help="fold of a run directory (default: first complete)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="window length for long proteins (default: the checkpoint's max_query_length, else 1022)",
    )


def _run_embed(args: argparse.Namespace) -> int:
    from e1min.data.fasta import DataError
    from e1min.inputs import read_input_fasta
    from e1min.io import check_output_dir
    from e1min.outputs import embed_file
    from e1min.predictor import PredictError, load_backbone
    from e1min.runtime import inference_precision

    _positive("--shard-size", args.shard_size)
    _positive("--max-tokens", args.max_tokens)
    if args.max_length is not None and args.max_length < 2:
        raise PredictError(f"--max-length must be at least 2, got {args.max_length}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PredictError("embed runs in one process; launch it without torchrun")
    if not Path(args.fasta).exists():
        raise DataError(f"{args.fasta}: file not found")
    check_output_dir(args.out, [args.fasta], ["index.json"], what="--out")
    backbone, info = load_backbone(args.checkpoint, args.fold, args.base_model, args.device, getattr(torch, args.dtype))
    if args.compile:
        from e1min.compile import compile_model

        compile_model(backbone)
    max_len = args.max_length or info.get("max_query_length") or 1022
    records, skipped = read_input_fasta(args.fasta, args.skip_invalid)
    if skipped:
        print(f"skipped {len(skipped)} invalid protein(s): " + "; ".join(f"{s.id}: {s.reason}" for s in skipped[:5]), file=sys.stderr)
    device = next(backbone.parameters()).device
    precision = inference_precision(device, _precision(args))
    print(f"embedding with {info.get('checkpoint')} on {device}, precision {precision}", file=sys.stderr)
    stats = embed_file(
        backbone,
        records,
        args.out,
        args.per_residue,
        args.shard_size,
        max_tokens=args.max_tokens,
        max_query_length=max_len,
        device=device,
        precision=precision,
        info=info,
        progress=not args.quiet,
    )
    print(f"wrote {stats['shards']} shard(s) and index.json to {args.out} ({len(records)} proteins)", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------ check-data, verify
def _add_check_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (YAML)")
    p.add_argument("--threads", type=int, default=1, help="mmseqs threads of the homology check (default 1)")


def _run_check_data(args: argparse.Namespace) -> int:
    """Exit 1 listing every problem (config and inputs) at once, 0 when all is well."""
    from e1min.data.check import check_data
    from e1min.recipe import TrainConfigError, load_recipe

    try:
        # The same validation as train; file checks are check_data's, so every problem is reported at once.
        recipe, notes = load_recipe(args.config, args.set, check_files=False)
    except TrainConfigError as e:
        print(f"e1min check-data: {e}", file=sys.stderr)
        return 1
    d, t = recipe.data, recipe.training
    report, problems = check_data(
        d.fasta_path, list(t.ions), d.fasta_pattern, d.msa_dir, t.num_folds, recipe.general.seed,
        d.fold_grouping, d.split_min_seq_id, d.split_coverage, d.homology_report, args.threads,
    )  # fmt: skip
    for n in notes:
        print(n)
    print(report)
    if problems:
        print(f"e1min check-data: {len(problems)} problem(s) in the inputs of {args.config}", file=sys.stderr)
        return 1
    return 0


def _add_verify_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint directory or Hub id (default: a tiny random E1)")
    p.add_argument("--revision", default=None)
    p.add_argument("--r", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (default 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="base weight dtype (default float32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)


def _run_verify_lora(args: argparse.Namespace) -> int:
    from e1min.verify import run_checks

    print(f"verify-lora on {args.checkpoint or 'tiny random E1'} ({args.dtype}, {args.device}, r={args.r}, alpha={args.alpha:g})")
    results = run_checks(
        args.checkpoint,
        r=args.r,
        alpha=args.alpha,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        seed=args.seed,
        revision=args.revision,
    )
    for res in results:
        print(res)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed}/{len(results)} checks passed")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------ info
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="local directory or Hub repo id (e.g. Profluent-Bio/E1-150m)")
    p.add_argument("--revision", default=None)
    p.add_argument("--meta", action="store_true", help=argparse.SUPPRESS)


def _run_info(args: argparse.Namespace) -> int:
    from e1min.hub import load_model

    model = load_model(args.checkpoint, revision=args.revision, device="meta" if args.meta else None)
    cfg = model.config
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    n = sum(p.numel() for p in model.parameters())
    kinds = ["global" if layer.is_global else "within" for layer in model.model.layers]
    print(f"checkpoint: {args.checkpoint}")
    print(f"parameters: {n:,} ({n / 1e6:.1f}M), dtype: {', '.join(dtypes)}")
    print(
        f"layers: {len(kinds)} ({kinds.count('within')} within-sequence, {kinds.count('global')} global: "
        f"{[i for i, k in enumerate(kinds) if k == 'global']})"
    )
    print("config:")
    for k, v in cfg.to_dict().items():
        print(f"  {k}: {v}")
    return 0


# ------------------------------------------------------------------------------------------ build-msa
def _add_build_msa(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fasta", required=True, help="proteins to build A3Ms for (labelled or unlabelled FASTA)")
    p.add_argument("--db", required=True, help="MMseqs2 database prefix (DB.dbtype) or a FASTA file (made into one)")
    p.add_argument("--out", required=True, help="MSA directory: writes OUT/ION/id.a3m with --ion, else OUT/id.a3m")
    p.add_argument("--ion", default=None, help="write into OUT/ION/ (e1min's layout for one ion)")
    p.add_argument("--threads", type=int, default=1, help="mmseqs threads (default 1)")
    p.add_argument("--sensitivity", type=float, default=None, help="mmseqs search -s (default: mmseqs's, 5.7)")
    p.add_argument("--max-seqs", type=int, default=None, help="mmseqs search --max-seqs (default: mmseqs's, 300)")
    p.add_argument("--evalue", type=float, default=None, help="mmseqs search -e (default: mmseqs's, 1e-3)")
    p.add_argument("--chunk-size", type=int, default=1000, help="proteins per mmseqs search (progress and resume granularity)")
    p.add_argument("--overwrite", action="store_true", help="rebuild A3Ms that already exist (default: skip them)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _run_build_msa(args: argparse.Namespace) -> int:
    """Exit 1 when some proteins failed (one line each), 0 otherwise."""
    from e1min.data.build_msa import build_msas

    def say(msg: str) -> None:
        if not args.quiet or ": failed: " in msg:
            print(msg, file=sys.stderr, flush=True)

    res = build_msas(
        args.fasta, args.db, args.out, args.ion, args.threads, args.sensitivity, args.max_seqs, args.evalue,
        args.overwrite, args.chunk_size, progress=say,
    )  # fmt: skip
    depths = sorted(res.depth.values())
    median = depths[len(depths) // 2] if depths else 0
    print(
        f"build-msa: wrote {len(res.written)} A3M(s) ({sum(1 for d in depths if d == 0)} query-only, median depth {median}), "
        f"skipped {len(res.skipped)} existing, {len(res.failed)} failed",
        file=sys.stderr,
    )
    return 1 if res.failed else 0


# ------------------------------------------------------------------------------------ the command
# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("joint LoRA + ion-head training with K-fold cross-validation", _add_train, _run_train),
    "report": ("regenerate a run's plots, thresholds and summary from its files", _add_report, _run_report),
    "predict": ("per-residue binding probabilities for a FASTA file", _add_predict, _run_predict),
    "evaluate": ("predict on a labelled FASTA and report metrics", _add_evaluate, _run_evaluate),
    "embed": ("per-residue and mean-pooled embeddings to safetensors", _add_embed, _run_embed),
    "check-data": ("validate every input a config names, print statistics", _add_check_data, _run_check_data),
    "verify-lora": ("unit-level LoRA checks (tiny random model by default)", _add_verify_lora, _run_verify_lora),
    "info": ("print a checkpoint's config, parameter count, dtype and layer types", _add_info, _run_info),
    "build-msa": ("one A3M per protein, searched with MMseqs2 against a database", _add_build_msa, _run_build_msa),
}
DESCRIPTIONS = {
    "predict": "Per-residue metal-binding probabilities for every protein of a FASTA file. Output rows are in input order: "
    "TSV columns id, position (1-based), residue, ion, probability (mean over folds), std (across folds), call (probability >= "
    "the run's saved threshold; empty when none is known); or one JSON object per protein. Under torchrun each rank predicts "
    "a strided share and rank 0 merges them.",
    "evaluate": "Predict a labelled FASTA and report per-ion AUPRC, AUROC, HRA, positive rate, and F1/MCC/precision/recall at "
    "the saved and at the best threshold. The FASTA's labels apply to every evaluated ion. Writes predictions.tsv, "
    "evaluation.json, evaluation.md, ROC/PR curves (CSV, and PNG with matplotlib) to --out-dir. Runs in one process.",
    "embed": "Final-norm embeddings of the fine-tuned backbone (a run/fold checkpoint, LoRA merged; a run directory uses --fold, "
    "default the first complete fold) or of a plain base E1 (a directory with config.json or a Hub id). Writes "
    "OUT/embeddings-00001.safetensors ... (key {id}: mean over residues), with --per-residue also OUT/residues-00001.safetensors "
    "... (key {id}: per residue), and OUT/index.json (id -> shard). Single sequence (no MSA context); runs in one process.",
}


def build_parser() -> argparse.ArgumentParser:
    from e1min import __version__

    p = argparse.ArgumentParser(prog="e1min", description="Fine-tune E1 to predict metal-binding residues.")
    p.add_argument("--version", action="version", version=f"e1min {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_text, add, run) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=DESCRIPTIONS.get(name, help_text))
        add(cmd)
        cmd.set_defaults(run=run)
    return p


def run_guarded(command: str, func: Callable[..., int | None], *args: object) -> int:
    """Run ``func(*args)``; an E1minError becomes one line on stderr and exit code 2 (E1MIN_DEBUG=1 re-raises).

    Any other exception is a bug (or out of memory) and propagates with its traceback (exit 1).
    """
    from e1min.stop import StopRequested

    try:
        return int(func(*args) or 0)
    except StopRequested as e:
        print(f"e1min {command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except E1minError as e:
        if os.environ.get("E1MIN_DEBUG"):
            raise
        print(f"e1min {command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``e1min`` console script (and of ``python -m e1min.train`` / ``e1min.predict``)."""
    from e1min.dist import exit_code_for_launcher

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return exit_code_for_launcher(run_guarded(args.command, args.run, args))


def command(name: str) -> Callable[[Sequence[str] | None], int]:
    """``main`` for one subcommand, raising instead of printing (``e1min.train.main``, ``e1min.predict.predict_main``)."""

    def run(argv: Sequence[str] | None = None) -> int:
        return COMMANDS[name][2](build_parser().parse_args([name, *(sys.argv[1:] if argv is None else argv)]))

    return run


if __name__ == "__main__":
    sys.exit(main())
