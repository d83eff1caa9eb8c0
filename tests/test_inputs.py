"""Prediction inputs are checked before any model work: FASTA records, --skip-invalid, MSA query rows.

Shares the tiny trained 2-fold run of conftest.py (built once per session)."""

from __future__ import annotations

import pytest

from e1min.data.fasta import DataError
from e1min.predict import (
    predict_main,
)
from tests.helpers import host_reports_native_bf16, one_thread, read_tsv, write_text_fasta  # noqa: F401 (module-scoped autouse fixtures)

TOL = 1e-5


def test_invalid_residue_errors_before_any_work(run_dir, tmp_path):
    bad = write_text_fasta(tmp_path, ">ok1\nACDEFGHIK\n>bad1\nACD*EF\n>ok2\nMKLV\n")
    out = tmp_path / "p.tsv"
    with pytest.raises(DataError, match=r"in.fasta:4: record 'bad1': invalid residue '\*'.*--skip-invalid"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(bad), "--out", str(out)])
    assert not out.exists()
    lower = write_text_fasta(tmp_path, ">low\nacdef\n", "lower.fasta")
    with pytest.raises(DataError, match="lower-case"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(lower), "--out", str(out)])


def test_skip_invalid_reports_and_skips(run_dir, tmp_path, capsys):
    bad = write_text_fasta(tmp_path, ">ok1\nACDEFGHIK\n>bad1\nACD*EF\n>ok2\nMKLV\n>ok1\nMMMM\n")
    out = tmp_path / "p.tsv"
    assert predict_main(["--checkpoint", str(run_dir), "--fasta", str(bad), "--out", str(out), "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 invalid protein(s)" in err and "bad1" in err and "duplicate id" in err
    rows = read_tsv(out)
    assert sorted({r["id"] for r in rows}) == ["ok1", "ok2"] and len(rows) == 2 * (9 + 4)


def test_empty_and_missing_fasta(run_dir, tmp_path):
    with pytest.raises(DataError, match="empty file"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(write_text_fasta(tmp_path, "\n\n")), "--out", str(tmp_path / "p.tsv")])
    with pytest.raises(DataError, match="not found"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(tmp_path / "nope.fasta")])
    only_bad = write_text_fasta(tmp_path, ">b\nAC1D\n", "bad.fasta")
    with pytest.raises(DataError, match="no valid records"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(only_bad), "--skip-invalid", "--out", str(tmp_path / "p.tsv")])


def test_msa_query_mismatch_is_checked_up_front(run_dir, tmp_path):
    msa = tmp_path / "msa"
    msa.mkdir()
    (msa / "p1.a3m").write_text(">p1\nACDEFG\n>hom\nACDEFA\n")
    fasta = write_text_fasta(tmp_path, ">p1\nACDEFGH\n>p2\nMKV\n")
    args = ["--checkpoint", str(run_dir), "--fasta", str(fasta), "--msa-dir", str(msa), "--out", str(tmp_path / "p.tsv")]
    with pytest.raises(DataError, match="p1.a3m:1: record .p1.: first row"):
        predict_main(args)
    assert predict_main(args + ["--skip-invalid", "--quiet"]) == 0
    assert {r["id"] for r in read_tsv(tmp_path / "p.tsv")} == {"p2"}
