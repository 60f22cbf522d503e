"""Padding helpers against hand-computed indices and cu_seqlens."""

import torch

from mosaic_embed.model.padding import cu_seqlens_to_indices, pad_input, unpad_input


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
