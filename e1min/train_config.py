"""The training recipe schema: YAML -> validated nested dict, with ``--set section.key=value`` overrides.

Keys follow the original pipeline's config so an existing ``e1_binding.yaml`` runs unchanged. Keys that
only made sense there are accepted and ignored with a one-line note. Every problem (unknown or
duplicated key, wrong type, value out of its range, missing file) is collected and reported in one
error that names each dotted key; values echoed in messages are cut to 80 characters.
"""

from __future__ import annotations

import copy
import os
import re
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
        "device": (_OPT_STR, None),  # cpu / cuda / cuda:N / None = cuda when available
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
        "matmul_precision": (str, "highest"),  # torch.set_float32_matmul_precision: highest | high | medium
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
    ("model", "matmul_precision"): ("highest", "high", "medium"),
    ("training", "pos_weight_mode"): ("none", "linear", "sqrt"),
    ("training", "selection_metric"): ("auprc", "hra"),
    ("training", "threshold_method"): ("youden", "f1", "mcc"),
}


# Ranges of numeric keys: (low, high, low inclusive, high inclusive); None = unbounded.
RANGES: dict[tuple[str, str], tuple[float | None, float | None, bool, bool]] = {
    ("general", "seed"): (0, None, True, True),
    ("general", "log_every"): (1, None, True, True),
    ("general", "dist_timeout_seconds"): (0, None, False, True),
    ("general", "check_replicas_every"): (0, None, True, True),
    ("data", "max_query_length"): (2, None, True, True),
    ("data", "max_example_tokens"): (1, None, True, True),
    ("model", "dropout"): (0, 1, True, False),
    ("lora", "r"): (1, None, True, True),
    ("lora", "alpha"): (0, None, False, True),
    ("lora", "lora_dropout"): (0, 1, True, False),
    ("training", "epochs"): (1, None, True, True),
    ("training", "warmup_epochs"): (0, None, True, True),
    ("training", "batch_size"): (1, None, True, True),
    ("training", "max_tokens_per_batch"): (1, None, True, True),
    ("training", "accum_steps"): (1, None, True, True),
    ("training", "learning_rate"): (0, None, True, True),
    ("training", "min_lr"): (0, None, True, True),
    ("training", "weight_decay"): (0, None, True, True),
    ("training", "max_grad_norm"): (0, None, False, True),
    ("training", "mlm_weight"): (0, None, True, True),
    ("training", "mlm_probability"): (0, 1, True, False),
    ("training", "label_smoothing"): (0, 1, True, False),
    ("training", "focal_gamma"): (0, None, True, True),
    ("training", "num_folds"): (2, None, True, True),
    ("training", "early_stop_patience"): (1, None, True, True),
    ("training", "min_delta"): (0, None, True, True),
    ("training", "eval_max_tokens_per_batch"): (1, None, True, True),
}
# MSA sampling settings: key -> (type, low, high). E1 takes at most 512 sequences per example
# (511 context rows + the query), so more samples would fail mid-run in the tokenizer.
MSA_SAMPLING_KEYS: dict[str, tuple[type, float, float | None]] = {
    "max_num_samples": (int, 0, 511),
    "max_token_length": (int, 0, None),
    "neighbor_similarity_lower_bound": (float, 0.0, 1.0),
    "min_query_similarity": (float, 0.0, 1.0),
    "max_query_similarity": (float, 0.0, 1.0),
}


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages (a config value may be huge)."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML loading that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {short(key)} (lines {seen[key]} and {line})", key_node.start_mark
            )
        if isinstance(key, (str, int, float, bool)):
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
# YAML 1.1 (PyYAML) reads ``1e-4`` as a string; learning rates are written that way, so read it as a float.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """Safe YAML (no Python tags) that rejects duplicate keys; raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader


def _parse_value(text: str) -> Any:
    return load_yaml(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise TrainConfigError(f"--set {short(item)}: expected section.key=value")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"--set {short(item)}: {short(p)} is not a section")
        try:
            node[parts[-1]] = _parse_value(value)
        except yaml.YAMLError as e:
            raise TrainConfigError(f"--set {short(item)}: not a valid YAML value ({_yaml_reason(e)})") from None
    return raw


def validate(raw: dict, source: str = "config", check_files: bool = True) -> tuple[dict, list[str]]:
    """Fill defaults and check types/choices/files. Returns (config, notes about ignored keys)."""
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{source}: expected a mapping of sections")
    problems, notes = [], []
    cfg: dict[str, dict[str, Any]] = {}
    for section, keys in raw.items():
        if section not in SCHEMA:
            problems.append(f"unknown section {short(section)}")
        elif not isinstance(keys, dict) and keys is not None:
            problems.append(f"section '{section}' must be a mapping, got {type(keys).__name__}")
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
                problems.append(f"unknown key '{section}.{short(key)[1:-1] if isinstance(key, str) else short(key)}'")
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
                problems.append(f"'{dotted}' must be {_names(types_t)}, got {short(value)}")
            elif isinstance(value, int) and float in types_t and int not in types_t:
                out[key] = float(value)
            elif not isinstance(value, types_t):
                problems.append(f"'{dotted}' must be {_names(types_t)}, got {type(value).__name__} {short(value)}")
            else:
                out[key] = value
            choices = CHOICES.get((section, key))
            if choices and key in out and out[key] not in choices:
                problems.append(f"'{dotted}' must be one of {', '.join(choices)}, got {short(out[key])}")
        cfg[section] = out
    if not problems:
        problems += _semantic_checks(cfg, check_files)
    if problems:
        raise TrainConfigError(f"{source}: " + "; ".join(problems))
    return cfg, notes


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _semantic_checks(cfg: dict, check_files: bool) -> list[str]:
    p = _range_problems(cfg)
    t, g = cfg["training"], cfg["general"]
    p += _list_problems("training.ions", t["ions"], str, required=True)
    p += _list_problems("lora.target_modules", cfg["lora"]["target_modules"], str, required=True)
    if cfg["lora"]["layers"] is not None:
        p += _list_problems("lora.layers", cfg["lora"]["layers"], int, low=0)
    if t["folds"] is not None:
        p += _list_problems("training.folds", t["folds"], int, low=1, high=t["num_folds"])
    if not p and t["min_lr"] > t["learning_rate"]:
        p.append(f"'training.min_lr' ({t['min_lr']}) must be <= 'training.learning_rate' ({t['learning_rate']})")
    known = set(cfg["lora"]["target_modules"]) if all(isinstance(m, str) for m in cfg["lora"]["target_modules"]) else set()
    unknown_targets = known - set(_LORA_TARGETS)
    if unknown_targets:
        p.append(f"'lora.target_modules' has unknown module(s) {short(sorted(unknown_targets))}; known: {_LORA_TARGETS}")
    for key in ("msa_sampling", "validation_msa_sampling"):
        p += msa_sampling_problems(f"training.{key}", t[key])
    if g["device"] is not None:
        from e1min.runtime import resolve_device

        try:
            resolve_device(g["device"])
        except ValueError as e:
            p.append(f"'general.device': {e}")
    if check_files:
        fasta_path = cfg["data"]["fasta_path"]
        if "{ION}" not in fasta_path and not Path(fasta_path).is_dir():
            p.append(f"'data.fasta_path' {short(fasta_path)}: no such directory")
        msa_dir = cfg["data"]["msa_dir"]
        if msa_dir and "{ION}" not in msa_dir and not Path(msa_dir).is_dir():
            p.append(f"'data.msa_dir' {short(msa_dir)}: no such directory")
        ckpt = cfg["model"]["checkpoint"]
        if (ckpt.startswith((".", "/", "~")) or ckpt.count("/") != 1) and not Path(ckpt).expanduser().is_dir():
            p.append(f"'model.checkpoint' {short(ckpt)}: no such directory (and not a Hub repo id)")
    return p


def _range_problems(cfg: dict) -> list[str]:
    problems = []
    for (section, key), (low, high, low_inc, high_inc) in RANGES.items():
        value = cfg[section][key]
        if value is None:
            continue
        too_low = low is not None and (value < low if low_inc else value <= low)
        too_high = high is not None and (value > high if high_inc else value >= high)
        if too_low or too_high:
            if high is None:
                wanted = f"{'>=' if low_inc else '>'} {low}"
            else:
                wanted = f"in {'[' if low_inc else '('}{low}, {high}{']' if high_inc else ')'}"
            problems.append(f"'{section}.{key}' must be {wanted}, got {short(value)}")
    return problems


def _list_problems(dotted: str, values: list, kind: type, required: bool = False, low: int | None = None, high: int | None = None) -> list[str]:
    """A flat list of ``kind`` values, without duplicates (and within [low, high] for integers)."""
    if required and not values:
        return [f"'{dotted}' must not be empty"]
    bad = [v for v in values if not isinstance(v, kind) or isinstance(v, bool) or (kind is str and not v)]
    if bad:
        return [f"'{dotted}' must be a flat list of {'names' if kind is str else 'integers'}, got {short(bad[0])}"]
    if (low is not None and min(values, default=low) < low) or (high is not None and max(values, default=high) > high):
        return [f"'{dotted}' values must be between {low} and {high if high is not None else 'inf'}, got {short(values)}"]
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        return [f"'{dotted}' lists {', '.join(dupes)[:80]} more than once"]
    return []


def msa_sampling_problems(dotted: str, given: Any) -> list[str]:
    """Problems of an ``msa_sampling`` mapping: unknown keys, types, ranges (``max_num_samples`` <= 511)."""
    if not isinstance(given, dict):
        return [f"'{dotted}' must be a mapping, got {type(given).__name__}"]
    problems = []
    for key, value in given.items():
        if key not in MSA_SAMPLING_KEYS:
            problems.append(f"unknown key '{dotted}.{short(key)[1:-1] if isinstance(key, str) else short(key)}'; known: {', '.join(MSA_SAMPLING_KEYS)}")
            continue
        kind, low, high = MSA_SAMPLING_KEYS[key]
        ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type:
            problems.append(f"'{dotted}.{key}' must be {'a number' if kind is float else 'an integer'}, got {short(value)}")
        elif value < low or (high is not None and value > high):
            problems.append(f"'{dotted}.{key}' must be in [{low}, {high if high is not None else 'inf'}], got {short(value)}"
                            + (" (E1 takes at most 512 sequences per example: 511 context rows + the query)" if key == "max_num_samples" else ""))
    if not problems and given.get("min_query_similarity", 0.0) > given.get("max_query_similarity", 1.0):
        problems.append(f"'{dotted}.min_query_similarity' is larger than its max_query_similarity")
    return problems


def _yaml_reason(e: Exception) -> str:
    """A YAML error in one short line (the problem and where)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return short(str(problem), 120).strip("'\"") + where


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, check_files: bool = True) -> tuple[dict, list[str]]:
    """Read a YAML recipe, apply overrides, validate. Returns (config, notes)."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise TrainConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise TrainConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({_yaml_reason(e)})") from None
    return validate(apply_overrides(raw, overrides or []), source=str(path), check_files=check_files)


def dump_config(cfg: dict) -> str:
    """The resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
    return yaml.safe_dump(cfg, sort_keys=False)
