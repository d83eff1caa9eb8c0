import numpy as np

from e1min.data.check import check_data
from e1min.data.fasta import Record, write_fasta


def test_collects_all_problems(tmp_path):
    write_fasta(tmp_path / "ZN_train.fasta", [Record(f"z{i}", "ACDEF" + "GHI"[i], np.array([0, 1, 0, 0, 0, 0], np.uint8)) for i in range(3)])
    (tmp_path / "CA_train.fasta").write_text(">a\nACD\n01\n")
    write_fasta(tmp_path / "LREE_train.fasta", [Record("r", "ACD", np.zeros(3, np.uint8))])
    write_fasta(tmp_path / "HREE_train.fasta", [Record("r", "ACE", np.zeros(3, np.uint8))])
    msa = tmp_path / "msa" / "ZN"
    msa.mkdir(parents=True)
    (msa / "z0.a3m").write_text(">z0\nACDEFW\n")
    report, problems = check_data(tmp_path, ["ZN", "CA", "MG", "REE"], msa_dir=tmp_path / "msa", num_folds=2, seed=0)
    text = "\n".join(problems)
    assert "CA_train.fasta:3" in text and "label length" in text
    assert "no FASTA file for ion MG" in text
    assert "different sequences in LREE and HREE" in text
    assert "z0.a3m" in text and "does not match" in text
    assert len(problems) == 4
    assert "ZN" in report and "4 problem(s)" in report


def test_clean_data(tmp_path):
    write_fasta(tmp_path / "ZN_train.fasta", [Record(f"z{i}", "ACDEFG" + "A" * i, None if i == 0 else np.ones(6 + i, np.uint8)) for i in range(4)])
    report, problems = check_data(tmp_path, ["ZN"], num_folds=2, seed=0)
    assert problems == [] and "no problems found" in report
