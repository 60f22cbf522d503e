"""Remove padding tokens from a padded batch and put them back.

A padded batch ``(B, S, ...)`` with an ``attention_mask`` ``(B, S)`` (1 = real token) becomes a packed
tensor ``(T, ...)`` holding only the T real tokens, sequence after sequence, described by

- ``indices`` (T,) int64: the position of each packed row in the flattened ``(B * S)`` padded layout;
- ``cu_seqlens`` (B + 1,) int32: cumulative sequence lengths, sequence b is rows
  ``cu_seqlens[b]:cu_seqlens[b + 1]`` (the format of FlashAttention's varlen functions);
- ``max_seqlen`` (int): the longest sequence, which sizes the attention kernel's grid.

Both directions are differentiable (gather / scatter), so gradients flow through unpadding.
Tokens are kept in row-major order, so any padding side works (right padding, left padding, holes).
"""

from __future__ import annotations

import torch


def unpad_input(
    hidden: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Keep only the real tokens of a padded batch.

    Args:
        hidden: (B, S, ...) any per-token tensor (ids, embeddings, labels).
        attention_mask: (B, S), nonzero/True for real tokens.

    Returns:
        ``(packed (T, ...), indices (T,) int64, cu_seqlens (B+1,) int32, max_seqlen int)``.
    """
    if attention_mask.dim() != 2 or hidden.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"unpad_input: attention_mask must be (B, S) matching hidden's first two dims; got "
            f"{tuple(attention_mask.shape)} for hidden {tuple(hidden.shape)}"
        )
    mask = attention_mask.bool()
    seqlens = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()  # (T,)
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))  # (B+1,)
    flat = hidden.reshape(hidden.shape[0] * hidden.shape[1], *hidden.shape[2:])  # (B*S, ...)
    return flat.index_select(0, indices), indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: scatter packed rows back, zeros at padding.

    Args:
        packed: (T, ...) rows of real tokens.
        indices: (T,) their positions in the flattened (batch * seqlen) layout.

    Returns:
        (batch, seqlen, ...).
    """
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])  # (B*S, ...)
    out = out.index_copy(0, indices, packed)  # out-of-place so autograd routes grads to `packed`
    return out.view(batch, seqlen, *packed.shape[1:])


def cu_seqlens_to_indices(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each packed token sits in a padded (B, max_seqlen) layout.

    Args:
        cu_seqlens: (B+1,) int32 cumulative lengths; total = cu_seqlens[-1].
        max_seqlen: the padded length S (>= every sequence length).
        total: T, passed explicitly so no device sync is needed.

    Returns:
        ``indices`` (T,) int64 into the flattened (B * S) layout, and ``positions`` (T,) int64, each
        token's position inside its own sequence (0 at its first token).
    """
    cu = cu_seqlens.long()
    seqlens = cu[1:] - cu[:-1]  # (B,)
    batch_of_token = torch.repeat_interleave(
        torch.arange(seqlens.numel(), device=cu.device), seqlens, output_size=total
    )  # (T,)
    positions = torch.arange(total, device=cu.device) - cu[:-1][batch_of_token]  # (T,)
    return batch_of_token * max_seqlen + positions, positions


__all__ = ["unpad_input", "pad_input", "cu_seqlens_to_indices"]
