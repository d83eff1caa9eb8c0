"""The `e1min` command: info, check-data, error handling, and an import without side effects."""

import subprocess
import sys

from e1min.cli import main
from tests.helpers import toy_config


def test_info(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "parameters: " in out and "6 (4 within-sequence, 2 global: [2, 5])" in out and "hidden_size: 64" in out


def test_info_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json: not valid JSON" in err and "Traceback" not in err


def test_check_data_ok_and_problems(tmp_path, tiny_checkpoint, capsys):
    cfg = toy_config(tmp_path, tiny_checkpoint)
    assert main(["check-data", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ZN" in out and "CA" in out and "no problems found" in out
    # Break two files: both problems are reported at once, exit code non-zero, no traceback.
    (tmp_path / "data" / "ZN_train.fasta").write_text(">a\nMKV\n0101\n")
    (tmp_path / "data" / "CA_train.fasta").write_text(">b\nMK1\n")
    assert main(["check-data", "--config", str(cfg)]) == 1
    captured = capsys.readouterr()
    assert "ZN_train.fasta" in captured.out and "CA_train.fasta" in captured.out
    assert "2 problem(s)" in captured.out and "Traceback" not in captured.err


def test_import_has_no_side_effects():
    code = (
        "import logging, threading, sys; before = threading.active_count(); import e1min; "
        "assert threading.active_count() == before; assert not logging.getLogger().handlers; "
        "assert not logging.getLogger('e1min').handlers; assert 'huggingface_hub' not in sys.modules; print(e1min.__version__)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == __import__("e1min").__version__
