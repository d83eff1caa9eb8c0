"""Random E1 weights in the released checkpoint layout, for tests, demos and benchmarks."""

from __future__ import annotations

import os

import torch

from e1min.config import E1Config
from e1min.model import E1ForMaskedLM


def random_model(config: E1Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> E1ForMaskedLM:
    """An E1ForMaskedLM with seeded random weights (norm weights perturbed away from 1), eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model = E1ForMaskedLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                bound = 1.0 / p.shape[1] ** 0.5
                if "embed" in name:
                    bound = 1.0
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.to(dtype).eval()


def write_random_checkpoint(
    directory: str | os.PathLike,
    config: E1Config,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> E1ForMaskedLM:
    """Write config.json + model.safetensors (sharded when ``max_shard_bytes``) and return the model."""
    from e1min.hub import save_model

    model = random_model(config, seed, dtype)
    save_model(model, directory, max_shard_bytes=max_shard_bytes)
    return model
