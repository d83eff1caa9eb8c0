"""The MMseqs2 runner: finding the binary, its version, and failures as one-line MMseqsErrors."""

from __future__ import annotations

import pytest

from e1min.data import mmseqs as mmseqs_module
from e1min.data.fasta import Record
from e1min.data.mmseqs import MMseqsError, find_mmseqs, read_entries, read_lookup
from e1min.errors import E1minError
from tests.helpers import require_mmseqs


def _fake(tmp_path, version: str):
    path = tmp_path / "mmseqs"
    path.write_text(f"#!/bin/sh\necho '{version}'\n")
    path.chmod(0o755)
    return path


def test_missing_binary_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("E1MIN_MMSEQS", str(tmp_path / "missing"))
    with pytest.raises(MMseqsError, match="E1MIN_MMSEQS=.*not an executable.*apt-get install mmseqs2"):
        find_mmseqs()
    monkeypatch.delenv("E1MIN_MMSEQS")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MMseqsError, match="no 'mmseqs' on PATH") as e:
        find_mmseqs()
    assert isinstance(e.value, E1minError) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "version, ok", [("12-113e3", False), ("11.e1a1c", False), ("13.45111", True), ("17.b804f", True), ("a" * 40, True), ("usage", False)]
)
def test_version_check(tmp_path, monkeypatch, version, ok):
    monkeypatch.setattr(mmseqs_module, "_FOUND", {})
    monkeypatch.setenv("E1MIN_MMSEQS", str(_fake(tmp_path, version)))
    if ok:
        assert find_mmseqs().version == version
    else:
        with pytest.raises(MMseqsError, match=f"MMseqs2 {version}, older than release 13|is not MMseqs2 .*'{version}'"):
            find_mmseqs()


def test_real_binary_runs_and_failures_become_errors(tmp_path):
    mm = require_mmseqs()
    assert mm.version
    db = mm.createdb_records([Record("a", "MKTAYIAKQRQISFVKSHFSRQ"), Record("b", "MKTAYIAKQRQISFVKSHFSRE")], tmp_path / "db")
    assert read_lookup(db) == {0: "a", 1: "b"}
    with pytest.raises(MMseqsError, match="mmseqs search failed"):
        mm.search(tmp_path / "nodb", db, tmp_path / "res", tmp_path / "tmp")
    res = mm.search(db, db, tmp_path / "res", tmp_path / "tmp", sensitivity=7.5)
    hits = mm.convertalis(db, db, res, tmp_path / "res.tsv")
    pairs = {(h.query, h.target): h for h in hits}
    assert pairs[("a", "a")].fident == 1.0 and 0.9 < pairs[("a", "b")].fident < 1.0
    assert pairs[("a", "b")].qcov == 1.0 and pairs[("a", "b")].alnlen == 22
    assert set(read_entries(res)) == {0, 1}
