"""Pure-torch reference attention of MosaicBERT: ALiBi slopes and biases, varlen and padded attention.

``varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, alibi_slopes)`` computes, for every sequence b
(rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of the packed q, k, v) and head h,

    softmax(scale * q_i . k_j - slope_h * |i - j|) over keys j of the same sequence, times v_j

exactly: the packed batch is padded once to ``(B, H, max_seqlen, D)``; ``F.scaled_dot_product_attention``
runs with one additive float mask (ALiBi bias plus the most negative finite value on padding keys), then
the real rows are gathered back. It supports attention dropout (finetuning ablation). This is what the
Triton kernel (``flash_attn_alibi.py``) is tested against; which of the two runs is decided in
``kernels/dispatch.py`` alone.

ALiBi slopes follow Press et al. (2022): for n a power of two, the geometric sequence starting at
``2^(-8/n)`` with that same ratio; otherwise the slopes of the closest lower power of two followed by every
other slope of the next power of two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.packing import cu_seqlens_to_indices


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes per Press et al. (2022), including head counts that are not powers of two.

    Returns:
        (n_heads,) float32, decreasing; e.g. 8 heads -> 1/2, 1/4, ..., 1/256.
    """
    if n_heads <= 0:
        raise ValueError(f"alibi_slopes: n_heads must be positive, got {n_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    slopes: torch.Tensor, q_len: int, k_len: int | None = None, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The additive ALiBi bias ``-slope_h * |i - j|`` for query i and key j (bidirectional).

    Built for the actual lengths, so a model trained at 128 tokens runs at any length.

    Args:
        slopes: (H,) float32 head slopes.

    Returns:
        (H, q_len, k_len) in ``dtype`` on ``slopes.device``.
    """
    k_len = q_len if k_len is None else k_len
    pos_q = torch.arange(q_len, device=slopes.device, dtype=torch.float32)
    pos_k = torch.arange(k_len, device=slopes.device, dtype=torch.float32)
    distance = (pos_q[:, None] - pos_k[None, :]).abs()  # (q_len, k_len)
    return (-slopes.float()[:, None, None] * distance).to(dtype)  # (H, q_len, k_len)


def padded_attention_torch(q, k, v, key_padding_mask, alibi_slopes, dropout_p=0.0, softmax_scale=None):
    """Torch attention on a padded batch with an additive ALiBi bias and a key-padding mask.

    Args:
        q, k, v: (B, H, S, D).
        key_padding_mask: (B, S) bool, True for real keys; None = no padding.
        alibi_slopes: (H,) fp32, or None for no position bias (``position="learned"``).

    Returns:
        (B, H, S, D). Query rows whose every key is padding get the mean of v (finite, to be discarded).
    """
    batch, n_heads, seqlen, _ = q.shape
    bias = None
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, seqlen, dtype=q.dtype)[None]  # (1, H, S, S)
    if key_padding_mask is not None:
        # The most negative finite value instead of -inf keeps fully masked rows finite (no NaN in
        # forward or backward); masked_fill writes it exactly, so nothing overflows.
        pad = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        if bias is None:
            bias = torch.zeros(batch, 1, 1, seqlen, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(pad, torch.finfo(q.dtype).min)  # (B, H|1, S|1, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=softmax_scale)


def varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, dropout_p=0.0, softmax_scale=None):
    """Exact varlen attention: q, k, v (T, H, D), cu_seqlens (B+1,) int32 -> (T, H, D) (see the module doc)."""
    total, n_heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    indices, _ = cu_seqlens_to_indices(cu_seqlens, max_seqlen, total)  # (T,) into (B*S)

    def to_padded(x):  # (T, H, D) -> (B, H, S, D)
        padded = x.new_zeros(batch * max_seqlen, n_heads, head_dim).index_copy(0, indices, x)
        return padded.view(batch, max_seqlen, n_heads, head_dim).transpose(1, 2)

    # index_fill_, not ``key_mask[indices] = True``: that copies the scalar from host memory (a stream sync)
    key_mask = torch.zeros(batch * max_seqlen, dtype=torch.bool, device=q.device).index_fill_(0, indices, True)
    out = padded_attention_torch(
        to_padded(q), to_padded(k), to_padded(v), key_mask.view(batch, max_seqlen), alibi_slopes,
        dropout_p, softmax_scale,
    )  # (B, H, S, D)
    out = out.transpose(1, 2).reshape(batch * max_seqlen, n_heads, head_dim)  # (B*S, H, D)
    return out.index_select(0, indices)  # (T, H, D)


__all__ = ["alibi_bias", "alibi_slopes", "padded_attention_torch", "varlen_attention_torch"]
