"""MSA context sampling: parse + weight time, time per draw of 64 rows and peak RSS on synthetic A3Ms.

    python tools/bench_msa.py [--rows 1000 10000 50000] [--width 500] [--dir /tmp/e1min_bench_msa]

Each A3M (query + mutated homologs: fragments with leading/trailing gaps, internal gaps, lower-case
insertions) is written once and reused; each size is then measured in a fresh process so that its
peak RSS is its own. base = interpreter + e1min imports (torch included), before the A3M is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import machine_line, peak_rss_mb, print_table, run_child  # noqa: E402

AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def write_a3m(path: Path, rows: int, width: int, seed: int = 0) -> None:
    """A synthetic A3M: identity to the query from ~30 % to ~95 %, half the rows fragments."""
    rng = np.random.default_rng(seed)
    query = rng.choice(AMINO, width)
    lines = [">query", query.tobytes().decode("ascii")]
    for k in range(1, rows):
        row = query.copy()
        sub = rng.random(width) < rng.uniform(0.05, 0.7)
        row[sub] = rng.choice(AMINO, int(sub.sum()))
        row[rng.random(width) < 0.05] = ord("-")
        if rng.random() < 0.5:  # a fragment
            a = int(rng.integers(0, width // 2))
            b = int(rng.integers(a + width // 4, width + 1))
            row[:a] = ord("-")
            row[b:] = ord("-")
        text = row.tobytes().decode("ascii")
        ins = np.flatnonzero(rng.random(width) < 0.01)
        for c in ins[::-1]:  # lower-case insertions after a few columns
            text = text[: c + 1] + rng.choice(AMINO, int(rng.integers(1, 4))).tobytes().decode("ascii").lower() + text[c + 1 :]
        lines += [f">hom{k}", text]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(path)


def child(s: dict) -> dict:
    import time

    from e1min.data.msa import MSASampling, read_a3m, sample_context

    base = peak_rss_mb()
    t0 = time.perf_counter()
    msa = read_a3m(s["path"])
    parse = time.perf_counter() - t0
    sampling = MSASampling(max_num_samples=64, max_token_length=10**9, max_query_similarity=0.95)
    t0 = time.perf_counter()
    msa.probabilities(sampling)  # neighbour counts (the O(rows^2 x width) part) + p
    weight = time.perf_counter() - t0
    draws = s["draws"]
    t0 = time.perf_counter()
    got = [len(sample_context(msa, seed, sampling)) for seed in range(draws)]
    draw = (time.perf_counter() - t0) / draws
    return {
        **s,
        "file_mb": Path(s["path"]).stat().st_size / 2**20,
        "parse_s": parse,
        "weight_s": weight,
        "draw_ms": draw * 1000,
        "drawn": float(np.mean(got)),
        "base_mb": base,
        "peak_mb": peak_rss_mb(),
        "added_mb": peak_rss_mb() - base,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--draws", type=int, default=50, help="draws (seeds) averaged per size")
    p.add_argument("--dir", default="/tmp/e1min_bench_msa")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    print(machine_line())
    results = []
    for n in a.rows:
        path = Path(a.dir) / f"synthetic_{n}x{a.width}.a3m"
        if not path.exists():
            write_a3m(path, n, a.width)
        results.append(run_child(__file__, {"rows": n, "width": a.width, "path": str(path), "draws": a.draws}, timeout=7200))
    print("parse = read_a3m; weights = neighbour counts at bound 0.8 + draw probabilities (once per MSA and bound);")
    print("draw = sample_context of 64 rows (max_query_similarity 0.95); base = interpreter + e1min (torch) imports")
    print_table(
        results,
        [
            ("rows", "rows", "d"),
            ("width", "columns", "d"),
            ("file_mb", "file MB", ".1f"),
            ("parse_s", "parse s", ".2f"),
            ("weight_s", "weights s", ".1f"),
            ("draw_ms", "draw ms", ".2f"),
            ("drawn", "rows drawn", ".0f"),
            ("base_mb", "base MB", ".0f"),
            ("peak_mb", "peak MB", ".0f"),
            ("added_mb", "added MB", ".0f"),
        ],
    )


if __name__ == "__main__":
    main()
