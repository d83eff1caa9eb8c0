"""The ``e1min`` command: train / predict / evaluate / embed / check-data / verify-lora / info.

Each subcommand is a thin shell around a library function; user errors (bad files, bad config,
bad checkpoints) print one clear message on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence


def _info(args: argparse.Namespace) -> int:
    from e1min.hub import load_model

    model = load_model(args.checkpoint, revision=args.revision, device="meta" if args.meta else None)
    cfg = model.config
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    n = sum(p.numel() for p in model.parameters())
    kinds = ["global" if layer.is_global else "within" for layer in model.model.layers]
    print(f"checkpoint: {args.checkpoint}")
    print(f"parameters: {n:,} ({n / 1e6:.1f}M), dtype: {', '.join(dtypes)}")
    print(f"layers: {len(kinds)} ({kinds.count('within')} within-sequence, {kinds.count('global')} global: {[i for i, k in enumerate(kinds) if k == 'global']})")
    print("config:")
    for k, v in cfg.to_dict().items():
        print(f"  {k}: {v}")
    return 0


# Subcommands that parse their own arguments (each module has a main(argv) usable on its own).
FORWARDED: dict[str, tuple[str, str, str]] = {
    "train": ("e1min.train", "main", "joint LoRA + ion-head training with K-fold cross-validation"),
    "predict": ("e1min.predict", "predict_main", "per-residue binding probabilities for a FASTA file"),
    "evaluate": ("e1min.predict", "evaluate_main", "predict on a labelled FASTA and report metrics"),
    "embed": ("e1min.predict", "embed_main", "per-residue and mean-pooled embeddings to safetensors"),
    "check-data": ("e1min.data.check", "main", "validate every input a config names, print statistics"),
    "report": ("e1min.train", "report_main", "regenerate a run's plots, thresholds and summary from its files"),
    "verify-lora": ("e1min.verify", "main", "unit-level LoRA checks (tiny random model by default)"),
}


def _forwarded(name: str) -> Callable[[list[str]], int]:
    import importlib

    module, func, _ = FORWARDED[name]
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    from e1min import __version__

    p = argparse.ArgumentParser(prog="e1min", description="Fine-tune E1 to predict metal-binding residues.")
    p.add_argument("--version", action="version", version=f"e1min {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a checkpoint's config, parameter count, dtype and layer types")
    info.add_argument("checkpoint", help="local directory or Hub repo id (e.g. Profluent-Bio/E1-150m)")
    info.add_argument("--revision", default=None)
    info.add_argument("--meta", action="store_true", help=argparse.SUPPRESS)
    info.set_defaults(run=_info)
    for name, (_, _, help_text) in FORWARDED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; parsed by the module itself
    return p


def run_guarded(command: str, func: Callable[..., int | None], *args: object) -> int:
    """Run ``func(*args)``; user errors become one line on stderr and exit code 2 (E1MIN_DEBUG=1 re-raises)."""
    try:
        return int(func(*args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("E1MIN_DEBUG"):
            raise
        # Our error types (CheckpointError, DataError, TrainConfigError, AdapterError, DistributedError, ...)
        # carry messages that name the file, record, key or rank.
        print(f"e1min {command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``e1min`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        from e1min.dist import exit_code_for_launcher

        return exit_code_for_launcher(run_guarded(argv[0], lambda: _forwarded(argv[0])(argv[1:])))
    args = build_parser().parse_args(argv)
    return run_guarded(args.command, args.run, args)


if __name__ == "__main__":
    sys.exit(main())
