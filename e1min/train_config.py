"""The training recipe schema: YAML -> validated nested dict, with ``--set section.key=value`` overrides.

Keys follow the original pipeline's config so an existing ``e1_binding.yaml`` runs unchanged. Keys that
only made sense there are accepted and ignored with a one-line note. Every problem (unknown key,
wrong type, missing file) is collected and reported in one error.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml


class TrainConfigError(ValueError):
    """A training config that cannot run; the message lists every problem."""


_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]

# section -> key -> (accepted types, default). A default of REQUIRED must be given by the user.
REQUIRED = object()
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...] | type, Any]]] = {
    "general": {
        "seed": (int, 42),
        "run_name": (_OPT_STR, None),
        "log_every": (int, 10),
        "device": (_OPT_STR, None),  # cuda / cpu / None = cuda when available
        "dist_timeout_seconds": (_NUM, 300),
        "check_replicas_every": (int, 0),  # debug: compare parameter checksums across ranks every N steps
    },
    "data": {
        "fasta_path": (str, REQUIRED),
        "fasta_pattern": (str, "{ION}_train.fasta"),
        "msa_dir": (_OPT_STR, None),
        "max_query_length": (int, 1022),
        "max_example_tokens": (int, 16384),
    },
    "model": {
        "checkpoint": (str, REQUIRED),
        "revision": (_OPT_STR, None),
        "dropout": (_NUM, 0.3),  # ion-head dropout
        "dtype": (str, "float32"),  # frozen base weights: float32 or bfloat16
        "gradient_checkpointing": (bool, False),
    },
    "lora": {
        "r": (int, 16),
        "alpha": (_NUM, 32),
        "lora_dropout": (_NUM, 0.0),
        "target_modules": (list, _LORA_TARGETS),
        "train_mlm_head": (bool, False),
        "use_rslora": (bool, False),
        "layers": ((list, type(None)), None),
    },
    "training": {
        "ions": (list, REQUIRED),
        "epochs": (int, 40),
        "warmup_epochs": (_NUM, 5),
        "batch_size": (int, 2),
        "max_tokens_per_batch": (_OPT_INT, None),  # token-budget batching when set
        "accum_steps": (int, 1),
        "learning_rate": (_NUM, 1e-4),
        "min_lr": (_NUM, 1e-6),
        "weight_decay": (_NUM, 0.01),
        "max_grad_norm": ((int, float, type(None)), 1.0),
        "mlm_weight": (_NUM, 1.0),
        "mlm_probability": (_NUM, 0.15),
        "mask_context": (bool, False),
        "label_smoothing": (_NUM, 0.0),
        "focal_gamma": (_NUM, 0.0),
        "pos_weight_mode": (str, "sqrt"),
        "num_folds": (int, 5),
        "folds": ((list, type(None)), None),  # 1-based subset of folds to run
        "early_stop_patience": (int, 5),
        "min_delta": (_NUM, 0.0),
        "selection_metric": (str, "auprc"),
        "threshold_method": (str, "youden"),
        "output_dir": (str, "results/run"),
        "bf16": (bool, False),  # bf16 autocast on CUDA (and on CPUs with native bf16; ignored with a note otherwise)
        "msa_sampling": (dict, {}),
        "validation_msa_sampling": (dict, {}),
        "eval_max_tokens_per_batch": (int, 16384),
    },
}
# Keys of the original pipeline that have no meaning here.
IGNORED = {
    "training.ddp_find_unused_parameters": "e1min's data parallelism has no unused-parameter machinery",
    "training.compile_flex_attention": "e1min uses scaled_dot_product_attention",
    "general.gpu_id": "devices come from torchrun's LOCAL_RANK",
    "training.num_workers": "batches are built in-process",
    "training.use_flash_attention": "SDPA picks the fastest kernel itself",
}
CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16"),
    ("training", "pos_weight_mode"): ("none", "linear", "sqrt"),
    ("training", "selection_metric"): ("auprc", "hra"),
    ("training", "threshold_method"): ("youden", "f1", "mcc"),
}


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2:
            raise TrainConfigError(f"--set {item!r}: expected section.key=value")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def validate(raw: dict, source: str = "config", check_files: bool = True) -> tuple[dict, list[str]]:
    """Fill defaults and check types/choices/files. Returns (config, notes about ignored keys)."""
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{source}: expected a mapping of sections")
    problems, notes = [], []
    cfg: dict[str, dict[str, Any]] = {}
    for section, keys in raw.items():
        if section not in SCHEMA:
            problems.append(f"unknown section '{section}'")
        elif not isinstance(keys, dict):
            problems.append(f"section '{section}' must be a mapping")
    for section, spec in SCHEMA.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            continue
        out = {}
        for key, value in given.items():
            dotted = f"{section}.{key}"
            if dotted in IGNORED:
                notes.append(f"note: {dotted} is ignored ({IGNORED[dotted]})")
            elif key not in spec:
                problems.append(f"unknown key '{dotted}'")
        for key, (types, default) in spec.items():
            dotted = f"{section}.{key}"
            if key not in given:
                if default is REQUIRED:
                    problems.append(f"missing required key '{dotted}'")
                    continue
                out[key] = copy.deepcopy(default)
                continue
            value = given[key]
            types_t = types if isinstance(types, tuple) else (types,)
            if isinstance(value, bool) and bool not in types_t:
                problems.append(f"'{dotted}' must be {_names(types_t)}, got {value!r}")
            elif isinstance(value, int) and float in types_t and int not in types_t:
                out[key] = float(value)
            elif not isinstance(value, types_t):
                problems.append(f"'{dotted}' must be {_names(types_t)}, got {type(value).__name__} {value!r}")
            else:
                out[key] = value
            choices = CHOICES.get((section, key))
            if choices and key in out and out[key] not in choices:
                problems.append(f"'{dotted}' must be one of {', '.join(choices)}, got {out[key]!r}")
        cfg[section] = out
    if not problems:
        problems += _semantic_checks(cfg, check_files)
    if problems:
        raise TrainConfigError(f"{source}: " + "; ".join(problems))
    return cfg, notes


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _semantic_checks(cfg: dict, check_files: bool) -> list[str]:
    p = []
    t = cfg["training"]
    if not t["ions"] or not all(isinstance(i, str) and i for i in t["ions"]):
        p.append("'training.ions' must be a non-empty list of ion names")
    for key in ("epochs", "batch_size", "accum_steps"):
        if t[key] < 1:
            p.append(f"'training.{key}' must be >= 1")
    if t["num_folds"] < 2:
        p.append("'training.num_folds' must be >= 2 (K-fold cross-validation needs a held-out fold)")
    if not 0 <= t["mlm_probability"] < 1:
        p.append("'training.mlm_probability' must be in [0, 1)")
    if t["folds"] is not None and not all(isinstance(f, int) and 1 <= f <= t["num_folds"] for f in t["folds"]):
        p.append(f"'training.folds' must list folds between 1 and {t['num_folds']}")
    unknown_targets = set(cfg["lora"]["target_modules"]) - set(_LORA_TARGETS)
    if unknown_targets:
        p.append(f"'lora.target_modules' has unknown module(s) {sorted(unknown_targets)}; known: {_LORA_TARGETS}")
    if check_files:
        fasta_path = cfg["data"]["fasta_path"]
        if "{ION}" not in fasta_path and not Path(fasta_path).is_dir():
            p.append(f"'data.fasta_path' {fasta_path}: no such directory")
        msa_dir = cfg["data"]["msa_dir"]
        if msa_dir and "{ION}" not in msa_dir and not Path(msa_dir).is_dir():
            p.append(f"'data.msa_dir' {msa_dir}: no such directory")
        ckpt = cfg["model"]["checkpoint"]
        if (ckpt.startswith((".", "/", "~")) or ckpt.count("/") != 1) and not Path(ckpt).expanduser().is_dir():
            p.append(f"'model.checkpoint' {ckpt}: no such directory (and not a Hub repo id)")
    return p


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, check_files: bool = True) -> tuple[dict, list[str]]:
    """Read a YAML recipe, apply overrides, validate. Returns (config, notes)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({e})") from None
    return validate(apply_overrides(raw, overrides or []), source=str(path), check_files=check_files)


def dump_config(cfg: dict) -> str:
    """The resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
    return yaml.safe_dump(cfg, sort_keys=False)
