"""Packed and padded batch layouts, the one place that defines ``cu_seqlens``.

MosaicBERT consumes *packed* batches: the B sequences concatenated into ``input_ids`` (T,), described by
``cu_seqlens`` (B+1,) int32, the cumulative lengths starting at 0 (sequence b is rows
``cu_seqlens[b]:cu_seqlens[b+1]``; FlashAttention's varlen layout), and ``max_seqlen``. Models without a
packed path take *padded* (B, S) arrays with an attention mask.

- host side (numpy, before a batch reaches the device): :func:`flatten`, :func:`cu_seqlens`,
  :func:`positions`, :func:`pad`, :func:`packed_inputs`, :func:`padded_inputs`: MLM collation, GLUE
  batches and the encoder build their batches with these;
- device side (torch, differentiable, inside the model): :func:`unpad_input` drops the padding of a padded
  batch, giving ``indices`` (T,) int64 (each packed row's position in the flattened (B * S) layout),
  ``cu_seqlens`` and ``max_seqlen``; :func:`pad_input` is its inverse; :func:`cu_seqlens_to_indices` maps a
  packed batch into a padded layout (the torch attention reference). Tokens keep row-major order, so any
  padding side works (right, left, holes).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch


def flatten(seqs: Sequence[Sequence[int]], dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (T,) ids back to back and (B,) int64 lengths (two ``np.fromiter`` passes, no copies)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def cu_seqlens(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Sequence lengths (B,) -> cumulative offsets (B+1,) int32, starting at 0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def positions(lengths: np.ndarray) -> np.ndarray:
    """(T,) int64: each token's position inside its own sequence (0 at every sequence's first token)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - starts


def pad(flat: np.ndarray, lengths: np.ndarray, pad_value: int, multiple: int | None = None
        ) -> tuple[np.ndarray, np.ndarray]:
    """Packed (T, ...) rows -> (B, S, ...) padded with ``pad_value``, and the (B, S) bool mask of real tokens.

    S is the longest sequence, rounded up to ``multiple`` when given (tensor-core friendly shapes).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    s = int(lengths.max()) if lengths.size else 0
    if multiple:
        s = (s + multiple - 1) // multiple * multiple
    mask = np.arange(s)[None, :] < lengths[:, None]  # (B, S)
    out = np.full((lengths.size, s, *flat.shape[1:]), pad_value, dtype=flat.dtype)
    out[mask] = flat  # row-major fill matches the concatenation order
    return out, mask


def to_device(array: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host array -> tensor on ``device`` without waiting for the GPU: a copy from pageable memory first
    synchronises the stream, so the host could not queue the next step while the GPU runs this one; a
    copy from pinned memory is asynchronous."""
    t = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def packed_inputs(seqs: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None = None,
                  device: torch.device | str = "cpu") -> dict:
    """Model inputs of a packed batch: ``input_ids`` (T,), [``token_type_ids`` (T,)], ``cu_seqlens`` (B+1,)
    int32 and ``max_seqlen`` (int)."""
    flat, lengths = flatten(seqs)
    out = {"input_ids": to_device(flat, device),
           "cu_seqlens": to_device(cu_seqlens(lengths), device),
           "max_seqlen": int(lengths.max()) if lengths.size else 0}
    if types is not None:
        out["token_type_ids"] = to_device(flatten(types)[0], device)
    return out


def padded_inputs(seqs: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None = None, pad_id: int = 0,
                  device: torch.device | str = "cpu") -> dict:
    """Model inputs of a padded batch: ``input_ids``, [``token_type_ids``], ``attention_mask``, each (B, S)."""
    flat, lengths = flatten(seqs)
    ids, mask = pad(flat, lengths, pad_id)
    out = {"input_ids": to_device(ids, device), "attention_mask": to_device(mask.astype(np.int64), device)}
    if types is not None:
        out["token_type_ids"] = to_device(pad(flatten(types)[0], lengths, 0)[0], device)
    return out


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


__all__ = ["cu_seqlens", "cu_seqlens_to_indices", "flatten", "pad", "pad_input", "packed_inputs", "padded_inputs",
           "positions", "unpad_input"]
