"""Padding fraction of token-budget vs fixed-size batching on a FASTA file's real lengths (+4 specials).

python tools/bench_batching.py ../shared/data/metal/ZN_train.fasta [--max-tokens 8192 4096] [--batch-sizes 2 8]
"""

from __future__ import annotations

import argparse

import numpy as np

from e1min.data.batching import fixed_size_batches, padding_fraction, token_budget_batches
from e1min.data.fasta import read_fasta
from e1min.tokenizer import SPECIALS_PER_SEQUENCE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fasta")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[8192, 4096])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--epochs", type=int, default=5, help="seeds averaged over")
    args = parser.parse_args()
    lengths = [len(r.sequence) + SPECIALS_PER_SEQUENCE for r in read_fasta(args.fasta)]
    print(f"{args.fasta}: {len(lengths)} proteins, tokens min/median/max {min(lengths)}/{int(np.median(lengths))}/{max(lengths)}")
    print(f"{'mode':<28} {'batches':>8} {'mean size':>10} {'padding':>9}")
    rows = [(f"token budget {m}", lambda s, m=m: token_budget_batches(lengths, m, seed=s)) for m in args.max_tokens]
    rows += [(f"fixed batch_size {b}", lambda s, b=b: fixed_size_batches(lengths, b, seed=s)) for b in args.batch_sizes]
    for name, make in rows:
        plans = [make(s) for s in range(args.epochs)]
        pad = np.mean([padding_fraction(p, lengths) for p in plans])
        print(f"{name:<28} {len(plans[0]):>8} {len(lengths) / len(plans[0]):>10.1f} {pad:>9.2%}")


if __name__ == "__main__":
    main()
