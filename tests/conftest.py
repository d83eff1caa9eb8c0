"""Shared fixtures: tiny random E1 models and checkpoints in the released layout (helpers: tests/helpers.py)."""

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
