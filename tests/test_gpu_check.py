"""tools/gpu_check.py (make gpu-check) passes its own dry run: every phase that can run without CUDA, on the CPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\[(PASS|FAIL|WARN)\] [a-z0-9_]+/[^:]+: .* [0-9]+\.[0-9]s$")


def gpu_check(tmp_path, *args):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    r = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith("[")]
    return r, lines, (json.loads(out.read_text()) if out.exists() else None)


def test_dry_run_passes_every_phase(tmp_path):
    r, lines, report = gpu_check(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert all(LINE.match(line) for line in lines), [line for line in lines if not LINE.match(line)]
    checks = {f"{c['phase']}/{c['check']}": c for c in report["checks"]}
    assert report["failed"] == 0 and len(checks) == len(lines)
    assert {c.split("/")[0] for c in checks} == {"env", "parity", "recompiles", "speed", "e2e"}
    # What the dry run can show on the CPU, it shows: flex equals the reference, a bounded graph count, e2e runs.
    assert checks["env/attention_path"]["value"] == "BlockRanges"
    assert checks["parity/tiny/float32_flex/embeddings_max_abs"]["value"] <= 1e-4
    assert checks["parity/e1-150m/float32_dense/lora_grads_rel_max"]["value"] <= 1e-3
    assert checks["recompiles/graphs_added_second_pass"]["value"] == 0
    assert checks["e2e/train_demo"]["status"] == checks["e2e/torchrun_forced_group"]["status"] == "PASS"
    # GPU targets are never claimed from a CPU run.
    assert checks["speed/context_step_mfu"]["status"] == "WARN"


def test_a_failed_check_fails_the_run(tmp_path):
    r, lines, report = gpu_check(tmp_path, "--phases", "env,no_such_phase")
    assert r.returncode == 1
    assert lines[-1].startswith("[FAIL] no_such_phase/known_phase: no_such_phase") and report["failed"] == 1


def test_without_cuda_and_without_dry_run_it_says_so(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device; run with --dry-run" in r.stderr
