"""E1's 34-token vocabulary and the batch encoder (single and multi-sequence).

One sequence ``SEQ`` encodes as ``<bos> 1 S E Q 2 <eos>``; residue i is token i+2.
A multi-sequence input ``CTX1,CTX2,QUERY`` concatenates the encodings; the query is last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from e1min.errors import E1minError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<bos_glm>", "<eos_span>", "?", "1", "2")
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, MASK_ID, START_ID, END_ID = 0, 1, 2, 5, 6, 7
FIRST_LETTER_ID = 8  # "A"
VOCAB_SIZE = len(VOCAB)
# The 20 standard amino acids: random replacements in MLM draw from these.
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
AMINO_ACID_IDS = tuple(TOKEN_TO_ID[a] for a in AMINO_ACIDS)
RESIDUE_OFFSET = 2  # residue i of a sequence is token i + 2 of its encoding
SPECIALS_PER_SEQUENCE = 4  # <bos> 1 ... 2 <eos>
MAX_NUM_SEQUENCES = 512
MAX_POSITIONS_WITHIN_SEQ = 8192

# byte -> id lookup; -1 marks characters that are not allowed in a sequence.
_BYTE_TO_ID = torch.full((256,), -1, dtype=torch.long)
for _c in range(ord("A"), ord("Z") + 1):
    _BYTE_TO_ID[_c] = FIRST_LETTER_ID + _c - ord("A")
_BYTE_TO_ID[ord("?")] = MASK_ID


class EncodingError(E1minError, ValueError):
    """An input sequence that E1 cannot encode."""


def residue_ids(sequence: str) -> torch.Tensor:
    """Token ids of a sequence's residues (no special tokens); validates characters."""
    if not sequence:
        raise EncodingError("empty sequence")
    raw = torch.frombuffer(bytearray(sequence.encode("ascii", errors="replace")), dtype=torch.uint8)
    ids = _BYTE_TO_ID[raw.long()]
    bad = (ids < 0).nonzero()
    if len(bad):
        i = int(bad[0])
        raise EncodingError(f"invalid character {sequence[i]!r} at position {i + 1} (allowed: A-Z and '?')")
    return ids


def encode(
    sequences: str | Sequence[str],
    max_num_sequences: int = MAX_NUM_SEQUENCES,
    max_positions_within_seq: int = MAX_POSITIONS_WITHIN_SEQ,
) -> dict[str, torch.Tensor]:
    """Encode one example: ``"CTX1,CTX2,QUERY"`` or a list of sequences (query last).

    Returns 1-D ``input_ids``, ``within_seq_position_ids``, ``global_position_ids``,
    ``sequence_ids`` and ``query_residue_mask`` (True on the last sequence's residues).
    """
    seqs = sequences.split(",") if isinstance(sequences, str) else list(sequences)
    if len(seqs) > max_num_sequences:
        raise EncodingError(f"{len(seqs)} sequences in one example (at most {max_num_sequences})")
    pieces, lengths = [], []
    for k, seq in enumerate(seqs):
        if len(seq) + SPECIALS_PER_SEQUENCE > max_positions_within_seq:
            raise EncodingError(
                f"sequence {k + 1} has {len(seq)} residues; the position limit allows {max_positions_within_seq - SPECIALS_PER_SEQUENCE}"
            )
        try:
            res = residue_ids(seq)
        except EncodingError as e:
            raise EncodingError(f"sequence {k + 1}: {e}") from None
        pieces.append(torch.cat([torch.tensor([BOS_ID, START_ID]), res, torch.tensor([END_ID, EOS_ID])]))
        lengths.append(len(seq) + SPECIALS_PER_SEQUENCE)
    lens = torch.tensor(lengths)
    input_ids = torch.cat(pieces)
    sequence_ids = torch.repeat_interleave(torch.arange(len(seqs)), lens)
    starts = torch.cumsum(lens, 0) - lens
    within = torch.arange(len(input_ids)) - torch.repeat_interleave(starts, lens)
    query_mask = torch.zeros(len(input_ids), dtype=torch.bool)
    query_mask[int(starts[-1]) + RESIDUE_OFFSET : len(input_ids) - RESIDUE_OFFSET] = True
    return {
        "input_ids": input_ids,
        "within_seq_position_ids": within,
        # Sequence k starts one past the last global position of sequence k-1: positions run on.
        "global_position_ids": torch.arange(len(input_ids)),
        "sequence_ids": sequence_ids,
        "query_residue_mask": query_mask,
    }


PAD_VALUES = {
    "input_ids": PAD_ID,
    "within_seq_position_ids": -1,
    "global_position_ids": -1,
    "sequence_ids": -1,
    "query_residue_mask": False,
}


def pad_batch(examples: Sequence[dict[str, torch.Tensor]], pad_values: dict | None = None) -> dict[str, torch.Tensor]:
    """Right-pad 1-D tensors of several examples into (B, L) tensors (keys present in all examples)."""
    pad_values = {**PAD_VALUES, **(pad_values or {})}
    length = max(len(e["input_ids"]) for e in examples)
    out = {}
    for key in examples[0]:
        first = examples[0][key]
        t = torch.full((len(examples), length), pad_values.get(key, 0), dtype=first.dtype)
        for i, e in enumerate(examples):
            t[i, : len(e[key])] = e[key]
        out[key] = t
    return out


def prepare_batch(
    sequences: Sequence[str] | str, max_num_sequences: int = MAX_NUM_SEQUENCES, max_positions_within_seq: int = MAX_POSITIONS_WITHIN_SEQ
) -> dict[str, torch.Tensor]:
    """Encode and right-pad a batch of examples, each ``"SEQ"`` or ``"CTX1,...,QUERY"``.

    Returns ``input_ids`` (pad 0), ``within_seq_position_ids``, ``global_position_ids``,
    ``sequence_ids`` (pad -1), and the bool ``query_residue_mask`` (residues of the last
    sequence of each row). Pass the batch to the model with ``model(**batch)``.
    """
    if isinstance(sequences, str):
        sequences = [sequences]
    if len(sequences) == 0:
        raise EncodingError("empty batch")
    encoded = []
    for i, s in enumerate(sequences):
        try:
            encoded.append(encode(s, max_num_sequences, max_positions_within_seq))
        except EncodingError as e:
            raise EncodingError(f"batch row {i}: {e}") from None
    return pad_batch(encoded)
