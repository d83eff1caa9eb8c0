"""Write the synthetic demo dataset: python tools/make_demo_dataset.py --out demo_data [--seed 0]."""

from __future__ import annotations

import argparse
import json

from e1min.data.demo import make_demo_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proteins-per-ion", type=int, default=200)
    args = parser.parse_args()
    summary = make_demo_dataset(args.out, seed=args.seed, proteins_per_ion=args.proteins_per_ion)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
