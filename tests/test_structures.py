"""Predictions painted on structures: residues mapped through the alignment (missing loop, insertion code,
modified residue, numbering offset), B-factors read back with gemmi, mismatches skipped, .gz inputs, scripts."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from e1min.structures import StructureError, paint_structures, read_predictions, require_gemmi

FIXTURES = Path(__file__).parent / "structure_files"
SEQ = "MKTCYHAKQRQISFVKSHFSRQLE"
# Chain A of prot1.pdb / prot1.cif: FASTA positions 9-11 missing, position 6 is 105A, position 1 is MSE 101.
POSITIONS = [p for p in range(1, 25) if p not in (9, 10, 11)]
RESI = [f"{100 + p}" if p <= 5 else ("105A" if p == 6 else f"{99 + p}") for p in POSITIONS]

if os.environ.get("CI"):
    import gemmi  # CI installs the structure extra: a missing gemmi fails there
else:
    gemmi = pytest.importorskip("gemmi")


def write_predictions(path: Path, ids: list[str], seed: int = 0, calls: bool = True) -> dict[tuple[str, str], np.ndarray]:
    rng = np.random.default_rng(seed)
    probs, lines = {}, ["id\tposition\tresidue\tion\tprobability\tstd\tcall\n"]
    for pid in ids:
        for ion in ("ZN", "CA"):
            p = np.round(rng.random(len(SEQ)), 6)
            probs[pid, ion] = p
            lines += [
                f"{pid}\t{i + 1}\t{aa}\t{ion}\t{q:.6g}\t0.01\t{int(q >= 0.5) if calls else ''}\n" for i, (aa, q) in enumerate(zip(SEQ, p))
            ]
    path.write_text("".join(lines))
    return probs


def chain_b(path: Path, chain: str = "A") -> dict[str, list[float]]:
    """resi (number + insertion code) -> B-factors of its atoms, for one chain, read back with gemmi."""
    st = gemmi.read_structure(str(path))
    return {f"{r.seqid.num}{r.seqid.icode.strip()}": [a.b_iso for a in r] for r in st[0][chain]}


@pytest.mark.parametrize("name", ["prot1.pdb", "prot1.cif", "prot1.pdb.gz", "prot1.cif.gz"])
def test_b_factors_equal_probabilities_at_the_right_residues(tmp_path, name):
    sdir = tmp_path / "structures"
    sdir.mkdir()
    src = FIXTURES / name.removesuffix(".gz")
    if name.endswith(".gz"):
        with gzip.open(sdir / name, "wb") as fh:
            fh.write(src.read_bytes())
    else:
        shutil.copy(src, sdir / name)
    probs = write_predictions(tmp_path / "pred.tsv", ["prot1"])
    rows = paint_structures(tmp_path / "pred.tsv", sdir, tmp_path / "out")
    assert [r["status"] for r in rows] == ["painted", "painted"]
    ext = "cif" if ".cif" in name else "pdb"
    for ion in ("ZN", "CA"):
        b = chain_b(tmp_path / "out" / f"prot1_{ion}.{ext}")
        p = probs["prot1", ion]
        for pos, resi in zip(POSITIONS, RESI):
            assert b[resi] == pytest.approx([100 * p[pos - 1]] * len(b[resi]), abs=0.006), (ion, resi)
        assert b["201"] == [0.0]  # the zinc ion is not a residue of the sequence
        assert len(b) == len(POSITIONS) + (1 if ext == "cif" else 2)  # nothing added or lost (ZN, and HOH in the PDB)
        if ext == "pdb":
            assert all(v == 0.0 for vs in chain_b(tmp_path / "out" / f"prot1_{ion}.pdb", "B").values() for v in vs)  # unrelated chain B


def test_scripts_name_the_painted_file_and_the_called_residues(tmp_path):
    probs = write_predictions(tmp_path / "pred.tsv", ["prot1"])
    paint_structures(tmp_path / "pred.tsv", FIXTURES, tmp_path / "out")
    for ion in ("ZN", "CA"):
        called = [r for pos, r in zip(POSITIONS, RESI) if probs["prot1", ion][pos - 1] >= 0.5]
        assert called
        cxc = (tmp_path / "out" / f"prot1_{ion}.cxc").read_text()
        opened = re.findall(r"^open (\S+)$", cxc, re.M)
        assert opened == [f"prot1_{ion}.pdb"] and (tmp_path / "out" / opened[0]).exists()
        assert "color bfactor #1 palette 0,blue:50,white:100,red" in cxc
        assert re.findall(r"^show #1/A:(\S+) atoms$", cxc, re.M) == [",".join(called)]
        pml = (tmp_path / "out" / f"prot1_{ion}.pml").read_text()
        assert ";" not in cxc + pml  # both programs split commands at ';', even in comments
        loaded = re.findall(r"^load (\S+), (\S+)$", pml, re.M)
        assert loaded == [(f"prot1_{ion}.pdb", f"prot1_{ion}")]
        assert "spectrum b, blue_white_red, prot1_ZN" in pml if ion == "ZN" else True
        assert re.findall(r"^show sticks, \S+ and chain A and resi (\S+) and", pml, re.M) == ["+".join(called)]


def test_mismatching_or_missing_structure_is_skipped_with_a_message(tmp_path, capsys):
    write_predictions(tmp_path / "pred.tsv", ["mismatch", "absent"])
    rows = paint_structures(tmp_path / "pred.tsv", FIXTURES, tmp_path / "out")
    assert {r["status"] for r in rows} == {"skipped"}
    by_id = {r["id"]: r["message"] for r in rows}
    assert "does not match the structure" in by_id["mismatch"] and "< 0.90" in by_id["mismatch"]
    assert "no structure file" in by_id["absent"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["structures.tsv"]
    report = (tmp_path / "out/structures.tsv").read_text().splitlines()
    assert report[0].startswith("id\tion\tstatus") and len(report) == 5


def test_one_point_mutation_is_painted_but_a_lower_bound_skips(tmp_path):
    pdb = (FIXTURES / "prot1.pdb").read_text().replace("LYS A 102", "ARG A 102")
    (tmp_path / "s").mkdir()
    (tmp_path / "s/prot1.pdb").write_text(pdb)
    write_predictions(tmp_path / "pred.tsv", ["prot1"])
    assert paint_structures(tmp_path / "pred.tsv", tmp_path / "s", tmp_path / "o1")[0]["status"] == "painted"
    rows = paint_structures(tmp_path / "pred.tsv", tmp_path / "s", tmp_path / "o2", min_identity=0.99)
    assert rows[0]["status"] == "skipped" and "0.95 < 0.99" in rows[0]["message"]


def test_alphafold_names_pattern_and_jsonl(tmp_path):
    sdir = tmp_path / "s"
    sdir.mkdir()
    shutil.copy(FIXTURES / "prot1.pdb", sdir / "AF-P12345-F1-model_v4.pdb")
    write_predictions(tmp_path / "pred.tsv", ["sp|P12345|TEST_HUMAN"])
    rows = paint_structures(tmp_path / "pred.tsv", sdir, tmp_path / "out")
    assert rows[0]["status"] == "painted" and rows[0]["structure"].endswith("AF-P12345-F1-model_v4.pdb")
    assert (tmp_path / "out/sp_P12345_TEST_HUMAN_ZN.pdb").exists()
    shutil.copy(FIXTURES / "prot1.pdb", sdir / "model_x_relaxed.pdb")
    write_predictions(tmp_path / "pred2.tsv", ["x"], calls=False)
    rows = paint_structures(tmp_path / "pred2.tsv", sdir, tmp_path / "out2", pattern="model_{id}_*.pdb")
    assert rows[0]["status"] == "painted" and rows[0]["called_residues"] == 0
    assert "no saved threshold" in (tmp_path / "out2/x_ZN.cxc").read_text()
    # JSONL predictions read like the TSV
    jl = tmp_path / "pred.jsonl"
    obj = {"id": "prot1", "sequence": SEQ, "ions": {"ZN": {"probability": [0.7] * 24, "std": [], "threshold": 0.5, "call": [1] * 24}}}
    jl.write_text(json.dumps(obj) + "\n")
    (pid, seq, ions), *_ = list(read_predictions(jl))
    assert pid == "prot1" and seq == SEQ and ions["ZN"] == ([0.7] * 24, [True] * 24)


def test_missing_gemmi_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemmi", None)
    with pytest.raises(StructureError, match=r"pip install 'e1min\[structure\]'"):
        require_gemmi()


def test_predict_cli_paints_structures(run_dir, tmp_path, capsys):
    from e1min.data.fasta import Record, write_fasta
    from e1min.predict import predict_main

    write_fasta(tmp_path / "q.fasta", [Record("prot1", SEQ, None), Record("mismatch", SEQ, None)])
    argv = ["--checkpoint", str(run_dir), "--fasta", str(tmp_path / "q.fasta"), "--out", str(tmp_path / "p.tsv"), "--quiet"]
    assert predict_main([*argv, "--structures", str(FIXTURES), "--out-structures", str(tmp_path / "painted"), "--ions", "ZN"]) == 0
    err = capsys.readouterr().err
    assert "structure of mismatch (ZN): skipped: sequence does not match" in err and "painted 1 of 2 protein(s)" in err
    (pid, seq, ions), _ = list(read_predictions(tmp_path / "p.tsv"))
    b = chain_b(tmp_path / "painted/prot1_ZN.pdb")
    for pos, resi in zip(POSITIONS, RESI):
        assert b[resi][0] == pytest.approx(100 * ions["ZN"][0][pos - 1], abs=0.006)
    from e1min.predictor import PredictError

    with pytest.raises(PredictError, match="--structures and --out-structures go together"):
        predict_main([*argv, "--structures", str(FIXTURES)])
    with pytest.raises(PredictError, match="is the --structures directory"):
        predict_main([*argv, "--structures", str(FIXTURES), "--out-structures", str(FIXTURES)])


def test_pymol_runs_the_script_when_installed(tmp_path):
    """Where PyMOL is installed (Debian's pymol), the .pml runs without an error and paints what gemmi wrote."""
    import subprocess

    if not shutil.which("pymol"):
        pytest.skip("PyMOL not installed (optional: the scripts are checked as text above)")
    probs = write_predictions(tmp_path / "pred.tsv", ["prot1"])
    paint_structures(tmp_path / "pred.tsv", FIXTURES, tmp_path / "out")
    probe = "print('B105A', cmd.get_model('prot1_ZN and chain A and resi 105A').atom[0].b); print('STICKS', cmd.count_atoms('rep sticks'))"
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}  # Debian's wrapper needs the system python3
    out = subprocess.run(
        ["pymol", "-cq", "prot1_ZN.pml", "-d", probe], cwd=tmp_path / "out", capture_output=True, text=True, timeout=120, env=env
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "Error" not in text, text
    assert float(re.search(r"B105A ([\d.]+)", text).group(1)) == pytest.approx(100 * probs["prot1", "ZN"][5], abs=0.006)
    assert int(re.search(r"STICKS (\d+)", text).group(1)) > 0


def test_every_matching_chain_of_a_homodimer_is_painted(tmp_path):
    lines = (FIXTURES / "prot1.pdb").read_text().splitlines()
    chain_a = [ln for ln in lines if ln.startswith(("ATOM", "HETATM")) and ln[21] == "A" and ln[17:20] not in ("ZN ", "HOH", " ZN")]
    copy = [ln[:21] + "C" + ln[22:] for ln in chain_a]
    (tmp_path / "s").mkdir()
    (tmp_path / "s/prot1.pdb").write_text("\n".join([ln for ln in lines if ln != "END"] + copy + ["TER", "END"]) + "\n")
    probs = write_predictions(tmp_path / "pred.tsv", ["prot1"])
    rows = paint_structures(tmp_path / "pred.tsv", tmp_path / "s", tmp_path / "out")
    assert rows[0]["chains"] == "A,C" and rows[0]["painted_residues"] == 2 * len(POSITIONS)
    for chain in ("A", "C"):
        b = chain_b(tmp_path / "out/prot1_ZN.pdb", chain)
        assert [b[r][0] for r in RESI] == pytest.approx([100 * probs["prot1", "ZN"][p - 1] for p in POSITIONS], abs=0.006)
    assert "#1/C:" in (tmp_path / "out/prot1_ZN.cxc").read_text()
