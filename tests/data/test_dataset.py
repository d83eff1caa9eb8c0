import numpy as np
import pytest

from e1min.data.dataset import (
    Example,
    fit_context,
    ion_stats,
    load_ion_records,
    make_eval_examples,
    make_train_examples,
    pos_weight,
    stitch_predictions,
)
from e1min.data.fasta import DataError, Record, write_fasta
from e1min.data.msa import ContextProvider, MSASampling


def R(pid, seq, labels=None):
    return Record(pid, seq, None if labels is None else np.array([int(c) for c in labels], np.uint8))


def test_ree_union_or(tmp_path):
    write_fasta(tmp_path / "LREE_train.fasta", [R("a", "ACDE", "1000"), R("b", "MK", "01"), R("u", "GG")])
    write_fasta(tmp_path / "HREE_train.fasta", [R("a", "ACDE", "0011"), R("c", "WW", "10"), R("u", "GG", "01")])
    got = load_ion_records(tmp_path, ["LREE", "HREE", "REE"])
    ree = {r.id: r for r in got["REE"]}
    assert sorted(ree) == ["a", "b", "c", "u"]
    assert ree["a"].labels.tolist() == [1, 0, 1, 1]
    assert ree["u"].labels.tolist() == [0, 1]
    assert got["LREE"][0].labels.tolist() == [1, 0, 0, 0]  # parts untouched by the OR


def test_ree_sequence_mismatch(tmp_path):
    write_fasta(tmp_path / "LREE_train.fasta", [R("a", "ACDE", "1000")])
    write_fasta(tmp_path / "HREE_train.fasta", [R("a", "ACDF", "0011")])
    with pytest.raises(DataError, match="'a' has different sequences in LREE and HREE"):
        load_ion_records(tmp_path, ["REE"])


def test_ree_direct_file_and_missing(tmp_path):
    write_fasta(tmp_path / "REE_train.fasta", [R("x", "AC", "11")])
    assert [r.id for r in load_ion_records(tmp_path, ["REE"])["REE"]] == ["x"]
    with pytest.raises(DataError, match="no FASTA file for ion ZN"):
        load_ion_records(tmp_path, ["ZN"])


def test_stats_and_pos_weight():
    recs = [R("a", "ACDE", "1000"), R("b", "MKVW", "1100"), R("c", "GG")]
    s = ion_stats(recs)
    assert (s["proteins"], s["labelled_proteins"], s["residues"], s["positives"]) == (3, 2, 10, 3)
    assert s["positive_rate"] == pytest.approx(3 / 8)
    assert pos_weight(recs, "none") == 1.0
    assert pos_weight(recs, "linear") == pytest.approx(5 / 3)
    assert pos_weight(recs, "sqrt") == pytest.approx(np.sqrt(5 / 3))
    with pytest.raises(ValueError):
        pos_weight(recs, "log")


def test_fit_context_drops_last_sampled_first():
    ctx = ["A" * 10, "C" * 10, "D" * 10]
    assert fit_context(ctx, 20, 24 + 14 + 14) == ctx[:2]
    assert fit_context(ctx, 20, 24 + 42) == ctx
    assert fit_context(ctx, 100, 50) == []  # the query alone is too long: no context, query kept


def _msa_dir(tmp_path, seq, n=30):
    rng = np.random.default_rng(0)
    rows = [seq]
    for _ in range(n):
        r = np.array(list(seq))
        r[rng.random(len(seq)) < 0.3] = "A"
        rows.append("".join(r))
    d = tmp_path / "msa" / "ZN"
    d.mkdir(parents=True)
    (d / "p.a3m").write_text("".join(f">r{i}\n{r}\n" for i, r in enumerate(rows)))
    return ContextProvider(str(tmp_path / "msa"))


def test_train_examples_fresh_context_per_epoch_and_budget(tmp_path):
    seq = "MKVLWCDEFGHIKLMNPQRSTVWY" * 3
    prov = _msa_dir(tmp_path, seq)
    rec = R("p", seq, "0" * 10 + "1" + "0" * (len(seq) - 11))
    s = MSASampling(max_query_similarity=1.0)
    e0 = make_train_examples([rec], "ZN", prov, s, 1, 0, None, 1000)[0]
    e0b = make_train_examples([rec], "ZN", prov, s, 1, 0, None, 1000)[0]
    e1 = make_train_examples([rec], "ZN", prov, s, 1, 1, None, 1000)[0]
    assert e0.context == e0b.context and e0.context != e1.context
    assert e0.query == seq and e0.num_tokens <= 1000
    small = make_train_examples([rec], "ZN", prov, s, 1, 0, 30, 200)[0]
    assert len(small.query) == 30 and small.labels.sum() == 1
    assert small.query == seq[small.offset : small.offset + 30]
    assert small.num_tokens <= 200 and all(len(c) <= 30 for c in small.context)


def test_eval_examples_fixed_and_windows_partition(tmp_path):
    seq = "MKVLWCDEFGHIKLMNPQRSTVWY" * 3
    prov = _msa_dir(tmp_path, seq)
    rec = R("p", seq, "1" * len(seq))
    s = MSASampling(max_query_similarity=1.0)
    a = make_eval_examples([rec], "ZN", prov, s, 3, 20, 400)
    b = make_eval_examples([rec], "ZN", prov, s, 3, 20, 400)
    assert [x.context for x in a] == [x.context for x in b]
    assert all(len(x.query) <= 20 and x.num_tokens <= 400 for x in a)
    stitched = stitch_predictions(a, [np.arange(x.offset, x.offset + len(x.query)) for x in a])
    np.testing.assert_array_equal(stitched["p"], np.arange(len(seq)))


def test_example_defaults():
    e = Example("p", "ZN", "ACD", None)
    assert (e.keep_start, e.keep_end, e.num_tokens) == (0, 3, 7)
