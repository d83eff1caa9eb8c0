"""Compatibility module: checkpoint resolution and loading live in ``e1min.weights``.

``load_model`` here additionally takes ``adapter=`` (a LoRA adapter directory applied on top); it is
the one ``e1min.load_model`` exports. ``e1min.weights`` itself never imports ``e1min.adapters``.
"""

from __future__ import annotations

import os

import torch

from e1min.adapters import load_adapter
from e1min.model import E1ForMaskedLM
from e1min.weights import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_state_dict,
    normalize_key,
    resolve_checkpoint,
    resolve_directory,
    save_model,
    weight_files,
)
from e1min.weights import load_model as load_base_model

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "load_model",
    "load_state_dict",
    "normalize_key",
    "resolve_checkpoint",
    "resolve_directory",
    "save_model",
    "weight_files",
]


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    adapter: str | os.PathLike | None = None,
) -> E1ForMaskedLM:
    """``e1min.weights.load_model``, then ``load_adapter(model, adapter)`` when ``adapter`` is given."""
    model = load_base_model(name_or_path, dtype=dtype, device=device, revision=revision)
    if adapter is not None:
        load_adapter(model, adapter)
    return model
