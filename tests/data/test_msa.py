import numpy as np
import pytest

from e1min.data.fasta import DataError
from e1min.data.msa import MSA, ContextProvider, MSASampling, parse_a3m, sample_context, sequence_weights


def _a3m(tmp_path, text, name="p.a3m"):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_parse_a3m_drops_insertions_and_reads_dots(tmp_path):
    p = _a3m(tmp_path, "#A3M#\n>q\nACDE\n>h1 desc\nAaaC.E\n>h2\nA-\nDE\n")
    assert parse_a3m(p) == ["ACDE", "AC-E", "A-DE"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        (">q\nACDE\n>h\nACD\n", "3 aligned columns, the query has 4"),
        ("ACDE\n", "expected a '>' header"),
        (">q\nAC1E\n", "invalid character '1'"),
        (">q\nACDE\n>h\n", "no aligned residues"),
    ],
)
def test_parse_a3m_errors(tmp_path, text, match):
    p = _a3m(tmp_path, text)
    with pytest.raises(DataError, match=match) as e:
        parse_a3m(p)
    assert str(p) in str(e.value)


def _naive_weights(rows, bound):
    w = []
    for a in rows:
        cols = [k for k, c in enumerate(a) if c != "-"]
        n = 0
        for b in rows:
            ident = sum(a[k] == b[k] for k in cols) / len(cols) if cols else 0.0
            n += ident >= bound
        w.append(1.0 / max(n, 1))
    return np.array(w)


def _random_rows(rng, n, length):
    q = rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), length)
    rows = ["".join(q)]
    for _ in range(n - 1):
        r = q.copy()
        sub = rng.random(length) < rng.uniform(0, 0.6)
        r[sub] = rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), sub.sum())
        r[rng.random(length) < 0.15] = "-"
        rows.append("".join(r))
    return rows


@pytest.mark.parametrize("bound", [0.5, 0.8])
def test_weights_match_naive_loop(bound):
    rows = _random_rows(np.random.default_rng(1), 30, 40) + ["-" * 40]
    np.testing.assert_allclose(sequence_weights(rows, bound), _naive_weights(rows, bound))


def test_identical_rows_share_weight():
    w = sequence_weights(["ACDE", "ACDE", "ACDE", "WWWW"])
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 1.0])


def test_sampling_deterministic_excludes_query_and_strips():
    rows = _random_rows(np.random.default_rng(2), 60, 50)
    s = MSASampling(max_num_samples=20, max_token_length=10_000, max_query_similarity=1.0)
    a, b = sample_context(rows, 5, s), sample_context(rows, 5, s)
    assert a == b and len(a) == 20
    assert sample_context(rows, 6, s) != a
    assert rows[0] not in a
    assert all("-" not in c and c.isupper() for c in a)
    stripped = {r.replace("-", "") for r in rows[1:]}
    assert set(a) <= stripped


def test_identity_filter():
    q = "ACDEFGHIKL"
    rows = [q, q, "ACDEFGHIKW", "ACDEFWWWWW", "WWWWWWWWWW"]  # identities 1.0, 0.9, 0.5, 0.0
    got = sample_context(rows, 0, MSASampling(min_query_similarity=0.4, max_query_similarity=0.95))
    assert sorted(got) == ["ACDEFGHIKW", "ACDEFWWWWW"]
    got = sample_context(rows, 0, MSASampling(min_query_similarity=0.4, max_query_similarity=0.85))
    assert got == ["ACDEFWWWWW"]
    got = sample_context(rows, 0, MSASampling(min_query_similarity=0.0, max_query_similarity=1.0))
    assert len(got) == 4


def test_token_budget_and_row_limit():
    rows = _random_rows(np.random.default_rng(3), 100, 50)
    s = MSASampling(max_num_samples=1000, max_token_length=300, max_query_similarity=1.0)
    ctx = sample_context(rows, 1, s)
    total = sum(map(len, ctx))
    assert total <= 300 and len(ctx) >= 1
    # it stopped at the first row that would not fit: that row is longer than the remaining budget
    msa = MSA.from_rows(rows)
    assert len(sample_context(msa, 1, MSASampling(max_num_samples=3, max_query_similarity=1.0))) == 3
    assert sample_context(msa, 1, MSASampling(max_num_samples=0)) == []


def test_weighted_draw_prefers_unique_rows():
    q = "ACDEFGHIKL"
    dup = "ACDEFGWWWW"  # identities to each other 1.0, to the query and the unique row < 0.8
    rows = [q] + [dup] * 20 + ["WWWEFGHIKL"]
    first = [sample_context(rows, s, MSASampling(max_num_samples=1, max_query_similarity=1.0))[0] for s in range(400)]
    frac_unique = np.mean([f == "WWWEFGHIKL" for f in first])
    assert 0.4 < frac_unique < 0.6  # weight 1 vs 20 x 1/20


def test_window_restricts_columns():
    rows = ["ACDEFGHIKL", "ACDEFGHIKW", "-CDEFGHIK-"]
    ctx = sample_context(rows, 0, MSASampling(max_query_similarity=1.0), window=(2, 5))
    assert sorted(ctx) == ["DEF", "DEF"]


def test_from_dict_rejects_unknown():
    assert MSASampling.from_dict({"max_num_samples": 3}).max_num_samples == 3
    with pytest.raises(ValueError, match="unknown MSA sampling setting.*max_rows"):
        MSASampling.from_dict({"max_rows": 3})


def test_provider_lookup_cache_and_missing(tmp_path):
    _a3m(tmp_path, ">a\nACDE\n>h\nAC-E\n", "ZN/a.a3m")
    _a3m(tmp_path, ">b\nMKV\n>h\nMKW\n", "b.a3m")
    _a3m(tmp_path, ">c\nGGG\n>h\nGGA\n", "LREE/c.a3m")
    prov = ContextProvider(str(tmp_path))
    s = MSASampling(max_query_similarity=1.0)
    assert prov.context("ZN", "a", "ACDE", 0, s) == ["ACE"]
    assert prov.context("ZN", "b", "MKV", 0, s) == ["MKW"]
    assert prov.context("REE", "c", "GGG", 0, s) == ["GGA"]  # REE falls back to its parts
    assert prov.context("ZN", "z", "MKV", 0, s) == []
    assert prov.missing == {("ZN", "z")}
    assert prov.rows("ZN", "a", "ACDE") == ["ACDE", "AC-E"]
    with pytest.raises(DataError, match="a.a3m.*does not match"):
        prov.rows("ZN", "a", "ACDF")


def test_provider_placeholder(tmp_path):
    _a3m(tmp_path, ">a\nACDE\n>h\nAC-E\n", "CA/msas/a.a3m")
    prov = ContextProvider(str(tmp_path / "{ION}" / "msas"))
    assert prov.rows("CA", "a", "ACDE") is not None
    assert prov.rows("ZN", "a", "ACDE") is None


def test_provider_disabled():
    prov = ContextProvider(None)
    assert prov.context("ZN", "a", "ACDE", 0) == [] and prov.missing == set()
