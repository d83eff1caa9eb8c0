"""Write a random E1 checkpoint in the released layout (config.json + model.safetensors).

python tools/make_random_checkpoint.py OUT_DIR --preset e1-150m [--dtype bfloat16] [--shard-mb 200]
python tools/make_random_checkpoint.py OUT_DIR --preset tiny --set hidden_size=128 --set num_hidden_layers=6
"""

import argparse

import torch

from e1min.config import preset
from e1min.random_checkpoint import write_random_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--preset", default="tiny", help="tiny, e1-150m, e1-300m or e1-600m")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field (int/float)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shard-mb", type=float, default=None, help="shard into files of at most this many MB")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    overrides = {}
    for item in a.set:
        key, _, value = item.partition("=")
        overrides[key] = float(value) if "." in value else int(value)
    config = preset(a.preset, **overrides)
    shard = int(a.shard_mb * 2**20) if a.shard_mb else None
    model = write_random_checkpoint(a.out_dir, config, a.seed, getattr(torch, a.dtype), shard)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out_dir}: {a.preset} {n / 1e6:.1f}M parameters, {a.dtype}")


if __name__ == "__main__":
    main()
