"""Importable test helpers: toy labelled datasets, a training config for them, and a tiny trained run.

Fixtures live in conftest.py; everything here is a plain function that tests import.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from e1min.config import preset
from e1min.data.dataset import Example
from e1min.data.fasta import Record, write_fasta
from e1min.heads import BindingModel
from e1min.lora import apply_lora
from e1min.predict import predict_main
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
        # The cross-fold homology report (an mmseqs search per run) is tested where asked for, not in every run.
        "data": {"fasta_path": str(tmp_path / "data"), "max_query_length": 40, "max_example_tokens": 1024, "homology_report": False},
        "model": {"checkpoint": str(checkpoint), "dropout": 0.0},
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "ions": ["ZN", "CA"],
            "epochs": 2,
            "warmup_epochs": 1,
            "max_tokens_per_batch": 512,
            "learning_rate": 3e-3,
            "num_folds": 2,
            "folds": [1],
            "output_dir": str(tmp_path / "out"),
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
        "data": {"fasta_path": str(data), "max_query_length": 64, "max_example_tokens": 1024, "homology_report": False},
        "model": {"checkpoint": str(ckpt), "dropout": 0.0},
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "ions": ["ZN", "CA"],
            "epochs": 1,
            "warmup_epochs": 1,
            "max_tokens_per_batch": 1024,
            "num_folds": 2,
            "output_dir": str(run),
            "learning_rate": 0.01,
        },
    }
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    train_main(["--config", str(cfg_path)])
    return run


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def write_text_fasta(tmp_path: Path, text: str, name: str = "in.fasta") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def copy_fold(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "fold"
    shutil.copytree(run_dir / "fold_1/best", dst)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    predict_main(argv)


# Module-scoped autouse fixtures for the prediction tests (import them into a test module to use them).
@pytest.fixture(autouse=True, scope="module")
def host_reports_native_bf16():
    """Every test here runs as on a CPU with native bf16: precision must still default to float32 (the
    float32 references below hold on every machine). tests/test_runtime.py covers the other outcome."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("e1min.runtime.cpu_has_native_bf16", lambda: True)
        yield


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core box OpenMP spinning makes 2 threads ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def strict_json_load(path: Path, text: str):
    def reject(token: str):
        raise AssertionError(f"{path}: non-standard JSON constant {token}")

    return json.loads(text, parse_constant=reject)


def parse_every_json(root: Path) -> int:
    """Parse every *.json / *.jsonl under ``root`` with a parser that rejects NaN/Infinity; returns the file count."""
    n = 0
    for path in sorted(root.rglob("*.json")) + sorted(root.rglob("*.jsonl")):
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in lines:
            strict_json_load(path, line)
        n += 1
    return n


def toy_examples(n, seed=0, ion="ZN"):
    """``n`` short labelled examples (the last unlabelled), every other one with a context sequence."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(8, 20))
        seq = "".join(rng.choice(list("ACDEHKLMW"), L))
        labels = None if i == n - 1 else (rng.random(L) < 0.3).astype(np.uint8)
        out.append(Example(f"p{i}", ion, seq, labels, context=["MKV"] if i % 2 else []))
    return out


def toy_binding_model(tiny_model, ions=("ZN", "CA"), **lora):
    """LoRA (r 4) + float32 ion heads on ``tiny_model``, with non-zero B so every LoRA gradient is live."""
    apply_lora(tiny_model, r=4, alpha=8, **lora)
    torch.manual_seed(0)
    model = BindingModel(tiny_model, list(ions), head_dropout=0.0)
    with torch.no_grad():  # non-zero B so LoRA gradients are all live
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def require_mmseqs():
    """The real mmseqs (``e1min.data.mmseqs.find_mmseqs``): a missing one fails under CI=true, skips elsewhere."""
    from e1min.data.mmseqs import MMseqsError, find_mmseqs

    try:
        return find_mmseqs()
    except MMseqsError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"MMseqs2 is required in CI: {e}")
        pytest.skip(f"MMseqs2 not available: {e}")


def homolog(rng: np.random.Generator, seq: str, identity: float, insert: str = "") -> str:
    """An unaligned homolog of ``seq``: substitutions at rate 1 - identity, ``insert`` in the middle."""
    row = np.array(list(seq))
    sub = rng.random(len(row)) > identity
    row[sub] = rng.choice(np.array(list(AA)), int(sub.sum()))
    text = "".join(row)
    return text[: len(text) // 2] + insert + text[len(text) // 2 :]
