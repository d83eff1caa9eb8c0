"""A small deterministic synthetic dataset with planted metal-binding motifs (for demos and smoke tests)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from e1min.data.fasta import Record, format_fasta
from e1min.io import atomic_write_text

AA = "ACDEFGHIKLMNPQRSTVWY"
# Background composition (UniProt-like, percent).
AA_FREQ = np.array([8.25, 1.37, 5.45, 6.75, 3.86, 7.07, 2.27, 5.96, 5.84, 9.66, 2.42, 4.06, 4.70, 3.93, 5.53, 6.56, 5.34, 6.87, 1.08, 2.92])
AA_FREQ = AA_FREQ / AA_FREQ.sum()
_AA_ARRAY = np.array(list(AA))
_AA_CUM = np.cumsum(AA_FREQ)
DEMO_IONS = ("ZN", "CA", "LREE", "HREE")

Motif = tuple[str, np.ndarray]  # residues, 0/1 labels


def _bg(rng: np.random.Generator, n: int) -> str:
    idx = np.minimum(np.searchsorted(_AA_CUM, rng.random(n)), len(AA) - 1)
    return "".join(_AA_ARRAY[idx])


def _pick(rng: np.random.Generator, options: str) -> str:
    return options[rng.integers(len(options))]


def _motif(rng: np.random.Generator, template: list[str], positives: set[int]) -> Motif:
    """``template`` items: a literal residue set ('x' = background) per position."""
    seq = "".join(_bg(rng, 1) if t == "x" else _pick(rng, t) for t in template)
    return seq, np.array([1 if i in positives else 0 for i in range(len(seq))], dtype=np.uint8)


def zinc_finger(rng: np.random.Generator) -> Motif:
    """C2H2: C-x(2,4)-C-x(12)-H-x(3,5)-H with the consensus F and L; C, C, H, H bind."""
    a, b = int(rng.integers(2, 5)), int(rng.integers(3, 6))
    t = ["Y", "x", "C"] + ["x"] * a + ["C"] + ["x", "x", "x", "F", "x", "x", "x", "x", "x", "L", "x", "x"] + ["H"] + ["x"] * b + ["H"]
    pos = {2, 3 + a, 3 + a + 13, 3 + a + 14 + b}
    return _motif(rng, t, pos)


def zinc_decoy(rng: np.random.Generator) -> Motif:
    """Half a finger (C-x2-C or H-x3-H alone): unlabelled."""
    t = ["C", "x", "x", "C"] if rng.random() < 0.5 else ["H", "x", "x", "x", "H"]
    return _motif(rng, ["x", "x"] + t + ["x", "x"], set())


EF_POSITIVES = {0, 2, 4, 6, 8, 11}  # loop positions 1, 3, 5, 7, 9, 12


def ef_hand(rng: np.random.Generator) -> Motif:
    """EF-hand loop D-x-[DNS]-x-[DNS]-G-x-[ILV]-[DNS]-x-x-E between helix-like flanks."""
    loop = ["D", "KAQ", "DNS", "GKR", "DNS", "G", "x", "ILV", "DNS", "x", "x", "E"]
    return _flanked(rng, loop, EF_POSITIVES)


def ef_decoy(rng: np.random.Generator) -> Motif:
    """EF-like loop without the G6 and E12 anchors: unlabelled."""
    loop = ["D", "x", "DNS", "x", "DNS", "AKT", "x", "x", "x", "x", "x", "KRQ"]
    return _flanked(rng, loop, set())


def lree_site(rng: np.random.Generator) -> Motif:
    """Lanmodulin-like loop with P2 and E12: D-P-D-[KR]-D-G-x-[IL]-[DS]-x-x-E."""
    loop = ["D", "P", "D", "KR", "D", "G", "x", "IL", "DS", "x", "x", "E"]
    return _flanked(rng, loop, EF_POSITIVES)


def hree_site(rng: np.random.Generator) -> Motif:
    """Heavy-lanthanide variant with N1, W7 and D12: N-x-D-x-N-G-W-[VI]-[DE]-x-x-D."""
    loop = ["N", "x", "D", "x", "N", "G", "W", "VI", "DE", "x", "x", "D"]
    return _flanked(rng, loop, EF_POSITIVES)


def ree_decoy(rng: np.random.Generator) -> Motif:
    """P2 loop without G6 and the acidic 12: unlabelled."""
    loop = ["D", "P", "x", "x", "x", "AS", "x", "x", "x", "x", "x", "KR"]
    return _flanked(rng, loop, set())


def _flanked(rng: np.random.Generator, loop: list[str], positives: set[int]) -> Motif:
    helix = ["EAKL", "EAKLQ", "AELK"]
    left = [_pick(rng, helix[0]) for _ in range(3)]
    right = [_pick(rng, helix[2]) for _ in range(3)]
    return _motif(rng, left + loop + right, {p + len(left) for p in positives})


SITES: dict[str, Callable[[np.random.Generator], Motif]] = {
    "ZN": zinc_finger,
    "CA": ef_hand,
    "LREE": lree_site,
    "HREE": hree_site,
}
DECOYS: dict[str, Callable[[np.random.Generator], Motif]] = {
    "ZN": zinc_decoy,
    "CA": ef_decoy,
    "LREE": ree_decoy,
    "HREE": ree_decoy,
}


def _assemble(rng: np.random.Generator, pieces: list[Motif]) -> tuple[str, list[int]]:
    """Background of length ~50-220 with the pieces planted at random places; returns piece starts."""
    core = sum(len(p[0]) for p in pieces)
    length = max(int(rng.integers(50, 221)), core + 10)
    gaps = rng.multinomial(length - core, np.ones(len(pieces) + 1) / (len(pieces) + 1))
    parts, starts, pos = [], [], 0
    for gap, (s, _) in zip(gaps, pieces):
        parts += [_bg(rng, int(gap)), s]
        starts.append(pos + int(gap))
        pos += int(gap) + len(s)
    parts.append(_bg(rng, int(gaps[-1])))
    return "".join(parts), starts


def _protein(rng: np.random.Generator, ions: list[str], n_sites: int) -> tuple[str, dict[str, np.ndarray]]:
    """A protein carrying sites of every ion in ``ions`` plus decoys; labels per ion."""
    pieces: list[tuple[str, Motif]] = []
    for ion in ions:
        pieces += [(ion, SITES[ion](rng)) for _ in range(n_sites)]
        pieces += [("", DECOYS[ion](rng)) for _ in range(int(rng.integers(0, 3)))]
    pieces = [pieces[k] for k in rng.permutation(len(pieces))]
    seq, starts = _assemble(rng, [m for _, m in pieces])
    labels = {ion: np.zeros(len(seq), np.uint8) for ion in ions}
    for (owner, (s, lab)), at in zip(pieces, starts):
        if owner:
            labels[owner][at : at + len(s)] = lab
    return seq, labels


def _mutate(rng: np.random.Generator, seq: str, labels: np.ndarray | None, identity: float) -> str:
    """An aligned homolog row: substitutions (binding residues mostly kept), gaps, lower-case insertions."""
    arr = np.array(list(seq))
    sub = rng.random(len(seq)) > identity
    if labels is not None:
        sub &= ~((labels == 1) & (rng.random(len(seq)) < 0.9))
    arr[sub] = list(_bg(rng, int(sub.sum())))
    gaps = rng.random(len(seq)) < 0.04
    if rng.random() < 0.4:  # a fragment: one terminus missing
        cut = int(rng.integers(1, max(2, len(seq) // 4)))
        if rng.random() < 0.5:
            gaps[:cut] = True
        else:
            gaps[-cut:] = True
    arr[gaps] = "-"
    row = list(arr)
    for i in np.flatnonzero(rng.random(len(seq)) < 0.02):
        row[i] = row[i] + _bg(rng, int(rng.integers(1, 4))).lower()
    text = "".join(row)
    return text.replace("-", ".", 1) if rng.random() < 0.1 else text


def _a3m(rng: np.random.Generator, pid: str, seq: str, labels: np.ndarray | None) -> str:
    n = int(rng.integers(6, 40))
    lines = [f">{pid}", seq]
    for k in range(n):
        lines += [f">{pid}_hom{k}", _mutate(rng, seq, labels, float(rng.uniform(0.35, 0.99)))]
    return "\n".join(lines) + "\n"


def make_demo_dataset(out_dir: str | os.PathLike, seed: int = 0, proteins_per_ion: int = 200, test_per_ion: int = 40) -> dict:
    """Write ``{ION}_train.fasta``, ``{ION}_test.fasta`` and ``msa/{ION}/{id}.a3m`` for ZN, CA, LREE, HREE.

    Returns a summary: paths, ions and per-file protein counts.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    files: dict[str, list[Record]] = {f"{ion}_{split}": [] for ion in DEMO_IONS for split in ("train", "test")}
    msas: dict[str, dict[str, str]] = {ion: {} for ion in DEMO_IONS}

    def add(split: str, pid: str, ions: list[str], labelled: bool, with_msa: bool) -> None:
        n_sites = int(rng.integers(1, 3))
        seq, labels = _protein(rng, ions, n_sites)
        a3m = _a3m(rng, pid, seq, np.maximum.reduce(list(labels.values()))) if with_msa else None
        for ion in ions:
            files[f"{ion}_{split}"].append(Record(pid, seq, labels[ion] if labelled else None))
            if a3m is not None:
                msas[ion][pid] = a3m

    for split, count in (("train", proteins_per_ion), ("test", test_per_ion)):
        tag = "" if split == "train" else "t"
        for ion in DEMO_IONS:
            for k in range(count):
                labelled = split == "test" or rng.random() >= 0.1
                add(split, f"{ion.lower()}{tag}_{k:04d}", [ion], labelled, rng.random() < 0.33)
        # Proteins in both LREE and HREE (same id and sequence): REE = their union.
        for k in range(max(2, count // 8)):
            add(split, f"ree{tag}_{k:04d}", ["LREE", "HREE"], True, rng.random() < 0.33)
    # Identical sequences under another id (as chains of one PDB entry): must share a fold.
    for ion in DEMO_IONS:
        recs = files[f"{ion}_train"]
        for k in range(3):
            src = recs[k]
            recs.append(Record(f"{src.id}_dup", src.sequence, None if src.labels is None else src.labels.copy()))
    for name, recs in files.items():
        atomic_write_text(out / f"{name}.fasta", format_fasta(recs))
    for ion, by_id in msas.items():
        for pid, text in by_id.items():
            atomic_write_text(out / "msa" / ion / f"{pid}.a3m", text)
    return {
        "fasta_path": str(out),
        "msa_dir": str(out / "msa"),
        "ions": list(DEMO_IONS),
        "proteins": {name: len(recs) for name, recs in files.items()},
        "msas": {ion: len(by_id) for ion, by_id in msas.items()},
    }
