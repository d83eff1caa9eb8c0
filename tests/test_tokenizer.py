import pytest
import torch

from e1min.tokenizer import EncodingError, encode, prepare_batch


def test_single_sequence_encoding():
    e = encode("ACZ")
    # <bos> 1 A C Z 2 <eos>; A=8, C=10, Z=33
    assert e["input_ids"].tolist() == [1, 6, 8, 10, 33, 7, 2]
    assert e["within_seq_position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert e["global_position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert e["sequence_ids"].tolist() == [0] * 7
    assert e["query_residue_mask"].tolist() == [False, False, True, True, True, False, False]


def test_multi_sequence_encoding_and_padding():
    b = prepare_batch(["MK", "AC,D?"])
    assert b["input_ids"].tolist() == [
        [1, 6, 20, 18, 7, 2, 0, 0, 0, 0, 0, 0],
        [1, 6, 8, 10, 7, 2, 1, 6, 11, 5, 7, 2],
    ]
    assert b["within_seq_position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5, -1, -1, -1, -1, -1, -1],
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5],
    ]
    assert b["global_position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5, -1, -1, -1, -1, -1, -1],
        list(range(12)),
    ]
    assert b["sequence_ids"].tolist() == [
        [0] * 6 + [-1] * 6,
        [0] * 6 + [1] * 6,
    ]
    assert b["query_residue_mask"][1].nonzero().flatten().tolist() == [8, 9]
    assert all(v.dtype in (torch.long, torch.bool) for v in b.values())


@pytest.mark.parametrize(
    "bad, message",
    [
        ("MKa", "invalid character 'a' at position 3"),
        ("MK1", "invalid character '1'"),
        ("", "empty sequence"),
        ("AC,", "sequence 2: empty"),
    ],
)
def test_invalid_inputs(bad, message):
    with pytest.raises(EncodingError, match=message):
        prepare_batch([bad])


def test_limits():
    with pytest.raises(EncodingError, match="513 sequences"):
        encode(",".join(["A"] * 513))
    with pytest.raises(EncodingError, match="position limit"):
        encode("A" * 8189)
    assert len(encode("A" * 8188)["input_ids"]) == 8192
