"""The `e1min` command: info, check-data, error handling, and an import without side effects."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e1min.cli import main
from tests.helpers import toy_config


def test_info(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "parameters: " in out and "6 (4 within-sequence, 2 global: [2, 5])" in out and "hidden_size: 64" in out


def test_info_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json: not valid JSON" in err and "Traceback" not in err


def test_check_data_ok_and_problems(tmp_path, tiny_checkpoint, capsys):
    cfg = toy_config(tmp_path, tiny_checkpoint)
    assert main(["check-data", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ZN" in out and "CA" in out and "no problems found" in out
    # Break two files: both problems are reported at once, exit code non-zero, no traceback.
    (tmp_path / "data" / "ZN_train.fasta").write_text(">a\nMKV\n0101\n")
    (tmp_path / "data" / "CA_train.fasta").write_text(">b\nMK1\n")
    assert main(["check-data", "--config", str(cfg)]) == 1
    captured = capsys.readouterr()
    assert "ZN_train.fasta" in captured.out and "CA_train.fasta" in captured.out
    assert "2 problem(s)" in captured.out and "Traceback" not in captured.err


def test_import_has_no_side_effects():
    code = (
        "import logging, threading, sys; before = threading.active_count(); import e1min; "
        "assert threading.active_count() == before; assert not logging.getLogger().handlers; "
        "assert not logging.getLogger('e1min').handlers; assert 'huggingface_hub' not in sys.modules; print(e1min.__version__)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == __import__("e1min").__version__


# -- outputs that cannot be written, inputs of the wrong kind: one line, exit 2, nothing left behind ----------


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    """A tmpfs at ``path`` (root only): read-only, or tiny to fill up."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs as root here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def unwritable_dir(path: Path):
    """A directory nobody may write in: a read-only tmpfs as root (root ignores permissions), chmod 555 otherwise."""
    if os.geteuid() == 0:
        with mounted_tmpfs(path, "ro,size=64k") as p:
            yield p
    else:
        path.mkdir(parents=True)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


def one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for e in expected:
        assert e in err, err
    return err


@pytest.mark.parametrize("where", ["read-only", "existing file", "under a file", "/dev/null"])
def test_train_output_dir_that_cannot_be_written(tmp_path, tiny_checkpoint, capsys, where):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    (tmp_path / "afile").write_text("keep")
    target = {"existing file": tmp_path / "afile", "under a file": tmp_path / "afile/run", "/dev/null": Path("/dev/null")}
    reason = {"read-only": "cannot write there", "existing file": "exists and is not a directory", "under a file": "Not a directory"}
    reason["/dev/null"] = reason["existing file"]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(unwritable_dir(tmp_path / "ro")) / "run" if where == "read-only" else target[where]
        assert main(["train", "--config", str(cfg), "--set", f"training.output_dir={out}"]) == 2
        one_line_error(capsys, "e1min train: error: training.output_dir", str(out), reason[where])
    assert (tmp_path / "afile").read_text() == "keep"


def test_directories_given_as_files(tmp_path, tiny_checkpoint, run_dir, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 2
    one_line_error(capsys, str(tmp_path), "is a directory")
    assert main(["predict", "--checkpoint", str(run_dir), "--fasta", str(tmp_path), "--out", str(tmp_path / "p.tsv")]) == 2
    one_line_error(capsys, str(tmp_path), "is a directory, not a FASTA file")
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">a\nMKVLA\n")
    state = run_dir / "fold_1/best/checkpoint.json"
    assert main(["predict", "--checkpoint", str(state), "--fasta", str(fasta), "--out", str(tmp_path / "p.tsv")]) == 2
    one_line_error(capsys, str(state), "is a file")
    assert not (tmp_path / "p.tsv").exists()


@pytest.mark.parametrize("full", ["file size limit", "disk full"])
def test_predict_out_on_a_full_disk_keeps_the_old_file(tmp_path, run_dir, full):
    """ENOSPC / EFBIG mid-write: one line naming --out, the previous file intact, no temporary left."""
    fasta = tmp_path / "q.fasta"
    fasta.write_text("".join(f">p{i}\n{'MKVLAHCDEG' * 20}\n" for i in range(40)))
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(mounted_tmpfs(tmp_path / "tiny", "size=32k")) if full == "disk full" else tmp_path / "outdir"
        d.mkdir(exist_ok=True)
        out = d / "p.tsv"
        out.write_text("old predictions\n")
        limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); " if full == "file size limit" else ""
        code = f"{limit}import sys; from e1min.cli import main; sys.exit(main(sys.argv[1:]))"
        argv = ["predict", "--checkpoint", str(run_dir), "--fasta", str(fasta), "--out", str(out), "--quiet"]
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert "Traceback" not in r.stderr and last.startswith(f"e1min predict: error: {out}: cannot write ("), r.stderr
        assert ("File too large" if full == "file size limit" else "No space left on device") in last
        assert out.read_text() == "old predictions\n"
        assert sorted(p.name for p in d.iterdir()) == ["p.tsv"]


def test_adapter_config_disagreeing_with_checkpoint_json(tmp_path, run_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = run / "fold_1/best/adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 2
    path.write_text(json.dumps(cfg))
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">a\nMKVLA\n")
    assert main(["predict", "--checkpoint", str(run), "--fasta", str(fasta), "--out", str(tmp_path / "p.tsv")]) == 2
    one_line_error(capsys, "adapter_config.json and checkpoint.json disagree", f"lora_alpha {cfg['lora_alpha']!r}", "lora.alpha")
