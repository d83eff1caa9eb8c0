"""Prediction outputs: a progress line, TSV/JSONL streaming in input order, the per-rank merge, embedding shards.

TSV columns: id, position (1-based), residue, ion, probability (mean over folds), std (across folds),
call (probability >= the run's saved threshold; empty when none is known). JSONL: one object per protein.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from e1min.compile import is_compiled
from e1min.data.batching import shard_eval
from e1min.data.dataset import make_eval_examples, stitch_predictions
from e1min.data.fasta import Record
from e1min.data.msa import VALIDATION_SAMPLING, ContextProvider
from e1min.io import atomic_path, atomic_save_safetensors, atomic_write_json, dumps_json, format_duration
from e1min.predictor import DEFAULT_MAX_TOKENS, PredictError, Predictor, _requested
from e1min.runtime import describe, inference_precision
from e1min.scoring import iter_embedded

TSV_HEADER = ("id", "position", "residue", "ion", "probability", "std", "call")
DEFAULT_CHUNK = 256


class Progress:
    """A progress line on stderr: proteins/s, residues/s, ETA (carriage-return updates on a terminal)."""

    def __init__(
        self, total: int, residues: int, label: str = "predicted", enabled: bool = True, stream: TextIO | None = None, world_size: int = 1
    ):
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
        msg = (
            f"{self.label} {done}/{self.total} proteins | {rate:.1f} proteins/s, {self.residues / el:.0f} residues/s"
            f" | elapsed {format_duration(el)} ETA {format_duration(eta)}"
        )
        self.stream.write(("\r" + msg) if self.tty else msg + "\n")
        self.stream.flush()

    def finish(self) -> dict[str, float]:
        el = max(time.time() - self.t0, 1e-9)
        if self.enabled and self.tty:
            self.stream.write("\n")
        return {
            "proteins": self.done,
            "residues": self.residues,
            "seconds": el,
            "proteins_per_s": self.done / el,
            "residues_per_s": self.residues / el,
        }


def _tsv_lines(
    rec: Record, ion: str, mean: np.ndarray, std: np.ndarray, threshold: float | None, labels: np.ndarray | None = None
) -> list[str]:
    calls = [""] * len(mean) if threshold is None else ["1" if c else "0" for c in (mean >= threshold).tolist()]
    lab = [] if labels is None else [f"\t{int(v)}" for v in labels.tolist()]
    return [
        f"{rec.id}\t{i + 1}\t{aa}\t{ion}\t{m:.6g}\t{s:.3g}\t{c}{lab[i] if lab else ''}\n"
        for i, (aa, m, s, c) in enumerate(zip(rec.sequence, mean.tolist(), std.tolist(), calls))
    ]


def _jsonl_line(
    rec: Record, results: dict[str, tuple[np.ndarray, np.ndarray]], thresholds: dict[str, float | None], labels: bool = False
) -> str:
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
    handles = [open(p, encoding="utf-8") for p in parts]
    pending: list[str | None] = [None] * len(parts)
    try:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            if fmt == "tsv":
                header = None
                for h in handles:
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
    meta = {
        "format": "e1min-embeddings",
        "version": 2,
        "hidden_size": hidden,
        "per_residue": per_residue,
        "dtype": "float32",
        "pooling": "mean over query residues of the final-norm hidden states",
        "keys": "{id} in embeddings-*.safetensors (mean, hidden_size); {id} in residues-*.safetensors (per residue, L x hidden_size)",
        "model": info or {},
        "runtime": describe(device, precision, compiled=is_compiled(backbone)),
        "proteins": len(index),
        "shards": shards,
        "index": index,
        "residue_shards": residue_shards,
        "residues_index": residues_index,
    }
    atomic_write_json(out_dir / "index.json", meta)
    return {**stats, "shards": len(shards)}
