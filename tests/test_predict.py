"""Prediction, evaluation and embeddings on a tiny trained 2-fold run (built once per session)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from e1min.checkpoint import RunCheckpointError
from e1min.data.dataset import make_eval_examples
from e1min.data.fasta import DataError, Record, write_fasta
from e1min.predict import (
    PredictError,
    embed_main,
    evaluate_main,
    evaluate_records,
    ion_metrics,
    load_checkpoint,
    load_ensemble,
    load_predictor,
    merge_parts,
    predict_main,
    read_input_fasta,
)
from e1min.scoring import score_examples
from tests.helpers import random_records

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _host_reports_native_bf16():
    """Every test here runs as on a CPU with native bf16: precision must still default to float32 (the
    float32 references below hold on every machine). tests/test_runtime.py covers the other outcome."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("e1min.runtime.cpu_has_native_bf16", lambda: True)
        yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core box OpenMP spinning makes 2 threads ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    from tests.helpers import build_run

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_run(tmp_path_factory.mktemp("predict_run"))
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ensemble(run_dir):
    return load_ensemble(run_dir)


@pytest.fixture(scope="session")
def queries() -> list[Record]:
    """Unlabelled proteins of mixed lengths, two longer than max_query_length (64)."""
    rng = np.random.default_rng(7)
    recs = random_records(rng, 9, "q", lo=5, hi=60, labelled=False)
    recs += random_records(rng, 2, "long", lo=150, hi=230, labelled=False)
    return recs


@pytest.fixture
def query_fasta(tmp_path, queries) -> Path:
    path = tmp_path / "queries.fasta"
    write_fasta(path, queries)
    return path


def _read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# ----------------------------------------------------------------------------------- loading


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
    rows = _read_tsv(run_dir / "fold_1/oof_predictions.tsv")
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


# ----------------------------------------------------------------------------------- batching / windows


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


# ----------------------------------------------------------------------------------- CLI outputs


def test_predict_tsv_parses_back(run_dir, ensemble, queries, query_fasta, tmp_path, capsys):
    out = tmp_path / "preds.tsv"
    assert predict_main(["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out", str(out), "--chunk-size", "3", "--max-tokens", "500"]) == 0
    rows = _read_tsv(out)
    assert list(rows[0]) == ["id", "position", "residue", "ion", "probability", "std", "call"]
    assert len(rows) == 2 * sum(len(r.sequence) for r in queries)
    assert [row["id"] for row in rows if row["position"] == "1" and row["ion"] == "ZN"] == [r.id for r in queries]  # input order
    ref = ensemble.predict(queries)
    thr = {ion: ensemble.threshold(ion) for ion in ("ZN", "CA")}
    by = {}
    for row in rows:
        by.setdefault((row["id"], row["ion"]), []).append(row)
    for r in queries:
        for ion in ("ZN", "CA"):
            rr = by[(r.id, ion)]
            assert [int(x["position"]) for x in rr] == list(range(1, len(r.sequence) + 1))
            assert "".join(x["residue"] for x in rr) == r.sequence
            prob = np.array([float(x["probability"]) for x in rr])
            assert np.allclose(prob, ref[r.id][ion][0], atol=TOL)
            assert np.allclose([float(x["std"]) for x in rr], ref[r.id][ion][1], atol=1e-3)
            assert [int(x["call"]) for x in rr] == [int(v >= thr[ion]) for v in prob]
    assert "proteins/s" in capsys.readouterr().err


def test_predict_jsonl_parses_back(run_dir, queries, query_fasta, tmp_path):
    out = tmp_path / "preds.jsonl"
    assert predict_main(["--checkpoint", str(run_dir / "fold_2"), "--fasta", str(query_fasta), "--out", str(out), "--ions", "CA", "--quiet"]) == 0
    objs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [o["id"] for o in objs] == [r.id for r in queries]
    ref = load_checkpoint(run_dir / "fold_2").predict(queries, ["CA"])
    for o, r in zip(objs, queries):
        assert o["sequence"] == r.sequence and list(o["ions"]) == ["CA"]
        ca = o["ions"]["CA"]
        assert np.allclose(ca["probability"], ref[r.id]["CA"][0], atol=TOL)
        assert ca["std"] == [0.0] * len(r.sequence)
        assert ca["call"] == [int(v >= ca["threshold"]) for v in ca["probability"]]


def test_missing_threshold_leaves_call_empty(run_dir, queries, query_fasta, tmp_path, capsys):
    fold = tmp_path / "fold_copy"
    shutil.copytree(run_dir / "fold_1/best", fold)  # no thresholds.json next to it
    out = tmp_path / "p.tsv"
    predict_main(["--checkpoint", str(fold), "--fasta", str(query_fasta), "--out", str(out), "--ions", "ZN"])
    assert "no saved threshold for ZN" in capsys.readouterr().err
    assert {row["call"] for row in _read_tsv(out)} == {""}


# ----------------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("flags,precision", [([], "float32"), (["--no-bf16"], "float32"), (["--precision", "bf16"], "bf16")])
def test_precision_is_explicit_and_recorded(run_dir, tmp_path, capsys, flags, precision):
    """Default float32 on a CPU even when it reports native bf16 (this module forces that); bf16 only when asked."""
    fasta = run_dir.parent / "data/CA_train.fasta"
    assert evaluate_main(["--checkpoint", str(run_dir / "fold_1"), "--fasta", str(fasta), "--out-dir", str(tmp_path / "ev"), "--quiet", *flags]) == 0
    assert f"on cpu, precision {precision};" in capsys.readouterr().err
    report = json.loads((tmp_path / "ev/evaluation.json").read_text())
    assert report["runtime"]["precision"] == precision and report["runtime"]["device"] == "cpu"
    with pytest.raises(PredictError, match="contradicts"):
        evaluate_main(["--checkpoint", str(run_dir / "fold_1"), "--fasta", str(fasta), "--out-dir", str(tmp_path / "e2"), "--no-bf16", "--precision", "bf16"])


def test_evaluate_metrics_equal_sklearn(run_dir, ensemble, tmp_path):
    sk = pytest.importorskip("sklearn.metrics")
    recs = read_input_fasta(run_dir.parent / "data/CA_train.fasta")[0]
    assert evaluate_main(["--checkpoint", str(run_dir), "--fasta", str(run_dir.parent / "data/CA_train.fasta"), "--out-dir", str(tmp_path / "ev"), "--quiet"]) == 0
    report = json.loads((tmp_path / "ev/evaluation.json").read_text())
    assert (tmp_path / "ev/evaluation.md").read_text().count("| ZN |") == 1
    pred = ensemble.predict(recs)
    y = np.concatenate([r.labels for r in recs]).astype(int)
    for ion in ("ZN", "CA"):
        p = np.concatenate([pred[r.id][ion][0] for r in recs]).astype(np.float64)
        m = report["ions"][ion]
        assert m["auprc"] == pytest.approx(sk.average_precision_score(y, p), abs=1e-9)
        assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-9)
        assert m["positive_rate"] == pytest.approx(y.mean())
        t = ensemble.threshold(ion)
        yhat = (p >= t).astype(int)
        assert m["at_saved"]["threshold"] == pytest.approx(t)
        assert m["at_saved"]["f1"] == pytest.approx(sk.f1_score(y, yhat, zero_division=0))
        assert m["at_saved"]["mcc"] == pytest.approx(sk.matthews_corrcoef(y, yhat))
        assert m["at_saved"]["precision"] == pytest.approx(sk.precision_score(y, yhat, zero_division=0))
        assert m["at_saved"]["recall"] == pytest.approx(sk.recall_score(y, yhat))
        prec, rec, thr = sk.precision_recall_curve(y, p)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0)[:-1]
        assert m["at_best_f1"]["f1"] == pytest.approx(f1.max())
        fpr, tpr, rthr = sk.roc_curve(y, p, drop_intermediate=False)
        assert m["at_youden"]["recall"] - m["at_youden"]["fp"] / (m["at_youden"]["fp"] + m["at_youden"]["tn"]) == pytest.approx((tpr - fpr).max())
        # Curves as CSV reproduce sklearn's ROC.
        roc = np.loadtxt(tmp_path / f"ev/roc_{ion}.csv", delimiter=",", skiprows=1)
        fpr2, tpr2, _ = sk.roc_curve(y, p)
        assert np.allclose(roc[:, 0], fpr2, atol=1e-6) and np.allclose(roc[:, 1], tpr2, atol=1e-6)
    tsv = _read_tsv(tmp_path / "ev/predictions.tsv")
    assert "label" in tsv[0] and len(tsv) == 2 * len(y)


def test_ion_metrics_match_sklearn_on_random_arrays():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.15).astype(int)
    p = np.round(np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1), 2)  # many ties
    m = ion_metrics(y, p, 0.5)
    assert m["auprc"] == pytest.approx(sk.average_precision_score(y, p))
    assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, p))
    yhat = (p >= 0.5).astype(int)
    assert m["at_saved"]["mcc"] == pytest.approx(sk.matthews_corrcoef(y, yhat))
    assert m["at_saved"]["f1"] == pytest.approx(sk.f1_score(y, yhat))
    best = max(sk.matthews_corrcoef(y, (p >= t).astype(int)) for t in np.unique(p))
    assert m["at_best_mcc"]["mcc"] == pytest.approx(best)


def test_evaluate_figure_with_matplotlib(run_dir, ensemble, tmp_path):
    pytest.importorskip("matplotlib")
    recs = read_input_fasta(run_dir.parent / "data/ZN_train.fasta")[0]
    evaluate_records(ensemble, recs, tmp_path, ["ZN"], progress=False)
    assert (tmp_path / "threshold_analysis_ZN.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------- embed


def test_embeddings_reload_with_right_shapes(run_dir, queries, query_fasta, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "emb"
    assert embed_main(["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out", str(out), "--per-residue", "--shard-size", "4", "--quiet"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["shards"] == ["embeddings-00001.safetensors", "embeddings-00002.safetensors", "embeddings-00003.safetensors"]
    assert index["residue_shards"] == [s.replace("embeddings", "residues") for s in index["shards"]]
    assert list(index["index"]) == [r.id for r in queries] == list(index["residues_index"])
    H = index["hidden_size"]
    means, residues = {}, {}
    for s, rs in zip(index["shards"], index["residue_shards"]):
        means.update(load_file(str(out / s)))
        residues.update(load_file(str(out / rs)))
    assert len(means) == len(residues) == len(queries)
    for r in queries:
        res, mean = residues[r.id], means[r.id]
        assert res.shape == (len(r.sequence), H) and mean.shape == (H,)
        assert torch.allclose(mean, res.mean(0), atol=1e-6)
        assert r.id in load_file(str(out / index["index"][r.id]))
    tensors = {**{f"{k}.residues": v for k, v in residues.items()}, **means}
    # The same protein alone (short: one window) equals what the fine-tuned backbone gives directly.
    p = load_checkpoint(run_dir / "fold_1")
    from e1min.tokenizer import prepare_batch

    r = queries[0]
    with torch.inference_mode():
        emb = p.model.backbone(**prepare_batch([r.sequence])).embeddings[0, 2 : 2 + len(r.sequence)]
    assert torch.allclose(tensors[f"{r.id}.residues"], emb, atol=1e-5)
    # A plain base model works too (mean-only) and differs from the fine-tuned backbone.
    base = json.loads((run_dir / "fold_1/best/checkpoint.json").read_text())["base_model"]
    assert embed_main(["--checkpoint", base, "--fasta", str(query_fasta), "--out", str(tmp_path / "base"), "--quiet"]) == 0
    b = load_file(str(tmp_path / "base/embeddings-00001.safetensors"))
    assert set(b) == {r.id for r in queries}
    assert not torch.allclose(b[r.id], tensors[r.id], atol=1e-4)


# ----------------------------------------------------------------------------------- bad input


def _fasta(tmp_path: Path, text: str, name: str = "in.fasta") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_invalid_residue_errors_before_any_work(run_dir, tmp_path):
    bad = _fasta(tmp_path, ">ok1\nACDEFGHIK\n>bad1\nACD*EF\n>ok2\nMKLV\n")
    out = tmp_path / "p.tsv"
    with pytest.raises(DataError, match=r"in.fasta:4: record 'bad1': invalid residue '\*'.*--skip-invalid"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(bad), "--out", str(out)])
    assert not out.exists()
    lower = _fasta(tmp_path, ">low\nacdef\n", "lower.fasta")
    with pytest.raises(DataError, match="lower-case"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(lower), "--out", str(out)])


def test_skip_invalid_reports_and_skips(run_dir, tmp_path, capsys):
    bad = _fasta(tmp_path, ">ok1\nACDEFGHIK\n>bad1\nACD*EF\n>ok2\nMKLV\n>ok1\nMMMM\n")
    out = tmp_path / "p.tsv"
    assert predict_main(["--checkpoint", str(run_dir), "--fasta", str(bad), "--out", str(out), "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 invalid protein(s)" in err and "bad1" in err and "duplicate id" in err
    rows = _read_tsv(out)
    assert sorted({r["id"] for r in rows}) == ["ok1", "ok2"] and len(rows) == 2 * (9 + 4)


def test_empty_and_missing_fasta(run_dir, tmp_path):
    with pytest.raises(DataError, match="empty file"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(_fasta(tmp_path, "\n\n")), "--out", str(tmp_path / "p.tsv")])
    with pytest.raises(DataError, match="not found"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(tmp_path / "nope.fasta")])
    only_bad = _fasta(tmp_path, ">b\nAC1D\n", "bad.fasta")
    with pytest.raises(DataError, match="no valid records"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(only_bad), "--skip-invalid", "--out", str(tmp_path / "p.tsv")])


def test_evaluate_needs_labels(run_dir, query_fasta, tmp_path):
    with pytest.raises(DataError, match="no label line"):
        evaluate_main(["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out-dir", str(tmp_path)])


def _copy_fold(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "fold"
    shutil.copytree(run_dir / "fold_1/best", dst)
    return dst


@pytest.mark.parametrize("missing", ["heads.safetensors", "adapter_model.safetensors", "adapter_config.json", "checkpoint.json"])
def test_missing_checkpoint_files(run_dir, tmp_path, missing):
    fold = _copy_fold(run_dir, tmp_path)
    (fold / missing).unlink()
    with pytest.raises(RunCheckpointError, match="missing|no checkpoint.json"):
        load_checkpoint(fold)


def test_unknown_format_version(run_dir, tmp_path):
    fold = _copy_fold(run_dir, tmp_path)
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

    fold = _copy_fold(run_dir, tmp_path)
    cfg = json.loads((fold / "adapter_config.json").read_text())
    cfg["r"] = 8  # the saved tensors have rank 4
    (fold / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="wrong shapes"):
        load_checkpoint(fold)


def test_heads_that_do_not_fit(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    fold = _copy_fold(run_dir, tmp_path)
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


def test_msa_query_mismatch_is_checked_up_front(run_dir, tmp_path):
    msa = tmp_path / "msa"
    msa.mkdir()
    (msa / "p1.a3m").write_text(">p1\nACDEFG\n>hom\nACDEFA\n")
    fasta = _fasta(tmp_path, ">p1\nACDEFGH\n>p2\nMKV\n")
    args = ["--checkpoint", str(run_dir), "--fasta", str(fasta), "--msa-dir", str(msa), "--out", str(tmp_path / "p.tsv")]
    with pytest.raises(DataError, match="p1.a3m:1: record .p1.: first row"):
        predict_main(args)
    assert predict_main(args + ["--skip-invalid", "--quiet"]) == 0
    assert {r["id"] for r in _read_tsv(tmp_path / "p.tsv")} == {"p2"}


# ----------------------------------------------------------------------------------- torchrun sharding


def test_merge_parts_restores_input_order(tmp_path):
    ids = ["a", "b", "c", "d", "e"]
    head = "id\tposition\n"
    parts = [tmp_path / "o.rank0.part", tmp_path / "o.rank1.part"]
    parts[0].write_text(head + "a\t1\na\t2\nc\t1\ne\t1\n")
    parts[1].write_text(head + "b\t1\nd\t1\nd\t2\n")
    merge_parts(tmp_path / "o.tsv", parts, ids, "tsv")
    assert (tmp_path / "o.tsv").read_text() == head + "a\t1\na\t2\nb\t1\nc\t1\nd\t1\nd\t2\ne\t1\n"
    assert not any(p.exists() for p in parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    predict_main(argv)


def test_two_process_predict_matches_single_process(run_dir, query_fasta, tmp_path):
    import torch.multiprocessing as mp

    single, multi = tmp_path / "single.tsv", tmp_path / "multi.tsv"
    common = ["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--device", "cpu", "--quiet"]
    predict_main(common + ["--out", str(single)])
    mp.start_processes(_rank_main, args=(2, _free_port(), common + ["--out", str(multi)]), nprocs=2, join=True, start_method="spawn")
    a, b = _read_tsv(single), _read_tsv(multi)
    assert [(r["id"], r["position"], r["ion"]) for r in a] == [(r["id"], r["position"], r["ion"]) for r in b]
    assert np.allclose([float(r["probability"]) for r in a], [float(r["probability"]) for r in b], atol=TOL)
    assert not list(tmp_path.glob("*.part"))


# ----------------------------------------------------------------------------------- output safety


def test_predict_never_overwrites_its_input(run_dir, query_fasta):
    before = query_fasta.read_bytes()
    with pytest.raises(ValueError, match="is an input"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out", str(query_fasta)])
    # also through another spelling of the same path
    other = query_fasta.parent / "." / query_fasta.name
    with pytest.raises(ValueError, match="is an input"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out", str(other)])
    assert query_fasta.read_bytes() == before


def test_output_paths_are_checked_before_any_work(run_dir, query_fasta, tmp_path, monkeypatch):
    import e1min.predictor as P

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(P, "load_predictor", no_model)
    monkeypatch.setattr(P, "load_backbone", no_model)
    (tmp_path / "adir").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        predict_main(["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out", str(tmp_path / "adir")])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        embed_main(["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out", str(tmp_path / "afile")])
    labelled = tmp_path / "ev" / "predictions.tsv"
    labelled.parent.mkdir()
    shutil.copy(run_dir.parent / "data/CA_train.fasta", labelled)
    with pytest.raises(ValueError, match="is an input"):
        evaluate_main(["--checkpoint", str(run_dir), "--fasta", str(labelled), "--out-dir", str(tmp_path / "ev")])


def test_embedding_keys_cannot_collide(run_dir, tmp_path):
    from safetensors.torch import load_file

    rng = np.random.default_rng(3)
    a, b = random_records(rng, 2, "x", labelled=False)
    recs = [Record("p1", a.sequence, None), Record("p1.residues", b.sequence, None)]
    fasta = _fasta(tmp_path, "".join(f">{r.id}\n{r.sequence}\n" for r in recs))
    out = tmp_path / "emb"
    assert embed_main(["--checkpoint", str(run_dir), "--fasta", str(fasta), "--out", str(out), "--per-residue", "--quiet"]) == 0
    index = json.loads((out / "index.json").read_text())
    means = load_file(str(out / index["index"]["p1"]))
    residues = load_file(str(out / index["residues_index"]["p1"]))
    assert set(means) == set(residues) == {"p1", "p1.residues"}
    assert residues["p1"].shape[0] == len(a.sequence) and residues["p1.residues"].shape[0] == len(b.sequence)
    assert means["p1.residues"].shape == (index["hidden_size"],)
