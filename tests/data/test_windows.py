import numpy as np
import pytest

from e1min.data.windows import random_crop, sliding_windows, stitch_predictions


@pytest.mark.parametrize("length", [1, 5, 10, 11, 37, 100, 1001])
@pytest.mark.parametrize("max_len, overlap", [(10, None), (10, 0), (10, 4), (16, 7), (64, 16)])
def test_keep_spans_partition(length, max_len, overlap):
    ws = sliding_windows(length, max_len, overlap)
    kept = np.concatenate([np.arange(w.keep_start, w.keep_end) for w in ws])
    assert kept.tolist() == list(range(length))
    for w in ws:
        assert 0 <= w.start <= w.keep_start < w.keep_end <= w.end <= length
        assert w.end - w.start <= max_len


def test_keep_is_most_central():
    ws = sliding_windows(30, 10, 4)
    for w in ws:
        for i in range(w.keep_start, w.keep_end):
            own = min(i - w.start, w.end - 1 - i)
            others = [min(i - v.start, v.end - 1 - i) for v in ws if v.start <= i < v.end]
            assert own >= max(others) - 1  # ties broken by the midpoint


def test_stitch_predictions_from_windowed_examples():
    from e1min.data.dataset import Example

    ws = sliding_windows(25, 8, 3)
    truth = np.arange(25, dtype=np.float32)
    seq = "A" * 25
    exs = [
        Example("p", "ZN", seq[w.start : w.end], None, offset=w.start, keep_start=w.keep_start, keep_end=w.keep_end, protein_length=25)
        for w in ws
    ]
    preds = [truth[w.start : w.end] for w in ws]
    np.testing.assert_array_equal(stitch_predictions(exs, preds)["p"], truth)
    with pytest.raises(ValueError, match="every residue exactly once"):
        stitch_predictions(exs[:-1], preds[:-1])


def test_random_crop_contains_positive():
    labels = np.zeros(500, np.uint8)
    labels[[3, 480]] = 1
    rng = np.random.default_rng(0)
    for _ in range(50):
        s, e = random_crop(500, 100, labels, rng)
        assert e - s == 100 and 0 <= s and e <= 500
        assert labels[s:e].any()
    assert random_crop(50, 100, labels[:50], rng) == (0, 50)
