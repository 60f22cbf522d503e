"""Batch layouts (data/packing.py) on hand-computed examples: packed cu_seqlens, positions, padding."""

import numpy as np
import torch

from mosaic_embed.data import packing
from mosaic_embed.data.packing import cu_seqlens_to_indices, pad_input, unpad_input


def test_flatten_and_cu_seqlens_by_hand():
    flat, lengths = packing.flatten([[5, 6, 7], [8], [9, 10]])
    assert flat.tolist() == [5, 6, 7, 8, 9, 10] and flat.dtype == np.int64
    assert lengths.tolist() == [3, 1, 2]
    cu = packing.cu_seqlens(lengths)
    assert cu.tolist() == [0, 3, 4, 6] and cu.dtype == np.int32
    assert packing.cu_seqlens([4, 1]).tolist() == [0, 4, 5]
    assert packing.cu_seqlens([]).tolist() == [0]
    assert packing.positions(lengths).tolist() == [0, 1, 2, 0, 0, 1]
    assert packing.flatten([[1, 2]], np.int32)[0].dtype == np.int32


def test_pad_fills_row_major_and_rounds_up():
    flat, lengths = packing.flatten([[1, 2, 3], [4]])
    padded, mask = packing.pad(flat, lengths, pad_value=0)
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    padded8, mask8 = packing.pad(flat, lengths, pad_value=-1, multiple=8)
    assert padded8.shape == (2, 8) and padded8[1, 1:].tolist() == [-1] * 7 and mask8.sum() == 4


def test_packed_and_padded_inputs_agree():
    seqs, types = [[2, 7, 8, 3], [2, 9, 3]], [[0, 0, 1, 1], [0, 0, 0]]
    packed = packing.packed_inputs(seqs, types)
    assert packed["input_ids"].tolist() == [2, 7, 8, 3, 2, 9, 3]
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["cu_seqlens"].tolist() == [0, 4, 7]
    assert packed["max_seqlen"] == 4 and packed["token_type_ids"].tolist() == [0, 0, 1, 1, 0, 0, 0]
    padded = packing.padded_inputs(seqs, types, pad_id=0)
    assert padded["input_ids"].tolist() == [[2, 7, 8, 3], [2, 9, 3, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert padded["token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    rows = padded["attention_mask"].bool()
    assert torch.equal(padded["input_ids"][rows], packed["input_ids"])


# ---- device side: dropping and restoring padding inside the model -------------------------------------


def test_unpad_right_padding_by_hand():
    # lengths 3, 1, 4 in a (3, 4) batch
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    hidden = torch.arange(12).view(3, 4, 1).float() * 10  # value = 10 * flat index
    packed, indices, cu, max_len = unpad_input(hidden, mask)
    assert indices.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 8]
    assert max_len == 4
    assert packed.squeeze(-1).tolist() == [0, 10, 20, 40, 80, 90, 100, 110]


def test_unpad_left_padding_and_holes_by_hand():
    mask = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]])
    ids = torch.tensor([[9, 9, 5, 6], [7, 9, 8, 9]])
    packed, indices, cu, max_len = unpad_input(ids, mask)
    assert packed.tolist() == [5, 6, 7, 8]
    assert indices.tolist() == [2, 3, 4, 6]
    assert cu.tolist() == [0, 2, 4] and max_len == 2


def test_pad_input_inverts_unpad_with_zeros_at_padding_and_gradients():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])  # an empty row too
    hidden = torch.randn(3, 3, 5, requires_grad=True)
    packed, indices, cu, max_len = unpad_input(hidden, mask)
    assert cu.tolist() == [0, 2, 5, 5] and max_len == 3
    back = pad_input(packed, indices, 3, 3)
    assert back.shape == (3, 3, 5)
    torch.testing.assert_close(back, hidden * mask[..., None])
    back.sum().backward()
    torch.testing.assert_close(hidden.grad, mask[..., None].float().expand(3, 3, 5))


def test_cu_seqlens_to_indices_by_hand():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    indices, positions = cu_seqlens_to_indices(cu, max_seqlen=5, total=8)
    # sequence 0 -> rows 0..2, sequence 1 -> row 5, sequence 2 -> rows 10..13 of a (3, 5) layout
    assert indices.tolist() == [0, 1, 2, 5, 10, 11, 12, 13]
    assert positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_cu_seqlens_round_trip_with_unpad():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    _, indices, cu, max_len = unpad_input(mask, mask)
    again, _ = cu_seqlens_to_indices(cu, max_len, int(cu[-1]))
    assert torch.equal(again, indices)
