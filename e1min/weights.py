"""E1 weights: find a checkpoint (local directory or Hugging Face Hub repo id), load, save, or make random ones.

Loading builds the model on the meta device and fills it tensor by tensor (``assign=True``), so no
second full copy of the weights ever exists; the file is re-opened per group of tensors so the
memory map of the part already copied is released.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from e1min.config import ConfigError, E1Config, show
from e1min.errors import E1minError
from e1min.io import atomic_save_safetensors, atomic_write_json
from e1min.model import E1ForMaskedLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_READ_GROUP_BYTES = 64 * 2**20
# safetensors header dtypes that load as floating-point tensors (F16, BF16, F32, F64, F8_*).
_FLOAT_PREFIXES = ("F", "BF")


class CheckpointError(E1minError, ValueError):
    """A checkpoint that cannot be found, read, or does not match the model."""


def resolve_directory(name_or_path: str | os.PathLike, revision: str | None, allow_patterns: list[str], what: str = "checkpoint") -> Path:
    """Local directory as is; otherwise a Hub repo id, fetched (or taken from the cache) with huggingface_hub.

    Respects ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``. Raises CheckpointError naming ``what``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        article = "an" if what[0] in "aeiou" else "a"
        raise CheckpointError(f"{name}: not {article} {what} directory, and not a Hub repo id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=allow_patterns))
    except Exception as e:  # huggingface_hub raises many types; all mean the same to a user
        raise CheckpointError(
            f"{name}: could not fetch the {what} from the Hugging Face Hub or find it in the local cache "
            f"(revision={revision or 'main'}, HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        ) from None


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The directory of an E1 checkpoint: local, or a Hub repo id (config + safetensors only)."""
    return resolve_directory(name_or_path, revision, [CONFIG_NAME, "*.safetensors", INDEX_NAME])


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors shards, in index order (one file when unsharded)."""
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and "/" not in v and "\\" not in v for v in weight_map.values()
        ):
            raise CheckpointError(f"{index}: 'weight_map' must be an object tensor name -> shard file name, got {show(weight_map)}")
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    elif (directory / WEIGHTS_NAME).exists():
        files = [directory / WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index}: shard(s) missing: {', '.join(missing)}")
    return files


def normalize_key(key: str) -> str:
    """Map a tensor name of a re-packaged checkpoint onto ours.

    Released E1 keys start with ``model.`` or ``mlm_head.``; re-packagings may add a wrapper prefix
    (e.g. ``e1.model.layers...``) or drop ``model.`` (``layers.0...``). Anything else is kept as is
    (and then reported as unexpected).
    """
    for anchor in ("model.", "mlm_head."):
        if key.startswith(anchor):
            return key
    for marker, target in ((".model.", "model."), (".mlm_head.", "mlm_head.")):
        i = key.find(marker)
        if i >= 0:
            return target + key[i + len(marker) :]
    if key.startswith(("layers.", "embed_tokens.", "embed_seq_id.", "norm.")):
        return "model." + key
    return key


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, str]]:
    """normalized key -> (file, original key), with clear errors for unreadable files."""
    from safetensors import safe_open

    where: dict[str, tuple[Path, str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                keys = list(fh.keys())
        except Exception as e:
            raise CheckpointError(f"{f}: unreadable or truncated safetensors file ({e})") from None
        for k in keys:
            nk = normalize_key(k)
            if nk in where:
                raise CheckpointError(f"{f}: tensor {k!r} appears twice in the checkpoint")
            where[nk] = (f, k)
    return where


def load_state_dict(
    files: list[Path], expected: dict[str, tuple[torch.Size, torch.dtype]], dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read, check and cast every expected tensor; one error lists all missing/unexpected/misshapen keys."""
    from safetensors import safe_open

    where = _read_headers(files)
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    shapes, dtypes = {}, {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                nk = normalize_key(k)
                if nk in expected:
                    sl = fh.get_slice(k)
                    shapes[nk] = tuple(sl.get_shape())
                    dtypes[nk] = (f, k, str(sl.get_dtype()))
    wrong = [
        f"{k}: {list(shapes[k])} in file, model expects {list(expected[k][0])}"
        for k in sorted(shapes)
        if shapes[k] != tuple(expected[k][0])
    ]
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    # Every E1 weight is floating point; an integer tensor would be cast silently (cheap: header only).
    not_float = [
        (f, k, dt) for nk, (f, k, dt) in sorted(dtypes.items()) if expected[nk][1].is_floating_point and not dt.startswith(_FLOAT_PREFIXES)
    ]
    if not_float:
        f, k, dt = not_float[0]
        more = f" (and {len(not_float) - 1} more)" if len(not_float) > 1 else ""
        raise CheckpointError(f"{f}: tensor {k!r} has non-floating dtype {dt}{more}; E1 weights are floating point")
    if problems:
        raise CheckpointError(f"{files[0].parent}: checkpoint does not match the config: " + " | ".join(problems))

    state: dict[str, torch.Tensor] = {}
    sums: list[torch.Tensor] = []  # one 0-d sum per tensor in ``order``: non-finite iff a NaN/Inf (or overflow)
    order: list[tuple[str, Path, str, torch.dtype]] = []
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for nk, (f, k) in where.items():
        by_file.setdefault(f, []).append((nk, k))
    for f, entries in by_file.items():
        group_start = 0
        while group_start < len(entries):
            # Re-open per group: closing the file drops the mapped pages already copied out.
            with safe_open(str(f), framework="pt") as fh:
                size = 0
                i = group_start
                while i < len(entries) and (size < _READ_GROUP_BYTES or i == group_start):
                    nk, k = entries[i]
                    try:
                        t = fh.get_tensor(k)
                    except Exception as e:
                        raise CheckpointError(f"{f}: cannot read tensor {k!r} ({e})") from None
                    target = dtype or expected[nk][1]
                    state[nk] = t.to(device=device, dtype=target if t.is_floating_point() else t.dtype)
                    if state[nk].is_floating_point() and state[nk].numel():
                        sums.append(state[nk].sum().float())
                        order.append((nk, f, k, t.dtype))
                    size += t.numel() * t.element_size()
                    del t
                    i += 1
                group_start = i
    _check_finite(state, sums, order)
    return state


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_finite(state: dict[str, torch.Tensor], sums: list[torch.Tensor], order: list[tuple[str, Path, str, torch.dtype]]) -> None:
    """CheckpointError naming file and tensor for the first weight with a NaN or infinity (after the cast).

    Checked on base weights too: a native-dtype sum per tensor is one memory-bound pass (~0.5 s for
    E1-600m on a CPU, under a tenth of reading and casting it), with a single device sync at the end;
    only a tensor whose sum is not finite (a NaN/Inf, or a sum that overflowed) gets the exact element check.
    """
    if not sums:
        return
    suspicious = (~torch.isfinite(torch.stack(sums))).nonzero().flatten().tolist()
    for i in suspicious:
        nk, f, k, stored = order[i]
        t = state[nk]
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan = int(torch.isnan(t).sum())
            cast = f" after the cast from {_dtype_name(stored)} to {_dtype_name(t.dtype)}" if stored != t.dtype else ""
            raise CheckpointError(
                f"{f}: tensor {k!r} has non-finite values{cast} ({n_nan} NaN, {int(bad.sum()) - n_nan} inf of {t.numel()})"
            )


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> E1ForMaskedLM:
    """Load E1 (``Profluent-Bio/E1-150m``, a re-packaging, or a local directory) in eval mode.

    ``dtype`` defaults to the checkpoint's stored dtype (bf16 for the released models); ``device`` to CPU.
    To apply a LoRA adapter on top, use ``e1min.load_model(..., adapter=...)`` or ``e1min.adapters.load_adapter``.
    """
    directory = resolve_checkpoint(name_or_path, revision)
    try:
        config = E1Config.from_json(directory / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = weight_files(directory)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = E1ForMaskedLM(config)
    expected = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    if dtype is None:
        dtype = _stored_dtype(config, directory / CONFIG_NAME)
    state = load_state_dict(files, expected, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.name_or_path = str(name_or_path)  # recorded in adapters and run checkpoints
    model.revision = revision
    return model


def _stored_dtype(config: E1Config, path: Path) -> torch.dtype | None:
    """config.json's ``torch_dtype`` as a floating torch dtype; None (the model's default) if absent or unknown."""
    name = config.torch_dtype
    found = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(found, torch.dtype):
        return None
    if not found.is_floating_point:
        raise CheckpointError(f"{path}: 'torch_dtype' must name a floating-point dtype, got {show(name)}")
    return found


def save_model(model: E1ForMaskedLM, directory: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (or shards + index) in the released layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write_json(directory / CONFIG_NAME, config)
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        atomic_save_safetensors(directory / WEIGHTS_NAME, state, meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_safetensors(directory / name, shard, meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    atomic_write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


# --------------------------------------------------------------------------------- random weights


def random_model(config: E1Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> E1ForMaskedLM:
    """An E1ForMaskedLM with seeded random weights (norm weights perturbed away from 1), eval mode.

    For tests, demos and benchmarks.
    """
    gen = torch.Generator().manual_seed(seed)
    model = E1ForMaskedLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                bound = 1.0 / p.shape[1] ** 0.5
                if "embed" in name:
                    bound = 1.0
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.to(dtype).eval()


def write_random_checkpoint(
    directory: str | os.PathLike,
    config: E1Config,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> E1ForMaskedLM:
    """Write config.json + model.safetensors (sharded when ``max_shard_bytes``) and return the model."""
    model = random_model(config, seed, dtype)
    save_model(model, directory, max_shard_bytes=max_shard_bytes)
    return model
