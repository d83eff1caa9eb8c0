"""LoRA adapters on disk in Hugging Face PEFT's layout, without importing peft.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``).
Tensor names are ``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``.lora_B.weight``
([out, r]); with ``train_mlm_head`` the head is saved like PEFT's ``modules_to_save``:
``base_model.model.mlm_head.<param>`` (e.g. ``mlm_head.0.weight``), and the config says
``"modules_to_save": ["mlm_head"]``.

Loading accepts our files and PEFT's, including keys that still carry an adapter name
(``...q_proj.lora_A.default.weight``, ``mlm_head.modules_to_save.default.0.weight``), and is strict where
PEFT is lenient: a missing prefix, missing or unexpected keys, rank/alpha/target/shape mismatches and
features e1min does not implement are ``AdapterError``s, never a silently zero adapter.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from e1min.errors import E1minError
from e1min.io import atomic_save_safetensors, atomic_write_json, read_json_object
from e1min.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    LoRAError,
    apply_lora,
    find_targets,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    lora_state_shapes,
)
from e1min.weights import CheckpointError, resolve_directory

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_HEAD_KEY = re.compile(r"^mlm_head\.(?:modules_to_save\.(?P<adapter>[^.]+)\.)?(?P<param>.+)$")


class AdapterError(E1minError, ValueError):
    """An adapter directory that cannot be written, read, or does not fit the model."""


# ----------------------------------------------------------------------------------------------- save


def adapter_config_dict(config: LoRAConfig, base_model_name_or_path: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT's ``LoraConfig`` reads for this adapter."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": ["mlm_head"] if config.train_mlm_head else None,
        # PEFT matches ``.*.layers\.(\d+)\.*`` on the module path (``model.layers.3.``) for these.
        "layers_to_transform": None if config.layers is None else list(config.layers),
        "layers_pattern": None if config.layers is None else "layers",
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_adapter`` writes, under their PEFT names."""
    mods = lora_modules(model)
    if not mods:
        raise AdapterError("the model has no LoRA layers: nothing to save (call apply_lora first)")
    tensors = {f"{PREFIX}{k}.weight": v for k, v in lora_state_dict(model).items()}
    config = getattr(model, "lora_config", None)
    if config is not None and config.train_mlm_head:
        for k, v in model.mlm_head.state_dict().items():
            tensors[f"{PREFIX}mlm_head.{k}"] = v.detach()
    return tensors


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None, revision: str | None = None
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (each atomically) and return the directory.

    ``base_model_name_or_path`` / ``revision`` default to what ``load_model`` recorded on the model.
    """
    config = getattr(model, "lora_config", None)
    tensors = adapter_tensors(model)
    if config is None:
        raise AdapterError("the model has LoRA layers but no lora_config; apply LoRA with e1min.apply_lora")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None)
    if revision is None:
        revision = getattr(model, "revision", None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first: a directory with a config always has the weights that go with it.
    atomic_save_safetensors(directory / ADAPTER_WEIGHTS_NAME, tensors, {"format": "pt"})
    atomic_write_json(directory / ADAPTER_CONFIG_NAME, adapter_config_dict(config, base_model_name_or_path, revision))
    return directory


# ----------------------------------------------------------------------------------------------- load


def _resolve(directory: str | os.PathLike) -> Path:
    try:
        return resolve_directory(directory, None, [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME], what="adapter")
    except CheckpointError as e:
        raise AdapterError(f"{e} (expected {ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME})") from None


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    """Parse and check ``adapter_config.json``; every PEFT feature e1min does not implement is an error."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    raw = read_json_object(path, AdapterError)
    problems = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type is {raw.get('peft_type')!r}, expected 'LORA'")
    # PEFT silently falls back to r=8 / lora_alpha=8 when these are absent; we refuse to guess.
    for key in ("r", "lora_alpha", "target_modules"):
        if raw.get(key) is None:
            problems.append(f"{key} is missing")
    r = raw.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        problems.append(f"r must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        problems.append(f"lora_alpha must be a number, got {alpha!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        problems.append(f"target_modules is the regex {targets!r}; e1min implements only a list of module names")
    elif targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        problems.append(f"target_modules must be a list of strings, got {targets!r}")
    unsupported = {
        "use_dora": (False, None),
        "fan_in_fan_out": (False, None),
        "lora_bias": (False, None),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        "layer_replication": (None, []),
        "exclude_modules": (None, [], ""),
        "megatron_config": (None, {}),
        "use_qalora": (False, None),
        "alora_invocation_tokens": (None,),
        "trainable_token_indices": (None,),
        "target_parameters": (None, []),
    }
    for key, ok in unsupported.items():
        if key in raw and not any(raw[key] == v and type(raw[key]) is type(v) for v in ok):
            what = {"use_dora": "DoRA", "lora_bias": "LoRA biases"}.get(key, key)
            problems.append(f"{key}={raw[key]!r}: {what} is not implemented by e1min")
    init = raw.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in ("gaussian", "eva")):
        # PiSSA / OLoRA / CorDA / LoftQ rewrite the base weights at init: such an adapter is wrong on the plain base.
        problems.append(f"init_lora_weights={init!r} modifies the base weights; convert the adapter to plain LoRA first")
    if raw.get("bias", "none") != "none":
        problems.append(f"bias={raw['bias']!r}: trained biases are not implemented by e1min (only 'none')")
    mts = raw.get("modules_to_save")
    if mts not in (None, [], ["mlm_head"]):
        problems.append(f"modules_to_save={mts!r}: e1min can only save/restore ['mlm_head']")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        problems.append(f"layers_to_transform must be null, an integer or a list of integers, got {layers!r}")
    pattern = raw.get("layers_pattern")
    if pattern not in (None, "layers", ["layers"]):
        problems.append(f"layers_pattern={pattern!r}: E1's decoder layers are 'model.layers.<i>'; only 'layers' is supported")
    dropout = raw.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
    if problems:
        raise AdapterError(f"{path}: " + "; ".join(problems))
    return LoRAConfig(
        r=r,
        alpha=alpha,
        dropout=float(dropout),
        target_modules=tuple(targets or DEFAULT_TARGETS),
        layers=None if layers is None else tuple(sorted(set(layers))),
        use_rslora=bool(raw.get("use_rslora", False)),
        train_mlm_head=mts == ["mlm_head"],
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        bin_path = path.with_name("adapter_model.bin")
        hint = f" ({bin_path.name} exists: re-save it as safetensors; pickle files are not loaded)" if bin_path.exists() else ""
        raise AdapterError(f"{path}: not found{hint}")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise AdapterError(f"{path}: unreadable or truncated safetensors file ({e})") from None


def _normalize_keys(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """PEFT names -> ``<module path>.lora_A`` / ``.lora_B`` / ``mlm_head.<param>``; errors for everything else."""
    out: dict[str, torch.Tensor] = {}
    problems, no_prefix, dora, bias, other, adapters = [], [], [], [], [], set()
    not_float: list[str] = []
    non_finite: list[str] = []
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            no_prefix.append(key)
            continue
        rest = key[len(PREFIX) :]
        if "lora_magnitude_vector" in rest:
            dora.append(key)
            continue
        if "lora_embedding_" in rest:
            other.append(key)
            continue
        m = _LORA_KEY.match(rest)
        if m:
            if m.group("adapter"):
                adapters.add(m.group("adapter"))
            if m.group("param") == "bias":
                bias.append(key)
                continue
            new = f"{m.group('module')}.lora_{m.group('ab')}"
        else:
            h = _HEAD_KEY.match(rest)
            if not h or h.group("param").startswith("original_module."):
                other.append(key)
                continue
            if h.group("adapter"):
                adapters.add(h.group("adapter"))
            new = f"mlm_head.{h.group('param')}"
        if new in out:
            problems.append(f"{new} appears twice")
        if not t.is_floating_point():
            not_float.append(f"{key} ({str(t.dtype).removeprefix('torch.')})")
        elif not bool(torch.isfinite(t).all()):  # adapters are small: an exact check costs nothing
            non_finite.append(f"{key} ({_count_non_finite(t)})")
        out[new] = t
    if not_float:
        problems.append(f"non-floating dtype in tensor(s) {_few(not_float)}")
    if non_finite:
        problems.append(f"non-finite values (NaN/inf) in tensor(s) {_few(non_finite)}")
    if no_prefix:
        problems.append(f"keys without the '{PREFIX}' prefix (not a PEFT adapter file?): {_few(no_prefix)}")
    if dora:
        problems.append(f"DoRA magnitude vectors are not implemented by e1min: {_few(dora)}")
    if bias:
        problems.append(f"LoRA biases (lora_bias=True) are not implemented by e1min: {_few(bias)}")
    if other:
        problems.append(f"unexpected keys: {_few(other)}")
    if len(adapters) > 1:
        problems.append(f"keys of several adapters ({sorted(adapters)}) in one file")
    if problems:
        raise AdapterError(f"{source}: " + " | ".join(problems))
    return out


def _count_non_finite(t: torch.Tensor) -> str:
    """``3 NaN, 0 inf of 256``."""
    n_nan = int(torch.isnan(t).sum())
    return f"{n_nan} NaN, {int((~torch.isfinite(t)).sum()) - n_nan} inf of {t.numel()}"


def _few(keys: list[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter (ours or PEFT's) into ``model`` and return it.

    A model without LoRA gets ``apply_lora`` with the saved config first; a model that already has LoRA
    must match the saved rank, alpha, rslora, targets and layers. Every check runs before the model is
    touched, so a failed load leaves the model as it was.
    """
    directory = _resolve(directory)
    config = read_adapter_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    state = _normalize_keys(_read_tensors(weights_path), weights_path)

    existing = lora_modules(model)
    if existing:
        have: LoRAConfig | None = getattr(model, "lora_config", None)
        if have is None:
            raise AdapterError("the model has LoRA layers but no lora_config; load the adapter into a fresh base model")
        if any(m.merged for m in existing.values()):
            raise AdapterError("the model's LoRA layers are merged; call unmerge_lora(model) before loading an adapter")
        mismatch = []
        for field, a, b in (
            ("r", have.r, config.r),
            ("lora_alpha", have.alpha, config.alpha),
            ("use_rslora", have.use_rslora, config.use_rslora),
            ("target_modules", sorted(have.target_modules), sorted(config.target_modules)),
            ("layers_to_transform", have.layers, config.layers),
        ):
            if a != b:
                mismatch.append(f"{field}: model has {a!r}, adapter has {b!r}")
        if mismatch:
            raise AdapterError(f"{directory}: adapter does not match the model's LoRA layers: " + "; ".join(mismatch))
        targets: dict[str, nn.Module] = dict(existing)
    else:
        try:
            targets = find_targets(model, config.target_modules, config.layers)
        except LoRAError as e:
            raise AdapterError(f"{directory}: {e}") from None

    expected: dict[str, tuple[int, ...]] = dict(lora_state_shapes(targets, config.r))
    if config.train_mlm_head:
        expected.update({f"mlm_head.{k}": tuple(v.shape) for k, v in model.mlm_head.state_dict().items()})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {list(state[k].shape)} in file, expected {list(expected[k])}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if wrong:
        problems.append(
            f"wrong shapes (adapter_config.json says r={config.r}): " + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else "")
        )
    if problems:
        raise AdapterError(f"{weights_path}: adapter does not fit the model: " + " | ".join(problems))

    if not existing:
        apply_lora(
            model,
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            target_modules=config.target_modules,
            layers=config.layers,
            use_rslora=config.use_rslora,
            train_mlm_head=config.train_mlm_head,
        )
    load_lora_state_dict(model, {k: t for k, t in state.items() if not k.startswith("mlm_head.")})
    head = dict(model.mlm_head.named_parameters()) if config.train_mlm_head else {}
    head_buffers = dict(model.mlm_head.named_buffers()) if config.train_mlm_head else {}
    with torch.no_grad():
        for key, t in state.items():
            if key.startswith("mlm_head."):
                k = key[len("mlm_head.") :]
                dst = head.get(k, head_buffers.get(k))
                dst.copy_(t.to(device=dst.device, dtype=dst.dtype))
    return model
