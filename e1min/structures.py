"""Predictions painted on protein structures: B-factor = 100 x probability, plus ChimeraX and PyMOL scripts.

For each protein of a prediction file (TSV or JSONL, as ``e1min predict`` wrote it) the structure
``DIR/{id}.pdb|.cif|.ent|.mmcif[.gz]`` (also ``AF-{id}-F1-model_v*``, ``pdb{id}``, the UniProt accession
of ``sp|ACC|NAME`` ids, or ``--structure-pattern``) is read with gemmi (the ``structure`` extra). Each
chain's observed amino-acid residues are aligned to the predicted sequence, so missing loops, insertion
codes, numbering offsets and modified residues (MSE -> M) map to the right positions; chains whose
identity is below ``min_identity`` are never painted, and a protein without a matching chain (or file)
is reported and skipped. Per ion it writes ``OUT/{id}_{ION}.pdb|cif`` (first model; atoms of unmapped
residues and ligands get B = 0), ``OUT/{id}_{ION}.cxc`` and ``OUT/{id}_{ION}.pml`` (colour by B-factor,
called residues as sticks), and ``OUT/structures.tsv`` lists what was painted or skipped and why.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e1min.errors import E1minError
from e1min.io import atomic_path, atomic_write_text

EXTENSIONS = (".pdb", ".cif", ".ent", ".mmcif")
DEFAULT_MIN_IDENTITY = 0.9
REPORT_HEADER = ("id", "ion", "status", "structure", "chains", "identity", "painted_residues", "called_residues", "files", "message")


class StructureError(E1minError, ValueError):
    """A structure request a user can fix: gemmi missing, a bad directory, pattern or prediction file."""


def require_gemmi() -> Any:
    """The gemmi module, or a one-line error naming the extra that installs it."""
    try:
        import gemmi
    except ImportError:
        raise StructureError("reading and writing structures needs gemmi: pip install 'e1min[structure]'") from None
    return gemmi


def candidates(directory: Path, protein_id: str, pattern: str | None = None) -> list[str]:
    """Glob patterns tried, in order, for one protein's structure file."""
    if pattern:
        return [str(directory / pattern.format(id=protein_id))]
    names = [protein_id, protein_id.lower(), protein_id.upper()]
    parts = protein_id.split("|")
    if len(parts) >= 2 and parts[1]:  # sp|P69905|HBA_HUMAN -> P69905
        names.append(parts[1])
    stems = []
    for n in dict.fromkeys(names):
        stems += [glob.escape(n), f"AF-{glob.escape(n)}-F1-model_v*", f"pdb{glob.escape(n.lower())}"]
    return [str(directory / f"{s}{ext}{gz}") for s in stems for ext in EXTENSIONS for gz in ("", ".gz")]


def find_structure(directory: Path, protein_id: str, pattern: str | None = None) -> Path | None:
    """The protein's structure file (the newest AlphaFold model version when several match), or None."""
    for pat in candidates(directory, protein_id, pattern):
        hits = sorted(glob.glob(pat), key=_natural)
        hits = [h for h in hits if os.path.isfile(h)]
        if hits:
            return Path(hits[-1])
    return None


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


@dataclass
class ChainMatch:
    """One chain's observed amino acids aligned to the predicted sequence."""

    chain: str
    identity: float
    pairs: list[tuple[int, int]]  # (index into the chain's amino-acid residues, 0-based sequence position)


def chain_residues(chain: Any) -> list[Any]:
    """The chain's amino-acid residues (standard and modified; ligands and waters left out)."""
    gemmi = require_gemmi()
    out = []
    for res in chain:
        info = gemmi.find_tabulated_residue(res.name)
        if info is not None and info.is_amino_acid():
            out.append(res)
    return out


def one_letter(res: Any) -> str:
    gemmi = require_gemmi()
    info = gemmi.find_tabulated_residue(res.name)
    code = info.one_letter_code.upper() if info is not None else " "
    return code if code.strip() and code != "?" else "X"


def align_chain(residues: list[Any], sequence: str, chain: str) -> ChainMatch:
    """Global alignment of the chain's observed residues to ``sequence``; identity = identical pairs / the shorter length."""
    gemmi = require_gemmi()
    observed = [one_letter(r) for r in residues]
    if not observed or not sequence:
        return ChainMatch(chain, 0.0, [])
    result = gemmi.align_string_sequences(observed, list(sequence), [], gemmi.AlignmentScoring())
    pairs, i, j, same = [], 0, 0, 0
    for n, op in re.findall(r"(\d+)([MID])", result.cigar_str()):
        for _ in range(int(n)):
            if op == "M":
                pairs.append((i, j))
                same += observed[i] == sequence[j]
                i, j = i + 1, j + 1
            elif op == "I":
                i += 1
            else:
                j += 1
    return ChainMatch(chain, same / min(len(observed), len(sequence)), pairs)


def read_predictions(path: Path) -> Iterator[tuple[str, str, dict[str, tuple[list[float], list[bool] | None]]]]:
    """(id, sequence, {ion: (probabilities, calls or None)}) per protein of a ``predict`` output (TSV or JSONL)."""
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
        if first.startswith("{"):
            for n, line in enumerate([first, *fh], start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    ions = {
                        ion: (v["probability"], None if v.get("call") is None else [bool(c) for c in v["call"]])
                        for ion, v in obj["ions"].items()
                    }
                    yield obj["id"], obj["sequence"], ions
                except (ValueError, KeyError, TypeError) as e:
                    raise StructureError(f"{path}:{n}: not an e1min JSONL prediction ({e})") from None
            return
        cols = first.rstrip("\n").split("\t")
        try:
            i_id, i_pos, i_res, i_ion, i_p, i_call = (cols.index(c) for c in ("id", "position", "residue", "ion", "probability", "call"))
        except ValueError:
            raise StructureError(f"{path}: not an e1min prediction TSV (header {first.strip()!r})") from None
        cur: str | None = None
        seq: dict[int, str] = {}
        ions: dict[str, tuple[list[float], list[bool] | None]] = {}
        for n, line in enumerate(fh, start=2):
            f = line.rstrip("\n").split("\t")
            try:
                pid, pos, prob, call = f[i_id], int(f[i_pos]), float(f[i_p]), f[i_call]
                aa, ion = f[i_res], f[i_ion]
            except (IndexError, ValueError):
                raise StructureError(f"{path}:{n}: malformed prediction line") from None
            if pid != cur:
                if cur is not None:
                    yield cur, "".join(seq[k] for k in sorted(seq)), ions
                cur, seq, ions = pid, {}, {}
            seq[pos] = aa
            probs, calls = ions.setdefault(ion, ([], [] if call != "" else None))
            probs.append(prob)
            if calls is not None:
                calls.append(call == "1")
        if cur is not None:
            yield cur, "".join(seq[k] for k in sorted(seq)), ions


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _resi(res: Any) -> str:
    icode = res.seqid.icode.strip()
    return f"{res.seqid.num}{icode}"


def chimerax_script(structure_file: str, pid: str, ion: str, threshold_note: str, sticks: dict[str, list[str]]) -> str:
    """ChimeraX commands: open the painted file, colour by B-factor (0 blue, 50 white, 100 red), called residues as sticks."""
    lines = [
        # PyMOL (and ChimeraX) split lines at ';' even inside comments: none may appear here.
        f"# e1min: {ion} binding probability of {pid.replace(';', '_')} in the B-factor column (100 x probability), {threshold_note}",
        "# run from this directory: chimerax " + structure_file.rsplit(".", 1)[0] + ".cxc",
        f"open {structure_file}",
        "hide #1 atoms",
        "cartoon #1",
        "color bfactor #1 palette 0,blue:50,white:100,red",
    ]
    for chain, resis in sticks.items():
        spec = f"#1/{chain}:{','.join(resis)}"
        lines += [f"show {spec} atoms", f"style {spec} stick"]
    lines.append("view #1")
    return "\n".join(lines) + "\n"


def pymol_script(structure_file: str, pid: str, ion: str, threshold_note: str, sticks: dict[str, list[str]]) -> str:
    """PyMOL commands: load the painted file, spectrum by B-factor 0-100, called residues as sticks."""
    obj = _safe(structure_file.rsplit(".", 1)[0])
    lines = [
        # PyMOL (and ChimeraX) split lines at ';' even inside comments: none may appear here.
        f"# e1min: {ion} binding probability of {pid.replace(';', '_')} in the B-factor column (100 x probability), {threshold_note}",
        "# run from this directory: pymol " + structure_file.rsplit(".", 1)[0] + ".pml",
        f"load {structure_file}, {obj}",
        f"hide everything, {obj}",
        f"show cartoon, {obj}",
        f"spectrum b, blue_white_red, {obj}, minimum=0, maximum=100",
    ]
    for chain, resis in sticks.items():
        lines.append(f"show sticks, {obj} and chain {chain} and resi {'+'.join(resis)} and not name N+C+O")
    lines.append(f"orient {obj}")
    return "\n".join(lines) + "\n"


def paint_structures(
    predictions: str | os.PathLike,
    structures_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    pattern: str | None = None,
    min_identity: float = DEFAULT_MIN_IDENTITY,
) -> list[dict[str, Any]]:
    """Paint every protein of a prediction file on its structure; returns one report row per (protein, ion)."""
    gemmi = require_gemmi()
    structures_dir, out_dir = Path(structures_dir), Path(out_dir)
    if not structures_dir.is_dir():
        raise StructureError(f"--structures {structures_dir}: not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for pid, sequence, ions in read_predictions(Path(predictions)):
        base = {"id": pid, "structure": "", "chains": "", "identity": "", "painted_residues": "", "called_residues": "", "files": ""}
        path = find_structure(structures_dir, pid, pattern)
        if path is None:
            msg = f"no structure file (tried e.g. {Path(candidates(structures_dir, pid, pattern)[0]).name})"
            rows += [{**base, "ion": ion, "status": "skipped", "message": msg} for ion in ions]
            continue
        try:
            st = gemmi.read_structure(str(path))
        except (RuntimeError, ValueError, OSError) as e:
            rows += [
                {**base, "ion": ion, "status": "skipped", "structure": str(path), "message": f"unreadable structure ({e})"} for ion in ions
            ]
            continue
        while len(st) > 1:
            del st[len(st) - 1]
        model = st[0]
        matches = [align_chain(chain_residues(ch), sequence, ch.name) for ch in model]
        good = [m for m in matches if m.pairs and m.identity >= min_identity]
        best = max((m.identity for m in matches), default=0.0)
        base.update(structure=str(path), identity=f"{best:.3f}")
        if not good:
            msg = f"sequence does not match the structure (best chain identity {best:.2f} < {min_identity:.2f}): not painted"
            rows += [{**base, "ion": ion, "status": "skipped", "message": msg} for ion in ions]
            continue
        base["chains"] = ",".join(m.chain for m in good)
        fmt = "cif" if any(s in path.name.lower() for s in (".cif", ".mmcif")) else "pdb"
        for ion, (probs, calls) in ions.items():
            for ch in model:
                for res in ch:
                    for atom in res:
                        atom.b_iso = 0.0
            sticks: dict[str, list[str]] = {}
            painted = called = 0
            for m in good:
                residues = chain_residues(model[m.chain])
                for i, j in m.pairs:
                    b = round(100.0 * probs[j], 2)
                    for atom in residues[i]:
                        atom.b_iso = b
                    painted += 1
                    if calls is not None and calls[j]:
                        sticks.setdefault(m.chain, []).append(_resi(residues[i]))
                        called += 1
            stem = f"{_safe(pid)}_{_safe(ion)}"
            structure_file = f"{stem}.{fmt}"
            with atomic_path(out_dir / structure_file) as tmp:
                if fmt == "pdb":
                    st.write_pdb(str(tmp))
                else:
                    st.make_mmcif_document().write_file(str(tmp))
            note = (
                "called residues (probability >= the saved threshold) as sticks"
                if calls is not None
                else "no saved threshold: no residue called"
            )
            atomic_write_text(out_dir / f"{stem}.cxc", chimerax_script(structure_file, pid, ion, note, sticks))
            atomic_write_text(out_dir / f"{stem}.pml", pymol_script(structure_file, pid, ion, note, sticks))
            rows.append(
                {
                    **base,
                    "ion": ion,
                    "status": "painted",
                    "painted_residues": painted,
                    "called_residues": called,
                    "files": f"{structure_file},{stem}.cxc,{stem}.pml",
                    "message": f"{painted} residues painted on chain(s) {base['chains']}",
                }
            )
    text = "\t".join(REPORT_HEADER) + "\n" + "".join("\t".join(str(r[k]) for k in REPORT_HEADER) + "\n" for r in rows)
    atomic_write_text(out_dir / "structures.tsv", text)
    return rows
