"""Run outputs on disk: a fold's best/last state (adapter + heads + metadata), resume state, no pickles.

A state directory is written under a temporary name and swapped in by rename, and ``checkpoint.json``
is written last inside it, so a crash never leaves a half-written ``best/`` or ``last/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from e1min import __version__
from e1min.io import atomic_save_safetensors, atomic_write_json

FORMAT_VERSION = 1
HEADS_FILE = "heads.safetensors"
META_FILE = "checkpoint.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class RunCheckpointError(ValueError):
    """A run checkpoint that is missing, incomplete, or from an incompatible e1min format."""


def heads_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Ion-head tensors keyed ``{ION}.{param}`` (e.g. ``ZN.proj.weight``)."""
    return {k: v.detach() for k, v in model.heads.state_dict().items()}


def save_state(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write adapter + heads (+ optimizer state when ``optimizer``) + checkpoint.json, atomically.

    No RNG state is stored: the trainer seeds dropout from (seed, fold, epoch, rank) at every epoch,
    so a resumed run draws the same numbers without it.
    """
    from e1min.adapters import save_adapter

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        backbone = model.backbone
        save_adapter(backbone, tmp, base_model_name_or_path=meta.get("base_model"), revision=meta.get("base_revision"))
        atomic_save_safetensors(tmp / HEADS_FILE, heads_state(model), {"format": "pt"})
        if optimizer is not None:
            _save_optimizer(tmp / OPTIMIZER_FILE, model, optimizer)
        atomic_write_json(tmp / META_FILE, {"format_version": FORMAT_VERSION, "e1min_version": __version__, **meta})
        _swap_in(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, directory: Path) -> None:
    old = directory.with_name(directory.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def state_dir(directory: str | os.PathLike) -> Path | None:
    """The usable state directory: ``directory``, or ``directory.old`` if a crash hit mid-swap; None if neither."""
    directory = Path(directory)
    for d in (directory, directory.with_name(directory.name + ".old")):
        if (d / META_FILE).exists():
            return d
    return None


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """checkpoint.json of a state directory, with clear errors for missing/incompatible files."""
    d = state_dir(directory)
    if d is None:
        raise RunCheckpointError(f"{directory}: no {META_FILE} (not a completed e1min checkpoint)")
    try:
        meta = json.loads((d / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise RunCheckpointError(f"{d / META_FILE}: not valid JSON ({e})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise RunCheckpointError(f"{d / META_FILE}: checkpoint format version {version!r}; this e1min reads version {FORMAT_VERSION}")
    meta["_dir"] = str(d)
    return meta


def load_heads(directory: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load ``heads.safetensors`` strictly into ``model.heads``."""
    path = Path(directory) / HEADS_FILE
    if not path.exists():
        raise RunCheckpointError(f"{path}: missing ion heads")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise RunCheckpointError(f"{path}: unreadable safetensors ({e})") from None
    expected = model.heads.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise RunCheckpointError(f"{path}: heads do not match the model (missing {missing}, unexpected {unexpected}, wrong shape {sorted(wrong)})")
    model.heads.load_state_dict(state)


def load_state(directory: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load adapter + heads (+ optimizer state) from a state directory; returns its metadata."""
    from e1min.adapters import load_adapter

    meta = read_meta(directory)
    d = Path(meta["_dir"])
    load_adapter(model.backbone, d)
    load_heads(d, model)
    if optimizer is not None:
        _load_optimizer(d / OPTIMIZER_FILE, model, optimizer)
    return meta


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.nn.Parameter]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for group in optimizer.param_groups for p in group["params"]]


def _save_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _param_names(model, optimizer):
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"{name}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    atomic_save_safetensors(path, tensors, {"format": "pt", "param_groups": json.dumps(groups)})


def _load_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from safetensors import safe_open

    if not path.exists():
        raise RunCheckpointError(f"{path}: missing optimizer state (cannot resume)")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        groups = json.loads(fh.metadata()["param_groups"])
    for g, saved in zip(optimizer.param_groups, groups):
        g.update(saved)
    for name, p in _param_names(model, optimizer):
        # AdamW keeps "step" on the CPU unless capturable.
        state = {
            key.split("::", 1)[1]: (v if key.endswith("::step") else v.to(p.device))
            for key, v in tensors.items()
            if key.split("::", 1)[0] == name
        }
        if state:
            optimizer.state[p] = state
