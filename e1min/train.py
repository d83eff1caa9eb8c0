"""``python -m e1min.train`` (what torchrun launches) and the names this module has always exported.

The training code lives in ``trainer`` (one fold), ``crossval`` (the run) and ``report`` (its outputs);
arguments are parsed in ``cli``.
"""

from __future__ import annotations

import sys

from e1min.cli import command
from e1min.crossval import check_fold_meta, data_fingerprint, prepare_run, run_cross_validation, setup_logging, train_run
from e1min.report import OOF_HEADER, read_oof, report_run, summarise, summary_markdown, write_oof, write_plots
from e1min.trainer import (
    FoldState,
    FoldTrainer,
    LossSpec,
    RunData,
    backward_window,
    build_model,
    build_optimizer,
    epoch_plan,
    lr_at,
    optimizer_step,
    plan_padding,
    predict_records,
    trainable,
)

__all__ = [
    "FoldState",
    "FoldTrainer",
    "LossSpec",
    "RunData",
    "backward_window",
    "build_model",
    "build_optimizer",
    "epoch_plan",
    "lr_at",
    "optimizer_step",
    "plan_padding",
    "predict_records",
    "trainable",
    "check_fold_meta",
    "data_fingerprint",
    "prepare_run",
    "run_cross_validation",
    "setup_logging",
    "train_run",
    "OOF_HEADER",
    "read_oof",
    "report_run",
    "summarise",
    "summary_markdown",
    "write_oof",
    "write_plots",
    "main",
    "report_main",
]

main = command("train")
report_main = command("report")

if __name__ == "__main__":
    from e1min.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
