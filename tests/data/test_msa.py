"""MSA parsing, E1-exact context sampling, blocked similarity computation, malformed inputs."""

import logging
import os

import numpy as np
import pytest

import e1min.data.a3m as a3m
import e1min.data.msa as msa_mod
import e1min.data.similarity as similarity
from e1min.data.fasta import DataError
from e1min.data.msa import (
    MSA,
    ContextProvider,
    MSASampling,
    neighbour_counts,
    parse_a3m,
    read_a3m,
    sample_context,
)

AMINO = list("ACDEFGHIKLMNPQRSTVWY")


def _a3m(tmp_path, text, name="p.a3m"):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _rows_a3m(rows):
    return "".join(f">r{i}\n{r}\n" for i, r in enumerate(rows))


# ---------------------------------------------------------------------------------------------
# An independent reference: E1's sampler written out literally from the facts doc, plain loops.
# ---------------------------------------------------------------------------------------------
class ReferenceCrash(Exception):
    """Where E1's sampler raises (no candidate, or a candidate row with weight 1/0)."""


def reference_sample_context(texts, seed, s):
    rows = [t.replace(".", "-") for t in texts]
    aligned = ["".join(c for c in r if not c.islower()) for r in rows]
    n, width = len(aligned), len(aligned[0])
    length = [sum(1 for c in a if c != "-") for a in aligned]
    bound = np.float32(s.neighbor_similarity_lower_bound)
    neighbours = []
    for i in range(n):
        count = 0
        for j in range(n):
            matches = sum(1 for c in range(width) if aligned[i][c] != "-" and aligned[j][c] == aligned[i][c])
            if length[j] == 0:
                continue  # 0 / 0 is NaN, never >= bound
            if np.float32(matches) / np.float32(length[j]) >= bound:
                count += 1
        neighbours.append(count)
    qsim = [np.float32(sum(1 for c in range(width) if a[c] == aligned[0][c])) / np.float32(width) for a in aligned]
    lo, hi = np.float32(s.min_query_similarity), np.float32(s.max_query_similarity)
    candidate = [lo <= q <= hi for q in qsim]
    if not any(candidate):
        raise ReferenceCrash("no candidate")
    weights = []
    for j in range(n):
        if not candidate[j]:
            weights.append(0.0)
        elif neighbours[j] == 0:
            raise ReferenceCrash("weight 1/0")
        else:
            weights.append(1.0 / neighbours[j])
    w = np.array(weights, dtype=np.float64)
    drawn = np.random.default_rng(seed).choice(n, size=min(s.max_num_samples, sum(candidate)), p=w / w.sum(), replace=False, shuffle=True)
    out, total = [], 0
    for i in drawn:
        seq = rows[i].upper().replace("-", "")
        if total + len(seq) > s.max_token_length:
            break
        out.append(seq)
        total += len(seq)
    return out


def _random_texts(rng, n, width, all_gap_rows=0):
    """Query + homologs: substitutions, fragments, gaps ('-' and '.'), insertions, exact duplicates."""
    query = rng.choice(AMINO, width)
    texts = ["".join(query)]
    for _ in range(n - 1):
        if len(texts) > 1 and rng.random() < 0.15:
            texts.append(texts[int(rng.integers(1, len(texts)))])  # an exact duplicate
            continue
        row = query.copy()
        sub = rng.random(width) < rng.uniform(0.0, 0.5)
        row[sub] = rng.choice(AMINO[:4], int(sub.sum()))  # few letters: many near-duplicates
        row[rng.random(width) < rng.uniform(0.0, 0.3)] = "-"
        if rng.random() < 0.4:
            a = int(rng.integers(0, width // 2))
            row[:a] = "-"
            row[int(rng.integers(a + 1, width + 1)) :] = "-"
        if (row == "-").all():
            row[int(rng.integers(0, width))] = query[0]
        cells = list(row)
        for k in range(width):
            if cells[k] == "-" and rng.random() < 0.3:
                cells[k] = "."
            if rng.random() < 0.08:
                cells[k] += "".join(rng.choice(list("acdkw"), int(rng.integers(1, 3))))
        texts.append("".join(cells))
    for _ in range(all_gap_rows):
        texts.insert(int(rng.integers(1, len(texts) + 1)), "-" * width)
    return texts


def test_sampler_equals_reference_implementation():
    rng = np.random.default_rng(11)
    compared = crashed = 0
    for trial in range(60):
        width = int(rng.integers(3, 16))
        texts = _random_texts(rng, int(rng.integers(1, 26)), width)
        s = MSASampling(
            max_num_samples=int(rng.integers(1, 30)),
            max_token_length=int(rng.integers(4, 200)),
            neighbor_similarity_lower_bound=float(rng.choice([0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])),
            min_query_similarity=float(rng.choice([0.0, 0.0, 0.2, 0.3])),
            max_query_similarity=float(rng.choice([1.0, 1.0, 0.95, 0.9, 0.7])),
        )
        msa = MSA.from_rows(texts)
        for seed in (0, 1, 12345, 2**62 + 7):
            try:
                want = reference_sample_context(texts, seed, s)
            except ReferenceCrash:
                crashed += 1
                assert sample_context(msa, seed, s) == []  # departure: single-sequence instead of raising
                continue
            assert sample_context(msa, seed, s) == want, (trial, seed, texts, s)
            assert sample_context(texts, seed, s) == want
            compared += 1
    assert compared > 150 and crashed > 0


def test_residue_free_rows_never_drawn_and_shift_nothing():
    rng = np.random.default_rng(5)
    for trial in range(20):
        texts = _random_texts(rng, 15, 10, all_gap_rows=2)
        # With min_query_similarity > 0 the all-gap rows are not candidates: the reference runs, and e1min
        # must equal it (the rows stay in the index space, so the draw is unchanged).
        s = MSASampling(10, 1000, 0.8, 0.05, 1.0)
        try:
            want = reference_sample_context(texts, trial, s)
        except ReferenceCrash:
            continue
        assert sample_context(texts, trial, s) == want
        # With min 0 they would be candidates of weight 1/0 (the reference crashes): e1min never draws them.
        got = sample_context(texts, trial, MSASampling(40, 10_000, 0.8, 0.0, 1.0))
        assert "" not in got and len(got) == 15


# ---------------------------------------------------------------------------------------------
# Hand-worked MSA: expected numbers written out from the definitions
# ---------------------------------------------------------------------------------------------
# Columns:   0123456789 10       aligned (insertions dropped, '.' -> '-')   non-gap
HAND = [
    "ACDEFGHIKL-",  # q     ACDEFGHIKL-                                      10
    "ACDEFGHIKW-",  # near  ACDEFGHIKW-   near-duplicate of the query        10
    "--DEFgaGHI---",  # frag --DEFGHI---   fragment, insertion "ga"            6
    "AC..FGHIKLM",  # dots  AC--FGHIKLM   '.' gaps                            9
    "WWWWWWHIKL-",  # far   WWWWWWHIKL-                                      10
]
# matches m(i, j) on shared equal non-gap columns (symmetric):
#   m01 9, m02 6, m03 8, m04 4, m12 6, m13 7, m14 3, m23 4, m24 2, m34 4
# sim(i -> j) = m(i, j) / len(j), bound 0.8:
#   row 0: 1, .9, 6/6, 8/9=.889, .4   -> {0,1,2,3} = 4
#   row 1: .9, 1, 6/6, 7/9=.778, .3   -> {0,1,2}   = 3
#   row 2: .6, .6, 1, 4/9, .2         -> {2}       = 1   (dividing by its own length would give 3)
#   row 3: .8, .7, 4/6, 1, .4         -> {0,3}     = 2   (0.8 >= 0.8 in float32)
#   row 4: .4, .3, 2/6, 4/9, 1        -> {4}       = 1
# qsim (gap == gap counts, / 11): 11/11, 10/11, 7/11, 8/11, 5/11
HAND_NEIGHBOURS = [4, 3, 1, 2, 1]
HAND_QSIM = [1.0, 10 / 11, 7 / 11, 8 / 11, 5 / 11]
HAND_CONTEXT = ["ACDEFGHIKL", "ACDEFGHIKW", "DEFGAGHI", "ACFGHIKLM", "WWWWWWHIKL"]


def test_hand_worked_weights_and_similarities(tmp_path):
    msa = read_a3m(_a3m(tmp_path, _rows_a3m(HAND)))
    assert msa.rows == ["ACDEFGHIKL-", "ACDEFGHIKW-", "--DEFGHI---", "AC--FGHIKLM", "WWWWWWHIKL-"]
    assert msa.lengths.tolist() == [10, 10, 6, 9, 10]
    assert msa.neighbour_counts(0.8).tolist() == HAND_NEIGHBOURS
    assert msa.weights(0.8).tolist() == [0.25, 1 / 3, 1.0, 0.5, 1.0]
    assert msa.query_similarity.dtype == np.float32
    assert msa.query_similarity.tolist() == np.array(HAND_QSIM, dtype=np.float32).tolist()
    # bound 0.6: row 1 counts row 3 (7/9), row 2 rows 0 and 1 (6/10), row 3 rows 1 and 2 (7/10, 4/6).
    assert msa.neighbour_counts(0.6).tolist() == [4, 4, 3, 4, 1]
    assert msa.query_sequence == "ACDEFGHIKL"


def test_hand_worked_contexts():
    s = MSASampling(max_num_samples=10, max_token_length=1000, min_query_similarity=0.0, max_query_similarity=0.95)
    got = sample_context(HAND, 3, s)
    assert sorted(got) == sorted(HAND_CONTEXT[1:])  # everything but the query (qsim 1.0 > 0.95)
    # Only the fragment has 0.6 <= qsim (7/11 = 0.636) <= 0.65; its insertion is kept, upper-cased.
    only_frag = MSASampling(5, 1000, 0.8, 0.6, 0.65)
    assert sample_context(HAND, 0, only_frag) == ["DEFGAGHI"]
    assert sample_context(HAND, 0, MSASampling(5, 7, 0.8, 0.6, 0.65)) == []  # 8 residues > budget 7: stop
    # max_query_similarity 1.0: the query row is a candidate like any other (E1 behaviour).
    everything = sample_context(HAND, 0, MSASampling(10, 1000, 0.8, 0.0, 1.0))
    assert sorted(everything) == sorted(HAND_CONTEXT)
    assert sample_context(HAND, 0, MSASampling(10, 1000, 0.8, 0.95, 1.0)) == ["ACDEFGHIKL"]


def test_hand_worked_draw_order_follows_numpy_choice():
    """The draw is rng.choice over all rows with p = w / w.sum(), w = 1/neighbours on candidates (float64)."""
    s = MSASampling(3, 1000, 0.8, 0.0, 1.0)
    w = np.array([1 / 4, 1 / 3, 1.0, 1 / 2, 1.0])
    for seed in range(5):
        order = np.random.default_rng(seed).choice(5, size=3, p=w / w.sum(), replace=False, shuffle=True)
        assert sample_context(HAND, seed, s) == [HAND_CONTEXT[i] for i in order]


def test_similarities_compare_in_float32():
    # 7/10 in float32 is 0.699999988..., equal to float32(0.7) but below the float64 0.7: E1 (torch,
    # float32 tensor vs Python float) counts it, as e1min must.
    rows = ["ACDEFGHIKL", "ACDEFGHWWW"]
    msa = MSA.from_rows(rows)
    assert msa.neighbour_counts(0.7).tolist() == [2, 2]
    assert msa.weights(0.7).tolist() == [0.5, 0.5]
    assert sample_context(msa, 0, MSASampling(1, 100, 0.7, 0.7, 0.95)) == ["ACDEFGHWWW"]
    assert sample_context(msa, 0, MSASampling(1, 100, 0.7, 0.0, 0.69)) == []


def test_neighbours_divide_by_the_other_rows_length():
    # A short fragment inside a long row: the long row counts the fragment (3/3), not the reverse (3/10).
    rows = ["ACDEFGHIKL", "ACD-------"]
    assert MSA.from_rows(rows).neighbour_counts(0.8).tolist() == [2, 1]


# ---------------------------------------------------------------------------------------------
# Blocked computation
# ---------------------------------------------------------------------------------------------
def _unblocked_neighbours(matrix, bound):
    gap = ord("-")
    lengths = (matrix != gap).sum(axis=1).astype(np.float32)
    match = ((matrix[:, None, :] == matrix[None, :, :]) & (matrix[:, None, :] != gap)).sum(axis=2).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (match / lengths[None, :] >= np.float32(bound)).sum(axis=1)


@pytest.mark.parametrize("bound", [0.0, 0.5, 0.7, 0.8, 1.0])
def test_blocked_equals_unblocked(monkeypatch, bound):
    rng = np.random.default_rng(int(bound * 10))
    msa = MSA.from_rows(_random_texts(rng, 50, 24, all_gap_rows=3))
    want = _unblocked_neighbours(msa.matrix, bound)
    assert neighbour_counts(msa.matrix, bound).tolist() == want.tolist()
    monkeypatch.setattr(similarity, "BLOCK_ROWS", 4)
    monkeypatch.setattr(similarity, "BLOCK_FEATURES", 7)  # several feature chunks as well
    assert neighbour_counts(msa.matrix, bound).tolist() == want.tolist()
    assert neighbour_counts(msa.matrix, bound, block_rows=1).tolist() == want.tolist()
    small = MSA.from_rows(msa.texts)
    assert small.query_similarity.tolist() == msa.query_similarity.tolist()
    s = MSASampling(20, 10_000, bound, 0.0, 1.0)
    assert sample_context(small, 9, s) == sample_context(MSA.from_rows(msa.texts), 9, s)


# ---------------------------------------------------------------------------------------------
# Windows (e1min's departure for long queries)
# ---------------------------------------------------------------------------------------------
def test_window_keeps_inner_insertions_only():
    q = "ACDEFGHIKL"
    rows = [q, "AC-EFgGHIKL", "ACDEFGHxIKL", "-CDEWGHIK-", "ACD------L"]
    s = MSASampling(10, 1000, 0.8, 0.0, 1.0)  # every row, the query included, is drawn
    # Query residues 3..6 = columns 3..6; row 1's 'g' lies between columns 4 and 5 (kept), row 2's 'x'
    # after column 6 (outside); row 4 has no residue there (skipped).
    assert sorted(sample_context(rows, 0, s, window=(3, 7))) == ["EFGGH", "EFGH", "EFGH", "EWGH"]
    # A window starting at the query's first residue keeps what precedes it, one ending at its last
    # residue what follows; the whole query is no window at all.
    assert sorted(sample_context(rows, 0, s, window=(0, 4))) == ["ACD", "ACDE", "ACDE", "ACE", "CDE"]
    assert sorted(sample_context(rows, 0, s, window=(6, 10))) == ["HIK", "HIKL", "HIKL", "HXIKL", "L"]
    assert sample_context(rows, 4, s, window=(0, 10)) == sample_context(rows, 4, s)
    assert sorted(sample_context(rows, 0, s)) == ["ACDEFGHIKL", "ACDEFGHXIKL", "ACDL", "ACEFGGHIKL", "CDEWGHIK"]


def test_window_budget_counts_window_residues():
    q = "ACDEFGHIKL"
    rows = [q] + ["ACDEFGHIKW"] * 3
    s = MSASampling(10, 8, 0.8, 0.0, 0.95)
    assert sample_context(rows, 0, s) == []  # 10 residues > 8
    assert sample_context(rows, 0, s, window=(0, 4)) == ["ACDE", "ACDE"]


# ---------------------------------------------------------------------------------------------
# Departures and settings
# ---------------------------------------------------------------------------------------------
def test_no_candidate_runs_single_sequence_and_says_so_once(caplog):
    rows = ["ACDEFGHIKL", "ACDEFGHIKL"]
    msa = MSA.from_rows(rows)
    with caplog.at_level(logging.INFO, logger="e1min"):
        assert sample_context(msa, 0, MSASampling(max_query_similarity=0.95)) == []
        assert sample_context(msa, 1, MSASampling(max_query_similarity=0.95)) == []
    notes = [r.getMessage() for r in caplog.records if "single-sequence" in r.getMessage()]
    assert len(notes) == 1 and "[0, 0.95]" in notes[0]
    assert sample_context(msa, 0, MSASampling(max_num_samples=0, max_query_similarity=1.0)) == []


def test_weights_cached_per_bound(monkeypatch):
    msa = MSA.from_rows(HAND)
    calls = []
    real = msa_mod.neighbour_counts
    monkeypatch.setattr(msa_mod, "neighbour_counts", lambda m, b: calls.append(b) or real(m, b))
    for seed in range(3):
        sample_context(msa, seed, MSASampling(neighbor_similarity_lower_bound=0.8))
        sample_context(msa, seed, MSASampling(neighbor_similarity_lower_bound=0.6))
    assert calls == [0.8, 0.6]


def test_from_dict_rejects_unknown():
    assert MSASampling.from_dict({"max_num_samples": 3}).max_num_samples == 3
    with pytest.raises(ValueError, match="unknown MSA sampling setting.*max_rows"):
        MSASampling.from_dict({"max_rows": 3})
    assert msa_mod.E1_REFERENCE_SAMPLING.to_dict() == {
        "max_num_samples": 511,
        "max_token_length": 32768,
        "neighbor_similarity_lower_bound": 0.8,
        "min_query_similarity": 0.0,
        "max_query_similarity": 1.0,
    }


# ---------------------------------------------------------------------------------------------
# Parsing and malformed input
# ---------------------------------------------------------------------------------------------
def test_parse_a3m_drops_insertions_and_reads_dots(tmp_path):
    p = _a3m(tmp_path, "#A3M#\n>q\nACDE\n>h1 desc\nAaaC.E\n>h2\nA-\nDE\n")
    assert parse_a3m(p) == ["ACDE", "AC-E", "A-DE"]
    msa = read_a3m(p)
    assert msa.texts == ["ACDE", "AaaC-E", "A-DE"] and msa.names == ["q", "h1", "h2"] and msa.lines == [2, 4, 6]


@pytest.mark.parametrize(
    "text, where, match",
    [
        ("", "", "empty A3M file"),
        (">q\nACDE\n>h\nACD\n", ":3: record 'h'", "3 aligned columns, the query 'q' has 4"),
        (">q\nACDE\n>h\nAcCDEx\n>h2\nACDDE\n", ":5: record 'h2'", "5 aligned columns"),
        ("ACDE\n", ":1:", "expected a '>' header"),
        (">q\nACDE\n>h\nAC1E\n", ":4: record 'h'", "invalid character '1'"),
        (">q\nACDE\n>h\n>h2\nACDE\n", ":3: record 'h'", "is empty"),
        (">q\nACDE\n>h\n", ":3: record 'h'", "is empty"),
        (">q\n----\n>h\nACDE\n", ":1: the query row 'q'", "no aligned residue"),
    ],
)
def test_parse_errors_name_file_line_record(tmp_path, text, where, match):
    p = _a3m(tmp_path, text)
    with pytest.raises(DataError, match=match) as e:
        read_a3m(p)
    assert str(e.value).startswith(f"{p}{where}")


def test_non_text_bytes(tmp_path):
    p = tmp_path / "nul.a3m"
    p.write_bytes(b">q\nACDE\n>h\nAC\x00E\n")
    with pytest.raises(DataError, match=rf"^{p}:4: non-text byte 0x00"):
        read_a3m(p)
    p = tmp_path / "latin1.a3m"
    p.write_bytes(b">q\nACDE\n>h \xe9\nACDE\n")
    with pytest.raises(DataError, match=rf"^{p}:3: non-text byte 0xe9"):
        read_a3m(p)


def test_paths_that_are_not_files(tmp_path):
    d = tmp_path / "ZN"
    (d / "dir.a3m").mkdir(parents=True)
    os.symlink(tmp_path / "nowhere.a3m", d / "dangling.a3m")
    os.symlink(d / "loop.a3m", d / "loop.a3m")
    prov = ContextProvider(tmp_path)
    for pid, message in [
        ("dir", "is a directory"),
        ("dangling", "dangling symlink"),
        ("loop", "symlink loop"),
        ("missing", "file not found"),
    ]:
        with pytest.raises(DataError, match=message) as e:
            read_a3m(d / f"{pid}.a3m")
        assert str(e.value).startswith(str(d / f"{pid}.a3m"))
        if pid != "missing":  # found but unusable: an error, never "no MSA"
            with pytest.raises(DataError, match=message):
                prov.context("ZN", pid, "ACDE", 0)
    assert prov.context("ZN", "missing", "ACDE", 0) == [] and prov.missing == {("ZN", "missing")}


def test_oversized_and_out_of_memory_are_data_errors(tmp_path, monkeypatch):
    p = _a3m(tmp_path, _rows_a3m(HAND))
    monkeypatch.setattr(a3m, "MAX_A3M_BYTES", 20)
    with pytest.raises(DataError, match=rf"^{p}: \d+ bytes, larger than the 20 bytes"):
        read_a3m(p)
    monkeypatch.setattr(a3m, "MAX_A3M_BYTES", 1 << 20)
    msa = read_a3m(p)

    def oom(*args):
        raise MemoryError

    monkeypatch.setattr(msa_mod, "neighbour_counts", oom)
    with pytest.raises(DataError, match=rf"^{p}: out of memory computing sequence weights \(5 rows\)"):
        sample_context(msa, 0)


# ---------------------------------------------------------------------------------------------
# ContextProvider
# ---------------------------------------------------------------------------------------------
def test_provider_lookup_cache_and_missing(tmp_path):
    _a3m(tmp_path, ">a\nACDE\n>h\nAC-E\n", "ZN/a.a3m")
    _a3m(tmp_path, ">b\nMKV\n>h\nMKW\n", "b.a3m")
    _a3m(tmp_path, ">c\nGGG\n>h\nGGA\n", "LREE/c.a3m")
    prov = ContextProvider(str(tmp_path))
    s = MSASampling(max_query_similarity=0.9)
    assert prov.context("ZN", "a", "ACDE", 0, s) == ["ACE"]
    assert prov.context("ZN", "b", "MKV", 0, s) == ["MKW"]
    assert prov.context("REE", "c", "GGG", 0, s) == ["GGA"]  # REE falls back to its parts
    assert prov.context("ZN", "z", "MKV", 0, s) == []
    assert prov.missing == {("ZN", "z")}
    assert prov.rows("ZN", "a", "ACDE") == ["ACDE", "AC-E"]
    assert prov.msa("ZN", "a", "ACDE") is prov.msa("ZN", "a", "ACDE")  # parsed once
    with pytest.raises(DataError, match=r"a\.a3m:1: record 'a': first row .*does not match the sequence of 'a'"):
        prov.rows("ZN", "a", "ACDF")


def test_provider_validate_does_not_cache(tmp_path):
    p = _a3m(tmp_path, ">a\nACDE\n>h\nAC-E\n", "ZN/a.a3m")
    prov = ContextProvider(str(tmp_path))
    assert prov.validate("ZN", "a", "ACDE") == p and prov.validate("ZN", "zz", "ACDE") is None
    assert prov._cache == {}
    with pytest.raises(DataError, match=r"first difference at residue 4"):
        prov.validate("ZN", "a", "ACDF")


def test_provider_placeholder(tmp_path):
    _a3m(tmp_path, ">a\nACDE\n>h\nAC-E\n", "CA/msas/a.a3m")
    prov = ContextProvider(str(tmp_path / "{ION}" / "msas"))
    assert prov.rows("CA", "a", "ACDE") is not None
    assert prov.rows("ZN", "a", "ACDE") is None


def test_provider_disabled():
    prov = ContextProvider(None)
    assert prov.context("ZN", "a", "ACDE", 0) == [] and prov.missing == set()
