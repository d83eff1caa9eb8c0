"""The one scoring path: windows stitched so every residue is scored once, order and batching irrelevant."""

from __future__ import annotations

import numpy as np
import torch

from e1min.data.dataset import make_eval_examples
from e1min.data.fasta import Record
from e1min.heads import BindingModel
from e1min.lora import apply_lora
from e1min.scoring import iter_embedded, score_examples, score_records


def _model(tiny_model) -> BindingModel:
    apply_lora(tiny_model, r=2, alpha=4)
    torch.manual_seed(0)
    return BindingModel(tiny_model, ["ZN"])


def _records(n: int = 5, long: int = 150) -> list[Record]:
    rng = np.random.default_rng(1)
    lengths = [20, 33, long, 8, 61][:n]
    return [Record(f"p{i}", "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), L)), None) for i, L in enumerate(lengths)]


def test_every_residue_scored_once_and_windows_stitched(tiny_model):
    model, recs = _model(tiny_model), _records()
    examples = make_eval_examples(recs, "ZN", None, None, 0, 64, None)
    assert len(examples) > len(recs)  # the 150-residue protein is split into windows
    scores = score_records(model, examples, "ZN", torch.device("cpu"), 512, "float32")
    assert {k: len(v) for k, v in scores.items()} == {r.id: len(r.sequence) for r in recs}
    per_example = score_examples(model, examples, "ZN", torch.device("cpu"), 512, "float32")
    for ex, p in zip(examples, per_example):  # each kept residue comes from its own window
        a, b = ex.keep_start - ex.offset, ex.keep_end - ex.offset
        np.testing.assert_array_equal(scores[ex.protein_id][ex.keep_start : ex.keep_end], p[a:b])


def test_token_budget_does_not_change_scores(tiny_model):
    model, recs = _model(tiny_model), _records()
    examples = make_eval_examples(recs, "ZN", None, None, 0, 64, None)
    big = score_records(model, examples, "ZN", torch.device("cpu"), 4096, "float32")
    small = score_records(model, examples, "ZN", torch.device("cpu"), 80, "float32")
    for pid in big:
        np.testing.assert_allclose(big[pid], small[pid], atol=1e-5)


def test_embeddings_cover_query_residues(tiny_model):
    recs = _records(2)
    examples = make_eval_examples(recs, "-", None, None, 0, None, None)
    out = dict(iter_embedded(tiny_model, examples, torch.device("cpu"), 1024))
    assert [out[i].shape for i in range(2)] == [(len(r.sequence), tiny_model.config.hidden_size) for r in recs]
