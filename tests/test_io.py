"""Atomic writes keep the user's umask; strict JSON; output paths never overwrite inputs."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from e1min.io import OutputError, atomic_write_text, check_output_dir, check_output_file, make_temp_dir


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_and_replaced_files_follow_the_umask(tmp_path, umask_022):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "one")
    assert _mode(path) == 0o644
    os.chmod(path, 0o600)
    atomic_write_text(path, "two")  # replacing a private file still gives the umask's mode
    assert _mode(path) == 0o644 and path.read_text() == "two"
    os.umask(0o077)
    atomic_write_text(path, "three")
    assert _mode(path) == 0o600
    os.umask(0o022)
    assert _mode(make_temp_dir(tmp_path, ".state.")) == 0o755


def test_no_temporary_file_is_left_on_failure(tmp_path):
    from e1min.io import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json"):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_output_file_checks(tmp_path):
    src = tmp_path / "in.fasta"
    src.write_text(">a\nMK\n")
    with pytest.raises(OutputError, match="is an input"):
        check_output_file(tmp_path / "sub" / ".." / "in.fasta", [src])
    link = tmp_path / "link.tsv"
    link.symlink_to(src)
    with pytest.raises(OutputError, match="is an input"):
        check_output_file(link, [src])
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path, [src])
    assert check_output_file(tmp_path / "new" / "out.tsv", [src]) == tmp_path / "new" / "out.tsv"


def test_output_dir_checks(tmp_path):
    src = tmp_path / "in.fasta"
    src.write_text(">a\nMK\n")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_dir(src)
    with pytest.raises(OutputError, match="is an input"):
        check_output_dir(tmp_path, [src], names=["in.fasta"])
    assert check_output_dir(tmp_path / "fresh", [src], names=["index.json"]) == tmp_path / "fresh"


def test_saved_state_directories_follow_the_umask(tmp_path, umask_022, tiny_model):
    """A fold state (best/, last/) is readable by collaborators: 0755 directory, 0644 files."""
    from e1min.checkpoint import save_state
    from e1min.heads import BindingModel
    from e1min.lora import apply_lora

    model = BindingModel(apply_lora(tiny_model, r=2, alpha=4), ["ZN"])
    save_state(tmp_path / "best", model, {"base_model": "x", "ions": ["ZN"]})
    assert _mode(tmp_path / "best") == 0o755
    assert {p.name: _mode(p) for p in (tmp_path / "best").iterdir()} == {p.name: 0o644 for p in (tmp_path / "best").iterdir()}


def test_strict_json_writer_turns_non_finite_into_null(tmp_path):
    from e1min.io import atomic_write_json, nan_if_none

    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": np.float32(2.0)})
    doc = json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert doc == {"a": None, "b": [None, None, 1.5], "c": 2.0}
    assert np.isnan(nan_if_none(doc["a"])) and nan_if_none(doc["b"][2]) == 1.5
