"""Prediction outputs: TSV/JSONL in input order, the per-rank merge, embedding shards, output-path safety.

Shares the tiny trained 2-fold run of conftest.py (built once per session)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from e1min.data.fasta import Record
from e1min.predict import (
    embed_main,
    evaluate_main,
    load_checkpoint,
    merge_parts,
    predict_main,
)
from tests.helpers import free_port, host_reports_native_bf16, one_thread, random_records, rank_main, read_tsv, write_text_fasta  # noqa: F401 (module-scoped autouse fixtures)

TOL = 1e-5


def test_predict_tsv_parses_back(run_dir, ensemble, queries, query_fasta, tmp_path, capsys):
    out = tmp_path / "preds.tsv"
    assert (
        predict_main(
            ["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out", str(out), "--chunk-size", "3", "--max-tokens", "500"]
        )
        == 0
    )
    rows = read_tsv(out)
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
    assert (
        predict_main(["--checkpoint", str(run_dir / "fold_2"), "--fasta", str(query_fasta), "--out", str(out), "--ions", "CA", "--quiet"])
        == 0
    )
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
    assert {row["call"] for row in read_tsv(out)} == {""}


def test_embeddings_reload_with_right_shapes(run_dir, queries, query_fasta, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "emb"
    assert (
        embed_main(
            ["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out", str(out), "--per-residue", "--shard-size", "4", "--quiet"]
        )
        == 0
    )
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


def test_merge_parts_restores_input_order(tmp_path):
    ids = ["a", "b", "c", "d", "e"]
    head = "id\tposition\n"
    parts = [tmp_path / "o.rank0.part", tmp_path / "o.rank1.part"]
    parts[0].write_text(head + "a\t1\na\t2\nc\t1\ne\t1\n")
    parts[1].write_text(head + "b\t1\nd\t1\nd\t2\n")
    merge_parts(tmp_path / "o.tsv", parts, ids, "tsv")
    assert (tmp_path / "o.tsv").read_text() == head + "a\t1\na\t2\nb\t1\nc\t1\nd\t1\nd\t2\ne\t1\n"
    assert not any(p.exists() for p in parts)


def test_two_process_predict_matches_single_process(run_dir, query_fasta, tmp_path):
    import torch.multiprocessing as mp

    single, multi = tmp_path / "single.tsv", tmp_path / "multi.tsv"
    common = ["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--device", "cpu", "--quiet"]
    predict_main(common + ["--out", str(single)])
    mp.start_processes(rank_main, args=(2, free_port(), common + ["--out", str(multi)]), nprocs=2, join=True, start_method="spawn")
    a, b = read_tsv(single), read_tsv(multi)
    assert [(r["id"], r["position"], r["ion"]) for r in a] == [(r["id"], r["position"], r["ion"]) for r in b]
    assert np.allclose([float(r["probability"]) for r in a], [float(r["probability"]) for r in b], atol=TOL)
    assert not list(tmp_path.glob("*.part"))


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
    fasta = write_text_fasta(tmp_path, "".join(f">{r.id}\n{r.sequence}\n" for r in recs))
    out = tmp_path / "emb"
    assert embed_main(["--checkpoint", str(run_dir), "--fasta", str(fasta), "--out", str(out), "--per-residue", "--quiet"]) == 0
    index = json.loads((out / "index.json").read_text())
    means = load_file(str(out / index["index"]["p1"]))
    residues = load_file(str(out / index["residues_index"]["p1"]))
    assert set(means) == set(residues) == {"p1", "p1.residues"}
    assert residues["p1"].shape[0] == len(a.sequence) and residues["p1.residues"].shape[0] == len(b.sequence)
    assert means["p1.residues"].shape == (index["hidden_size"],)
