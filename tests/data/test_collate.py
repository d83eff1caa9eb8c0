import numpy as np
import pytest
import torch

from e1min.data.collate import IGNORE_INDEX, MaskingConfig, collate
from e1min.data.dataset import Example
from e1min.tokenizer import AMINO_ACID_IDS, MASK_ID, encode


def _ex(pid, query, labels="random", context=(), offset=0, ion="ZN", **kw):
    if labels == "random":
        labels = np.random.default_rng(len(query)).integers(0, 2, len(query)).astype(np.uint8)
    return Example(pid, ion, query, labels, list(context), offset, **kw)


def test_label_alignment_single_and_multi_sequence():
    a = _ex("a", "ACDEFGH")
    b = _ex("b", "MKVLW", context=["GGGGGGGGGG", "PPP"], offset=7)
    batch = collate([a, b], masking=None, seed=0, epoch=0)
    for row, ex in enumerate([a, b]):
        enc = encode([*ex.context, ex.query])
        n = len(enc["input_ids"])
        query_start = n - len(ex.query) - 4
        for i in range(len(ex.query)):
            t = query_start + i + 2
            assert batch["binding_labels"][row, t] == ex.labels[i]
            assert batch["input_ids"][row, t] == enc["input_ids"][t]
        assert batch["binding_mask"][row].sum() == len(ex.query)
        assert torch.equal(batch["binding_mask"][row], batch["query_residue_mask"][row])
    assert batch["input_ids"].shape == (2, 4 + 10 + 4 + 3 + 4 + 5)
    assert batch["sequence_ids"][0, -1] == -1 and batch["input_ids"][0, -1] == 0  # padding
    assert not batch["binding_mask"][0][~batch["query_residue_mask"][0]].any()
    assert (batch["mlm_labels"] == IGNORE_INDEX).all()
    assert batch["ion"] == "ZN" and batch["protein_ids"] == ["a", "b"]


def test_one_ion_per_batch():
    with pytest.raises(ValueError, match="one ion"):
        collate([_ex("a", "AC"), _ex("b", "AC", ion="CA")], masking=None, seed=0, epoch=0)


def _big_batch():
    rng = np.random.default_rng(0)
    aa = list("ACDEFGHIKLMNPQRSTVWY")
    return [_ex(f"p{i}", "".join(rng.choice(aa, 300)), context=["".join(rng.choice(aa, 100))]) for i in range(20)]


def test_masking_statistics_and_positions():
    examples = _big_batch()
    clean = collate(examples, masking=None, seed=0, epoch=0)
    batch = collate(examples, masking=MaskingConfig(), seed=0, epoch=0)
    chosen = batch["mlm_labels"] != IGNORE_INDEX
    q = clean["query_residue_mask"]
    assert not (chosen & ~q).any()  # never specials, context or padding
    rate = chosen.sum().item() / q.sum().item()
    assert abs(rate - 0.15) < 0.015
    assert torch.equal(batch["mlm_labels"][chosen], clean["input_ids"][chosen])
    now = batch["input_ids"][chosen]
    orig = clean["input_ids"][chosen]
    n = chosen.sum().item()
    masked = (now == MASK_ID).float().mean().item()
    changed = ((now != MASK_ID) & (now != orig)).sum().item()
    assert abs(masked - 0.8) < 0.03
    # random replacements (10%) hit the original residue 1/20 of the time
    assert abs(changed / n - 0.1 * 19 / 20) < 0.025
    assert all(int(t) in AMINO_ACID_IDS for t in now[now != MASK_ID])
    assert torch.equal(batch["input_ids"][~chosen], clean["input_ids"][~chosen])
    # masked positions never enter the BCE targets
    assert not (batch["binding_mask"] & chosen).any()
    assert torch.equal(batch["binding_mask"] | chosen, q)


def test_mask_context_option():
    examples = _big_batch()
    clean = collate(examples, masking=None, seed=0, epoch=0)
    batch = collate(examples, masking=MaskingConfig(mask_context=True), seed=0, epoch=0)
    chosen = batch["mlm_labels"] != IGNORE_INDEX
    assert (chosen & (batch["sequence_ids"] == 0)).sum() > 0  # context residues now masked too
    residues = clean["input_ids"] >= 8  # letters only: no specials, no padding
    assert not (chosen & ~residues).any()
    assert not (batch["binding_mask"] & chosen).any()


def test_masking_independent_of_batch_composition_and_epoch():
    examples = _big_batch()
    m = MaskingConfig()
    full = collate(examples, masking=m, seed=3, epoch=1)
    alone = collate([examples[5]], masking=m, seed=3, epoch=1)
    n = alone["input_ids"].shape[1]
    assert torch.equal(full["input_ids"][5, :n], alone["input_ids"][0])
    assert torch.equal(full["mlm_labels"][5, :n], alone["mlm_labels"][0])
    other = collate([examples[5]], masking=m, seed=3, epoch=2)
    assert not torch.equal(other["mlm_labels"], alone["mlm_labels"])


def test_unlabelled_rows_are_mlm_only_and_smoothing():
    a = _ex("a", "ACDEFGHIKL" * 5)
    u = _ex("u", "MKVLWMKVLW" * 5, labels=None)
    batch = collate([a, u], masking=MaskingConfig(probability=0.3), seed=0, epoch=0, label_smoothing=0.1)
    assert not batch["binding_mask"][1].any()
    assert (batch["mlm_labels"][1] != IGNORE_INDEX).any()
    assert batch["query_residue_mask"][1].sum() == 50
    vals = sorted(set(batch["binding_labels"][0][batch["binding_mask"][0]].tolist()))
    assert vals == pytest.approx([0.05, 0.95])
    assert (batch["binding_labels"][1] == 0).all()


def test_keep_span_limits_scored_residues():
    e = _ex("a", "ACDEFGHIKL", offset=100, keep_start=103, keep_end=107, protein_length=200)
    batch = collate([e], masking=None, seed=0, epoch=0)
    # Query token t holds residue offset + (t - first query token); only residues 103..106 are scored.
    first = int(batch["query_residue_mask"][0].nonzero()[0])
    idx = (batch["binding_mask"][0].nonzero().flatten() - first + 100).tolist()
    assert idx == [103, 104, 105, 106]
