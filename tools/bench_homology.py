"""MSAs and homology with MMseqs2: build-msa time and depth, and leakage tables (README "MSAs and homology").

    python tools/bench_homology.py build-msa [--threads 2] [--dir /tmp/e1min_bench_homology]
    python tools/bench_homology.py leakage --fasta-dir ../shared/data/metal [--ions ZN CA MG] [--threads 2]
    python tools/bench_homology.py redundant --fasta-dir ../shared/data/metal [--ion ZN] [--threads 2]

build-msa: the demo set's ZN_train.fasta (tools/make_demo_dataset.py, seed 0) searched against a database
of every demo protein (all ions, train and test) plus three mutated homologs of each (90 / 70 / 50 %
identity, an insertion each) and unrelated proteins, written once under --dir.
leakage: per ion, the folds of a run (sequence grouping, K=5, seed 42 as configs/e1_binding.yaml) and
fold 1 held out as a test set against folds 2-5 (what ``evaluate --train-fasta`` reports).
redundant: one ion's proteins plus a mutated copy of each (95 % identity, ``_mut``), under sequence and
identity grouping (data.split_min_seq_id 0.3, data.split_coverage 0.8): proteins with a homolog in
another fold at 30 / 50 / 90 % over 80 % coverage.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from e1min.data.build_msa import build_msas
from e1min.data.dataset import load_ion_records
from e1min.data.demo import AA, make_demo_dataset
from e1min.data.fasta import Record, read_fasta, write_fasta
from e1min.data.folds import assign_folds
from e1min.data.homology import THRESHOLDS, fold_leakage, heldout_leakage, make_folds, search, unique_proteins
from e1min.data.mmseqs import find_mmseqs

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import cpu_model  # noqa: E402


def _mutant(rng: np.random.Generator, seq: str, identity: float, insert: int = 0) -> str:
    row = np.array(list(seq))
    sub = rng.random(len(row)) > identity
    row[sub] = rng.choice(np.array(list(AA)), int(sub.sum()))
    text = "".join(row)
    cut = int(rng.integers(1, len(text)))
    return text[:cut] + "".join(rng.choice(np.array(list(AA)), insert)) + text[cut:]


def _counts(report: dict) -> str:
    n = report["proteins"]
    return " | ".join(
        f"{report['with_homolog'][f'{t:g}']} ({100 * report['with_homolog'][f'{t:g}'] / max(n, 1):.1f} %)" for t in THRESHOLDS
    )


def bench_build(args: argparse.Namespace) -> None:
    root = Path(args.dir)
    info = make_demo_dataset(root / "demo", seed=0)
    rng = np.random.default_rng(1)
    db: dict[str, str] = {}
    for path in sorted((root / "demo").glob("*.fasta")):
        for r in read_fasta(path):
            db.setdefault(r.id, r.sequence)
    for pid, seq in list(db.items()):
        for k, ident in enumerate((0.9, 0.7, 0.5)):
            db[f"{pid}_hom{k}"] = _mutant(rng, seq, ident, insert=int(rng.integers(1, 6)))
    for k in range(500):
        db[f"unrelated{k}"] = "".join(rng.choice(np.array(list(AA)), int(rng.integers(60, 300))))
    write_fasta(root / "db.fasta", [Record(k, v) for k, v in db.items()])
    mm = find_mmseqs()
    dbp = mm.createdb(root / "db.fasta", root / "db")
    fasta = root / "demo" / "ZN_train.fasta"
    n = len(read_fasta(fasta))
    out = root / "msa"
    res = build_msas(fasta, dbp, out, ion="ZN", threads=args.threads, overwrite=True, progress=lambda m: print(m, file=sys.stderr))
    depths = sorted(res.depth.values())
    print(f"mmseqs {mm.version}; {cpu_model()}; threads {args.threads}; demo {info['proteins']['ZN_train']} ZN proteins")
    print("| query proteins | database sequences | wall time | per protein | A3M depth mean / median / max | query-only |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {n} | {len(db)} | {res.seconds:.1f} s | {1000 * res.seconds / n:.0f} ms | "
        f"{statistics.mean(depths):.1f} / {statistics.median(depths):.0f} / {max(depths)} | {sum(d == 0 for d in depths)} |"
    )
    t = time.monotonic()
    again = build_msas(fasta, dbp, out, ion="ZN", threads=args.threads)
    print(f"rerun (resume): {len(again.skipped)} skipped, {time.monotonic() - t:.2f} s")


def bench_leakage(args: argparse.Namespace) -> None:
    mm = find_mmseqs()
    print(f"mmseqs {mm.version}; {cpu_model()}; threads {args.threads}; sequence grouping, K=5, seed 42; coverage >= 80 % of both")
    print("| ion | split | proteins | >= 30 % | >= 50 % | >= 90 % | search |")
    print("|---|---|---|---|---|---|---|")
    for ion in args.ions:
        recs = load_ion_records(args.fasta_dir, [ion])
        assignment = assign_folds(recs, 5, 42)
        t = time.monotonic()
        homology = search(unique_proteins(recs), threads=args.threads)
        dt = time.monotonic() - t
        rep = fold_leakage(recs, assignment, homology)
        print(f"| {ion} | 5 folds | {rep['proteins']} | {_counts(rep)} | {dt:.0f} s |")
        test = [r for r in recs[ion] if assignment[r.id] == 0]
        train = [r for r in recs[ion] if assignment[r.id] != 0]
        t = time.monotonic()
        rep = heldout_leakage(test, train, threads=args.threads)
        print(f"| {ion} | fold 1 vs folds 2-5 (evaluate) | {rep['proteins']} | {_counts(rep)} | {time.monotonic() - t:.0f} s |")
        sys.stdout.flush()


def bench_redundant(args: argparse.Namespace) -> None:
    mm = find_mmseqs()
    rng = np.random.default_rng(0)
    base = load_ion_records(args.fasta_dir, [args.ion])[args.ion]
    recs = list(base) + [Record(f"{r.id}_mut", _mutant(rng, r.sequence, 0.95), r.labels) for r in base]
    by_ion = {args.ion: recs}
    print(f"mmseqs {mm.version}; {cpu_model()}; threads {args.threads}; {args.ion} + a 95 % copy of each protein; K=5, seed 42")
    t = time.monotonic()
    ident, extra, homology = make_folds(by_ion, 5, 42, "identity", 0.3, 0.8, args.threads)
    dt = time.monotonic() - t
    seq = assign_folds(by_ion, 5, 42)
    print("| grouping | proteins | groups | largest group | >= 30 % | >= 50 % | >= 90 % | fold sizes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, assignment, groups in (("sequence", seq, None), ("identity", ident, extra["groups"])):
        rep = fold_leakage(by_ion, assignment, homology)
        sizes = np.bincount(list(assignment.values()), minlength=5)
        if groups is None:
            n_groups, largest = len({r.sequence for r in recs}), "-"
        else:
            counts = np.unique(list(groups.values()), return_counts=True)[1]
            n_groups, largest = len(counts), int(counts.max())
        print(f"| {name} | {len(recs)} | {n_groups} | {largest} | {_counts(rep)} | {' / '.join(map(str, sizes))} |")
    print(f"identity grouping (one all-vs-all search + components + assignment): {dt:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build-msa")
    b.add_argument("--dir", default="/tmp/e1min_bench_homology")
    b.add_argument("--threads", type=int, default=2)
    for name in ("leakage", "redundant"):
        q = sub.add_parser(name)
        q.add_argument("--fasta-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "metal"))
        q.add_argument("--threads", type=int, default=2)
        if name == "leakage":
            q.add_argument("--ions", nargs="+", default=["ZN", "CA", "MG"])
        else:
            q.add_argument("--ion", default="ZN")
    args = p.parse_args()
    {"build-msa": bench_build, "leakage": bench_leakage, "redundant": bench_redundant}[args.what](args)


if __name__ == "__main__":
    main()
