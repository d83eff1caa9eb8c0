"""A run's report from its files: summary (with notes on undefined metrics), thresholds, plots, e1min report."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from e1min.data.fasta import Record, write_fasta
from e1min.run import RunStateError
from e1min.train import main as train_main
from e1min.train import report_main
from tests.helpers import parse_every_json, toy_config


@pytest.fixture
def first_run(tmp_path, tiny_checkpoint):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    assert train_main(["--config", str(cfg)]) == 0
    return tmp_path, cfg


def test_report_regenerates_plots_and_summary(tmp_path, tiny_checkpoint, capsys):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    assert train_main(["--config", str(cfg)]) == 0
    out = tmp_path / "out"
    shutil.rmtree(out / "plots")
    for name in ("summary.json", "summary.md", "thresholds.json"):
        (out / name).unlink()
    capsys.readouterr()
    assert report_main([str(out)]) == 0
    assert (out / "plots/curves_fold_1.csv").exists() and (out / "summary.json").exists()
    assert "Cross-validation summary over folds 1" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunStateError, match="no config.yaml"):
        report_main([str(tmp_path / "empty")])


def test_fold_without_positives_warns_stays_loadable_and_summary_names_it(tmp_path, tiny_checkpoint, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    recs = [Record(f"p{i}", "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 30)), np.zeros(30, dtype=np.uint8)) for i in range(8)]
    write_fasta(data / "CA_train.fasta", recs)
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"ions": ["CA"], "epochs": 2, "early_stop_patience": 5})
    assert train_main(["--config", str(cfg)]) == 0  # the trainer logs to stdout (and training.log)
    out = tmp_path / "out"
    assert "fold 1: auprc undefined at every epoch" in capsys.readouterr().out
    result = json.loads((out / "fold_1/fold_result.json").read_text())
    assert result["complete"] is True and result["best_epoch"] is None and "undefined" in result["selection"]
    from e1min.predict import load_checkpoint

    assert load_checkpoint(out / "fold_1").predict(recs[:2])["p0"]["CA"][0].shape == (30,)
    summary = json.loads((out / "summary.json").read_text())
    assert any("fold 1, CA: metrics undefined" in n for n in summary["notes"])
    assert "Notes:" in (out / "summary.md").read_text()
    page = (out / "report.html").read_text()  # the run's page says so too
    assert "fold 1, CA: metrics undefined" in page and "no out-of-fold predictions for this ion yet" not in page
    assert "fold 2: not trained (no fold_2/)" in page  # folds: [1] in this recipe
    parse_every_json(out)  # strict JSON even with undefined metrics


def test_summary_survives_a_missing_oof_file(first_run, caplog):
    from e1min.train import summarise

    tmp_path, _ = first_run
    out = tmp_path / "out"
    (out / "fold_1/oof_predictions.tsv").unlink()
    with caplog.at_level(logging.WARNING, logger="e1min"):
        assert summarise(out, ["ZN", "CA"], 2, "youden") is None
    assert any("fold 1: no oof_predictions.tsv" in r.getMessage() for r in caplog.records)
