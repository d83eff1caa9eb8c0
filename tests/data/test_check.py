import numpy as np

from e1min.data.check import check_data
from e1min.data.fasta import Record, write_fasta


def test_collects_all_problems(tmp_path):
    write_fasta(
        tmp_path / "ZN_train.fasta", [Record(f"z{i}", "ACDEF" + "GHI"[i], np.array([0, 1, 0, 0, 0, 0], np.uint8)) for i in range(3)]
    )
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
    write_fasta(
        tmp_path / "ZN_train.fasta", [Record(f"z{i}", "ACDEFG" + "A" * i, None if i == 0 else np.ones(6 + i, np.uint8)) for i in range(4)]
    )
    report, problems = check_data(tmp_path, ["ZN"], num_folds=2, seed=0)
    assert problems == [] and "no problems found" in report


def test_every_msa_problem_is_found(tmp_path):
    import os

    seqs = {f"z{i}": "ACDEFG" + "HIKLMN"[i] for i in range(6)}
    write_fasta(tmp_path / "ZN_train.fasta", [Record(pid, s, np.array([0, 1] + [0] * 5, np.uint8)) for pid, s in seqs.items()])
    msa = tmp_path / "msa" / "ZN"
    msa.mkdir(parents=True)
    (msa / "z0.a3m").write_text(f">z0\n{seqs['z0']}\n>h\nACDEFGW\n")  # fine
    (msa / "z1.a3m").write_text(f">z1\n{seqs['z1']}\n>h\nACDEF\n")  # unequal aligned width
    (msa / "z2.a3m").mkdir()  # a directory
    os.symlink(tmp_path / "gone.a3m", msa / "z3.a3m")  # dangling
    os.symlink(msa / "z4.a3m", msa / "z4.a3m")  # loop
    (msa / "z5.a3m").write_bytes(b">z5\nACDEFGN\n>h\nAC\xffDEFG\n")  # not text
    report, problems = check_data(tmp_path, ["ZN"], msa_dir=tmp_path / "msa", num_folds=2, seed=0)
    text = "\n".join(problems)
    assert f"{msa / 'z1.a3m'}:3: record 'h' has 5 aligned columns" in text
    assert f"{msa / 'z2.a3m'}: is a directory" in text
    assert f"{msa / 'z3.a3m'}: dangling symlink" in text
    assert f"{msa / 'z4.a3m'}: symlink loop" in text
    assert f"{msa / 'z5.a3m'}:4: non-text byte 0xff" in text
    assert len(problems) == 5 and "1/6" in report


def test_homology_across_folds_and_identity_grouping(tmp_path, monkeypatch):
    from tests.data.test_homology import planted
    from tests.helpers import require_mmseqs

    require_mmseqs()
    write_fasta(tmp_path / "ZN_train.fasta", planted(np.random.default_rng(11)))
    report, problems = check_data(tmp_path, ["ZN"], num_folds=3, seed=0)
    assert problems == [] and "grouping sequence" in report and "homology across folds" in report
    report, problems = check_data(tmp_path, ["ZN"], num_folds=3, seed=0, grouping="identity")
    assert problems == [] and "grouping identity" in report
    assert "homology across folds (mmseqs" in report and ">= 30 %: 0/14" in report
    monkeypatch.setenv("E1MIN_MMSEQS", str(tmp_path / "none"))
    report, problems = check_data(tmp_path, ["ZN"], num_folds=3, seed=0)
    assert problems == [] and "homology across folds: not checked" in report
    report, problems = check_data(tmp_path, ["ZN"], num_folds=3, seed=0, grouping="identity")
    assert len(problems) == 1 and problems[0].startswith("folds: E1MIN_MMSEQS=")
