import numpy as np
import pytest

from e1min.data.fasta import DataError, Record, ion_fasta_path, read_fasta, write_fasta


def _write(tmp_path, text, name="x.fasta", newline="\n"):
    p = tmp_path / name
    p.write_bytes(text.replace("\n", newline).encode())
    return p


def test_labelled_and_unlabelled(tmp_path):
    p = _write(tmp_path, ">a desc\nACD\n010\n\n>b\nMKV  \n>c\nGG\n11\n")
    recs = read_fasta(p)
    assert [r.id for r in recs] == ["a", "b", "c"]
    assert recs[0].labels.tolist() == [0, 1, 0] and recs[0].labels.dtype == np.uint8
    assert recs[1].sequence == "MKV" and recs[1].labels is None
    assert recs[2].labels.tolist() == [1, 1]


def test_crlf(tmp_path):
    p = _write(tmp_path, ">a\nACD\n010\n>b\nMK\n", newline="\r\n")
    recs = read_fasta(p)
    assert recs[0].sequence == "ACD" and recs[0].labels.tolist() == [0, 1, 0]
    assert recs[1].sequence == "MK"


def test_wrapped_unlabelled(tmp_path):
    recs = read_fasta(_write(tmp_path, ">a\nACDE\nFGH\nIK\n>b\nMM\n"))
    assert recs[0].sequence == "ACDEFGHIK" and recs[0].labels is None


@pytest.mark.parametrize(
    "text, match, line",
    [
        (">a\nACD\n01\n", "label length 2 differs from sequence length 3", 3),
        (">a\nACD\n012\n", "invalid label character '2'", 3),
        (">a\nAC1D\n0101\n", "invalid residue '1'", 2),
        (">a\nAcD\n010\n", "invalid residue 'c'.*lower-case", 2),
        (">a\nAC*\n", "invalid residue", 2),
        (">a\nACD\n>a\nMK\n", "duplicate id", 3),
        (">a\n010\n", "empty sequence", 2),
        (">a\n>b\nMK\n", "header without a sequence", 1),
        (">b\nMK\n>a\n", "header without a sequence", 3),
        ("ACD\n>a\nMK\n", "expected a '>' header", 1),
        (">\nMK\n", "header without an id", 1),
    ],
)
def test_errors_name_file_line_and_record(tmp_path, text, match, line):
    p = _write(tmp_path, text)
    with pytest.raises(DataError, match=match) as e:
        read_fasta(p)
    assert f"{p}:{line}:" in str(e.value)
    if "id" not in match and "header" not in match:
        assert "'a'" in str(e.value)


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_fasta(_write(tmp_path, "\n  \r\n"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_fasta(tmp_path / "nope.fasta")


def test_require_labels(tmp_path):
    with pytest.raises(DataError, match="no label line"):
        read_fasta(_write(tmp_path, ">a\nACD\n010\n>b\nMK\n"), require_labels=True)


def test_write_roundtrip(tmp_path):
    recs = [Record("a", "ACD", np.array([0, 1, 0], np.uint8)), Record("b", "MK", None)]
    p = tmp_path / "sub" / "out.fasta"
    write_fasta(p, recs)
    assert read_fasta(p) == recs
    assert [f.name for f in p.parent.iterdir()] == ["out.fasta"]  # no temp file left


def test_ion_fasta_path():
    assert str(ion_fasta_path("data", "ZN")) == "data/ZN_train.fasta"
    assert str(ion_fasta_path("data", "ZN", "{ION}_test.fasta")) == "data/ZN_test.fasta"
    assert str(ion_fasta_path("data/{ION}/train.fa", "CA")) == "data/CA/train.fa"
