"""``python -m e1min.predict predict|evaluate|embed ARGS`` (for torchrun) and the names this module has always exported.

The code lives in ``predictor`` (loading a fold or an ensemble), ``inputs`` (checked FASTA/MSA inputs),
``outputs`` (streamed TSV/JSONL, rank merge, embedding shards), ``evaluation`` and ``scoring``; arguments
are parsed in ``cli``.
"""

from __future__ import annotations

import sys

from e1min.cli import command
from e1min.evaluation import EVALUATION_FILES, evaluate_records, evaluation_table, ion_metrics, write_curves
from e1min.inputs import Skipped, check_msas, read_input_fasta
from e1min.outputs import (
    DEFAULT_CHUNK,
    TSV_HEADER,
    Progress,
    embed_file,
    merge_parts,
    output_format,
    predict_file,
    predict_stream,
    write_predictions,
)
from e1min.predictor import (
    DEFAULT_MAX_TOKENS,
    PredictError,
    Predictor,
    complete_folds,
    is_run_dir,
    load_backbone,
    load_checkpoint,
    load_ensemble,
    load_predictor,
)
from e1min.scoring import iter_embedded

__all__ = [
    "Predictor",
    "PredictError",
    "load_checkpoint",
    "load_ensemble",
    "load_predictor",
    "complete_folds",
    "is_run_dir",
    "load_backbone",
    "read_input_fasta",
    "check_msas",
    "Skipped",
    "predict_stream",
    "predict_file",
    "write_predictions",
    "merge_parts",
    "output_format",
    "Progress",
    "evaluate_records",
    "evaluation_table",
    "ion_metrics",
    "write_curves",
    "embed_file",
    "iter_embedded",
    "TSV_HEADER",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_CHUNK",
    "EVALUATION_FILES",
    "predict_main",
    "evaluate_main",
    "embed_main",
    "main",
]

predict_main = command("predict")
evaluate_main = command("evaluate")
embed_main = command("embed")


def main(argv: list[str] | None = None) -> int:
    """``python -m e1min.predict predict|evaluate|embed ARGS``."""
    from e1min.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("predict", "evaluate", "embed"):
        print("usage: python -m e1min.predict {predict,evaluate,embed} ARGS ...", file=sys.stderr)
        return 2
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
