"""Importable test helpers: toy labelled datasets, a training config for them, and a tiny trained run.

Fixtures live in conftest.py; everything here is a plain function that tests import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from e1min.config import preset
from e1min.data.fasta import Record, write_fasta
from e1min.random_checkpoint import write_random_checkpoint
from e1min.train import main as train_main


def write_toy_dataset(directory, ions=("ZN", "CA"), proteins=24, seed=0, unlabelled=2):
    """Small labelled FASTA files: residues 'C' and 'H' bind ZN, 'D' and 'E' bind CA (learnable at once)."""

    rng = np.random.default_rng(seed)
    binders = {"ZN": "CH", "CA": "DE", "LREE": "DN", "HREE": "EQ"}
    alphabet = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    directory.mkdir(parents=True, exist_ok=True)
    for ion in ions:
        records = []
        for i in range(proteins + unlabelled):
            seq = "".join(rng.choice(alphabet, size=int(rng.integers(20, 48))))
            labels = np.array([aa in binders.get(ion, "C") and rng.random() < 0.8 for aa in seq], dtype=np.uint8)
            records.append(Record(f"{ion.lower()}{i}", seq, labels if i < proteins else None))
        write_fasta(directory / f"{ion}_train.fasta", records)
    return directory


def toy_config(tmp_path, checkpoint, **sections):
    """A YAML training config for the toy dataset; ``sections`` override keys per section."""

    cfg = {
        "general": {"seed": 0, "device": "cpu", "log_every": 100},
        "data": {"fasta_path": str(tmp_path / "data"), "max_query_length": 40, "max_example_tokens": 1024},
        "model": {"checkpoint": str(checkpoint), "dropout": 0.0},
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "ions": ["ZN", "CA"], "epochs": 2, "warmup_epochs": 1, "max_tokens_per_batch": 512,
            "learning_rate": 3e-3, "num_folds": 2, "folds": [1], "output_dir": str(tmp_path / "out"),
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    if not (tmp_path / "data").exists():
        write_toy_dataset(tmp_path / "data", cfg["training"]["ions"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


AA = "ACDEFGHIKLMNPQRSTVWY"


def random_records(rng: np.random.Generator, n: int, prefix: str, lo: int = 12, hi: int = 60, labelled: bool = True) -> list[Record]:
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi))
        seq = "".join(rng.choice(list(AA), size=length))
        labels = None
        if labelled:
            # Cysteines and histidines bind (plus noise): something the model can learn a little.
            labels = np.array([1 if (c in "CH" and rng.random() < 0.8) else 0 for c in seq], dtype=np.uint8)
        out.append(Record(f"{prefix}{i}", seq, labels))
    return out


def build_run(root: Path) -> Path:
    """Write a tiny random E1 + data and train a 2-fold run; returns the run directory."""

    rng = np.random.default_rng(0)
    ckpt = root / "tiny-e1"
    write_random_checkpoint(ckpt, preset("tiny"), seed=0)
    data = root / "data"
    write_fasta(data / "ZN_train.fasta", random_records(rng, 16, "zn"))
    write_fasta(data / "CA_train.fasta", random_records(rng, 16, "ca"))
    run = root / "run"
    cfg = {
        "general": {"seed": 0, "device": "cpu", "log_every": 50},
        "data": {"fasta_path": str(data), "max_query_length": 64, "max_example_tokens": 1024},
        "model": {"checkpoint": str(ckpt), "dropout": 0.0},
        "lora": {"r": 4, "alpha": 8},
        "training": {"ions": ["ZN", "CA"], "epochs": 1, "warmup_epochs": 1, "max_tokens_per_batch": 1024,
                     "num_folds": 2, "output_dir": str(run), "learning_rate": 0.01},
    }
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    train_main(["--config", str(cfg_path)])
    return run
