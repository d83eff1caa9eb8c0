"""Run state that cannot go stale: folds.json must describe the run, undefined metrics, strict JSON outputs."""

from __future__ import annotations

import json

import pytest

from e1min.data.fasta import DataError
from e1min.train import main as train_main
from e1min.train_config import TrainConfigError, load_config
from tests.helpers import parse_every_json, toy_config


@pytest.fixture
def first_run(tmp_path, tiny_checkpoint):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    assert train_main(["--config", str(cfg)]) == 0
    return tmp_path, cfg


@pytest.mark.parametrize(
    "override,field",
    [
        ("training.num_folds=3", "num_folds is 2 there but 3"),
        ("general.seed=7", "seed is 0 there but 7"),
        ("training.ions=[ZN]", "ions is ['ZN', 'CA'] there but ['ZN']"),
    ],
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
    assert parse_every_json(tmp_path / "out") >= 8  # folds, data_stats, checkpoints, adapter configs, metrics, summary


@pytest.mark.parametrize("key", ["msa_sampling", "validation_msa_sampling"])
def test_more_than_511_context_rows_is_a_config_error(tmp_path, tiny_checkpoint, key):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={key: {"max_num_samples": 600}})
    with pytest.raises(TrainConfigError, match=f"training.{key}.max_num_samples' must be in \\[0, 511\\].*512 sequences"):
        load_config(cfg)
