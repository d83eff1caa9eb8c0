"""A trained run, ready to predict: load one fold or a K-fold ensemble over ONE base model.

    from e1min import load_predictor
    p = load_predictor("results/run")            # every complete fold, one backbone in memory
    out = p.predict(records)                     # {id: {ion: (mean, std)}} per residue

A checkpoint path may be a run directory (``results/<run>``: all complete folds as an ensemble), a fold
directory (``results/<run>/fold_K``: its ``best/`` state) or a state directory (``fold_K/best``).

Ensembles keep ONE base model in memory: the LoRA layers stay unmerged and each fold's LoRA A/B, MLM
head (if trained) and ion heads are cached as small tensors and copied into the model before that
fold scores. A single fold is merged into the base weights (inference at base-model speed).
Fold predictions are averaged residue by residue; ``std`` is their population standard deviation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e1min.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, load_adapter
from e1min.checkpoint import HEADS_FILE, META_FILE, RunCheckpointError, load_heads, read_meta, state_dir
from e1min.config import ConfigError, E1Config
from e1min.data.dataset import make_eval_examples
from e1min.data.fasta import Record
from e1min.data.msa import VALIDATION_SAMPLING, ContextProvider, MSASampling
from e1min.errors import E1minError
from e1min.heads import BindingModel
from e1min.hub import CONFIG_NAME, load_model, resolve_checkpoint
from e1min.lora import load_lora_state_dict, lora_state_dict, merge_lora
from e1min.run import RunDir
from e1min.runtime import describe, inference_precision, parse_precision, resolve_device
from e1min.scoring import score_records

DEFAULT_MAX_TOKENS = 16384
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")


class PredictError(E1minError, ValueError):
    """A user error of predict / evaluate / embed (bad arguments, nothing to predict, ...)."""


@dataclass
class _FoldWeights:
    name: str
    lora: dict[str, torch.Tensor]
    mlm_head: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]


@dataclass
class Predictor:
    """A BindingModel with one or more folds' weights. ``predict`` averages the folds residue by residue."""

    model: Any  # e1min.heads.BindingModel
    ions: list[str]
    thresholds: dict[str, dict[str, Any]]  # ion -> {"threshold": float, "method": str, ...}
    meta: dict[str, Any]  # checkpoint.json of the first fold
    device: torch.device
    precision: str  # "float32" or "bf16" (autocast backbone; heads and probabilities float32)
    folds: list[_FoldWeights] = field(default_factory=list)
    fold_names: list[str] = field(default_factory=list)
    merged: bool = False
    run_dir: Path | None = None
    _active: int = -1

    @property
    def bf16(self) -> bool:
        """Whether the backbone runs under bf16 autocast."""
        return self.precision == "bf16"

    @property
    def runtime(self) -> dict[str, str]:
        """What runs: precision, device, float32 matmul precision (for logs and evaluation.json)."""
        from e1min.compile import is_compiled

        return describe(self.device, self.precision, compiled=is_compiled(self.model))

    # -- properties from checkpoint.json -------------------------------------------------------
    @property
    def num_folds(self) -> int:
        return max(1, len(self.folds))

    @property
    def max_query_length(self) -> int | None:
        return self.meta.get("max_query_length")

    @property
    def max_example_tokens(self) -> int | None:
        return self.meta.get("max_example_tokens")

    @property
    def sampling(self) -> MSASampling:
        return MSASampling.from_dict(self.meta.get("validation_msa_sampling") or {}, base=VALIDATION_SAMPLING)

    def threshold(self, ion: str) -> float | None:
        t = self.thresholds.get(ion)
        if not t or t.get("threshold") is None or (isinstance(t["threshold"], float) and math.isnan(t["threshold"])):
            return None
        return float(t["threshold"])

    # -- fold switching ----------------------------------------------------------------------
    def activate(self, k: int) -> None:
        """Copy fold ``k``'s LoRA A/B, MLM head and ion heads into the shared model (no-op if already active)."""
        if not self.folds or self._active == k:
            return
        if self.merged:
            raise RuntimeError("cannot switch folds of a merged model")
        w = self.folds[k]
        load_lora_state_dict(self.model.backbone, w.lora)
        with torch.no_grad():
            if w.mlm_head:
                head = self.model.backbone.mlm_head.state_dict()
                for key, t in w.mlm_head.items():
                    head[key].copy_(t)
            heads = self.model.heads.state_dict()
            for key, t in w.heads.items():
                heads[key].copy_(t)
        self._active = k

    # -- prediction --------------------------------------------------------------------------
    def fold_probabilities(
        self,
        records: Sequence[Record],
        ions: Sequence[str] | None = None,
        provider: ContextProvider | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        seed: int | None = None,
    ) -> dict[str, list[np.ndarray]]:
        """ion -> per record (in ``records`` order) a (folds, length) float32 array of probabilities.

        ``seed`` seeds MSA context sampling; default: the run's seed, so the training run's out-of-fold
        predictions are reproduced exactly.
        """
        ions = self._check_ions(ions)
        seed = self.meta.get("seed", 0) if seed is None else seed
        examples = {
            ion: make_eval_examples(records, ion, provider, self.sampling, seed, self.max_query_length, self.max_example_tokens)
            for ion in ions
        }
        out = {ion: [np.zeros((self.num_folds, len(r.sequence)), dtype=np.float32) for r in records] for ion in ions}
        index = {r.id: i for i, r in enumerate(records)}
        for k in range(self.num_folds):
            self.activate(k)
            for ion in ions:
                for pid, p in score_records(self.model, examples[ion], ion, self.device, max_tokens, self.precision).items():
                    out[ion][index[pid]][k] = p
        return out

    def predict(
        self,
        records: Sequence[Record],
        ions: Sequence[str] | None = None,
        provider: ContextProvider | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        seed: int | None = None,
    ) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """{protein id: {ion: (mean probability, std across folds)}} per residue.

        Holds every result of ``records`` in memory: for large inputs use ``predict_file`` (streams in chunks).
        """
        per_fold = self.fold_probabilities(records, ions, provider, max_tokens, seed)
        out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {r.id: {} for r in records}
        for ion, arrays in per_fold.items():
            for r, a in zip(records, arrays):
                out[r.id][ion] = (a.mean(0), a.std(0))
        return out

    def _check_ions(self, ions: Sequence[str] | None) -> list[str]:
        if ions is None:
            return list(self.ions)
        unknown = [i for i in ions if i not in self.ions]
        if unknown:
            raise PredictError(f"ion(s) {unknown} not predicted by this checkpoint; it has heads for {self.ions}")
        if not ions:
            raise PredictError("no ions requested")
        return list(dict.fromkeys(ions))


def _find_run_dir(state: Path) -> Path | None:
    """results/<run> for results/<run>/fold_K/best (or fold_K), when it looks like a run directory."""
    for cand in (state.parent, state.parent.parent):
        if RunDir(cand).thresholds.exists() or (cand / "config.yaml").exists():
            return cand
    return None


def _read_thresholds(run_dir: Path | None) -> dict[str, dict[str, Any]]:
    path = RunDir(run_dir).thresholds if run_dir is not None else None
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunCheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunCheckpointError(f"{path}: expected an object ion -> {{threshold, method}}")
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def _resolve_state(path: str | os.PathLike) -> Path:
    """A state directory (with checkpoint.json) from a fold dir (``fold_K`` -> ``fold_K/best``) or a state dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RunCheckpointError(f"{p}: no such checkpoint directory")
    if not p.is_dir():
        raise RunCheckpointError(f"{p}: is a file; give a run directory, a fold directory or fold_K/best")
    for cand in (p, p / "best"):
        d = state_dir(cand)
        if d is not None:
            return d
    raise RunCheckpointError(f"{p}: no {META_FILE} here or in {p / 'best'} (not a completed e1min fold checkpoint)")


def _check_state_files(d: Path) -> None:
    missing = [n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, HEADS_FILE) if not (d / n).exists()]
    if missing:
        raise RunCheckpointError(f"{d}: incomplete checkpoint, missing {', '.join(missing)}")


def _load_base(d: Path, meta: dict, base_model: str | os.PathLike | None, device: torch.device, dtype: torch.dtype | None):
    """The base E1 named by checkpoint.json (or ``base_model``), after checking it has the trained shape."""

    name = str(base_model) if base_model is not None else meta["base_model"]
    revision = None if base_model is not None else meta.get("base_revision")
    directory = resolve_checkpoint(name, revision)
    try:
        config = E1Config.from_json(directory / CONFIG_NAME)
    except ConfigError as e:
        raise RunCheckpointError(str(e)) from None
    trained = meta["base_config"]
    diff = [
        f"{k}: trained on {trained.get(k)}, base has {getattr(config, k)}"
        for k in SHAPE_KEYS
        if k in trained and trained[k] != getattr(config, k)
    ]
    if diff:
        raise RunCheckpointError(
            f"{d}: the adapter was trained on a base model of another shape than {name} ({'; '.join(diff)}); "
            f"pass the base model it was trained on with --base-model"
        )
    return load_model(directory, dtype=dtype or torch.float32, device=device)


def _build(
    states: list[tuple[Path, dict]], base_model, device, dtype, precision: str | None, merge: bool, names: list[str], run_dir: Path | None
) -> Predictor:
    """One BindingModel for the state directories ``states`` ((directory, checkpoint.json) of each fold)."""
    device = resolve_device(device)
    first_dir, first = states[0]
    ions = list(first["ions"])
    for d, m in states[1:]:
        for key in ("ions", "base_model", "base_revision", "base_config", "lora", "max_query_length", "max_example_tokens"):
            if m.get(key) != first.get(key):
                raise RunCheckpointError(
                    f"{d}: {key} differs from {first_dir} ({str(m.get(key))[:80]!r} vs {str(first.get(key))[:80]!r}); "
                    "folds of one run must agree"
                )
    backbone = _load_base(first_dir, first, base_model, device, dtype)
    model = BindingModel(backbone, ions, head_dropout=0.0)
    model.heads.to(device)
    model.eval()
    folds: list[_FoldWeights] = []
    for (d, _), name in zip(states, names):
        load_adapter(backbone, d)  # first call applies LoRA; later calls check the config and copy
        load_heads(d, model)
        if len(states) > 1:
            mlm = {k: v.detach().clone() for k, v in backbone.mlm_head.state_dict().items()} if backbone.lora_config.train_mlm_head else {}
            folds.append(
                _FoldWeights(
                    name,
                    {k: v.clone() for k, v in lora_state_dict(backbone).items()},
                    mlm,
                    {k: v.detach().clone() for k, v in model.heads.state_dict().items()},
                )
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    merged = False
    if len(states) == 1 and merge:
        merge_lora(backbone)
        merged = True
    pred = Predictor(
        model=model,
        ions=ions,
        thresholds=_read_thresholds(run_dir),
        meta=first,
        device=device,
        precision=inference_precision(device, precision),
        folds=folds,
        fold_names=names,
        merged=merged,
        run_dir=run_dir,
    )
    if folds:
        pred._active = len(folds) - 1  # the last loaded fold's weights are in the model
    return pred


def load_checkpoint(
    fold_dir: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    merge: bool = True,
    bf16: bool | None = None,
    precision: str | None = None,
) -> Predictor:
    """One fold, ready to predict: ``fold_K`` or ``fold_K/best`` of a run.

    Base E1 from checkpoint.json's ``base_model``/``base_revision`` (or ``base_model``: a local directory or
    Hub id of the same shape), LoRA adapter applied and merged (``merge=False`` keeps it separate), ion
    heads loaded, thresholds from the run's ``thresholds.json`` when present. ``dtype``: base weights
    (default float32). ``precision``: ``"float32"`` or ``"bf16"`` (autocast); default float32 on the CPU
    and bf16 on CUDA, never chosen from CPU flags. ``bf16=True/False`` is the older spelling.
    """
    d = _resolve_state(fold_dir)
    _check_state_files(d)
    meta = read_meta(d)
    return _build([(d, meta)], base_model, device, dtype, _requested(precision, bf16), merge, [str(d)], _find_run_dir(d))


def _requested(precision: str | None, bf16: bool | None) -> str | None:
    """The precision asked for through ``precision`` or the older ``bf16`` flag (None: the device default)."""
    if precision is not None and bf16 is not None and parse_precision(precision) != ("bf16" if bf16 else "float32"):
        raise PredictError(f"precision={precision!r} contradicts bf16={bf16}")
    if precision is not None:
        try:
            return parse_precision(precision)
        except ValueError as e:
            raise PredictError(str(e)) from None
    return None if bf16 is None else ("bf16" if bf16 else "float32")


def complete_folds(results_dir: str | os.PathLike) -> list[int]:
    """1-based folds of a run with ``fold_K/fold_result.json`` (complete) and a ``best`` checkpoint."""
    out = []
    root = Path(results_dir)
    for d in sorted(root.glob("fold_*"), key=lambda p: (len(p.name), p.name)):
        k = d.name.removeprefix("fold_")
        if k.isdigit() and RunDir(root).fold_result(int(k)).exists() and state_dir(RunDir(root).state(int(k), "best")) is not None:
            out.append(int(k))
    return out


def load_ensemble(
    results_dir: str | os.PathLike,
    folds: Sequence[int] | None = None,
    base_model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    merge: bool = True,
    bf16: bool | None = None,
    precision: str | None = None,
) -> Predictor:
    """Every complete fold of a run (or the 1-based ``folds``), sharing one base model in memory.

    With several folds the adapters stay unmerged and are switched per fold; a single fold is merged
    when ``merge``.
    """
    root = Path(results_dir).expanduser()
    if not root.is_dir():
        raise RunCheckpointError(f"{root}: no such run directory")
    available = complete_folds(root)
    if folds is None:
        if not available:
            raise RunCheckpointError(f"{root}: no complete folds (no fold_K/fold_result.json with a fold_K/best checkpoint)")
        chosen = available
    else:
        chosen = list(dict.fromkeys(int(f) for f in folds))
        missing = [f for f in chosen if f not in available]
        if missing:
            raise RunCheckpointError(f"{root}: fold(s) {missing} not complete; complete folds: {available or 'none'}")
    states = []
    for k in chosen:
        d = _resolve_state(RunDir(root).fold(k))
        _check_state_files(d)
        meta = read_meta(d)
        states.append((d, meta))
    return _build(states, base_model, device, dtype, _requested(precision, bf16), merge, [f"fold_{k}" for k in chosen], root)


def is_run_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and state_dir(p) is None and not (p / "best").exists() and any(p.glob("fold_*"))


def load_predictor(path: str | os.PathLike, folds: Sequence[int] | None = None, **kwargs: Any) -> Predictor:
    """A run directory -> ``load_ensemble``; a fold or state directory -> ``load_checkpoint``."""
    if is_run_dir(path):
        return load_ensemble(path, folds=folds, **kwargs)
    if folds:
        raise PredictError(f"{path}: --folds applies to a run directory (results/<run>), not to one fold")
    return load_checkpoint(path, **kwargs)


def load_backbone(path: str | os.PathLike, fold: int | None = None, base_model=None, device=None, dtype=None) -> tuple[Any, dict]:
    """The backbone to embed with: a fine-tuned fold (LoRA merged), or a plain base E1 (dir with config.json or Hub id)."""
    p = Path(path).expanduser()
    looks_e1min = p.is_dir() and (state_dir(p) is not None or (p / "best").exists() or any(p.glob("fold_*")))
    if looks_e1min:
        if is_run_dir(p):
            available = complete_folds(p)
            if not available:
                raise RunCheckpointError(f"{p}: no complete folds")
            k = fold or available[0]
            if k not in available:
                raise RunCheckpointError(f"{p}: fold {k} not complete; complete folds: {available}")
            p = RunDir(p).fold(k)
        pred = load_checkpoint(p, base_model=base_model, device=device, dtype=dtype, merge=True)
        info = {
            "source": "fine-tuned",
            "checkpoint": pred.fold_names[0],
            "base_model": pred.meta.get("base_model"),
            "max_query_length": pred.max_query_length,
        }
        return pred.model.backbone, info
    backbone = load_model(path, dtype=dtype or torch.float32, device=resolve_device(device))
    return backbone, {"source": "base", "checkpoint": str(path), "base_model": str(path), "max_query_length": None}
