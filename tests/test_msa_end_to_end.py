"""MSA context end to end: a tiny training run with data.msa_dir, then predict --msa-dir on the same proteins.

The context must reach the model (probabilities differ from single-sequence ones) and prediction must
reproduce the run's out-of-fold probabilities (same fixed validation context). Precision is pinned to
float32 in training (``training.bf16: false``) and prediction (``--no-bf16``) so this holds on every CPU.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from e1min.data.fasta import Record, read_fasta, write_fasta
from e1min.data.msa import MSASampling, read_a3m
from e1min.predict import predict_main
from e1min.train import main as train_main
from tests.helpers import toy_config, write_toy_dataset

AMINO = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a busy 2-core box: one intra-op thread is much faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_msas(directory, records, rng) -> None:
    """Six homologs per protein: substitutions, a fragment, lower-case insertions, '.' gaps."""
    directory.mkdir(parents=True, exist_ok=True)
    for r in records:
        lines = [f">{r.id}", r.sequence]
        for k in range(6):
            row = np.array(list(r.sequence))
            sub = rng.random(len(row)) < 0.25
            row[sub] = rng.choice(AMINO, int(sub.sum()))
            if k == 0:
                row[: len(row) // 3] = "."
            text = "".join(row)
            cut = int(rng.integers(1, len(text)))
            lines += [f">{r.id}_h{k}", text[:cut] + "kw" + text[cut:] if k % 2 else text]
        (directory / f"{r.id}.a3m").write_text("\n".join(lines) + "\n")


def _read_tsv(path) -> dict[tuple[str, int], float]:
    with open(path, newline="") as fh:
        return {(r["id"], int(r["position"])): float(r["probability"]) for r in csv.DictReader(fh, delimiter="\t")}


def test_context_reaches_the_model_and_predict_reproduces_oof(tmp_path, tiny_checkpoint):
    data = write_toy_dataset(tmp_path / "data", ions=("ZN",), proteins=12, unlabelled=0)
    records = read_fasta(data / "ZN_train.fasta")
    msa_dir = tmp_path / "msa"
    _write_msas(msa_dir / "ZN", records, np.random.default_rng(3))
    cfg = toy_config(
        tmp_path,
        tiny_checkpoint,
        data={"msa_dir": str(msa_dir), "max_example_tokens": 2048},
        training={
            "ions": ["ZN"],
            "epochs": 1,
            "warmup_epochs": 0,
            "num_folds": 2,
            "folds": [1],
            "bf16": False,
            "msa_sampling": {"max_num_samples": 4},
            "validation_msa_sampling": {"max_num_samples": 5},
        },
    )
    assert train_main(["--config", str(cfg)]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "data_stats.json").read_text())["ions"]["ZN"]["msa_coverage"] == 1.0  # shown in report.html
    assert "<td>100.0%</td>" in (out / "report.html").read_text()

    oof = {}
    with open(out / "fold_1/oof_predictions.tsv", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            oof[(row["id"], int(row["position"]))] = float(row["probability"])
    held_out = sorted({pid for pid, _ in oof})
    assert held_out
    by_id = {r.id: r for r in records}
    fasta = tmp_path / "held_out.fasta"
    write_fasta(fasta, [Record(pid, by_id[pid].sequence) for pid in held_out])
    # The held-out proteins really have context under the run's validation sampling.
    msa = read_a3m(msa_dir / "ZN" / f"{held_out[0]}.a3m")
    assert msa.probabilities(MSASampling(5, 12288))[1] == 6

    common = ["--checkpoint", str(out), "--fasta", str(fasta), "--no-bf16", "--quiet"]
    assert predict_main(common + ["--msa-dir", str(msa_dir), "--out", str(tmp_path / "ctx.tsv")]) == 0
    assert predict_main(common + ["--out", str(tmp_path / "single.tsv")]) == 0
    with_context, single = _read_tsv(tmp_path / "ctx.tsv"), _read_tsv(tmp_path / "single.tsv")
    assert set(with_context) == set(oof) == set(single)
    keys = sorted(oof)
    got = np.array([with_context[k] for k in keys])
    want = np.array([oof[k] for k in keys])
    alone = np.array([single[k] for k in keys])
    # Both files print 6 significant digits; the same context and weights give the same float32 numbers.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    assert np.abs(alone - want).max() > 1e-3  # without --msa-dir the numbers move: context reached the model
