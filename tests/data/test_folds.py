import json

import numpy as np
import pytest

from e1min.data.dataset import load_ion_records
from e1min.data.fasta import DataError, Record, write_fasta
from e1min.data.folds import assign_folds, check_assignment, load_folds, save_folds, split


def _recs(prefix, n, rng, shared=()):
    out = [Record(f"{prefix}{i}", "".join(rng.choice(list("ACDEFGHIK"), rng.integers(20, 80))), None) for i in range(n)]
    return out + list(shared)


def test_deterministic_balanced_and_consistent_across_ree(tmp_path):
    rng = np.random.default_rng(0)
    shared = _recs("s", 10, rng)
    lree, hree = _recs("l", 40, rng, shared), _recs("h", 40, rng, shared)
    lab = lambda r: Record(r.id, r.sequence, np.zeros(len(r.sequence), np.uint8))
    write_fasta(tmp_path / "LREE_train.fasta", [lab(r) for r in lree])
    write_fasta(tmp_path / "HREE_train.fasta", [lab(r) for r in hree])
    by_ion = load_ion_records(tmp_path, ["LREE", "HREE", "REE"])
    a = assign_folds(by_ion, 5, seed=1)
    assert a == assign_folds(by_ion, 5, seed=1)
    assert a != assign_folds(by_ion, 5, seed=2)
    assert set(a) == {r.id for r in by_ion["REE"]} and set(a.values()) == set(range(5))
    for fold in range(5):
        ree_val = {r.id for r in split(by_ion["REE"], a, fold)[1]}
        part_val = {r.id for ion in ("LREE", "HREE") for r in split(by_ion[ion], a, fold)[1]}
        assert ree_val == part_val  # held out for REE <=> held out for LREE/HREE
    counts = np.bincount(list(a.values()), minlength=5)
    assert counts.max() - counts.min() <= 6


def test_identical_sequences_share_fold():
    seqs = ["ACDEFGHIK" + "A" * i for i in range(30)]
    by_ion = {
        "ZN": [Record(f"z{i}", s) for i, s in enumerate(seqs)],
        "CA": [Record(f"c{i}", s) for i, s in enumerate(seqs)],  # same sequences, other ids
    }
    a = assign_folds(by_ion, 3, seed=0)
    assert all(a[f"z{i}"] == a[f"c{i}"] for i in range(30))
    assert len(set(a.values())) == 3


def test_too_few_groups():
    with pytest.raises(DataError, match="only 1 independent"):
        assign_folds({"ZN": [Record("a", "AC"), Record("b", "AC")]}, 2, 0)


def test_save_load_roundtrip_and_errors(tmp_path):
    p = tmp_path / "folds.json"
    save_folds(p, {"a": 0, "b": 1}, {"seed": 3})
    assert load_folds(p) == ({"a": 0, "b": 1}, {"seed": 3})
    p.write_text("{not json")
    with pytest.raises(DataError, match="folds.json:1: not valid JSON"):
        load_folds(p)
    p.write_text(json.dumps({"version": 1, "num_folds": 2, "folds": {"a": 5}}))
    with pytest.raises(DataError, match="'a'"):
        load_folds(p)
    with pytest.raises(DataError, match="not found"):
        load_folds(tmp_path / "none.json")


def test_split_and_check():
    recs = [Record("a", "AC"), Record("b", "MK"), Record("c", "WW")]
    train, val = split(recs, {"a": 0, "b": 1, "c": 0}, 0)
    assert [r.id for r in train] == ["b"] and [r.id for r in val] == ["a", "c"]
    assert check_assignment({"a": 0}, {"ZN": recs}) == ["b", "c"]
    with pytest.raises(DataError, match="no fold assignment"):
        split(recs, {"a": 0}, 0)
