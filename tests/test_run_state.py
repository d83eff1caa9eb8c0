"""Run state that cannot go stale: folds.json must describe the run, undefined metrics, strict JSON outputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from e1min.data.fasta import DataError, Record, write_fasta
from e1min.train import main as train_main
from e1min.train_config import TrainConfigError, load_config
from tests.helpers import toy_config


def _strict_load(path: Path, text: str):
    def reject(token: str):
        raise AssertionError(f"{path}: non-standard JSON constant {token}")

    return json.loads(text, parse_constant=reject)


def _parse_every_json(root: Path) -> int:
    n = 0
    for path in sorted(root.rglob("*.json")) + sorted(root.rglob("*.jsonl")):
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in lines:
            _strict_load(path, line)
        n += 1
    return n


@pytest.fixture
def first_run(tmp_path, tiny_checkpoint):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    assert train_main(["--config", str(cfg)]) == 0
    return tmp_path, cfg


@pytest.mark.parametrize(
    "override,field",
    [("training.num_folds=3", "num_folds is 2 there but 3"), ("general.seed=7", "seed is 0 there but 7"),
     ("training.ions=[ZN]", "ions is ['ZN', 'CA'] there but ['ZN']")],
)
def test_rerun_with_other_fold_settings_is_refused(first_run, override, field):
    tmp_path, cfg = first_run
    import re

    with pytest.raises(DataError, match=f"folds.json: {re.escape(field)}.*new training.output_dir"):
        train_main(["--config", str(cfg), "--set", override, "--resume"])


def test_rerun_on_changed_data_is_refused(first_run):
    tmp_path, cfg = first_run
    fasta = tmp_path / "data" / "ZN_train.fasta"
    fasta.write_text(fasta.read_text().replace(">zn0", ">zn0_renamed", 1))
    with pytest.raises(DataError, match="folds.json: built from other data \\(ZN:"):
        train_main(["--config", str(cfg), "--resume"])


def test_folds_file_records_what_it_was_built_from(first_run):
    tmp_path, _ = first_run
    meta = json.loads((tmp_path / "out/folds.json").read_text())["meta"]
    assert meta["num_folds"] == 2 and meta["seed"] == 0 and meta["ions"] == ["ZN", "CA"]
    assert set(meta["data"]) == {"ZN", "CA"} and meta["data"]["ZN"]["proteins"] == 26


def test_every_json_output_is_strict(first_run):
    tmp_path, _ = first_run
    assert _parse_every_json(tmp_path / "out") >= 8  # folds, data_stats, checkpoints, adapter configs, metrics, summary


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
    _parse_every_json(out)


def test_summary_survives_a_missing_oof_file(first_run, caplog):
    from e1min.train import summarise

    tmp_path, _ = first_run
    out = tmp_path / "out"
    (out / "fold_1/oof_predictions.tsv").unlink()
    with caplog.at_level(logging.WARNING, logger="e1min"):
        assert summarise(out, ["ZN", "CA"], 2, "youden") is None
    assert any("fold 1: no oof_predictions.tsv" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("key", ["msa_sampling", "validation_msa_sampling"])
def test_more_than_511_context_rows_is_a_config_error(tmp_path, tiny_checkpoint, key):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={key: {"max_num_samples": 600}})
    with pytest.raises(TrainConfigError, match=f"training.{key}.max_num_samples' must be in \\[0, 511\\].*512 sequences"):
        load_config(cfg)


def test_replica_checksum_stays_on_the_parameters_device():
    """check_replicas must not mix a CPU tensor into CUDA parameters (NCCL): shown on the meta device."""
    from e1min.dist import replica_checksum

    params = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta")]
    out = replica_checksum(params)
    assert out.device.type == "meta" and out.shape == (2,) and out.dtype == torch.float64
    cpu = replica_checksum([torch.ones(3, 4), torch.full((5,), 2.0)])
    assert cpu.tolist() == [22.0, 0.0]


def test_strict_json_writer_turns_non_finite_into_null(tmp_path):
    from e1min.io import atomic_write_json, nan_if_none

    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": np.float32(2.0)})
    doc = _strict_load(tmp_path / "x.json", (tmp_path / "x.json").read_text())
    assert doc == {"a": None, "b": [None, None, 1.5], "c": 2.0}
    assert np.isnan(nan_if_none(doc["a"])) and nan_if_none(doc["b"][2]) == 1.5
