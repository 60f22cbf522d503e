"""The one attention dispatch point of MosaicBERT: bidirectional ALiBi attention over unpadded batches.

``varlen_alibi_attention(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, impl)`` computes, for every
sequence b (rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of the packed q, k, v) and head h,

    softmax(scale * q_i . k_j - slope_h * |i - j|) over keys j of the same sequence, times v_j

- ``impl="torch"``: exact reference, CPU or GPU. The packed batch is padded once to
  ``(B, H, max_seqlen, D)``; ``F.scaled_dot_product_attention`` runs with one additive float mask
  (ALiBi bias plus the most negative finite value on padding keys), then the real rows are gathered back.
  Supports attention dropout (finetuning ablation).
- ``impl="triton"``: the fused FlashAttention-style kernel of ``kernels/flash_attn_alibi.py`` (fp16/bf16,
  CUDA, no dropout), imported lazily so this module works without it.
- ``impl="auto"``: triton for fp16/bf16 CUDA tensors when Triton is installed and no attention dropout is
  asked for, otherwise torch.

The path that runs is logged once per (request, choice) as a warning; asking for triton where it cannot
run raises instead of falling back.

ALiBi slopes follow Press et al. (2022): for n a power of two, the geometric sequence starting at
``2^(-8/n)`` with that same ratio; otherwise the slopes of the closest lower power of two followed by every
other slope of the next power of two.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os

import torch
import torch.nn.functional as F

from ..model.padding import cu_seqlens_to_indices

logger = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "triton")
_announced: set[tuple[str, str, str]] = set()


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


# Looked up once: find_spec cannot be traced by torch.compile, and the answer never changes in a process.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def _kernel_head_dims() -> tuple[int, ...] | None:
    """Head dims the Triton kernel supports (None if it does not say)."""
    from . import flash_attn_alibi

    return getattr(flash_attn_alibi, "_SUPPORTED_HEAD_DIMS", None)


def resolve_attn_impl(
    impl: str, device: torch.device, dtype: torch.dtype, dropout_p: float, head_dim: int | None = None
) -> str:
    """Turn ``impl`` ("auto" | "torch" | "triton") into the path that will run; announce it once.

    "auto" picks triton only for fp16/bf16 CUDA inputs, no attention dropout, a head dim the kernel
    supports and Triton installed. An explicit "triton" also accepts fp32 (the kernel takes it, for tests).

    Raises:
        ValueError / RuntimeError when "triton" is asked for where it cannot run (no silent fallback).
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    key = (impl, device.type, dtype, dropout_p, head_dim, interpret)
    choice = _resolved.get(key)
    if choice is None:  # every layer of every step asks the same question: answer it once per process
        choice = _resolve_attn_impl(impl, device, dtype, dropout_p, head_dim, interpret)
        _resolved[key] = choice
    return choice


_resolved: dict[tuple, str] = {}


@torch.compiler.disable
def _resolve_attn_impl(
    impl: str, device: torch.device, dtype: torch.dtype, dropout_p: float, head_dim: int | None, interpret: bool
) -> str:
    # Outside torch.compile's graph (imports, logging); resolve_attn_impl caches the answer.
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        choice, why = "torch", "attn_impl='torch'"
    elif impl == "triton":
        if dropout_p > 0:
            raise ValueError(
                f"attn_impl='triton' has no attention dropout (dropout_p={dropout_p}); use attn_impl='torch'"
            )
        if not _triton_importable():
            raise RuntimeError("attn_impl='triton' but the triton package is not installed; use 'torch'")
        if device.type != "cuda" and not interpret:
            raise RuntimeError(
                f"attn_impl='triton' needs CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs the "
                "kernel in Triton's CPU interpreter for tests); use attn_impl='torch' or 'auto'"
            )
        supported = _kernel_head_dims()
        if head_dim is not None and supported is not None and head_dim not in supported:
            raise ValueError(f"attn_impl='triton' supports head dims {supported}, got {head_dim}; use 'torch'")
        choice, why = "triton", "attn_impl='triton'"
    elif device.type != "cuda":
        choice, why = "torch", f"attn_impl='auto' on {device.type}"
    elif not _triton_importable():
        choice, why = "torch", "attn_impl='auto' on CUDA without the triton package"
    elif dtype not in (torch.float16, torch.bfloat16):
        choice, why = "torch", f"attn_impl='auto' with {dtype} inputs (the Triton kernel takes fp16/bf16)"
    elif dropout_p > 0:
        choice, why = "torch", f"attn_impl='auto' with attention dropout {dropout_p} (the kernel has none)"
    elif head_dim is not None and (supported := _kernel_head_dims()) is not None and head_dim not in supported:
        choice, why = "torch", f"attn_impl='auto' with head dim {head_dim} (the kernel takes {supported})"
    else:
        choice, why = "triton", "attn_impl='auto' on CUDA with fp16/bf16 inputs"
    if (impl, choice, why) not in _announced:
        _announce(impl, choice, why)
    return choice


@torch.compiler.disable
def _announce(impl: str, choice: str, why: str) -> None:
    # Outside torch.compile's graph: a logging call inside it would break the graph at every layer.
    _announced.add((impl, choice, why))
    logger.warning("MosaicBERT attention runs the %s path (%s)", choice.upper(), why)


def padded_alibi_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Torch attention on a padded batch with an additive ALiBi bias and a key-padding mask.

    The attention of the ``unpad=False`` ablation (announced once, like the varlen paths).

    Args:
        q, k, v: (B, H, S, D).
        key_padding_mask: (B, S) bool, True for real keys; None = no padding.
        alibi_slopes: (H,) fp32, or None for no position bias (``position="learned"``).

    Returns:
        (B, H, S, D). Query rows whose every key is padding get the mean of v (finite, to be discarded).
    """
    if ("padded", "torch", "unpad=False") not in _announced:
        _announce("padded", "torch", "unpad=False")
    return _padded_sdpa(q, k, v, key_padding_mask, alibi_slopes, dropout_p, softmax_scale)


def _padded_sdpa(q, k, v, key_padding_mask, alibi_slopes, dropout_p, softmax_scale):
    """See :func:`padded_alibi_attention`; shared with the varlen torch path."""
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


def _varlen_torch(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, dropout_p, softmax_scale):
    total, n_heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    indices, _ = cu_seqlens_to_indices(cu_seqlens, max_seqlen, total)  # (T,) into (B*S)

    def to_padded(x):  # (T, H, D) -> (B, H, S, D)
        padded = x.new_zeros(batch * max_seqlen, n_heads, head_dim).index_copy(0, indices, x)
        return padded.view(batch, max_seqlen, n_heads, head_dim).transpose(1, 2)

    key_mask = torch.zeros(batch * max_seqlen, dtype=torch.bool, device=q.device)
    key_mask[indices] = True
    out = _padded_sdpa(
        to_padded(q), to_padded(k), to_padded(v), key_mask.view(batch, max_seqlen), alibi_slopes,
        dropout_p, softmax_scale,
    )  # (B, H, S, D)
    out = out.transpose(1, 2).reshape(batch * max_seqlen, n_heads, head_dim)  # (B*S, H, D)
    return out.index_select(0, indices)  # (T, H, D)


def varlen_alibi_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    alibi_slopes: torch.Tensor | None,
    impl: str = "torch",
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional ALiBi attention over a packed batch of variable-length sequences.

    Args:
        q, k, v: (T, H, D), T = total tokens of all sequences.
        cu_seqlens: (B+1,) int32 cumulative sequence lengths, cu_seqlens[-1] == T.
        max_seqlen: the longest sequence (python int).
        alibi_slopes: (H,) float32; None means no position bias (zero slopes).
        impl: "torch" | "triton" | "auto" (see the module docstring); the choice is logged once.
        dropout_p: attention-probability dropout (torch path only); pass 0 in eval.
        softmax_scale: default 1/sqrt(D).

    Returns:
        (T, H, D) in q's dtype.
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"varlen_alibi_attention: q, k, v must share one (T, H, D) shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"varlen_alibi_attention: cu_seqlens must be 1-D int32, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if alibi_slopes is not None and alibi_slopes.shape != (q.shape[1],):
        raise ValueError(f"varlen_alibi_attention: alibi_slopes must be ({q.shape[1]},), got "
                         f"{tuple(alibi_slopes.shape)}")
    choice = resolve_attn_impl(impl, q.device, q.dtype, dropout_p, head_dim=q.shape[-1])
    if choice == "triton":
        from .flash_attn_alibi import flash_attn_varlen_alibi

        if alibi_slopes is None:
            alibi_slopes = torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)
        return flash_attn_varlen_alibi(
            q, k, v, cu_seqlens, max_seqlen, alibi_slopes.to(device=q.device, dtype=torch.float32),
            softmax_scale=softmax_scale,
        )
    return _varlen_torch(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, dropout_p, softmax_scale)


__all__ = [
    "varlen_alibi_attention",
    "padded_alibi_attention",
    "alibi_slopes",
    "alibi_bias",
    "resolve_attn_impl",
]
