"""build-msa with the real mmseqs: demo proteins against a database of their mutated homologs."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from e1min.cli import main as cli_main
from e1min.data.build_msa import build_msas, msa_path
from e1min.data.check import check_data
from e1min.data.demo import _protein
from e1min.data.fasta import Record, read_fasta, write_fasta
from e1min.data.msa import ContextProvider, MSASampling, read_a3m, sample_context
from e1min.train import main as train_main
from tests.helpers import homolog, random_records, require_mmseqs, toy_config, write_toy_dataset

INSERT = "WKWPW"  # planted insertion: lower case in the A3M rows of its homologs


def _dataset(root, rng):
    """6 demo ZN proteins + 1 orphan (labelled FASTA) and a database: each protein, 3 homologs, unrelated fillers."""
    proteins = []
    for k in range(6):
        seq, labels = _protein(rng, ["ZN"], 1)
        proteins.append(Record(f"zn{k}", seq, labels["ZN"]))
    orphan = random_records(rng, 1, "orphan", lo=80, hi=81)[0]
    proteins.append(orphan)
    db = list(proteins[:6])
    for r in proteins[:6]:
        db += [
            Record(f"{r.id}_h{i}", homolog(rng, r.sequence, ident, INSERT if i == 1 else "")) for i, ident in enumerate((0.9, 0.75, 0.6))
        ]
    db += random_records(rng, 20, "filler", lo=60, hi=120, labelled=False)
    write_fasta(root / "ZN_train.fasta", proteins)
    write_fasta(root / "db.fasta", [Record(r.id, r.sequence) for r in db])
    return proteins


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    require_mmseqs()
    root = tmp_path_factory.mktemp("build_msa")
    proteins = _dataset(root, np.random.default_rng(5))
    res = build_msas(root / "ZN_train.fasta", root / "db.fasta", root / "msa", ion="ZN", threads=2, chunk_size=4)
    return root, proteins, res


def _records(path):
    text = path.read_text()
    out = []
    for block in text.split(">")[1:]:
        header, _, body = block.partition("\n")
        out.append((header.split()[0], "".join(body.split())))
    return out


def test_every_a3m_starts_with_the_query_and_has_its_width(built):
    root, proteins, res = built
    assert sorted(res.written) == sorted(r.id for r in proteins) and not res.failed and not res.skipped
    insertions = 0
    for r in proteins:
        rows = _records(msa_path(root / "msa", r.id, "ZN"))
        assert rows[0] == (r.id, r.sequence)
        for name, row in rows[1:]:
            assert sum(c.isupper() or c == "-" for c in row) == len(r.sequence), name
            assert name != r.id  # the database's copy of the query is not repeated
            insertions += any(c.islower() for c in row)
        if r.id != "orphan0":
            assert {f"{r.id}_h0", f"{r.id}_h1"} <= {n for n, _ in rows}
            assert not any(n.startswith("filler") for n, _ in rows)
            # the planted insertion of homolog 1 is in lower case (the aligner may match one of its letters)
            assert re.search("[a-z]{4}", dict(rows)[f"{r.id}_h1"])
    assert insertions >= 6
    assert _records(msa_path(root / "msa", "orphan0", "ZN")) == [("orphan0", proteins[-1].sequence)]
    assert res.depth["orphan0"] == 0 and min(d for k, d in res.depth.items() if k != "orphan0") >= 2


def test_check_data_passes_and_e1s_sampler_reads_them(built):
    root, proteins, _ = built
    report, problems = check_data(root, ["ZN"], msa_dir=root / "msa", num_folds=2, seed=0)
    assert problems == [], report
    assert f"{len(proteins)}/{len(proteins)}" in report
    provider = ContextProvider(root / "msa")
    msa = read_a3m(provider.validate("ZN", "zn0", proteins[0].sequence))
    context = sample_context(msa, seed=1, sampling=MSASampling(max_num_samples=8))
    assert len(context) >= 2 and all(set(s) <= set("ACDEFGHIKLMNPQRSTVWYX") for s in context)


def test_resume_skips_finished_proteins_and_overwrite_redoes_them(built, tmp_path):
    root, proteins, _ = built
    out = tmp_path / "msa"
    first = build_msas(root / "ZN_train.fasta", root / "db.fasta", out, threads=2)
    assert len(first.written) == len(proteins)
    stamp = {r.id: os.stat(msa_path(out, r.id)).st_mtime_ns for r in proteins}
    msa_path(out, "zn3").unlink()
    lines = []
    again = build_msas(root / "ZN_train.fasta", root / "db.fasta", out, threads=2, progress=lines.append)
    assert again.written == ["zn3"] and len(again.skipped) == len(proteins) - 1
    assert any("ETA" in line for line in lines) and any("skipped" in line for line in lines)
    assert all(os.stat(msa_path(out, p)).st_mtime_ns == t for p, t in stamp.items() if p != "zn3")
    assert msa_path(out, "zn3").read_text() == msa_path(root / "msa", "zn3", "ZN").read_text()
    redo = build_msas(root / "ZN_train.fasta", root / "db.fasta", out, threads=2, overwrite=True)
    assert len(redo.written) == len(proteins) and not redo.skipped
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_a_protein_that_cannot_be_written_is_one_line_and_exit_1(built, tmp_path, capsys):
    root, proteins, _ = built
    (tmp_path / "m" / "zn2.a3m").mkdir(parents=True)  # a directory where the A3M should go
    args = ["build-msa", "--fasta", str(root / "ZN_train.fasta"), "--db", str(root / "db.fasta"), "--out", str(tmp_path / "m")]
    assert cli_main(args + ["--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "failed:" in line] == [err[0]] and err[0].startswith("build-msa: zn2: failed: ")
    assert "cannot write" in err[0]
    assert f"wrote {len(proteins) - 1} A3M(s)" in err[-1] and "1 failed" in err[-1]
    assert (tmp_path / "m" / "zn1.a3m").is_file()


def test_cli_builds_and_reports(built, tmp_path, capsys):
    root, proteins, _ = built
    args = ["build-msa", "--fasta", str(root / "ZN_train.fasta"), "--db", str(root / "db.fasta"), "--out", str(tmp_path / "m")]
    assert cli_main(args + ["--ion", "ZN", "--threads", "2", "--sensitivity", "7.5", "--max-seqs", "50", "--evalue", "0.01"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {len(proteins)} A3M(s) (1 query-only" in err
    assert (tmp_path / "m" / "ZN" / "zn0.a3m").is_file()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_mmseqs", "MMseqs2"),
        ("bad_db", "neither an MMseqs2 database"),
        ("empty_fasta", "empty file"),
        ("missing_fasta", "FASTA file not found"),
        ("binary_fasta", "in.fasta"),
    ],
)
def test_errors_are_one_line_exit_2(built, tmp_path, capsys, monkeypatch, case, expected):
    root, _, _ = built
    fasta, db = root / "ZN_train.fasta", root / "db.fasta"
    if case == "no_mmseqs":
        monkeypatch.setenv("E1MIN_MMSEQS", str(tmp_path / "nowhere" / "mmseqs"))
    elif case == "bad_db":
        db = tmp_path / "no_such_db"
    elif case == "empty_fasta":
        fasta = tmp_path / "in.fasta"
        fasta.write_text("")
    elif case == "missing_fasta":
        fasta = tmp_path / "in.fasta"
    else:
        fasta = tmp_path / "in.fasta"
        fasta.write_bytes(b">a\nAC\x00\xff\n")
    code = cli_main(["build-msa", "--fasta", str(fasta), "--db", str(db), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert err.startswith("e1min build-msa: error:")
    if case == "no_mmseqs":
        assert "apt-get install mmseqs2" in err
    assert not (tmp_path / "out").exists()  # nothing written before the checks


def test_a_database_prefix_works_like_a_fasta(built, tmp_path):
    root, proteins, _ = built
    mm = require_mmseqs()
    mm.createdb(root / "db.fasta", tmp_path / "db")
    res = build_msas(root / "ZN_train.fasta", tmp_path / "db", tmp_path / "msa", threads=2)
    for r in proteins:
        assert msa_path(tmp_path / "msa", r.id).read_text() == msa_path(root / "msa", r.id, "ZN").read_text()
    assert len(res.written) == len(proteins)


def test_training_runs_on_built_msas(tmp_path, tiny_checkpoint):
    require_mmseqs()
    data = write_toy_dataset(tmp_path / "data", ions=("ZN",), proteins=10, unlabelled=0)
    records = read_fasta(data / "ZN_train.fasta")
    rng = np.random.default_rng(2)
    db = [Record(f"{r.id}_h{i}", homolog(rng, r.sequence, ident)) for r in records for i, ident in enumerate((0.95, 0.85))]
    write_fasta(tmp_path / "db.fasta", db)
    res = build_msas(data / "ZN_train.fasta", tmp_path / "db.fasta", tmp_path / "msa", ion="ZN", threads=2, sensitivity=7.5)
    assert len(res.written) == len(records) and sum(d > 0 for d in res.depth.values()) >= len(records) // 2
    cfg = toy_config(
        tmp_path,
        tiny_checkpoint,
        data={"msa_dir": str(tmp_path / "msa"), "max_example_tokens": 2048},
        training={"ions": ["ZN"], "epochs": 1, "warmup_epochs": 0, "folds": [1], "bf16": False, "msa_sampling": {"max_num_samples": 4}},
    )
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(["--config", str(cfg)]) == 0
    finally:
        torch.set_num_threads(n)
    log = (tmp_path / "out" / "training.log").read_text()
    assert "had no MSA" not in log
    assert (tmp_path / "out" / "fold_1" / "fold_result.json").is_file()
