"""A trained run, loaded: single folds, ensembles, merging, precision, and every bad-checkpoint error.

Shares the tiny trained 2-fold run of conftest.py (built once per session)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from e1min.checkpoint import RunCheckpointError
from e1min.data.dataset import make_eval_examples
from e1min.data.fasta import Record
from e1min.predict import (
    PredictError,
    evaluate_main,
    load_checkpoint,
    load_ensemble,
    load_predictor,
    predict_main,
)
from e1min.scoring import score_examples
from tests.helpers import copy_fold, host_reports_native_bf16, one_thread, read_tsv  # noqa: F401 (module-scoped autouse fixtures)

TOL = 1e-5


def test_ensemble_is_mean_of_single_folds(run_dir, ensemble, queries):
    assert ensemble.num_folds == 2 and not ensemble.merged
    ens = ensemble.predict(queries)
    singles = [load_checkpoint(run_dir / f"fold_{k}").predict(queries) for k in (1, 2)]
    for r in queries:
        for ion in ("ZN", "CA"):
            folds = np.stack([s[r.id][ion][0] for s in singles])
            assert np.allclose(ens[r.id][ion][0], folds.mean(0), atol=TOL)
            assert np.allclose(ens[r.id][ion][1], folds.std(0), atol=TOL)
    # The folds really differ (otherwise the test proves nothing) and single folds have std 0.
    assert max(np.abs(singles[0][r.id]["ZN"][0] - singles[1][r.id]["ZN"][0]).max() for r in queries) > 1e-3
    assert all(np.all(singles[0][r.id]["CA"][1] == 0) for r in queries)


def test_ensemble_switching_is_order_independent(ensemble, queries):
    """Scoring fold 2 then fold 1 again gives the same numbers (weights are copied, not accumulated)."""
    a = ensemble.predict(queries[:4])
    ensemble.activate(0)
    b = ensemble.predict(queries[:4])
    for r in queries[:4]:
        assert np.array_equal(a[r.id]["ZN"][0], b[r.id]["ZN"][0])


def test_merged_equals_unmerged(run_dir, queries):
    from e1min.lora import lora_modules

    merged = load_checkpoint(run_dir / "fold_1", merge=True)
    unmerged = load_checkpoint(run_dir / "fold_1/best", merge=False)
    assert merged.merged and not unmerged.merged
    assert any(float(m.lora_B.abs().max()) > 0 for m in lora_modules(unmerged.model.backbone).values())
    a, b = merged.predict(queries), unmerged.predict(queries)
    for r in queries:
        for ion in ("ZN", "CA"):
            assert np.allclose(a[r.id][ion][0], b[r.id][ion][0], atol=TOL)


def test_prediction_reproduces_out_of_fold_predictions(run_dir):
    """Fold 1's best checkpoint scores its validation proteins exactly as training did (oof_predictions.tsv)."""
    rows = read_tsv(run_dir / "fold_1/oof_predictions.tsv")
    seqs: dict[tuple[str, str], list] = {}
    for row in rows:
        seqs.setdefault((row["ion"], row["id"]), []).append((row["residue"], float(row["probability"])))
    p = load_checkpoint(run_dir / "fold_1")
    for ion in ("ZN", "CA"):
        ids = [pid for (i, pid) in seqs if i == ion]
        recs = [Record(pid, "".join(aa for aa, _ in seqs[(ion, pid)])) for pid in ids]
        out = p.predict(recs, [ion])
        for r in recs:
            want = np.array([q for _, q in seqs[(ion, r.id)]])
            assert np.allclose(out[r.id][ion][0], want, atol=2e-6, rtol=1e-5)


def test_thresholds_and_metadata(run_dir, ensemble):
    saved = json.loads((run_dir / "thresholds.json").read_text())
    assert ensemble.threshold("ZN") == pytest.approx(saved["ZN"]["threshold"])
    assert ensemble.ions == ["ZN", "CA"] and ensemble.max_query_length == 64
    single = load_checkpoint(run_dir / "fold_2/best")
    assert single.threshold("CA") == pytest.approx(saved["CA"]["threshold"])
    assert load_predictor(run_dir, folds=[2]).fold_names == ["fold_2"]


def test_batching_and_order_do_not_change_predictions(ensemble, queries):
    big = ensemble.predict(queries, max_tokens=100_000)
    one_by_one = {}
    for r in reversed(queries):
        one_by_one.update(ensemble.predict([r], max_tokens=1))  # a budget of 1 -> every example alone
    shuffled = [queries[i] for i in np.random.default_rng(0).permutation(len(queries))]
    mid = ensemble.predict(shuffled, max_tokens=300)
    for r in queries:
        for ion in ("ZN", "CA"):
            assert np.allclose(big[r.id][ion][0], one_by_one[r.id][ion][0], atol=TOL)
            assert np.allclose(big[r.id][ion][0], mid[r.id][ion][0], atol=TOL)
            assert np.allclose(big[r.id][ion][1], one_by_one[r.id][ion][1], atol=TOL)


def test_long_protein_windows_cover_every_residue_once(run_dir, queries):
    p = load_checkpoint(run_dir / "fold_1")
    long = [r for r in queries if r.id.startswith("long")]
    assert all(len(r.sequence) > p.max_query_length for r in long)
    out = p.predict(long, ["ZN"])
    for r in long:
        examples = make_eval_examples([r], "ZN", None, p.sampling, 0, p.max_query_length, p.max_example_tokens)
        assert len(examples) >= 3
        covered = np.zeros(len(r.sequence), dtype=int)
        window_probs = score_examples(p.model, examples, "ZN", p.device, 100_000)
        expected = np.full(len(r.sequence), np.nan)
        for ex, probs in zip(examples, window_probs):
            assert len(ex.query) <= p.max_query_length
            covered[ex.keep_start : ex.keep_end] += 1
            expected[ex.keep_start : ex.keep_end] = probs[ex.keep_start - ex.offset : ex.keep_end - ex.offset]
        assert np.all(covered == 1)
        got = out[r.id]["ZN"][0]
        assert got.shape == (len(r.sequence),)
        assert np.allclose(got, expected, atol=TOL)
        # Windowing matters: the same protein scored in one window gives different numbers near the cuts.
        whole = make_eval_examples([r], "ZN", None, p.sampling, 0, None, None)
        assert not np.allclose(score_examples(p.model, whole, "ZN", p.device, 100_000)[0], got, atol=1e-4)


@pytest.mark.parametrize("flags,precision", [([], "float32"), (["--no-bf16"], "float32"), (["--precision", "bf16"], "bf16")])
def test_precision_is_explicit_and_recorded(run_dir, tmp_path, capsys, flags, precision):
    """Default float32 on a CPU even when it reports native bf16 (this module forces that); bf16 only when asked."""
    fasta = run_dir.parent / "data/CA_train.fasta"
    assert (
        evaluate_main(
            ["--checkpoint", str(run_dir / "fold_1"), "--fasta", str(fasta), "--out-dir", str(tmp_path / "ev"), "--quiet", *flags]
        )
        == 0
    )
    assert f"on cpu, precision {precision};" in capsys.readouterr().err
    report = json.loads((tmp_path / "ev/evaluation.json").read_text())
    assert report["runtime"]["precision"] == precision and report["runtime"]["device"] == "cpu"
    with pytest.raises(PredictError, match="contradicts"):
        evaluate_main(
            [
                "--checkpoint",
                str(run_dir / "fold_1"),
                "--fasta",
                str(fasta),
                "--out-dir",
                str(tmp_path / "e2"),
                "--no-bf16",
                "--precision",
                "bf16",
            ]
        )


@pytest.mark.parametrize("missing", ["heads.safetensors", "adapter_model.safetensors", "adapter_config.json", "checkpoint.json"])
def test_missing_checkpoint_files(run_dir, tmp_path, missing):
    fold = copy_fold(run_dir, tmp_path)
    (fold / missing).unlink()
    with pytest.raises(RunCheckpointError, match="missing|no checkpoint.json"):
        load_checkpoint(fold)


def test_unknown_format_version(run_dir, tmp_path):
    fold = copy_fold(run_dir, tmp_path)
    meta = json.loads((fold / "checkpoint.json").read_text())
    meta["format_version"] = 99
    (fold / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(RunCheckpointError, match="format version 99"):
        load_checkpoint(fold)


def test_adapter_for_another_base_shape(run_dir, tmp_path):
    from e1min.config import preset
    from e1min.random_checkpoint import write_random_checkpoint

    other = tmp_path / "wide-e1"
    write_random_checkpoint(other, preset("tiny", hidden_size=96), seed=0)
    with pytest.raises(RunCheckpointError, match=r"another shape.*hidden_size: trained on 64, base has 96"):
        load_checkpoint(run_dir / "fold_1", base_model=other)


def test_adapter_weights_that_do_not_fit(run_dir, tmp_path):
    from e1min.adapters import AdapterError

    fold = copy_fold(run_dir, tmp_path)
    cfg = json.loads((fold / "adapter_config.json").read_text())
    cfg["r"] = 8  # the saved tensors have rank 4
    (fold / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunCheckpointError, match="adapter_config.json and checkpoint.json disagree: r 8 in adapter_config.json, lora.r 4"):
        load_checkpoint(fold)
    meta = json.loads((fold / "checkpoint.json").read_text())
    meta["lora"]["r"] = 8  # both files agree on a rank the tensors do not have
    (fold / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="wrong shapes"):
        load_checkpoint(fold)


def test_heads_that_do_not_fit(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    fold = copy_fold(run_dir, tmp_path)
    heads = load_file(str(fold / "heads.safetensors"))
    save_file({k: v for k, v in heads.items() if not k.startswith("CA.")}, str(fold / "heads.safetensors"))
    with pytest.raises(RunCheckpointError, match="heads do not match"):
        load_checkpoint(fold)


def test_no_complete_folds_and_unknown_folds(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with pytest.raises(RunCheckpointError, match=r"fold\(s\) \[3\] not complete"):
        load_ensemble(run, folds=[3])
    for k in (1, 2):
        (run / f"fold_{k}/fold_result.json").unlink()
    with pytest.raises(RunCheckpointError, match="no complete folds"):
        load_ensemble(run)
    with pytest.raises(RunCheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing_here")


def test_folds_with_different_ions_are_rejected(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    meta_path = run / "fold_2/best/checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["max_query_length"] = 128
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RunCheckpointError, match="max_query_length differs"):
        load_ensemble(run)


def test_unknown_ion_and_cli_exit_code(run_dir, query_fasta, capsys):
    with pytest.raises(PredictError, match=r"\['FE'\] not predicted.*\['ZN', 'CA'\]"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--ions", "FE"])
    from e1min.cli import main as cli_main

    assert cli_main(["predict", "--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--ions", "FE"]) == 2
    assert "e1min predict: error:" in capsys.readouterr().err
