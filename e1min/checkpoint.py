"""Run outputs on disk: a fold's best/last state (adapter + heads + metadata), resume state, no pickles.

A state directory is written under a temporary name and swapped in by rename, and ``checkpoint.json``
is written last inside it, so a crash never leaves a half-written ``best/`` or ``last/``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from e1min import __version__
from e1min.config import ConfigError, E1Config, show
from e1min.errors import E1minError
from e1min.io import atomic_save_safetensors, atomic_write_json, make_temp_dir

FORMAT_VERSION = 1
HEADS_FILE = "heads.safetensors"
META_FILE = "checkpoint.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class RunCheckpointError(E1minError, ValueError):
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
    tmp = make_temp_dir(directory.parent, prefix=f".{directory.name}.")
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
    """checkpoint.json of a state directory, checked by ``validate_meta``; clear errors for missing/bad files."""
    return read_state_meta(directory)[1]


def read_state_meta(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(the usable state directory (see ``state_dir``), its checked checkpoint.json)."""
    d = state_dir(directory)
    if d is None:
        raise RunCheckpointError(f"{directory}: no {META_FILE} (not a completed e1min checkpoint)")
    path = d / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunCheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise RunCheckpointError(f"{path}: unreadable ({e.strerror or e})") from None
    validate_meta(meta, path)
    check_adapter_agrees(d, meta)
    return d, meta


# checkpoint.json's "lora" key -> (adapter_config.json's key, LoRAConfig attribute)
_LORA_KEYS = {
    "r": ("r", "r"),
    "alpha": ("lora_alpha", "alpha"),
    "lora_dropout": ("lora_dropout", "dropout"),
    "target_modules": ("target_modules", "target_modules"),
    "layers": ("layers_to_transform", "layers"),
    "use_rslora": ("use_rslora", "use_rslora"),
}


def check_adapter_agrees(directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    """RunCheckpointError naming both files and values where adapter_config.json and checkpoint.json's ``lora`` disagree.

    The adapter file is what loads; a disagreement means one of the two was edited or copied from another run.
    """
    from e1min.adapters import ADAPTER_CONFIG_NAME, read_adapter_config

    d = Path(directory)
    if not (d / ADAPTER_CONFIG_NAME).exists():
        return  # load_adapter reports the missing file
    adapter = read_adapter_config(d)
    lora = meta.get("lora") or {}
    diffs = []
    for key, (adapter_key, attr) in _LORA_KEYS.items():
        if key not in lora:
            continue
        mine, theirs = lora[key], getattr(adapter, attr)
        if key in ("target_modules", "layers") and mine is not None and theirs is not None:
            mine, theirs = sorted(mine), sorted(theirs)
        elif key in ("alpha", "lora_dropout") and _number(mine):
            mine, theirs = float(mine), float(theirs)
        if mine != theirs:
            diffs.append(f"{adapter_key} {theirs!r} in {ADAPTER_CONFIG_NAME}, lora.{key} {mine!r} in {META_FILE}")
    if diffs:
        raise RunCheckpointError(f"{d}: {ADAPTER_CONFIG_NAME} and {META_FILE} disagree: " + "; ".join(diffs))


def _int(lo: int | None = None) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)), "an integer" + (
        f" >= {lo}" if lo is not None else ""
    )


def _or_null(check: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or check[0](v)), check[1] + " or null"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_OBJECT = (lambda v: isinstance(v, dict)), "an object"
_STR = (lambda v: isinstance(v, str) and bool(v)), "a non-empty string"
_IONS = (
    lambda v: isinstance(v, list) and bool(v) and all(isinstance(i, str) and i and "." not in i for i in v) and len(set(v)) == len(v),
    "a non-empty list of distinct ion names (strings without '.')",
)

# checkpoint.json: field -> (required, (check, description)). Optional fields may be absent (older checkpoints).
META_FIELDS: dict[str, tuple[bool, tuple[Callable[[Any], bool], str]]] = {
    "fold": (True, _int(1)),
    "epoch": (True, _int(0)),
    "ions": (True, _IONS),
    "seed": (False, _int()),
    "base_model": (True, _STR),
    "base_revision": (False, _or_null(_STR)),
    "base_config": (True, _OBJECT),
    "lora": (True, _OBJECT),
    "head_dropout": (True, ((lambda v: _number(v) and 0 <= v < 1), "a number in [0, 1)")),
    "max_query_length": (False, _or_null(_int(2))),
    "max_example_tokens": (False, _or_null(_int(1))),
    "validation_msa_sampling": (False, _or_null(_OBJECT)),
    "metrics": (True, _OBJECT),
    "trainer_state": (False, _OBJECT),
    "runtime": (False, _OBJECT),
    "e1min_version": (False, ((lambda v: isinstance(v, str)), "a string")),
}

# trainer_state (the trainer's FoldState): field -> (check, description); all required for a resume.
TRAINER_STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epoch": _int(0),
    "step": _int(0),
    # null: -inf (nothing selected yet) written by strict JSON; -Infinity from a non-strict writer means the same.
    "best_metric": ((lambda v: v is None or _number(v) or v == -math.inf), "a number or null"),
    "best_epoch": _int(-1),
    "bad_epochs": _int(0),
    "history": ((lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v)), "a list of objects"),
}
# Written only by a run a signal stopped mid-epoch (absent: the state is at an epoch boundary).
OPTIONAL_TRAINER_STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "window": _int(0),
    "partial": (
        lambda v: (
            v is None
            or (
                isinstance(v, dict)
                and all(k in v for k in ("stats", "tokens", "seconds", "world_size", "accum_steps"))
                and isinstance(v["stats"], list)
                and all(isinstance(r, list) and len(r) == 4 and all(_number(x) for x in r) for r in v["stats"])
                and _int(0)[0](v["tokens"])
                and _number(v["seconds"])
                and _int(1)[0](v["world_size"])
                and _int(1)[0](v["accum_steps"])
            )
        ),
        "null or an object with stats (rows of 4 numbers), tokens, seconds, world_size, accum_steps",
    ),
}


def validate_meta(meta: Any, path: str | os.PathLike) -> None:
    """RunCheckpointError naming ``path`` and the dotted field for the first checkpoint.json field of a wrong type."""
    if not isinstance(meta, dict):
        raise RunCheckpointError(f"{path}: expected a JSON object, got {show(meta)}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        raise RunCheckpointError(f"{path}: checkpoint format version {version!r}; this e1min reads version {FORMAT_VERSION}")
    for name, (required, (ok, what)) in META_FIELDS.items():
        if name not in meta:
            if required:
                raise RunCheckpointError(f"{path}: missing field {name!r} ({what})")
            continue
        if not ok(meta[name]):
            raise RunCheckpointError(f"{path}: {name!r} must be {what}, got {show(meta[name])}")
    try:
        E1Config.from_dict(meta["base_config"], source="'base_config'")
    except ConfigError as e:
        raise RunCheckpointError(f"{path}: {e}") from None
    if meta.get("validation_msa_sampling") is not None:
        from e1min.data.msa import VALIDATION_SAMPLING, MSASampling

        try:
            MSASampling.from_dict(meta["validation_msa_sampling"], base=VALIDATION_SAMPLING)
        except (E1minError, TypeError, ValueError) as e:
            raise RunCheckpointError(f"{path}: 'validation_msa_sampling': {e}") from None
    if "trainer_state" in meta:
        validate_trainer_state(meta["trainer_state"], path)


def validate_trainer_state(state: Any, path: str | os.PathLike) -> None:
    """RunCheckpointError naming ``path`` and ``trainer_state.<field>`` unless ``state`` can resume a fold."""
    if not isinstance(state, dict):
        raise RunCheckpointError(f"{path}: 'trainer_state' must be an object, got {show(state)}")
    for name, (ok, what) in TRAINER_STATE_FIELDS.items():
        if name not in state:
            raise RunCheckpointError(f"{path}: missing field 'trainer_state.{name}' ({what}); cannot resume")
        if not ok(state[name]):
            raise RunCheckpointError(f"{path}: 'trainer_state.{name}' must be {what}, got {show(state[name])}")
    for name, (ok, what) in OPTIONAL_TRAINER_STATE_FIELDS.items():
        if name in state and not ok(state[name]):
            raise RunCheckpointError(f"{path}: 'trainer_state.{name}' must be {what}, got {show(state[name])}")
    if state.get("window") and not state.get("partial"):
        raise RunCheckpointError(f"{path}: 'trainer_state.window' is {state['window']} but 'trainer_state.partial' is missing")
    unknown = set(state) - set(TRAINER_STATE_FIELDS) - set(OPTIONAL_TRAINER_STATE_FIELDS)
    unknown = sorted(unknown - _fold_state_fields()) if unknown else []
    if unknown:
        raise RunCheckpointError(
            f"{path}: unknown field(s) {', '.join('trainer_state.' + k for k in unknown)} (written by another e1min version?)"
        )


def _fold_state_fields() -> set[str]:
    """Field names of the trainer's FoldState (fields added there after this check was written are accepted)."""
    import dataclasses

    try:
        from e1min.run import FoldState
    except ImportError:  # pragma: no cover
        return set()
    return {f.name for f in dataclasses.fields(FoldState)}


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise RunCheckpointError(f"{path}: missing {what}")
    try:
        return load_file(str(path))
    except Exception as e:
        raise RunCheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None


def _non_finite(t: torch.Tensor) -> str | None:
    """None if every value is finite, else ``3 NaN, 0 inf of 64``."""
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    n_nan = int(torch.isnan(t).sum())
    return f"{n_nan} NaN, {int(bad.sum()) - n_nan} inf of {t.numel()}"


def read_heads(directory: str | os.PathLike, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``heads.safetensors``, checked against ``model.heads`` (names, shapes, floating dtype, finite values)."""
    path = Path(directory) / HEADS_FILE
    state = _read_safetensors(path, "ion heads")
    expected = model.heads.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise RunCheckpointError(
            f"{path}: heads do not match the model (missing {missing}, unexpected {unexpected}, wrong shape {sorted(wrong)})"
        )
    for k in sorted(state):
        t = state[k]
        if not t.is_floating_point():
            raise RunCheckpointError(f"{path}: tensor {k!r} has non-floating dtype {str(t.dtype).removeprefix('torch.')}")
        bad = _non_finite(t)
        if bad:
            raise RunCheckpointError(f"{path}: tensor {k!r} has non-finite values ({bad})")
    return state


def load_heads(directory: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load ``heads.safetensors`` strictly into ``model.heads`` (checked by ``read_heads`` first)."""
    model.heads.load_state_dict(read_heads(directory, model))


def check_resume_state(directory: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Metadata of a ``last/`` state after checking everything a resume needs, without touching model or optimizer.

    checkpoint.json with a valid ``trainer_state``, heads, and ``optimizer.safetensors`` against the
    optimizer's parameters (names, shapes, finite values, param_groups). Adapter files are checked by
    ``load_adapter``, which also leaves the model untouched on error.
    """
    d, meta = read_state_meta(directory)
    if "trainer_state" not in meta:
        raise RunCheckpointError(f"{d / META_FILE}: missing field 'trainer_state' (not a resumable last/ state)")
    read_heads(d, model)
    _read_optimizer(d / OPTIMIZER_FILE, model, optimizer)
    return meta


def load_state(directory: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load adapter + heads (+ optimizer state) from a state directory; returns its metadata.

    With ``optimizer`` (a resume) the state must also hold a valid ``trainer_state`` and optimizer state;
    every file is checked before the model or optimizer is changed.
    """
    from e1min.adapters import load_adapter

    d, meta = read_state_meta(directory)
    opt_state = None
    if optimizer is not None:
        if "trainer_state" not in meta:
            raise RunCheckpointError(f"{d / META_FILE}: missing field 'trainer_state' (not a resumable last/ state)")
        opt_state = _read_optimizer(d / OPTIMIZER_FILE, model, optimizer)
    heads = read_heads(d, model)
    load_adapter(model.backbone, d)
    model.heads.load_state_dict(heads)
    if optimizer is not None:
        _apply_optimizer(optimizer, *opt_state)
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


_ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def _group_value_ok(saved: Any, current: Any) -> bool:
    """Whether a saved param_groups value can replace the optimizer's current one (same JSON type)."""
    if saved is None or current is None:
        return True
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return _number(saved)
    if isinstance(current, (tuple, list)):
        return isinstance(saved, list) and len(saved) == len(current) and all(_group_value_ok(s, c) for s, c in zip(saved, current))
    if isinstance(current, str):
        return isinstance(saved, str)
    return True  # tensors and other objects: not written by _save_optimizer as JSON; nothing to compare


def _read_optimizer(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[dict[str, Any]], dict[int, tuple[torch.nn.Parameter, dict[str, torch.Tensor]]]]:
    """Read and check ``optimizer.safetensors`` against ``optimizer``'s parameters; nothing is changed."""
    from safetensors import safe_open

    tensors = _read_safetensors(path, "optimizer state (cannot resume)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as e:  # pragma: no cover - load_file succeeded on the same file
        raise RunCheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    if "param_groups" not in metadata:
        raise RunCheckpointError(f"{path}: no 'param_groups' in the safetensors metadata (not an e1min optimizer state)")
    try:
        groups = json.loads(metadata["param_groups"])
    except json.JSONDecodeError as e:
        raise RunCheckpointError(f"{path}: metadata 'param_groups' is not valid JSON ({e})") from None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise RunCheckpointError(f"{path}: metadata 'param_groups' must be a list of objects, got {show(groups)}")
    if len(groups) != len(optimizer.param_groups):
        raise RunCheckpointError(
            f"{path}: metadata 'param_groups' has {len(groups)} group(s), the optimizer has {len(optimizer.param_groups)}"
        )
    for i, (saved, current) in enumerate(zip(groups, optimizer.param_groups)):
        if "params" in saved:
            raise RunCheckpointError(f"{path}: metadata 'param_groups[{i}].params' must not be saved")
        for key, value in saved.items():
            if key in current and not _group_value_ok(value, current[key]):
                raise RunCheckpointError(f"{path}: metadata 'param_groups[{i}].{key}' must be like {show(current[key])}, got {show(value)}")

    params = dict(_param_names(model, optimizer))
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sorted(tensors.items()):
        name, sep, field = key.partition("::")
        if not sep or name not in params:
            raise RunCheckpointError(
                f"{path}: tensor {key!r} does not name a parameter of the optimizer (a state of another model or LoRA config?)"
            )
        if adam and field not in _ADAM_KEYS:
            raise RunCheckpointError(f"{path}: tensor {key!r}: unknown optimizer state {field!r} (expected one of {sorted(_ADAM_KEYS)})")
        p = params[name]
        if field == "step":
            if t.numel() != 1:
                raise RunCheckpointError(f"{path}: tensor {key!r} must be a scalar step count, got shape {list(t.shape)}")
        elif tuple(t.shape) != tuple(p.shape):
            raise RunCheckpointError(f"{path}: tensor {key!r} has shape {list(t.shape)}, the parameter has {list(p.shape)}")
        if not t.is_floating_point() and field != "step":
            raise RunCheckpointError(f"{path}: tensor {key!r} has non-floating dtype {str(t.dtype).removeprefix('torch.')}")
        bad = _non_finite(t.float())
        if bad:
            raise RunCheckpointError(f"{path}: tensor {key!r} has non-finite values ({bad})")
        if field == "step" and float(t.reshape(())) < 0:
            raise RunCheckpointError(f"{path}: tensor {key!r} is a negative step count ({float(t.reshape(()))})")
        per_param.setdefault(name, {})[field] = t
    if adam:
        amsgrad = {id(p): bool(g.get("amsgrad")) for g in optimizer.param_groups for p in g["params"]}
        for name, state in per_param.items():
            need = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad[id(params[name])] else set())
            missing = sorted(need - set(state))
            if missing:
                raise RunCheckpointError(
                    f"{path}: incomplete state of parameter {name!r}: missing {', '.join(f'{name}::{k}' for k in missing)}"
                )
    return groups, {id(params[n]): (params[n], s) for n, s in per_param.items()}


def _apply_optimizer(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], states: dict[int, tuple[torch.nn.Parameter, dict[str, torch.Tensor]]]
) -> None:
    for g, saved in zip(optimizer.param_groups, groups):
        for key, value in saved.items():
            # JSON turned tuples (AdamW's betas) into lists; keep the optimizer's own type.
            g[key] = tuple(value) if isinstance(g.get(key), tuple) and isinstance(value, list) else value
    for p, state in states.values():
        # AdamW keeps "step" on the CPU (float32) unless capturable; moments take the parameter's device and dtype.
        optimizer.state[p] = {
            key: (v.reshape(()).float() if key == "step" else v.to(device=p.device, dtype=p.dtype)) for key, v in state.items()
        }


def _load_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Check and load ``optimizer.safetensors`` into ``optimizer``."""
    _apply_optimizer(optimizer, *_read_optimizer(path, model, optimizer))
