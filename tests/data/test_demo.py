import hashlib

import numpy as np

from e1min.data.check import check_data
from e1min.data.dataset import load_ion_records
from e1min.data.demo import make_demo_dataset
from e1min.data.fasta import read_fasta
from e1min.data.msa import parse_a3m


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_deterministic_and_parseable(tmp_path):
    s1 = make_demo_dataset(tmp_path / "a", seed=0, proteins_per_ion=40, test_per_ion=8)
    make_demo_dataset(tmp_path / "b", seed=0, proteins_per_ion=40, test_per_ion=8)
    make_demo_dataset(tmp_path / "c", seed=1, proteins_per_ion=40, test_per_ion=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    root = tmp_path / "a"
    for ion in s1["ions"]:
        for split in ("train", "test"):
            recs = read_fasta(root / f"{ion}_{split}.fasta")
            assert all(50 <= len(r.sequence) <= 260 for r in recs)
        labelled = [r for r in read_fasta(root / f"{ion}_train.fasta") if r.labels is not None]
        assert 0 < len(labelled) < len(recs) + 40  # some unlabelled
        rate = np.concatenate([r.labels for r in labelled]).mean()
        assert 0.01 < rate < 0.2
    a3ms = list((root / "msa").rglob("*.a3m"))
    assert a3ms and sum(s1["msas"].values()) == len(a3ms)
    for p in a3ms:
        rows = parse_a3m(p)
        assert len(rows) > 1
    by_ion = load_ion_records(root, ["LREE", "HREE", "REE"])
    assert len(by_ion["REE"]) < len(by_ion["LREE"]) + len(by_ion["HREE"])  # some proteins in both
    report, problems = check_data(root, ["ZN", "CA", "REE"], msa_dir=root / "msa", num_folds=3, seed=0)
    assert problems == [], problems
    assert "REE" in report and "folds" in report


def test_zinc_positives_are_motif_residues(tmp_path):
    make_demo_dataset(tmp_path, seed=0, proteins_per_ion=30, test_per_ion=4)
    for r in read_fasta(tmp_path / "ZN_train.fasta"):
        if r.labels is not None:
            assert set(np.array(list(r.sequence))[r.labels == 1]) <= {"C", "H"}
            assert r.labels.sum() % 4 == 0 and r.labels.sum() > 0
