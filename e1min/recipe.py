"""The training recipe as frozen typed dataclasses: one field per YAML key, with its default, range and doc.

``load_recipe(path, overrides)`` reads a YAML recipe (strict safe YAML: duplicate keys are errors, ``1e-4``
is a float), applies ``--set section.key=value`` overrides (values parsed by the same loader) and returns
``(Recipe, notes)``. Keys follow the original pipeline's config so an existing ``e1_binding.yaml`` runs
unchanged; keys that only made sense there (``IGNORED``) are accepted with a one-line note. Every problem
(unknown or duplicated key, wrong type, value out of its range, missing file) is collected and reported in
one ``TrainConfigError`` naming each dotted key; values echoed in messages are cut to 80 characters.

A field's accepted YAML types come from its annotation (``float`` accepts ints, ``tuple`` a list,
``MSASampling`` a mapping); ``metadata`` holds ``doc``, ``range`` (``">= 1"``, ``"> 0"``, ``"[0, 1)"``) and
``choices``. ``Recipe.to_dict()`` gives the plain dict-of-dicts of ``e1min.train_config.load_config``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from e1min.data.msa import TRAIN_SAMPLING, VALIDATION_SAMPLING, MSASampling
from e1min.errors import E1minError
from e1min.lora import DEFAULT_TARGETS, LoRAConfig


class TrainConfigError(E1minError, ValueError):
    """A training config that cannot run; the message lists every problem."""


REQUIRED = object()  # the "default" of a key the user must give


def opt(
    default: Any = MISSING, doc: str = "", *, range: str | None = None, choices: tuple[str, ...] | None = None, factory: Any = None
) -> Any:
    """A recipe field: default (none = required; ``factory`` for a mutable one), its doc, and its range or choices."""
    meta = {"doc": doc, "range": range, "choices": choices}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass(frozen=True)
class General:
    """``general:`` run-wide settings."""

    seed: int = opt(42, "seed of the fold assignment, LoRA init, dropout, masking and batch order", range=">= 0")
    run_name: str | None = opt(None, "free-form label, kept in config.yaml (not used otherwise)")
    log_every: int = opt(10, "log a training line every N optimiser steps", range=">= 1")
    device: str | None = opt(None, "cpu | cuda | cuda:N; null = cuda when available")
    dist_timeout_seconds: float = opt(300, "timeout of torch.distributed collectives, in seconds", range="> 0")
    check_replicas_every: int = opt(0, "debug: compare parameter checksums across ranks every N steps; 0 = never", range=">= 0")


@dataclass(frozen=True)
class Data:
    """``data:`` where the labelled sequences and MSAs are, and how long an example may be."""

    fasta_path: str = opt(doc="directory of the labelled 3-line FASTA files (may contain {ION})")
    fasta_pattern: str = opt("{ION}_train.fasta", "file name of an ion's FASTA inside fasta_path")
    msa_dir: str | None = opt(None, "A3M directory ({msa_dir}/{ION}/{id}.a3m or {msa_dir}/{id}.a3m); null = no MSAs")
    max_query_length: int = opt(1022, "longer query sequences are cropped to a window of this many residues", range=">= 2")
    max_example_tokens: int = opt(16384, "token budget of one example (query + MSA context rows)", range=">= 1")
    fold_grouping: str = opt(
        "sequence",
        "what shares a fold: sequence (same id or identical sequence) | identity (also proteins linked by an MMseqs2 "
        "alignment at >= split_min_seq_id over >= split_coverage of both; connected components)",
        choices=("sequence", "identity"),
    )
    split_min_seq_id: float = opt(0.3, "identity grouping: minimum alignment identity of a link", range="(0, 1]")
    split_coverage: float = opt(0.8, "identity grouping: minimum coverage of both sequences of a link", range="[0, 1]")
    homology_report: bool = opt(True, "write the cross-fold homology report (MMseqs2) into data_stats.json; skipped without mmseqs")


@dataclass(frozen=True)
class Model:
    """``model:`` the base E1 checkpoint, how it is held, and the ion heads."""

    checkpoint: str = opt(doc="E1 checkpoint: a Hugging Face Hub repo id (Profluent-Bio/E1-600m) or a local directory")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of checkpoint; null = the default branch")
    dropout: float = opt(
        0.3,
        "ION-HEAD dropout: the Dropout of every per-ion head (LayerNorm -> Dropout -> Linear); "
        "not LoRA's dropout, which is lora.lora_dropout",
        range="[0, 1)",
    )
    dtype: str = opt("float32", "dtype of the frozen base weights (LoRA, heads, optimiser stay float32)", choices=("float32", "bfloat16"))
    gradient_checkpointing: bool = opt(False, "recompute backbone activations in backward (less memory, slower)")
    compile: bool = opt(
        False, "torch.compile each decoder layer's elementwise work (e1min.compile_model); a one-off compile of tens of seconds"
    )
    matmul_precision: str = opt(
        "highest", "float32 matmul precision (torch.set_float32_matmul_precision)", choices=("highest", "high", "medium")
    )

    @property
    def head_dropout(self) -> float:
        """The ion-head dropout (the YAML key is ``model.dropout``)."""
        return self.dropout


@dataclass(frozen=True)
class Lora:
    """``lora:`` the adapter; ``to_lora_config()`` / ``apply_kwargs()`` give it to ``e1min.lora``."""

    r: int = opt(16, "LoRA rank (rows of lora_A)", range=">= 1")
    alpha: float = opt(32, "the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)", range="> 0")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch's input (LoRAConfig.dropout)", range="[0, 1)")
    target_modules: tuple[str, ...] = opt(DEFAULT_TARGETS, "module-name suffixes to adapt (of " + ", ".join(DEFAULT_TARGETS) + ")")
    train_mlm_head: bool = opt(False, "keep E1's pretrained MLM head trainable (frozen otherwise)")
    use_rslora: bool = opt(False, "rank-stabilised LoRA: scale by alpha / sqrt(r)")
    layers: tuple[int, ...] | None = opt(None, "indices of the decoder layers to adapt; null = all")

    def apply_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``e1min.lora.apply_lora``."""
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "layers": self.layers,
            "use_rslora": self.use_rslora,
            "train_mlm_head": self.train_mlm_head,
        }

    def to_lora_config(self) -> LoRAConfig:
        """The ``LoRAConfig`` that ``apply_lora(**apply_kwargs())`` records (layers sorted)."""
        kw = self.apply_kwargs()
        kw["layers"] = None if self.layers is None else tuple(sorted(self.layers))
        return LoRAConfig(**kw)


@dataclass(frozen=True)
class Training:
    """``training:`` ions, optimisation, loss, cross-validation, outputs and MSA sampling."""

    ions: tuple[str, ...] = opt(doc="ions to train, one head each ({ION} in data.fasta_pattern)")
    epochs: int = opt(40, "maximum epochs per fold", range=">= 1")
    warmup_epochs: float = opt(5, "linear learning-rate warm-up, in epochs (may be fractional)", range=">= 0")
    batch_size: int = opt(2, "examples per micro-batch (when max_tokens_per_batch is null)", range=">= 1")
    max_tokens_per_batch: int | None = opt(
        None, "token-budget batching when set: micro-batches of up to this many tokens instead of batch_size examples", range=">= 1"
    )
    accum_steps: int = opt(1, "micro-batches accumulated per optimiser step", range=">= 1")
    learning_rate: float = opt(1e-4, "peak AdamW learning rate (after warm-up)", range=">= 0")
    min_lr: float = opt(1e-6, "end of the cosine decay; <= learning_rate", range=">= 0")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on norms and biases)", range=">= 0")
    max_grad_norm: float | None = opt(1.0, "gradient-norm clipping; null = none", range="> 0")
    mlm_weight: float = opt(1.0, "weight of the MLM loss term; 0 disables masking and the MLM term", range=">= 0")
    mlm_probability: float = opt(0.15, "fraction of residues chosen for MLM corruption", range="[0, 1)")
    mask_context: bool = opt(False, "apply MLM corruption to MSA context rows too")
    label_smoothing: float = opt(0.0, "label smoothing of the BCE targets of labelled training rows", range="[0, 1)")
    focal_gamma: float = opt(0.0, "focal-loss gamma; 0 = plain BCE", range=">= 0")
    pos_weight_mode: str = opt("sqrt", "per-ion BCE pos_weight from the training folds' neg/pos ratio", choices=("none", "linear", "sqrt"))
    num_folds: int = opt(5, "K of the K-fold cross-validation", range=">= 2")
    folds: tuple[int, ...] | None = opt(None, "1-based subset of the folds to run; null = all")
    early_stop_patience: int = opt(5, "epochs without improvement before a fold stops", range=">= 1")
    min_delta: float = opt(0.0, "improvement of the selection metric that counts as better", range=">= 0")
    selection_metric: str = opt("auprc", "selection / early-stopping metric (mean over ions)", choices=("auprc", "hra"))
    threshold_method: str = opt("youden", "how per-ion thresholds are fitted on out-of-fold predictions", choices=("youden", "f1", "mcc"))
    output_dir: str = opt("results/run", "the run directory")
    bf16: bool = opt(False, "bf16 autocast on CUDA (and on CPUs with native bf16; ignored with a note otherwise)")
    msa_sampling: MSASampling = opt(
        doc="how training context rows are drawn; unset keys from data.msa.TRAIN_SAMPLING", factory=lambda: copy.copy(TRAIN_SAMPLING)
    )
    validation_msa_sampling: MSASampling = opt(
        doc="how validation context rows are drawn; unset keys from data.msa.VALIDATION_SAMPLING",
        factory=lambda: copy.copy(VALIDATION_SAMPLING),
    )
    eval_max_tokens_per_batch: int = opt(16384, "token budget of a validation batch", range=">= 1")


# Keys of the original pipeline that have no meaning here.
IGNORED = {
    "training.ddp_find_unused_parameters": "e1min's data parallelism has no unused-parameter machinery",
    "training.compile_flex_attention": "e1min uses scaled_dot_product_attention",
    "general.gpu_id": "devices come from torchrun's LOCAL_RANK",
    "training.num_workers": "batches are built in-process",
    "training.use_flash_attention": "SDPA picks the fastest kernel itself",
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


def field_types(hint: Any) -> tuple[type, ...]:
    """YAML value types a field annotation accepts: float takes ints, tuple a list, MSASampling a mapping."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    out: list[type] = []
    for a in args:
        a = typing.get_origin(a) or a
        out += {float: [int, float], tuple: [list], MSASampling: [dict]}.get(a, [a])
    return tuple(out)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default (a fresh copy), or ``REQUIRED``."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return REQUIRED if f.default is MISSING else f.default


def parse_range(spec: str) -> tuple[float | None, float | None, bool, bool]:
    """``">= 1"`` / ``"> 0"`` / ``"[0, 1)"`` -> (low, high, low inclusive, high inclusive)."""
    num, n = r"(-?[0-9.e+-]+)", lambda text: int(text) if text.lstrip("-").isdigit() else float(text)
    if m := re.fullmatch(rf"(>=|>) {num}", spec):
        return n(m[2]), None, m[1] == ">=", True
    if m := re.fullmatch(rf"([\[(]){num}, {num}([\])])", spec):
        return n(m[2]), n(m[3]), m[1] == "[", m[4] == "]"
    raise ValueError(f"bad range spec {spec!r}")


def _plain(value: Any) -> Any:
    """A typed value as YAML/JSON-ready data (tuples -> lists, MSASampling -> dict)."""
    if isinstance(value, tuple):
        return list(value)
    return value.to_dict() if isinstance(value, MSASampling) else value


def _typed(value: Any) -> Any:
    """Checked plain data as a field value (lists -> tuples, mappings -> MSASampling)."""
    if isinstance(value, list):
        return tuple(value)
    return MSASampling.from_dict(value) if isinstance(value, dict) else value


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages (a config value may be huge)."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Recipe:
    """A validated training recipe: ``recipe.training.accum_steps``, ``recipe.lora.to_lora_config()``, ..."""

    general: General
    data: Data
    model: Model
    lora: Lora
    training: Training

    @staticmethod
    def sections() -> dict[str, type]:
        """Section name -> its dataclass, in YAML order."""
        return {f.name: typing.get_type_hints(Recipe)[f.name] for f in fields(Recipe)}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config", check_files: bool = True) -> tuple[Recipe, list[str]]:
        """Validate a raw (YAML-loaded) dict; returns (recipe, notes about ignored keys) or raises listing every problem."""
        if not isinstance(raw, dict):
            raise TrainConfigError(f"{source}: expected a mapping of sections")
        problems, notes, cfg = [], [], {}
        for section, keys in raw.items():
            if section not in cls.sections():
                problems.append(f"unknown section {short(section)}")
            elif not isinstance(keys, dict) and keys is not None:
                problems.append(f"section '{section}' must be a mapping, got {type(keys).__name__}")
        for section, kind in cls.sections().items():
            given = raw.get(section) or {}
            if isinstance(given, dict):
                cfg[section] = _section_values(section, kind, given, problems, notes)
        if not problems:
            problems += _semantic_checks(cfg, check_files)
        if problems:
            raise TrainConfigError(f"{source}: " + "; ".join(problems))
        return cls(**{s: kind(**{k: _typed(v) for k, v in cfg[s].items()}) for s, kind in cls.sections().items()}), notes

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain dict-of-dicts (lists, and full msa_sampling dicts) that ``from_dict`` reads back to an equal recipe."""
        return {s: {f.name: _plain(getattr(getattr(self, s), f.name)) for f in fields(kind)} for s, kind in self.sections().items()}

    def dump_yaml(self) -> str:
        """The resolved recipe as YAML (what ``config.yaml`` in a run directory holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _section_values(section: str, kind: type, given: dict, problems: list[str], notes: list[str]) -> dict[str, Any]:
    """Type and choice checks of one section; returns its plain values with defaults filled in."""
    hints, out = typing.get_type_hints(kind), {}
    for key in given:
        dotted = f"{section}.{key}"
        if dotted in IGNORED:
            notes.append(f"note: {dotted} is ignored ({IGNORED[dotted]})")
        elif key not in hints:
            problems.append(f"unknown key '{section}.{short(key)[1:-1] if isinstance(key, str) else short(key)}'")
    for f in fields(kind):
        dotted, default = f"{section}.{f.name}", field_default(f)
        if f.name not in given:
            if default is REQUIRED:
                problems.append(f"missing required key '{dotted}'")
            else:
                out[f.name] = _plain(default)
            continue
        value, accepted = given[f.name], field_types(hints[f.name])
        names = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
        if isinstance(value, bool) and bool not in accepted:
            problems.append(f"'{dotted}' must be {names}, got {short(value)}")
        elif not isinstance(value, accepted):
            problems.append(f"'{dotted}' must be {names}, got {type(value).__name__} {short(value)}")
        elif isinstance(default, MSASampling):
            out[f.name] = {**default.to_dict(), **value}  # unset keys from the default sampling
        else:
            out[f.name] = value
        choices = f.metadata["choices"]
        if choices and f.name in out and out[f.name] not in choices:
            problems.append(f"'{dotted}' must be one of {', '.join(choices)}, got {short(out[f.name])}")
    return out


def _semantic_checks(cfg: dict, check_files: bool) -> list[str]:
    p = _range_problems(cfg)
    t, g, lora = cfg["training"], cfg["general"], cfg["lora"]
    p += _list_problems("training.ions", t["ions"], str, required=True)
    p += _list_problems("lora.target_modules", lora["target_modules"], str, required=True)
    if lora["layers"] is not None:
        p += _list_problems("lora.layers", lora["layers"], int, low=0)
    if t["folds"] is not None:
        p += _list_problems("training.folds", t["folds"], int, low=1, high=t["num_folds"])
    if not p and t["min_lr"] > t["learning_rate"]:
        p.append(f"'training.min_lr' ({t['min_lr']}) must be <= 'training.learning_rate' ({t['learning_rate']})")
    known = set(lora["target_modules"]) if all(isinstance(m, str) for m in lora["target_modules"]) else set()
    if known - set(DEFAULT_TARGETS):
        p.append(
            f"'lora.target_modules' has unknown module(s) {short(sorted(known - set(DEFAULT_TARGETS)))}; known: {list(DEFAULT_TARGETS)}"
        )
    for key in ("msa_sampling", "validation_msa_sampling"):
        p += msa_sampling_problems(f"training.{key}", t[key])
    if g["device"] is not None:
        from e1min.runtime import resolve_device

        try:
            resolve_device(g["device"])
        except ValueError as e:
            p.append(f"'general.device': {e}")
    d, ckpt = cfg["data"], cfg["model"]["checkpoint"]
    if check_files and "{ION}" not in d["fasta_path"] and not Path(d["fasta_path"]).is_dir():
        p.append(f"'data.fasta_path' {short(d['fasta_path'])}: no such directory")
    if check_files and d["msa_dir"] and "{ION}" not in d["msa_dir"] and not Path(d["msa_dir"]).is_dir():
        p.append(f"'data.msa_dir' {short(d['msa_dir'])}: no such directory")
    if check_files and (ckpt.startswith((".", "/", "~")) or ckpt.count("/") != 1) and not Path(ckpt).expanduser().is_dir():
        p.append(f"'model.checkpoint' {short(ckpt)}: no such directory (and not a Hub repo id)")
    return p


def _range_problems(cfg: dict) -> list[str]:
    problems = []
    for section, kind in Recipe.sections().items():
        for f in fields(kind):
            value, spec = cfg[section][f.name], f.metadata["range"]
            if spec is None or value is None:
                continue
            low, high, low_inc, high_inc = parse_range(spec)
            too_low = low is not None and (value < low if low_inc else value <= low)
            too_high = high is not None and (value > high if high_inc else value >= high)
            if too_low or too_high:
                wanted = (
                    f"{'>=' if low_inc else '>'} {low}"
                    if high is None
                    else f"in {'[' if low_inc else '('}{low}, {high}{']' if high_inc else ')'}"
                )
                problems.append(f"'{section}.{f.name}' must be {wanted}, got {short(value)}")
    return problems


def _list_problems(
    dotted: str, values: list, kind: type, required: bool = False, low: int | None = None, high: int | None = None
) -> list[str]:
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
            problems.append(
                f"unknown key '{dotted}.{short(key)[1:-1] if isinstance(key, str) else short(key)}'; known: {', '.join(MSA_SAMPLING_KEYS)}"
            )
            continue
        kind, low, high = MSA_SAMPLING_KEYS[key]
        ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type:
            problems.append(f"'{dotted}.{key}' must be {'a number' if kind is float else 'an integer'}, got {short(value)}")
        elif value < low or (high is not None and value > high):
            problems.append(
                f"'{dotted}.{key}' must be in [{low}, {high if high is not None else 'inf'}], got {short(value)}"
                + (" (E1 takes at most 512 sequences per example: 511 context rows + the query)" if key == "max_num_samples" else "")
            )
    if not problems and given.get("min_query_similarity", 0.0) > given.get("max_query_similarity", 1.0):
        problems.append(f"'{dotted}.min_query_similarity' is larger than its max_query_similarity")
    return problems


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
    return yaml.load(text, Loader=_StrictLoader)  # _StrictLoader is a SafeLoader


def yaml_reason(e: Exception) -> str:
    """A YAML error in one short line (the problem and where)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return short(str(problem), 120).strip("'\"") + where


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed by ``load_yaml``) to a copy of a raw config dict."""
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
            node[parts[-1]] = load_yaml(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise TrainConfigError(f"--set {short(item)}: not a valid YAML value ({yaml_reason(e)})") from None
    return raw


def read_raw(path: str | os.PathLike) -> Any:
    """A recipe file's raw YAML content ({} when empty); file and YAML problems as ``TrainConfigError``."""
    path = Path(path)
    try:
        return load_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise TrainConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise TrainConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({yaml_reason(e)})") from None


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = (), check_files: bool = True) -> tuple[Recipe, list[str]]:
    """Read a YAML recipe, apply ``--set`` overrides, validate. Returns (recipe, notes about ignored keys)."""
    raw = apply_overrides(read_raw(path), overrides or ())
    return Recipe.from_dict(raw, source=str(Path(path)), check_files=check_files)
