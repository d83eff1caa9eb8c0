"""Homology with the real mmseqs: planted families, identity-grouped folds, the leakage report."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from e1min.crossval import prepare_run
from e1min.data.demo import make_demo_dataset
from e1min.data.fasta import DataError, Record, read_fasta, write_fasta
from e1min.data.folds import split
from e1min.data.homology import (
    Homology,
    check_group_sizes,
    fold_leakage,
    format_leakage,
    heldout_leakage,
    identity_groups,
    make_folds,
    search,
)
from e1min.dist import DistContext
from e1min.recipe import Recipe
from tests.helpers import AA, homolog, require_mmseqs

# folds.json of the demo data below (K=5, seed 42, five ions) as e1min wrote it before fold_grouping existed.
SEQUENCE_FOLDS_SHA256 = "a91a7b6c526c805a7e68a0925b74ac560fc7f7e44e4e60c3f83c3f3b4a25014e"


def _random(rng, n):
    return "".join(rng.choice(np.array(list(AA)), n))


def planted(rng) -> list[Record]:
    """s ~ s95 ~ s60; a chain a - b - c (a and c share disjoint halves of b: unrelated to each other); 8 loners."""
    s = _random(rng, 180)
    b = _random(rng, 200)
    blocks = [b[i : i + 10] for i in range(0, 200, 10)]
    a = "".join(blk if k % 2 == 0 else _random(rng, 10) for k, blk in enumerate(blocks))
    c = "".join(blk if k % 2 == 1 else _random(rng, 10) for k, blk in enumerate(blocks))
    recs = [Record("s", s), Record("s95", homolog(rng, s, 0.95)), Record("s60", homolog(rng, s, 0.6))]
    recs += [Record("a", a), Record("b", b), Record("c", c)]
    recs += [Record(f"u{k}", _random(rng, int(rng.integers(120, 220)))) for k in range(8)]
    for r in recs:
        r.labels = (rng.random(len(r.sequence)) < 0.05).astype(np.uint8)
    return recs


def exhaustive_links(mm, records, tmp_path, min_seq_id=0.3, coverage=0.8) -> set[frozenset]:
    """An independent all-vs-all check: every pair aligned without prefilter (easy-search --exhaustive-search)."""
    write_fasta(tmp_path / "all.fasta", [Record(r.id, r.sequence) for r in records])
    out = tmp_path / "all.m8"
    mm.run(
        "easy-search", tmp_path / "all.fasta", tmp_path / "all.fasta", out, tmp_path / "es_tmp", "--exhaustive-search", "1",
        "--format-output", "query,target,fident,qcov,tcov", "-e", "10", "-v", "1", "--threads", "2",
    )  # fmt: skip
    links = set()
    for line in out.read_text().splitlines():
        q, t, fid, qc, tc = line.split("\t")
        if q != t and float(fid) >= min_seq_id and min(float(qc), float(tc)) >= coverage:
            links.add(frozenset((q, t)))
    return links


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    mm = require_mmseqs()
    recs = planted(np.random.default_rng(11))
    return mm, recs, exhaustive_links(mm, recs, tmp_path_factory.mktemp("exhaustive"))


def test_planted_links_are_what_the_test_expects(family):
    _, _, links = family
    assert {frozenset(p) for p in (("s", "s95"), ("s", "s60"), ("s95", "s60"), ("a", "b"), ("b", "c"))} <= links
    assert frozenset(("a", "c")) not in links  # a and c meet only through b
    assert not any(x.startswith("u") for pair in links for x in pair)


def test_identity_grouping_keeps_every_linked_pair_in_one_fold(family):
    mm, recs, links = family
    by_ion = {"ZN": recs}
    assignment, extra, homology = make_folds(by_ion, 3, seed=0, grouping="identity", min_seq_id=0.3, coverage=0.8)
    assert assignment["s"] == assignment["s95"] == assignment["s60"]
    assert assignment["a"] == assignment["b"] == assignment["c"]
    groups = extra["groups"]
    assert groups["a"] == groups["b"] == groups["c"] and groups["s"] == groups["s60"] != groups["a"]
    assert len({groups[f"u{k}"] for k in range(8)}) == 8
    assert extra["grouping"] == {"method": "identity", "min_seq_id": 0.3, "coverage": 0.8} and extra["mmseqs_version"] == mm.version
    for fold in range(3):
        train, val = split(recs, assignment, fold)
        train_ids, val_ids = {r.id for r in train}, {r.id for r in val}
        assert not [p for p in links if p & train_ids and p & val_ids], f"linked pair across the split of fold {fold}"
    sizes = np.bincount(list(assignment.values()), minlength=3)
    assert sizes.max() - sizes.min() <= 3
    # The same folds under sequence grouping split the families (the reason identity grouping exists).
    seq_assignment, _, _ = make_folds(by_ion, 3, seed=0)
    report = fold_leakage(by_ion, seq_assignment, homology)
    assert report["with_homolog"]["0.3"] > 0
    assert fold_leakage(by_ion, assignment, homology)["with_homolog"] == {"0.3": 0, "0.5": 0, "0.9": 0}


def test_leakage_counts_per_threshold(family):
    _, recs, _ = family
    by_ion = {"ZN": recs}
    homology = search(recs)
    apart = {r.id: k % 5 for k, r in enumerate(recs)}  # s, s95, s60 and a, b, c all in different folds
    report = fold_leakage(by_ion, apart, homology)
    assert report["with_homolog"]["0.3"] == 6  # s, s95, s60, a, b, c
    assert report["with_homolog"]["0.9"] == 2  # s ~ s95 only
    assert 2 <= report["with_homolog"]["0.5"] <= 6
    worst = report["worst_pairs"][0]
    assert {worst["query"], worst["target"]} == {"s", "s95"} and worst["identity"] >= 0.9
    text = format_leakage(report)
    assert ">= 90 %: 2/14" in text and "s95" in text


def test_a_giant_component_is_a_clear_error(family):
    _, recs, _ = family
    homology = Homology([], "x")
    groups = identity_groups({"ZN": recs}, homology, 0.3, 0.8) + [["g1", "g2", "g3", "g4", "g5", "g6", "g7"]]
    with pytest.raises(DataError, match=r"holds 7 of 21 proteins .*raise data.split_min_seq_id \(now 0.3\)"):
        check_group_sizes(groups, 5, 0.3)


def test_heldout_leakage_against_training(family):
    _, recs, _ = family
    train = [r for r in recs if r.id not in ("s95", "c", "u0")]
    test = [Record("s95", recs[1].sequence), Record("c", recs[5].sequence), Record("u0", recs[6].sequence)]
    report = heldout_leakage(test, train)
    counts = report["with_homolog"]
    assert counts["0.3"] == 2 and counts["0.9"] == 1 and 1 <= counts["0.5"] <= 2  # c ~ b sits near 50 %
    assert report["proteins"] == 3 and report["train_proteins"] == len(train) and report["same_id"] == 0
    assert report["worst_pairs"][0]["query"] == "s95" and report["worst_pairs"][0]["target"] == "s"


def _demo_recipe(tmp_path, **data):
    make_demo_dataset(tmp_path / "data", seed=0, proteins_per_ion=30, test_per_ion=2)
    raw = {
        "data": {"fasta_path": str(tmp_path / "data"), "homology_report": False, **data},
        "model": {"checkpoint": str(tmp_path)},
        "training": {"ions": ["ZN", "CA", "LREE", "HREE", "REE"], "output_dir": str(tmp_path / "out")},
    }
    (tmp_path / "out").mkdir(exist_ok=True)
    return Recipe.from_dict(raw, check_files=False)[0]


def test_sequence_grouping_writes_todays_folds_json(tmp_path):
    require_mmseqs()
    cfg = _demo_recipe(tmp_path, homology_report=True)
    prepare_run(cfg, DistContext(), tmp_path / "out")
    assert hashlib.sha256((tmp_path / "out" / "folds.json").read_bytes()).hexdigest() == SEQUENCE_FOLDS_SHA256
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())
    # The demo's "_dup" chains (identical sequences) share a fold, so only true homologs could leak.
    assert set(stats["homology"]["with_homolog"]) == {"0.3", "0.5", "0.9"} and stats["homology"]["split"] == "folds"
    assert set(stats["homology"]["per_ion"]) == {"ZN", "CA", "LREE", "HREE", "REE"}


def test_identity_grouping_in_a_run_and_a_rerun_with_other_settings(tmp_path):
    require_mmseqs()
    cfg = _demo_recipe(tmp_path, fold_grouping="identity")
    data = prepare_run(cfg, DistContext(), tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "folds.json").read_text())
    meta = doc["meta"]
    assert meta["grouping"] == {"method": "identity", "min_seq_id": 0.3, "coverage": 0.8}
    assert meta["mmseqs_version"] and set(meta["groups"]) == set(doc["folds"]) == set(data.assignment)
    ree = {r.id for r in read_fasta(tmp_path / "data" / "LREE_train.fasta")} & {
        r.id for r in read_fasta(tmp_path / "data" / "HREE_train.fasta")
    }
    assert ree and all(doc["folds"][p] in range(5) for p in ree)
    # Reruns: the same settings reuse folds.json; other settings or sequence grouping are a clear error.
    prepare_run(cfg, DistContext(), tmp_path / "out")
    for other in ({"fold_grouping": "identity", "split_min_seq_id": 0.5}, {}):
        with pytest.raises(DataError, match="folds.json: .*grouping"):
            prepare_run(_demo_recipe(tmp_path, **other), DistContext(), tmp_path / "out")
    # A sequence-grouped run cannot be continued as an identity-grouped one either.
    (tmp_path / "out" / "folds.json").unlink()
    prepare_run(_demo_recipe(tmp_path), DistContext(), tmp_path / "out")
    with pytest.raises(DataError, match="grouping is {'method': 'sequence'} there"):
        prepare_run(cfg, DistContext(), tmp_path / "out")
