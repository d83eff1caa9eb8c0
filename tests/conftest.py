"""Shared fixtures: tiny random E1 models and checkpoints in the released layout."""

import pytest
import torch

from e1min.config import preset
from e1min.random_checkpoint import random_model, write_random_checkpoint


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    # 6 layers so there are two global layers (i = 2, 5) between within-sequence ones.
    return preset("tiny", num_hidden_layers=6)


@pytest.fixture
def tiny_model(tiny_config):
    return random_model(tiny_config, seed=1)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_config):
    path = tmp_path / "tiny_ckpt"
    write_random_checkpoint(path, tiny_config, seed=1)
    return path


def write_toy_dataset(directory, ions=("ZN", "CA"), proteins=24, seed=0, unlabelled=2):
    """Small labelled FASTA files: residues 'C' and 'H' bind ZN, 'D' and 'E' bind CA (learnable at once)."""
    import numpy as np

    from e1min.data.fasta import Record, write_fasta

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
    import yaml

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
