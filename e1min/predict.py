"""Use a trained run: load a fold or a K-fold ensemble, predict, evaluate on a labelled set, embed.

    e1min predict  --checkpoint results/run --fasta proteins.fasta [--msa-dir DIR] [--ions ZN,CA] [--out preds.tsv]
    e1min evaluate --checkpoint results/run --fasta test.fasta [--out-dir eval/]
    e1min embed    --checkpoint results/run/fold_1 --fasta proteins.fasta --out emb/ [--per-residue]
    torchrun --nproc_per_node=4 -m e1min.predict predict --checkpoint results/run --fasta proteome.fasta --out preds.tsv

Library use::

    from e1min.predict import load_predictor
    p = load_predictor("results/run")            # every complete fold, one backbone in memory
    out = p.predict(records)                     # {id: {ion: (mean, std)}} per residue

A checkpoint path may be a run directory (``results/<run>``: all complete folds as an ensemble), a fold
directory (``results/<run>/fold_K``: its ``best/`` state) or a state directory (``fold_K/best``).

Ensembles keep ONE base model in memory: the LoRA layers stay unmerged and each fold's LoRA A/B, MLM
head (if trained) and ion heads are cached as small tensors and copied into the model before that
fold scores. A single fold is merged into the base weights (inference at base-model speed).

Inputs are never masked; long proteins are scored in sliding windows and stitched so that every residue
gets exactly one prediction per fold (``e1min.data.windows``); fold predictions are averaged residue by
residue, and ``std`` is their population standard deviation (0 for a single fold).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TextIO

import numpy as np
import torch

from e1min.checkpoint import HEADS_FILE, META_FILE, RunCheckpointError, load_heads, read_meta, state_dir
from e1min.data.batching import shard_eval, token_budget_batches
from e1min.data.collate import collate
from e1min.data.dataset import Example, make_eval_examples, stitch_predictions
from e1min.data.fasta import DataError, Record, read_fasta
from e1min.data.msa import VALIDATION_SAMPLING, ContextProvider, MSASampling
from e1min.io import check_output_dir, check_output_file, dumps_json
from e1min.runtime import MATMUL_PRECISIONS, describe, inference_precision, parse_precision, set_matmul_precision
from e1min.scoring import autocast_context, score_examples, to_device

__all__ = [
    "Predictor",
    "load_checkpoint",
    "load_ensemble",
    "load_predictor",
    "read_input_fasta",
    "predict_file",
    "evaluate_records",
    "embed_file",
    "predict_main",
    "evaluate_main",
    "embed_main",
]

TSV_HEADER = ("id", "position", "residue", "ion", "probability", "std", "call")
DEFAULT_MAX_TOKENS = 16384
EVALUATION_FILES = ("predictions.tsv", "evaluation.json", "evaluation.md")
DEFAULT_CHUNK = 256
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")


class PredictError(ValueError):
    """A user error of predict / evaluate / embed (bad arguments, nothing to predict, ...)."""


# =============================================================================================
# Loading
# =============================================================================================
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
        return describe(self.device, self.precision)

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
        from e1min.lora import lora_modules

        if self.merged:
            raise RuntimeError("cannot switch folds of a merged model")
        w = self.folds[k]
        mods = lora_modules(self.model.backbone)
        with torch.no_grad():
            for key, t in w.lora.items():
                module, _, ab = key.rpartition(".")
                getattr(mods[module], ab).copy_(t)
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
                probs = score_examples(self.model, examples[ion], ion, self.device, max_tokens, self.precision)
                for pid, p in stitch_predictions(examples[ion], probs).items():
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
        if (cand / "thresholds.json").exists() or (cand / "config.yaml").exists():
            return cand
    return None


def _read_thresholds(run_dir: Path | None) -> dict[str, dict[str, Any]]:
    if run_dir is None or not (run_dir / "thresholds.json").exists():
        return {}
    path = run_dir / "thresholds.json"
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
    for cand in (p, p / "best"):
        d = state_dir(cand)
        if d is not None:
            return d
    raise RunCheckpointError(f"{p}: no {META_FILE} here or in {p / 'best'} (not a completed e1min fold checkpoint)")


def _check_state_files(d: Path) -> None:
    from e1min.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

    missing = [n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, HEADS_FILE) if not (d / n).exists()]
    if missing:
        raise RunCheckpointError(f"{d}: incomplete checkpoint, missing {', '.join(missing)}")


def _check_meta(meta: dict, d: Path) -> None:
    missing = [k for k in ("ions", "base_model", "base_config") if not meta.get(k)]
    if missing:
        raise RunCheckpointError(f"{d / META_FILE}: missing key(s) {missing}")


def _load_base(meta: dict, base_model: str | os.PathLike | None, device: torch.device, dtype: torch.dtype | None):
    """The base E1 named by checkpoint.json (or ``base_model``), after checking it has the trained shape."""
    from e1min.config import ConfigError, E1Config
    from e1min.hub import CONFIG_NAME, load_model, resolve_checkpoint

    name = str(base_model) if base_model is not None else meta["base_model"]
    revision = None if base_model is not None else meta.get("base_revision")
    directory = resolve_checkpoint(name, revision)
    try:
        config = E1Config.from_json(directory / CONFIG_NAME)
    except ConfigError as e:
        raise RunCheckpointError(str(e)) from None
    trained = meta["base_config"]
    diff = [f"{k}: trained on {trained.get(k)}, base has {getattr(config, k)}" for k in SHAPE_KEYS if k in trained and trained[k] != getattr(config, k)]
    if diff:
        raise RunCheckpointError(
            f"{meta['_dir']}: the adapter was trained on a base model of another shape than {name} ({'; '.join(diff)}); "
            f"pass the base model it was trained on with --base-model"
        )
    return load_model(directory, dtype=dtype or torch.float32, device=device)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _build(metas: list[dict], base_model, device, dtype, precision: str | None, merge: bool, names: list[str], run_dir: Path | None) -> Predictor:
    from e1min.adapters import load_adapter
    from e1min.heads import BindingModel
    from e1min.lora import lora_state_dict, merge_lora

    device = _device(device)
    first = metas[0]
    ions = list(first["ions"])
    for m in metas[1:]:
        for key in ("ions", "base_model", "base_revision", "base_config", "lora", "max_query_length", "max_example_tokens"):
            if m.get(key) != first.get(key):
                raise RunCheckpointError(f"{m['_dir']}: {key} differs from {first['_dir']} ({m.get(key)!r} vs {first.get(key)!r}); folds of one run must agree")
    backbone = _load_base(first, base_model, device, dtype)
    model = BindingModel(backbone, ions, head_dropout=0.0)
    model.heads.to(device)
    model.eval()
    folds: list[_FoldWeights] = []
    for m, name in zip(metas, names):
        d = Path(m["_dir"])
        load_adapter(backbone, d)  # first call applies LoRA; later calls check the config and copy
        load_heads(d, model)
        if len(metas) > 1:
            mlm = {k: v.detach().clone() for k, v in backbone.mlm_head.state_dict().items()} if backbone.lora_config.train_mlm_head else {}
            folds.append(_FoldWeights(name, {k: v.clone() for k, v in lora_state_dict(backbone).items()}, mlm,
                                      {k: v.detach().clone() for k, v in model.heads.state_dict().items()}))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    merged = False
    if len(metas) == 1 and merge:
        merge_lora(backbone)
        merged = True
    pred = Predictor(model=model, ions=ions, thresholds=_read_thresholds(run_dir), meta=first, device=device,
                     precision=inference_precision(device, precision),
                     folds=folds, fold_names=names, merged=merged, run_dir=run_dir)
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
    _check_meta(meta, d)
    return _build([meta], base_model, device, dtype, _requested(precision, bf16), merge, [str(d)], _find_run_dir(d))


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
        if k.isdigit() and (d / "fold_result.json").exists() and state_dir(d / "best") is not None:
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
    metas = []
    for k in chosen:
        d = _resolve_state(root / f"fold_{k}")
        _check_state_files(d)
        meta = read_meta(d)
        _check_meta(meta, d)
        metas.append(meta)
    return _build(metas, base_model, device, dtype, _requested(precision, bf16), merge, [f"fold_{k}" for k in chosen], root)


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


# =============================================================================================
# Input
# =============================================================================================
@dataclass
class Skipped:
    id: str
    reason: str


def read_input_fasta(
    path: str | os.PathLike, skip_invalid: bool = False, require_labels: bool = False, max_length: int | None = None
) -> tuple[list[Record], list[Skipped]]:
    """Records of a labelled (3-line), unlabelled (2-line) or wrapped FASTA, checked before any work.

    File-level problems (missing, empty, not text, no header first) are always a DataError. A bad record
    (invalid residue, bad label line, duplicate id, missing labels when ``require_labels``, longer than
    ``max_length``) is a DataError naming file, line and id, or with ``skip_invalid`` it is returned in
    the skipped list instead.
    """
    skipped: list[Skipped] = []

    def skip(rid: str, error: DataError) -> None:
        if not skip_invalid:
            raise DataError(f"{error} (use --skip-invalid to skip such proteins)") from None
        skipped.append(Skipped(rid, str(error)))

    path = Path(path)
    records = read_fasta(path, require_labels=require_labels, max_length=max_length, on_invalid=skip)
    if not records:
        raise DataError(f"{path}: no valid records ({len(skipped)} skipped as invalid)")
    return records, skipped


def check_msas(provider: ContextProvider, ions: Sequence[str], records: Sequence[Record], skip_invalid: bool) -> tuple[list[Record], list[Skipped]]:
    """Parse each protein's MSA once and check its query row (without caching it) before any work."""
    keep, skipped = [], []
    for r in records:
        try:
            for ion in ions:
                provider.validate(ion, r.id, r.sequence)
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e} (use --skip-invalid to skip such proteins)") from None
            skipped.append(Skipped(r.id, str(e)))
            continue
        keep.append(r)
    return keep, skipped


# =============================================================================================
# Streaming prediction
# =============================================================================================
class Progress:
    """A progress line on stderr: proteins/s, residues/s, ETA (carriage-return updates on a terminal)."""

    def __init__(self, total: int, residues: int, label: str = "predicted", enabled: bool = True, stream: TextIO | None = None, world_size: int = 1):
        self.total, self.total_residues, self.label = total, residues, label
        self.enabled, self.stream, self.world = enabled, stream or sys.stderr, world_size
        self.done = self.residues = 0
        self.t0 = time.time()
        self.last = 0.0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, proteins: int, residues: int) -> None:
        self.done += proteins * self.world  # rank 0's share scaled to the whole job (shards are strided)
        self.residues += residues * self.world
        now = time.time()
        if self.enabled and (now - self.last > (0.5 if self.tty else 10.0) or self.done >= self.total):
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        el = max(now - self.t0, 1e-9)
        done = min(self.done, self.total)
        rate = done / el
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        msg = (f"{self.label} {done}/{self.total} proteins | {rate:.1f} proteins/s, {self.residues / el:.0f} residues/s"
               f" | elapsed {_fmt_time(el)} ETA {_fmt_time(eta)}")
        self.stream.write(("\r" + msg) if self.tty else msg + "\n")
        self.stream.flush()

    def finish(self) -> dict[str, float]:
        el = max(time.time() - self.t0, 1e-9)
        if self.enabled and self.tty:
            self.stream.write("\n")
        return {"proteins": self.done, "residues": self.residues, "seconds": el, "proteins_per_s": self.done / el, "residues_per_s": self.residues / el}


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _tsv_lines(rec: Record, ion: str, mean: np.ndarray, std: np.ndarray, threshold: float | None, labels: np.ndarray | None = None) -> list[str]:
    calls = [""] * len(mean) if threshold is None else ["1" if c else "0" for c in (mean >= threshold).tolist()]
    lab = [] if labels is None else [f"\t{int(v)}" for v in labels.tolist()]
    return [
        f"{rec.id}\t{i + 1}\t{aa}\t{ion}\t{m:.6g}\t{s:.3g}\t{c}{lab[i] if lab else ''}\n"
        for i, (aa, m, s, c) in enumerate(zip(rec.sequence, mean.tolist(), std.tolist(), calls))
    ]


def _jsonl_line(rec: Record, results: dict[str, tuple[np.ndarray, np.ndarray]], thresholds: dict[str, float | None], labels: bool = False) -> str:
    obj: dict[str, Any] = {"id": rec.id, "sequence": rec.sequence, "ions": {}}
    for ion, (mean, std) in results.items():
        t = thresholds.get(ion)
        obj["ions"][ion] = {
            "probability": [round(float(v), 6) for v in mean],
            "std": [round(float(v), 4) for v in std],
            "threshold": t,
            "call": None if t is None else [int(v) for v in (mean >= t)],
        }
    if labels and rec.labels is not None:
        obj["labels"] = [int(v) for v in rec.labels]
    return dumps_json(obj, separators=(",", ":")) + "\n"


def output_format(out: str | os.PathLike, fmt: str | None) -> str:
    if fmt:
        if fmt not in ("tsv", "jsonl"):
            raise PredictError(f"--format must be tsv or jsonl, got {fmt!r}")
        return fmt
    return "jsonl" if str(out).endswith((".jsonl", ".json")) else "tsv"


def predict_stream(
    predictor: Predictor,
    records: Sequence[Record],
    ions: Sequence[str],
    provider: ContextProvider | None,
    max_tokens: int,
    chunk_size: int = DEFAULT_CHUNK,
    seed: int | None = None,
    progress: Progress | None = None,
) -> Iterator[tuple[Record, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """(record, {ion: (mean, std)}) for every record, in input order, computed ``chunk_size`` proteins at a time.

    Within a chunk proteins are length-sorted into token-budget batches; only one chunk's results are
    held in memory. MSAs parsed for a chunk are dropped after it.
    """
    for a in range(0, len(records), chunk_size):
        chunk = list(records[a : a + chunk_size])
        per_fold = predictor.fold_probabilities(chunk, ions, provider, max_tokens, seed)
        if provider is not None:
            provider.clear_cache()  # bounded memory on proteome-sized inputs
        for i, rec in enumerate(chunk):
            yield rec, {ion: (per_fold[ion][i].mean(0), per_fold[ion][i].std(0)) for ion in ions}
        if progress is not None:
            progress.update(len(chunk), sum(len(r.sequence) for r in chunk))


def write_predictions(
    path: Path,
    stream: Iterable[tuple[Record, dict[str, tuple[np.ndarray, np.ndarray]]]],
    fmt: str,
    thresholds: dict[str, float | None],
    with_labels: bool = False,
    header: bool = True,
) -> int:
    """Stream predictions to ``path`` (written under a temporary name, renamed at the end). Returns rows/lines."""
    from e1min.io import atomic_path

    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        if fmt == "tsv" and header:
            fh.write("\t".join(TSV_HEADER + (("label",) if with_labels else ())) + "\n")
        for rec, results in stream:
            if fmt == "tsv":
                for ion, (mean, std) in results.items():
                    lines = _tsv_lines(rec, ion, mean, std, thresholds.get(ion), rec.labels if with_labels else None)
                    fh.writelines(lines)
                    n += len(lines)
            else:
                fh.write(_jsonl_line(rec, results, thresholds, with_labels))
                n += 1
        fh.flush()
    return n


def merge_parts(out: Path, parts: Sequence[Path], ids: Sequence[str], fmt: str) -> None:
    """Merge strided per-rank part files (protein i is in part i % W) into ``out`` in input order; removes the parts."""
    from e1min.io import atomic_path

    handles = [open(p, encoding="utf-8") for p in parts]
    pending: list[str | None] = [None] * len(parts)
    try:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            if fmt == "tsv":
                header = None
                for k, h in enumerate(handles):
                    line = h.readline()
                    header = header or line
                fh.write(header or "\t".join(TSV_HEADER) + "\n")
            for i, pid in enumerate(ids):
                k = i % len(parts)
                h = handles[k]
                if fmt == "jsonl":
                    line = h.readline()
                    if not line.startswith('{"id":' + json.dumps(pid) + ","):
                        raise RuntimeError(f"{parts[k]}: expected protein {pid!r} next, found {line[:60]!r}")
                    fh.write(line)
                    continue
                prefix = pid + "\t"
                line = pending[k] if pending[k] is not None else h.readline()
                if not line.startswith(prefix):
                    raise RuntimeError(f"{parts[k]}: expected protein {pid!r} next, found {line[:60]!r}")
                while line and line.startswith(prefix):
                    fh.write(line)
                    line = h.readline()
                pending[k] = line
    finally:
        for h in handles:
            h.close()
    for p in parts:
        os.unlink(p)


def predict_file(
    predictor: Predictor,
    records: Sequence[Record],
    out: str | os.PathLike,
    ions: Sequence[str] | None = None,
    provider: ContextProvider | None = None,
    fmt: str = "tsv",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk_size: int = DEFAULT_CHUNK,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
    progress: bool = True,
    with_labels: bool = False,
) -> dict[str, float]:
    """Predict ``records`` to ``out`` (TSV or JSONL) in input order, streaming; returns throughput figures.

    With ``world_size > 1`` this rank predicts records ``rank::world_size`` into ``OUT.rank{rank}.part``;
    after ``barrier()`` rank 0 merges the parts in input order and deletes them.
    """
    out = Path(out)
    ions = predictor._check_ions(ions)
    thresholds = {ion: predictor.threshold(ion) for ion in ions}
    mine = shard_eval(list(records), rank, world_size)
    prog = Progress(len(records), sum(len(r.sequence) for r in records), enabled=progress and rank == 0, world_size=world_size)
    stream = predict_stream(predictor, mine, ions, provider, max_tokens, chunk_size, seed, prog)
    target = out if world_size == 1 else out.with_name(f"{out.name}.rank{rank}.part")
    write_predictions(target, stream, fmt, thresholds, with_labels, header=True)
    stats = prog.finish()
    if world_size > 1:
        barrier()
        if rank == 0:
            merge_parts(out, [out.with_name(f"{out.name}.rank{r}.part") for r in range(world_size)], [r.id for r in records], fmt)
        barrier()
    return stats


# =============================================================================================
# Evaluation
# =============================================================================================
def _at(y: np.ndarray, p: np.ndarray, t: float | None) -> dict[str, Any]:
    from e1min.metrics import confusion_at

    if t is None or (isinstance(t, float) and math.isnan(t)):
        return {"threshold": None, "f1": None, "mcc": None, "precision": None, "recall": None}
    c = confusion_at(y, p, t)
    return {"threshold": float(t), **{k: c[k] for k in ("f1", "mcc", "precision", "recall", "tp", "fp", "tn", "fn")}}


def ion_metrics(y: np.ndarray, p: np.ndarray, saved: float | None, min_recall: float = 0.7) -> dict[str, Any]:
    """AUPRC, AUROC, HRA, positive rate, and F1/MCC/precision/recall at the saved and the best thresholds."""
    from e1min.metrics import best_threshold, binary_metrics

    m = binary_metrics(y, p, min_recall=min_recall)
    f1_t, _ = best_threshold(y, p, "f1")
    mcc_t, _ = best_threshold(y, p, "mcc")
    you_t, _ = best_threshold(y, p, "youden")
    out = {k: m[k] for k in ("n", "positives", "positive_rate", "auprc", "auroc", "hra", "hra_raw")}
    out["min_recall"] = min_recall
    out["at_saved"] = _at(y, p, saved)
    out["at_best_f1"] = _at(y, p, f1_t)
    out["at_best_mcc"] = _at(y, p, mcc_t)
    out["at_youden"] = _at(y, p, you_t)
    return _nan_to_none(out)


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    return o


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def evaluation_table(results: dict[str, dict]) -> str:
    """Markdown table of ``ion_metrics`` per ion."""
    head = ["ion", "residues", "pos. rate", "AUPRC", "AUROC", "HRA", "thr (saved)", "F1", "MCC", "Prec", "Rec",
            "thr (best F1)", "F1", "MCC", "Prec", "Rec"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ion, m in results.items():
        s, b = m["at_saved"], m["at_best_f1"]
        row = [ion, str(m["n"]), _f(m["positive_rate"], 4), _f(m["auprc"]), _f(m["auroc"]), _f(m["hra"]),
               _f(s["threshold"]), _f(s["f1"]), _f(s["mcc"]), _f(s["precision"]), _f(s["recall"]),
               _f(b["threshold"]), _f(b["f1"]), _f(b["mcc"]), _f(b["precision"]), _f(b["recall"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_curves(out_dir: Path, ion: str, y: np.ndarray, p: np.ndarray, m: dict) -> list[Path]:
    """ROC and PR curves as CSV (always) and a threshold-analysis PNG (when matplotlib is installed)."""
    from e1min.io import atomic_path, atomic_write_text
    from e1min.metrics import precision_recall_curve, roc_curve

    fpr, tpr, rthr = roc_curve(y, p)
    prec, rec, pthr = precision_recall_curve(y, p)
    written = [out_dir / f"roc_{ion}.csv", out_dir / f"pr_{ion}.csv"]
    atomic_write_text(written[0], "fpr,tpr,threshold\n" + "".join(f"{a:.6g},{b:.6g},{c:.6g}\n" for a, b, c in zip(fpr, tpr, rthr)))
    # precision/recall have one more point than thresholds (the (1, 0) end point): its threshold is blank.
    pt = [f"{t:.6g}" for t in pthr] + [""]
    atomic_write_text(written[1], "precision,recall,threshold\n" + "".join(f"{a:.6g},{b:.6g},{c}\n" for a, b, c in zip(prec, rec, pt)))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    marks = [("saved", m["at_saved"], "o"), ("best F1", m["at_best_f1"], "s"), ("best MCC", m["at_best_mcc"], "^"), ("Youden", m["at_youden"], "D")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax1.plot(fpr, tpr, lw=1.5, label=f"ROC (AUROC {_f(m['auroc'])})")
    ax1.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax2.plot(rec, prec, lw=1.5, drawstyle="steps-post", label=f"PR (AUPRC {_f(m['auprc'])})")
    ax2.axhline(m["positive_rate"] or 0, ls=":", c="grey", lw=1)
    for name, at, marker in marks:
        if at["threshold"] is None:
            continue
        fp_rate = at["fp"] / max(at["fp"] + at["tn"], 1)
        label = f"{name} t={at['threshold']:.3g} (F1 {at['f1']:.2f}, MCC {at['mcc']:.2f})"
        ax1.plot([fp_rate], [at["recall"]], marker=marker, ls="", ms=7, label=label)
        ax2.plot([at["recall"]], [at["precision"]], marker=marker, ls="", ms=7, label=label)
    ax1.set(xlabel="false positive rate", ylabel="true positive rate (recall)", title=f"{ion}: ROC")
    ax2.set(xlabel="recall", ylabel="precision", title=f"{ion}: precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax1.legend(fontsize=7, loc="lower right")
    ax2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    png = out_dir / f"threshold_analysis_{ion}.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return written + [png]


def evaluate_records(
    predictor: Predictor,
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    ions: Sequence[str] | None = None,
    provider: ContextProvider | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk_size: int = DEFAULT_CHUNK,
    seed: int | None = None,
    min_recall: float = 0.7,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict labelled ``records`` (labels apply to every requested ion) and write the evaluation.

    Writes ``predictions.tsv`` (with a ``label`` column), ``evaluation.json``, ``evaluation.md``, per-ion
    ROC/PR curves as CSV, and threshold-analysis PNGs when matplotlib is installed. Per-residue labels
    and probabilities of every requested ion are kept in memory for the metrics (fine for test sets).
    """
    from e1min.io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ions = predictor._check_ions(ions)
    unlabelled = [r.id for r in records if r.labels is None]
    if unlabelled:
        raise PredictError(f"evaluate needs labelled records; {len(unlabelled)} have no labels (e.g. {unlabelled[0]!r})")
    thresholds = {ion: predictor.threshold(ion) for ion in ions}
    ys = {ion: [] for ion in ions}
    ps = {ion: [] for ion in ions}
    prog = Progress(len(records), sum(len(r.sequence) for r in records), enabled=progress)

    def collect():
        for rec, res in predict_stream(predictor, records, ions, provider, max_tokens, chunk_size, seed, prog):
            for ion, (mean, _) in res.items():
                ys[ion].append(rec.labels)
                ps[ion].append(mean)
            yield rec, res

    write_predictions(out_dir / "predictions.tsv", collect(), "tsv", thresholds, with_labels=True)
    speed = prog.finish()
    results = {}
    for ion in ions:
        y = np.concatenate(ys[ion]).astype(np.int64)
        p = np.concatenate(ps[ion]).astype(np.float64)
        m = ion_metrics(y, p, thresholds[ion], min_recall)
        m["saved_threshold_method"] = (predictor.thresholds.get(ion) or {}).get("method")
        results[ion] = m
        write_curves(out_dir, ion, y, p, m)
    report = {
        "checkpoint": {"folds": predictor.fold_names, "base_model": predictor.meta.get("base_model"), "ions": predictor.ions},
        "proteins": len(records),
        "runtime": predictor.runtime,
        "note": "labels of the FASTA apply to every evaluated ion; 'at_best_*' thresholds are fitted on this set (optimistic)",
        "ions": results,
        "throughput": speed,
    }
    atomic_write_json(out_dir / "evaluation.json", report)
    md = [f"Evaluation of {', '.join(predictor.fold_names)} on {len(records)} proteins", "",
          "F1/MCC/precision/recall at the saved threshold (thresholds.json) and at the best-F1 threshold of this set (optimistic).",
          "", evaluation_table(results)]
    atomic_write_text(out_dir / "evaluation.md", "\n".join(md))
    return report


# =============================================================================================
# Embeddings
# =============================================================================================
def iter_embedded(
    backbone, examples: Sequence[Example], device: torch.device, max_tokens: int, precision: str | bool = "float32"
) -> Iterator[tuple[int, torch.Tensor]]:
    """(example index, final-norm hidden states of its query residues, float32 on CPU) in token-budget batches."""
    lengths = [ex.num_tokens for ex in examples]
    with torch.inference_mode(), autocast_context(device, precision):
        for idx in token_budget_batches(lengths, max_tokens, seed=None):
            batch = to_device(collate([examples[i] for i in idx], masking=None, seed=0, epoch=0), device)
            emb = backbone.model(batch["input_ids"], batch["within_seq_position_ids"], batch["global_position_ids"], batch["sequence_ids"])
            q = batch["query_residue_mask"]
            for row, i in enumerate(idx):
                yield i, emb[row][q[row]].float().cpu()


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
            p = p / f"fold_{k}"
        pred = load_checkpoint(p, base_model=base_model, device=device, dtype=dtype, merge=True)
        info = {"source": "fine-tuned", "checkpoint": pred.fold_names[0], "base_model": pred.meta.get("base_model"),
                "max_query_length": pred.max_query_length}
        return pred.model.backbone, info
    from e1min.hub import load_model

    backbone = load_model(path, dtype=dtype or torch.float32, device=_device(device))
    return backbone, {"source": "base", "checkpoint": str(path), "base_model": str(path), "max_query_length": None}


def embed_file(
    backbone,
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    per_residue: bool = False,
    shard_size: int = 1000,
    max_shard_bytes: int = 1 << 30,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_query_length: int | None = 1022,
    chunk_size: int = DEFAULT_CHUNK,
    device: torch.device | None = None,
    bf16: bool | None = None,
    info: dict | None = None,
    progress: bool = True,
    precision: str | None = None,
) -> dict[str, Any]:
    """Mean-pooled (and optionally per-residue) embeddings into safetensors shards + ``index.json``.

    Mean shards ``embeddings-00001.safetensors``...: key ``{id}`` -> (hidden_size,); with ``per_residue``,
    residue shards ``residues-00001.safetensors``...: key ``{id}`` -> (L, hidden_size); float32. Two key
    spaces (two kinds of file), so no protein id can collide with another's per-residue entry. Shards are
    written when they hold ``shard_size`` proteins or ``max_shard_bytes``; ``index.json`` (id -> shard,
    ``residues_index``: id -> residue shard) is written last. Long proteins are embedded in sliding
    windows and stitched.
    ``precision``: ``"float32"`` (default on the CPU) or ``"bf16"`` (default on CUDA); ``bf16`` is the older flag.
    """
    from e1min.io import atomic_save_safetensors, atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or next(backbone.parameters()).device
    precision = inference_precision(device, _requested(precision, bf16))
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PredictError(f"protein id {dup!r} appears more than once; embeddings are keyed by id")
    index: dict[str, str] = {}
    residues_index: dict[str, str] = {}
    shards: list[str] = []
    residue_shards: list[str] = []
    buf: dict[str, torch.Tensor] = {}
    buf_res: dict[str, torch.Tensor] = {}
    buf_bytes = 0

    def flush():
        nonlocal buf, buf_res, buf_bytes
        if not buf:
            return
        name = f"embeddings-{len(shards) + 1:05d}.safetensors"
        atomic_save_safetensors(out_dir / name, buf, {"format": "pt"})
        index.update({pid: name for pid in buf})
        shards.append(name)
        if buf_res:
            rname = f"residues-{len(residue_shards) + 1:05d}.safetensors"
            atomic_save_safetensors(out_dir / rname, buf_res, {"format": "pt"})
            residues_index.update({pid: rname for pid in buf_res})
            residue_shards.append(rname)
        buf, buf_res, buf_bytes = {}, {}, 0

    prog = Progress(len(records), sum(len(r.sequence) for r in records), label="embedded", enabled=progress)
    for a in range(0, len(records), chunk_size):
        chunk = records[a : a + chunk_size]
        examples = make_eval_examples(chunk, "-", None, VALIDATION_SAMPLING, 0, max_query_length, None)
        embs: list[torch.Tensor | None] = [None] * len(examples)
        for i, e in iter_embedded(backbone, examples, device, max_tokens, precision):
            embs[i] = e.numpy()
        stitched = stitch_predictions(examples, embs)
        for r in chunk:
            res = torch.from_numpy(stitched[r.id])
            buf[r.id] = res.mean(0)
            if per_residue:
                buf_res[r.id] = res
            buf_bytes += (res.numel() + res.shape[1]) * 4 if per_residue else res.shape[1] * 4
            if len(buf) >= shard_size or buf_bytes >= max_shard_bytes:
                flush()
        prog.update(len(chunk), sum(len(r.sequence) for r in chunk))
    flush()
    stats = prog.finish()
    hidden = backbone.config.hidden_size
    meta = {"format": "e1min-embeddings", "version": 2, "hidden_size": hidden, "per_residue": per_residue, "dtype": "float32",
            "pooling": "mean over query residues of the final-norm hidden states",
            "keys": "{id} in embeddings-*.safetensors (mean, hidden_size); {id} in residues-*.safetensors (per residue, L x hidden_size)",
            "model": info or {}, "runtime": describe(device, precision), "proteins": len(index), "shards": shards, "index": index,
            "residue_shards": residue_shards, "residues_index": residues_index}
    atomic_write_json(out_dir / "index.json", meta)
    return {**stats, "shards": len(shards)}


# =============================================================================================
# Command line
# =============================================================================================
def _common_args(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--fasta", required=True, help="FASTA file (labelled 3-line, unlabelled 2-line or wrapped)")
    p.add_argument("--skip-invalid", action="store_true", help="report and skip proteins that cannot be predicted instead of stopping")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="token budget per batch (padded tokens)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="proteins per streamed chunk (length-sorted within)")
    p.add_argument("--base-model", default=None, help="local base E1 directory to use instead of the one recorded in checkpoint.json")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    _precision_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype the base weights are stored in (default float32)")
    p.add_argument("--precision", default=None, choices=["float32", "bf16"],
                   help="compute precision: float32, or bf16 autocast for the backbone (heads and probabilities stay float32). "
                        "Default: float32 on the CPU, bf16 on CUDA; never chosen from CPU flags")
    p.add_argument("--no-bf16", action="store_true", help="same as --precision float32")
    p.add_argument("--matmul-precision", default="highest", choices=list(MATMUL_PRECISIONS),
                   help="float32 matmuls: highest (exact, default), high/medium (TF32 on GPUs, reduced-precision float32 on CPUs that have it)")


def _cli_precision(args: argparse.Namespace) -> str | None:
    """The precision asked for on the command line (None: the device's default); sets the matmul precision."""
    set_matmul_precision(args.matmul_precision)
    if args.no_bf16 and args.precision == "bf16":
        raise PredictError("--no-bf16 contradicts --precision bf16")
    return "float32" if args.no_bf16 else args.precision


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--msa-dir", default=None, help="A3M directory ({msa_dir}/{ION}/{id}.a3m or {msa_dir}/{id}.a3m)")
    p.add_argument("--ions", default=None, help="comma-separated subset of the model's ions (default: all)")
    p.add_argument("--folds", default=None, help="comma-separated 1-based folds of a run directory (default: all complete)")
    p.add_argument("--seed", type=int, default=None, help="seed of MSA context sampling (default: the run's seed)")


def _positive(name: str, v: int) -> None:
    if v <= 0:
        raise PredictError(f"{name} must be positive, got {v}")


def _setup(args: argparse.Namespace, ctx_device: torch.device | None = None) -> tuple[Predictor, list[str], ContextProvider | None, list[Record], list[Skipped]]:
    """Load the checkpoint and check every input before any prediction."""
    _positive("--max-tokens", args.max_tokens)
    _positive("--chunk-size", args.chunk_size)
    folds = None
    if args.folds:
        try:
            folds = [int(f) for f in args.folds.split(",") if f.strip()]
        except ValueError:
            raise PredictError(f"--folds must be comma-separated integers, got {args.folds!r}") from None
    if not Path(args.fasta).exists():
        raise DataError(f"{args.fasta}: file not found")
    if args.msa_dir and not Path(str(args.msa_dir).split("{ION}")[0] or ".").is_dir():
        raise PredictError(f"--msa-dir {args.msa_dir}: no such directory")
    predictor = load_predictor(args.checkpoint, folds=folds, base_model=args.base_model, device=ctx_device or args.device,
                               dtype=getattr(torch, args.dtype), precision=_cli_precision(args))
    ions = predictor._check_ions([i.strip() for i in args.ions.split(",") if i.strip()] if args.ions else None)
    max_len = None
    if predictor.max_query_length is None:
        from e1min.tokenizer import MAX_POSITIONS_WITHIN_SEQ, SPECIALS_PER_SEQUENCE

        max_len = MAX_POSITIONS_WITHIN_SEQ - SPECIALS_PER_SEQUENCE
    records, skipped = read_input_fasta(args.fasta, args.skip_invalid, require_labels=getattr(args, "require_labels", False), max_length=max_len)
    provider = ContextProvider(args.msa_dir) if args.msa_dir else None
    if provider is not None:
        records, more = check_msas(provider, ions, records, args.skip_invalid)
        skipped += more
        if not records:
            raise DataError(f"{args.fasta}: no valid records left after checking MSAs")
    return predictor, ions, provider, records, skipped


def _report_setup(predictor: Predictor, ions: list[str], records: list[Record], skipped: list[Skipped], is_main: bool = True) -> None:
    if not is_main:
        return
    err = sys.stderr
    print(f"model: {', '.join(predictor.fold_names)} ({predictor.num_folds} fold(s){', LoRA merged' if predictor.merged else ''}) "
          f"on {predictor.device}, precision {predictor.precision}; ions {', '.join(ions)}; {len(records)} proteins, {sum(len(r.sequence) for r in records)} residues", file=err)
    for ion in ions:
        if predictor.threshold(ion) is None:
            print(f"note: no saved threshold for {ion} (no thresholds.json entry): the call column is left empty", file=err)
    if skipped:
        print(f"skipped {len(skipped)} invalid protein(s):", file=err)
        for s in skipped[:20]:
            print(f"  {s.id}: {s.reason}", file=err)
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more", file=err)


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``e1min predict``: per-residue probabilities, fold spread and calls for a FASTA file."""
    p = argparse.ArgumentParser(
        prog="e1min predict",
        description="Per-residue metal-binding probabilities for every protein of a FASTA file. Output rows are in "
        "input order: TSV columns id, position (1-based), residue, ion, probability (mean over folds), std (across folds), "
        "call (probability >= the run's saved threshold; empty when none is known); or one JSON object per protein.",
    )
    _common_args(p, "run directory (all complete folds), fold directory or fold_K/best")
    _model_args(p)
    p.add_argument("--out", default=None, help="output file (default predictions.tsv, or predictions.jsonl with --format jsonl)")
    p.add_argument("--format", default=None, choices=["tsv", "jsonl"], help="default: from --out's extension (.jsonl -> jsonl), else tsv")
    args = p.parse_args(argv)
    fmt = output_format(args.out or "", args.format)
    out = check_output_file(args.out or f"predictions.{fmt}", [args.fasta])
    from e1min.dist import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = init_distributed(timeout_s=float(os.environ.get("E1MIN_PREDICT_TIMEOUT", 24 * 3600)), device=args.device) if world > 1 else None
    try:
        predictor, ions, provider, records, skipped = _setup(args, ctx.device if ctx else None)
        rank, ws = (ctx.rank, ctx.world_size) if ctx else (0, 1)
        _report_setup(predictor, ions, records, skipped, rank == 0)
        stats = predict_file(predictor, records, out, ions, provider, fmt, args.max_tokens, args.chunk_size, args.seed, rank, ws,
                             barrier=(ctx.barrier if ctx else None), progress=not args.quiet)
        if rank == 0:
            print(f"wrote {out} ({len(records)} proteins, {len(ions)} ion(s)); {stats['proteins_per_s']:.1f} proteins/s, "
                  f"{stats['residues_per_s']:.0f} residues/s", file=sys.stderr)
    finally:
        if ctx is not None:
            ctx.destroy()
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``e1min evaluate``: predict a labelled FASTA and report per-ion metrics."""
    p = argparse.ArgumentParser(
        prog="e1min evaluate",
        description="Predict a labelled FASTA and report per-ion AUPRC, AUROC, HRA, positive rate, and F1/MCC/precision/recall "
        "at the saved and at the best threshold. The FASTA's labels apply to every evaluated ion (all of the model's ions "
        "unless --ions picks some). Writes predictions.tsv, evaluation.json, evaluation.md, ROC/PR curves (CSV, and PNG "
        "with matplotlib) to --out-dir. Runs in one process.",
    )
    _common_args(p, "run directory (all complete folds), fold directory or fold_K/best")
    _model_args(p)
    p.add_argument("--out-dir", default="evaluation", help="output directory (default ./evaluation)")
    p.add_argument("--min-recall", type=float, default=0.7, help="recall floor of the high-recall AUPRC (HRA)")
    args = p.parse_args(argv)
    args.require_labels = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PredictError("evaluate runs in one process; launch it without torchrun")
    check_output_dir(args.out_dir, [args.fasta], EVALUATION_FILES)
    predictor, ions, provider, records, skipped = _setup(args)
    _report_setup(predictor, ions, records, skipped)
    report = evaluate_records(predictor, records, args.out_dir, ions, provider, args.max_tokens, args.chunk_size, args.seed,
                              args.min_recall, progress=not args.quiet)
    print(evaluation_table(report["ions"]))
    print(f"wrote {Path(args.out_dir) / 'evaluation.json'}, evaluation.md, predictions.tsv and curves", file=sys.stderr)
    return 0


def embed_main(argv: Sequence[str] | None = None) -> int:
    """``e1min embed``: mean-pooled (and per-residue) backbone embeddings to safetensors shards."""
    p = argparse.ArgumentParser(
        prog="e1min embed",
        description="Final-norm embeddings of the fine-tuned backbone (a run/fold checkpoint, LoRA merged; a run directory "
        "uses --fold, default the first complete fold) or of a plain base E1 (a directory with config.json or a Hub id). "
        "Writes OUT/embeddings-00001.safetensors ... (key {id}: mean over residues), with --per-residue also "
        "OUT/residues-00001.safetensors ... (key {id}: per residue), and OUT/index.json (id -> shard). Single sequence "
        "(no MSA context); runs in one process.",
    )
    p.add_argument("--checkpoint", required=True, help="run dir, fold dir, fold_K/best, or a base E1 directory / Hub id")
    p.add_argument("--fasta", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--per-residue", action="store_true", help="also store per-residue embeddings (residues-*.safetensors)")
    p.add_argument("--shard-size", type=int, default=1000, help="proteins per safetensors shard (also capped at 1 GiB)")
    p.add_argument("--fold", type=int, default=None, help="fold of a run directory (default: first complete)")
    p.add_argument("--max-length", type=int, default=None, help="window length for long proteins (default: the checkpoint's max_query_length, else 1022)")
    p.add_argument("--skip-invalid", action="store_true")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--base-model", default=None)
    p.add_argument("--device", default=None)
    _precision_args(p)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    _positive("--shard-size", args.shard_size)
    _positive("--max-tokens", args.max_tokens)
    if args.max_length is not None and args.max_length < 2:
        raise PredictError(f"--max-length must be at least 2, got {args.max_length}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PredictError("embed runs in one process; launch it without torchrun")
    if not Path(args.fasta).exists():
        raise DataError(f"{args.fasta}: file not found")
    check_output_dir(args.out, [args.fasta], ["index.json"], what="--out")
    backbone, info = load_backbone(args.checkpoint, args.fold, args.base_model, args.device, getattr(torch, args.dtype))
    max_len = args.max_length or info.get("max_query_length") or 1022
    records, skipped = read_input_fasta(args.fasta, args.skip_invalid)
    if skipped:
        print(f"skipped {len(skipped)} invalid protein(s): " + "; ".join(f"{s.id}: {s.reason}" for s in skipped[:5]), file=sys.stderr)
    device = next(backbone.parameters()).device
    precision = inference_precision(device, _cli_precision(args))
    print(f"embedding with {info.get('checkpoint')} on {device}, precision {precision}", file=sys.stderr)
    stats = embed_file(backbone, records, args.out, args.per_residue, args.shard_size, max_tokens=args.max_tokens,
                       max_query_length=max_len, device=device, precision=precision, info=info, progress=not args.quiet)
    print(f"wrote {stats['shards']} shard(s) and index.json to {args.out} ({len(records)} proteins)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m e1min.predict predict|evaluate|embed ARGS`` (for torchrun)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"predict": predict_main, "evaluate": evaluate_main, "embed": embed_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m e1min.predict {predict,evaluate,embed} ARGS ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    from e1min.cli import run_guarded

    from e1min.dist import exit_code_for_launcher

    args = sys.argv[1:]
    sys.exit(exit_code_for_launcher(run_guarded(args[0] if args else "predict", main, args)))
