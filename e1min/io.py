"""Atomic file writes and strict JSON: a crash never leaves a half-written file under its final name,
and every JSON file e1min writes parses with a strict parser (NaN and infinities are written as null)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from e1min.errors import E1minError

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file under the user's umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Mode of a new directory under the user's umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new hidden temporary directory in ``parent`` with the umask's mode (mkdtemp makes 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    The file gets the user's umask mode (mkstemp would make it 0600, and a replaced file would
    silently become private on a shared cluster).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({_reason(e)})") from None
    os.fchmod(fd, file_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename not in (None, tmp, str(path)):
            raise  # an input the block read, not this output
        # Disk full, quota, file size limit, read-only: the previous file (if any) is untouched.
        raise OutputError(f"{path}: cannot write ({_reason(e)}); the previous file, if any, is unchanged") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def make_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Create directory ``path`` (and parents); an OSError becomes an ``OutputError`` naming ``what`` and the reason."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".e1min-probe.", delete=True)
        probe.close()
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write there ({_reason(e)})") from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON atomically (NaN/Infinity become null)."""
    atomic_write_text(path, dumps_json(obj, indent=2) + "\n")


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``obj`` as strict JSON: NaN and +-Infinity become null, numpy/torch scalars and
    arrays become numbers and lists, paths become strings. Read nulls back with ``nan_if_none``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` made of plain JSON types, with non-finite floats replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch arrays and scalars
        return json_safe(obj.tolist())
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def nan_if_none(value: Any) -> float:
    """A number read back from strict JSON: null (a NaN or infinity when written) -> NaN."""
    return math.nan if value is None else float(value)


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors (made contiguous, on CPU) as safetensors atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, file_mode())  # safetensors recreates the file as 0600


def read_json_object(path: str | os.PathLike, error: type[Exception], missing: str = "not found") -> dict[str, Any]:
    """A JSON object from ``path``; a missing file, invalid JSON or a non-object is ``error`` naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object")
    return obj


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), what: str = "--out") -> Path:
    """Refuse, before any work, an output file that is one of ``inputs`` or an existing directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a directory; give a file name")
    _refuse_inputs(path, inputs, what)
    _check_parent(path, what)
    return path


def check_output_dir(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), names: Iterable[str] = (), what: str = "--out-dir"
) -> Path:
    """Refuse, before any work, an output directory that is a file, or whose output ``names`` are ``inputs``."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a directory")
    inputs = list(inputs)
    for name in names:
        _refuse_inputs(path / name, inputs, what)
    _check_parent(path / "x", what) if path.is_dir() else _check_parent(path, what)
    return path


def _refuse_inputs(out: Path, inputs: Iterable[str | os.PathLike | None], what: str) -> None:
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).expanduser()
        if src.resolve() == target or (src.exists() and out.exists() and os.path.samefile(src, out)):
            raise OutputError(f"{what} {out}: is an input ({given}); refusing to overwrite it")


def _check_parent(path: Path, what: str) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot write in {parent}")


class OutputError(E1minError, ValueError):
    """An output path that would overwrite an input, is of the wrong kind, or cannot be written."""


def format_duration(seconds: float) -> str:
    """``1h05m`` / ``3m07s`` for logs and progress lines; ``?`` when unknown (infinite or NaN)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
