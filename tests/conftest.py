"""Shared fixtures: tiny random E1 models and checkpoints in the released layout (helpers: tests/helpers.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from e1min.config import preset
from e1min.data.fasta import Record, write_fasta
from e1min.predict import load_ensemble
from e1min.random_checkpoint import random_model, write_random_checkpoint
from tests.helpers import random_records


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


# The tiny trained 2-fold run (ZN + CA) shared by the prediction tests, built once per session.
@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    from tests.helpers import build_run

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_run(tmp_path_factory.mktemp("predict_run"))
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ensemble(run_dir):
    return load_ensemble(run_dir)


@pytest.fixture(scope="session")
def queries() -> list[Record]:
    """Unlabelled proteins of mixed lengths, two longer than max_query_length (64)."""
    rng = np.random.default_rng(7)
    recs = random_records(rng, 9, "q", lo=5, hi=60, labelled=False)
    recs += random_records(rng, 2, "long", lo=150, hi=230, labelled=False)
    return recs


@pytest.fixture
def query_fasta(tmp_path, queries) -> Path:
    path = tmp_path / "queries.fasta"
    write_fasta(path, queries)
    return path
