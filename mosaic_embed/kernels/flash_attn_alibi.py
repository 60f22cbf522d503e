"""FlashAttention with ALiBi on unpadded (variable-length) batches, forward and backward, in Triton.

Sequences are packed back to back: ``q, k, v`` are ``(T, H, D)`` with ``T`` = total real tokens and
sequence ``b`` occupying rows ``cu_seqlens[b]:cu_seqlens[b+1]``. Attention is bidirectional within a
sequence and never crosses one. Head ``h`` adds the ALiBi bias ``-slope[h] * |i - j|`` (Press et al.,
arXiv 2108.12409) to the scaled scores; the bias is computed in the kernel, never materialised.

File order (flash-attention's ``ops/triton/layer_norm.py``): pure-torch reference -> ``@triton.jit``
kernels -> launchers (block-size table, grids) -> torch custom op (``torch.library``: eager,
autograd and ``torch.compile`` all run the same kernels) -> public function
:func:`flash_attn_varlen_alibi`.

Algorithm (FlashAttention-2, Dao 2023, arXiv 2307.08691):
- forward: one program per (query tile, head, sequence); it streams the sequence's key/value tiles
  with an online softmax in fp32 (exp2 domain: ``log2(e)`` is folded into the scale and the slope)
  and saves the row log-sum-exp ``lse`` (natural log, fp32, ``(H, T)``) for the backward;
- backward: a kernel per query tile computes its rows' ``delta = rowsum(dO * O)`` (``(H, T)`` fp32),
  recomputes ``P = exp(S - lse)`` and accumulates ``dQ``; then a kernel per key tile accumulates
  ``dK, dV`` over the sequence's query tiles. Sequences of at most 128 tokens take a fused backward:
  one program per (sequence, head) computes dQ, dK, dV from a single tile, reading every input once;
- ALiBi-specific: tiles so far from the diagonal that their softmax weight is provably below 2^-32 of
  the row maximum (Cauchy-Schwarz bound with the sequence's max |k|, see ``_window``) are skipped; on
  steep-slope heads of long sequences that is most of the matrix.
- host side: at short lengths the GPU work of a fwd+bwd is a few hundred microseconds, so the launch
  path is kept lean: 2 launches at max length <= 128, 3 up to 1024, 4 above; the scratch the backward
  needs comes from the forward; compiled kernels are launched without Triton's per-call dispatch
  (``_Launcher``).
Tile shapes, warps and stages come from a table measured on an H100 (``_TUNED``; numbers in
benchmarks/NOTES_attention.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import cdiv, next_pow2

__all__ = ["attention_reference", "flash_attn_varlen_alibi"]

_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# 1. Pure-torch reference
# --------------------------------------------------------------------------------------------------


def attention_reference(q, k, v, cu_seqlens, alibi_slopes, softmax_scale=None, upcast=True, return_lse=False):
    """Eager ``softmax(Q K^T * scale - slope * |i - j|) V`` for each packed sequence; differentiable.

    q, k, v: (T, H, D); cu_seqlens: (B+1,) int; alibi_slopes: (H,). Returns out (T, H, D) in q's dtype
    (fp32 when ``upcast``). ``upcast=True`` computes everything in fp32 (the ground truth of the
    tests); ``upcast=False`` keeps the matrix products in the input precision with an fp32 softmax,
    i.e. what plain torch in bf16/fp16 achieves, the yardstick for the kernel's own rounding error.
    With ``return_lse`` also returns the fp32 row log-sum-exp of the biased scores, (H, T).
    Memory is O(H * L^2) per sequence: a test and documentation aid, not a training path.
    """
    dtype = torch.float32 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    slopes = alibi_slopes.to(device=q.device, dtype=torch.float32)
    bounds = cu_seqlens.tolist()
    outs, lses = [], []
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        pos = torch.arange(end - start, device=q.device, dtype=torch.float32)
        dist = (pos[:, None] - pos[None, :]).abs()  # (n, n)
        scores = (qs @ ks.transpose(1, 2)).float() * scale - slopes[:, None, None] * dist  # (H, n, n)
        probs = torch.softmax(scores, dim=-1).to(dtype)
        outs.append((probs @ vs).transpose(0, 1))  # (n, H, D)
        lses.append(torch.logsumexp(scores, dim=-1))  # (H, n)
    out = torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
    if return_lse:
        lse = torch.cat(lses, dim=1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
        return out, lse
    return out


# --------------------------------------------------------------------------------------------------
# 2. Triton kernels
# --------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Far-tile skipping (see _window): a key is skipped only when its softmax weight is provably below
# 2^-32 of the row's largest weight (the literal 32.0 in the kernels), so the dropped mass of a whole row
# is < L * 2^-32 of its denominator: about fp32 rounding of the sums at the lengths this kernel takes.


@triton.jit
def _seq_block(pid, num_blocks, num_heads, CU, BLOCK: tl.constexpr):
    """Decode a flat program id into (block start, head, sequence index, sequence start, sequence length).

    The block index varies fastest so that the programs of one (sequence, head) run side by side and
    share its K/V (or Q/dO) blocks in L2.
    """
    pid_blk = pid % num_blocks
    bh = pid // num_blocks
    h = bh % num_heads
    b = bh // num_heads
    seq_start = tl.load(CU + b)
    seqlen = tl.load(CU + b + 1) - seq_start
    return pid_blk * BLOCK, h, b, seq_start.to(tl.int64), seqlen


@triton.jit
def _window(start, end, reach, seqlen, BLOCK: tl.constexpr):
    """Positions within ``reach`` of the block [start, end), clipped to the sequence: (lo, hi).

    ``lo`` is rounded down to a multiple of BLOCK (the partner loop's tiles stay aligned); ``hi`` is
    exclusive and <= seqlen. ``reach`` is fp32 and may be +inf (slope 0: no skipping).

    Why skipping is exact: with |q_i . k_j| <= |q_i| |k_j| (Cauchy-Schwarz), the log2-domain score
    s_ij <= |q_i| Kmax c - slope2 |i - j| (c = scale*log2 e), while the row's max (and lse) is at least
    a known value M_i (the diagonal score s_ii in the forward, lse_i itself in the backward). Every key
    with slope2 |i - j| > |q_i| Kmax c - M_i + 32 has weight exp2(s_ij - M_i) < 2^-32.
    """
    lo_f = tl.maximum(start.to(tl.float32) - reach, 0.0)
    hi_f = tl.minimum(end.to(tl.float32) + reach, seqlen.to(tl.float32))
    lo = (lo_f.to(tl.int32) // BLOCK) * BLOCK
    hi = tl.minimum(hi_f.to(tl.int32) + 1, seqlen)
    return lo, hi


@triton.jit
def _split_range(lo, hi, seqlen, BLOCK: tl.constexpr):
    """Split [lo, hi) into full tiles [lo, full_hi) (no bounds masks) and the partial last tile [tail_lo, tail_hi)."""
    n_full = (seqlen // BLOCK) * BLOCK
    full_hi = tl.minimum(((hi + BLOCK - 1) // BLOCK) * BLOCK, n_full)
    tail_hi = tl.where(hi > n_full, seqlen, n_full)  # zero or one partial tile
    return full_hi, n_full, tail_hi


@triton.jit
def _stats_ptr(AUX, b, h, num_heads, total_tokens):
    """Address of the (Kmax, slack) pair of (sequence b, head h) in the aux buffer (see ``_aux_numel``)."""
    return AUX + num_heads * total_tokens + (b * num_heads + h) * 2


@triton.jit(do_not_specialize=["total_tokens", "num_chunks"])
def _seq_kmax_kernel(K, CU, AUX, stride_kt, stride_kh, total_tokens, num_heads, num_chunks,
                     HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Kmax[b, h] = max over the sequence's tokens t of |k[t, h]| (fp32; the aux buffer is zero-initialised).

    One program per (BLOCK_T-token chunk, head, sequence), combined with an atomic max. The forward runs it
    first when it skips far tiles itself; otherwise the forward kernel computes the same maxima on the way.
    """
    start, h, b, seq_start, seqlen = _seq_block(tl.program_id(0), num_chunks, num_heads, CU, BLOCK_T)
    if start >= seqlen:
        return
    offs_t = start + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + seq_start * stride_kt + h * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :],
                mask=(offs_t < seqlen)[:, None], other=0.0).to(tl.float32)
    kmax = tl.sqrt(tl.max(tl.sum(k * k, 1), 0))
    tl.atomic_max(_stats_ptr(AUX, b, h, num_heads, total_tokens), kmax, sem="relaxed")


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, row_bias, qk_scale, slope2, lo, hi,
               seqlen, offs_n, offs_d, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Online-softmax sweep over key tiles [lo, hi); MASK handles the sequence's partial last tile."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        if MASK:
            col_ok = cols < seqlen
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) fp32
        # slope * |i - j| == |slope*i - slope*j| for slope >= 0: one subtract per element.
        col_bias = slope2 * cols.to(tl.float32)
        s = qk * qk_scale - tl.abs(row_bias[:, None] - col_bias[None, :])  # log2 domain
        if MASK:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["total_tokens", "num_blocks"])
def _fwd_kernel(Q, K, V, Out, LSE, AUX, CU, SLOPES, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_ot, stride_oh, total_tokens, num_heads, num_blocks, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP: tl.constexpr,
                WRITE_STATS: tl.constexpr):
    """One query tile of one (sequence, head): O = softmax(S) V and lse = logsumexp(S) per row.

    SKIP reads the sequence's Kmax from AUX (``_seq_kmax_kernel`` ran first).
    WRITE_STATS (a backward will skip far tiles): the sequence's first tile also stores Kmax and a zero slack
    in AUX for it, so the backward needs no pass of its own over K.
    """
    start_m, h, b, seq_start, seqlen = _seq_block(tl.program_id(0), num_blocks, num_heads, CU, BLOCK_M)
    if start_m >= seqlen:
        return
    slope2 = tl.load(SLOPES + h) * 1.4426950408889634  # log2(e): exp2 instead of exp
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q_ptrs = Q + seq_start * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + seq_start * stride_kt + h * stride_kh
    v_base = V + seq_start * stride_vt + h * stride_vh
    row_bias = slope2 * offs_m.to(tl.float32)

    if SKIP:
        # lower bound of each row's max score: its own (diagonal, zero-bias) score s_ii
        k_diag = tl.load(k_base + offs_m[:, None] * stride_kt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        qf = q.to(tl.float32)
        s_ii = tl.sum(qf * k_diag.to(tl.float32), 1) * qk_scale
        q_norm = tl.sqrt(tl.sum(qf * qf, 1))
        kmax = tl.load(_stats_ptr(AUX, b, h, num_heads, total_tokens))
        slack = q_norm * kmax * tl.abs(qk_scale) - s_ii + 32.0
        reach = tl.max(tl.where(row_ok, slack, 0.0), 0) / slope2
        lo, hi = _window(start_m, start_m + BLOCK_M, reach, seqlen, BLOCK_N)
    else:
        lo = 0
        hi = seqlen
    full_hi, tail_lo, tail_hi = _split_range(lo, hi, seqlen, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, row_bias, qk_scale,
                               slope2, lo, full_hi, seqlen, offs_n, offs_d, BLOCK_N, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, row_bias, qk_scale,
                               slope2, tail_lo, tail_hi, seqlen, offs_n, offs_d, BLOCK_N, True)

    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + h * total_tokens + seq_start + offs_m, lse, mask=row_ok)
    o_ptrs = Out + seq_start * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None])

    if WRITE_STATS:
        if start_m == 0:  # one program per (sequence, head); its keys are warm in L2 from the sweep above
            kmax2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start_n in range(0, seqlen, BLOCK_N):
                cols = start_n + offs_n
                k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=(cols < seqlen)[:, None],
                            other=0.0).to(tl.float32)
                kmax2 = tl.maximum(kmax2, tl.sum(k * k, 1))
            stats = _stats_ptr(AUX, b, h, num_heads, total_tokens)
            tl.store(stats, tl.sqrt(tl.max(kmax2, 0)))
            tl.store(stats + 1, 0.0)  # the dQ kernel atomically maxes the slack into it


@triton.jit
def _row_delta(o, do, dlse_ptrs, ok, HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, minus the lse's gradient when it has one (d lse / d s = P, so a gradient
    g on lse adds P * g to dS = P (dP - delta): it is folded into delta)."""
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptrs, mask=ok, other=0.0)
    return delta


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, row_bias, qk_scale, slope2,
                  lo, hi, seqlen, offs_n, offs_d, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        if MASK:
            col_ok = cols < seqlen
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k))
        col_bias = slope2 * cols.to(tl.float32)
        s = qk * qk_scale - tl.abs(row_bias[:, None] - col_bias[None, :])
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["total_tokens", "num_blocks"])
def _bwd_dq_kernel(Q, K, V, Out, DO, LSE, DLSE, AUX, DQ, CU, SLOPES,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh, total_tokens, num_heads, num_blocks, qk_scale,
                   sm_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   SKIP: tl.constexpr, HAS_DLSE: tl.constexpr):
    """One query tile of one (sequence, head): dQ = scale * dS K over the sequence's key tiles.

    It first computes its rows' ``delta = rowsum(dO * O)`` (minus dlse) and stores it in AUX for the dK/dV
    kernel that runs next (no separate preprocess launch). With SKIP it also records, per (sequence, head),
    max_i (|q_i| Kmax c - lse2_i) as the slack in AUX (zeroed by the forward, so clamped at 0) for the dK/dV
    kernel's window.
    """
    start_m, h, b, seq_start, seqlen = _seq_block(tl.program_id(0), num_blocks, num_heads, CU, BLOCK_M)
    if start_m >= seqlen:
        return
    slope2 = tl.load(SLOPES + h) * 1.4426950408889634
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + seq_start * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + seq_start * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + h * total_tokens + seq_start + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    o = tl.load(Out + seq_start * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    delta = _row_delta(o, do, DLSE + h * total_tokens + seq_start + offs_m, row_ok, HAS_DLSE)
    tl.store(AUX + h * total_tokens + seq_start + offs_m, delta, mask=row_ok)
    row_bias = slope2 * offs_m.to(tl.float32)
    k_base = K + seq_start * stride_kt + h * stride_kh
    v_base = V + seq_start * stride_vt + h * stride_vh

    if SKIP:
        stats = _stats_ptr(AUX, b, h, num_heads, total_tokens)
        qf = q.to(tl.float32)
        q_norm = tl.sqrt(tl.sum(qf * qf, 1))
        slack = tl.max(tl.where(row_ok, q_norm * tl.load(stats) * tl.abs(qk_scale) - lse2, 0.0), 0)
        tl.atomic_max(stats + 1, slack, sem="relaxed")
        lo, hi = _window(start_m, start_m + BLOCK_M, (slack + 32.0) / slope2, seqlen, BLOCK_N)
    else:
        lo = 0
        hi = seqlen
    full_hi, tail_lo, tail_hi = _split_range(lo, hi, seqlen, BLOCK_N)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, row_bias, qk_scale, slope2,
                       lo, full_hi, seqlen, offs_n, offs_d, BLOCK_N, False)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, row_bias, qk_scale, slope2,
                       tail_lo, tail_hi, seqlen, offs_n, offs_d, BLOCK_N, True)
    dq = dq * sm_scale
    tl.store(DQ + seq_start * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, col_bias, qk_scale,
                    slope2, lo, hi, seqlen, offs_m, offs_d, BLOCK_M: tl.constexpr, MASK: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) (transposed: rows are keys)."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = q_base + rows[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = do_base + rows[:, None] * stride_dot + offs_d[None, :]
        if MASK:
            row_ok = rows < seqlen
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            # lse = +inf makes P = 0 on the padding rows, with no select per element
            lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse2 = tl.load(lse_base + rows) * 1.4426950408889634
            delta = tl.load(delta_base + rows)
        qkT = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M)
        row_bias = slope2 * rows.to(tl.float32)
        sT = qkT * qk_scale - tl.abs(col_bias[:, None] - row_bias[None, :])
        pT = tl.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=["total_tokens", "num_blocks"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, AUX, DK, DV, CU, SLOPES,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh, total_tokens, num_heads, num_blocks, qk_scale,
                     sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP: tl.constexpr):
    """One key tile of one (sequence, head): dK, dV.

    Reads delta (and, with SKIP, the slack that bounds its query window) from AUX, written by the dQ kernel.
    """
    start_n, h, b, seq_start, seqlen = _seq_block(tl.program_id(0), num_blocks, num_heads, CU, BLOCK_N)
    if start_n >= seqlen:
        return
    slope2 = tl.load(SLOPES + h) * 1.4426950408889634
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seqlen
    k = tl.load(K + seq_start * stride_kt + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + seq_start * stride_vt + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    col_bias = slope2 * offs_n.to(tl.float32)
    q_base = Q + seq_start * stride_qt + h * stride_qh
    do_base = DO + seq_start * stride_dot + h * stride_doh
    lse_base = LSE + h * total_tokens + seq_start
    delta_base = AUX + h * total_tokens + seq_start

    if SKIP:
        slack = tl.load(_stats_ptr(AUX, b, h, num_heads, total_tokens) + 1)
        lo, hi = _window(start_n, start_n + BLOCK_N, (slack + 32.0) / slope2, seqlen, BLOCK_M)
    else:
        lo = 0
        hi = seqlen
    full_hi, tail_lo, tail_hi = _split_range(lo, hi, seqlen, BLOCK_M)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, col_bias,
                             qk_scale, slope2, lo, full_hi, seqlen, offs_m, offs_d, BLOCK_M, False)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, col_bias,
                             qk_scale, slope2, tail_lo, tail_hi, seqlen, offs_m, offs_d, BLOCK_M, True)
    dk = dk * sm_scale  # S = scale * QK^T + bias, so dK = scale * dS^T Q
    tl.store(DK + seq_start * stride_dkt + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + seq_start * stride_dvt + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["total_tokens"])
def _bwd_short_kernel(Q, K, V, Out, DO, LSE, DLSE, DQ, DK, DV, CU, SLOPES,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                      stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                      total_tokens, num_heads, qk_scale, sm_scale,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr):
    """Whole backward of one (sequence, head) whose sequence fits one BLOCK x BLOCK tile.

    Short sequences (pretraining runs at 128 tokens) make the tiled backward re-read Q, dO, K, V from
    several programs and pay a separate delta pass; here every input is read once and dQ, dK, dV are
    written once, with delta = rowsum(dO * O) computed in place.
    """
    _, h, b, seq_start, seqlen = _seq_block(tl.program_id(0), 1, num_heads, CU, BLOCK)
    slope2 = tl.load(SLOPES + h) * 1.4426950408889634
    idx = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = idx < seqlen
    rows = idx[:, None]
    cols = offs_d[None, :]
    q = tl.load(Q + seq_start * stride_qt + h * stride_qh + rows * stride_qt + cols, mask=ok[:, None], other=0.0)
    k = tl.load(K + seq_start * stride_kt + h * stride_kh + rows * stride_kt + cols, mask=ok[:, None], other=0.0)
    v = tl.load(V + seq_start * stride_vt + h * stride_vh + rows * stride_vt + cols, mask=ok[:, None], other=0.0)
    o = tl.load(Out + seq_start * stride_ot + h * stride_oh + rows * stride_ot + cols, mask=ok[:, None], other=0.0)
    do = tl.load(DO + seq_start * stride_dot + h * stride_doh + rows * stride_dot + cols, mask=ok[:, None],
                 other=0.0)
    # lse = +inf on padding rows gives P = 0 there
    lse2 = tl.load(LSE + h * total_tokens + seq_start + idx, mask=ok, other=float("inf")) * 1.4426950408889634
    delta = _row_delta(o, do, DLSE + h * total_tokens + seq_start + idx, ok, HAS_DLSE)

    pos = slope2 * idx.to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * qk_scale - tl.abs(pos[:, None] - pos[None, :])  # (BLOCK, BLOCK), log2 domain
    p = tl.exp2(s - lse2[:, None])
    p = tl.where(ok[None, :], p, 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do)
    dp = tl.dot(do, tl.trans(v))
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dq = tl.dot(ds, k) * sm_scale
    dk = tl.dot(tl.trans(ds), q) * sm_scale
    tl.store(DQ + seq_start * stride_dqt + h * stride_dqh + rows * stride_dqt + cols, dq.to(DQ.dtype.element_ty),
             mask=ok[:, None])
    tl.store(DK + seq_start * stride_dkt + h * stride_dkh + rows * stride_dkt + cols, dk.to(DK.dtype.element_ty),
             mask=ok[:, None])
    tl.store(DV + seq_start * stride_dvt + h * stride_dvh + rows * stride_dvt + cols, dv.to(DV.dtype.element_ty),
             mask=ok[:, None])


# --------------------------------------------------------------------------------------------------
# 3. Launchers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch settings of one kernel: (BLOCK_M, BLOCK_N) rows of Q x rows of K."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class AttentionConfig:
    """Settings of the kernels for one (head_dim, max_seqlen bucket).

    ``fwd_skip_above`` / ``bwd_skip_above``: skip provably negligible far-away tiles (see ``_window``) when
    max_seqlen exceeds this; below it the bound's work (the sequence's max |k|, per-row norms) costs more
    than the tiles it saves. The forward's bound (diagonal score) is looser than the backward's (exact lse), hence the
    higher threshold (measured: at max length 512 skipping slowed the forward by a third and sped the
    backward up a little).
    ``short_bwd_max``: when max_seqlen is at most this, the backward is one fused kernel per (sequence, head)
    (``_bwd_short_kernel``, tile = next power of two >= max_seqlen) with ``short_bwd_warps`` warps.
    """

    fwd: KernelConfig
    dkdv: KernelConfig
    dq: KernelConfig
    fwd_skip_above: int = 1024
    bwd_skip_above: int = 256
    short_bwd_max: int = 128
    short_bwd_warps: int = 8


# Upper edges of the max_seqlen buckets of the tuning table (the last one is open).
_SEQLEN_BUCKETS = (128, 256, 512, 1024, 2048, 4096)


def _cfg(fwd, dkdv, dq, **kw):
    return AttentionConfig(KernelConfig(*fwd), KernelConfig(*dkdv), KernelConfig(*dq), **kw)


# Hopper (sm_90) table: {(head_dim, bucket upper edge): settings}, (BLOCK_M, BLOCK_N, num_warps, num_stages)
# for the forward, dK/dV and dQ kernels, chosen by measurement with benchmarks/tune_attention.py on an
# H100 (bf16, 12 heads, lengths uniform in [L/2, L], ~25k tokens; numbers in benchmarks/NOTES_attention.md;
# buckets 128/512/2048 re-measured with far-tile skipping, 256/1024/8192 from the first sweep).
# The separate dQ kernel beat fp32-atomic dQ inside the dK/dV kernel in every bucket (by 2-25 %; that
# variant was removed, see the notes); the fused short backward
# (8 warps) beat the tiled one at max length <= 128 for every head dim (by 11-34 %). A bucket not
# listed uses the nearest smaller listed bucket of the same head dim.
_TUNED: dict[tuple[int, int], AttentionConfig] = {
    (32, 128): _cfg((128, 32, 4, 3), (16, 128, 4, 4), (64, 32, 4, 3)),
    (32, 256): _cfg((128, 32, 4, 3), (32, 64, 4, 3), (64, 32, 4, 4)),
    (32, 512): _cfg((64, 64, 4, 2), (32, 64, 4, 3), (64, 32, 4, 3)),
    (32, 1024): _cfg((64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3)),
    (32, 2048): _cfg((64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3)),
    (32, 8192): _cfg((64, 128, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3)),
    (64, 128): _cfg((64, 64, 4, 3), (16, 64, 4, 3), (64, 32, 4, 3)),
    (64, 256): _cfg((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)),
    (64, 512): _cfg((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)),
    (64, 1024): _cfg((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)),
    (64, 2048): _cfg((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)),
    (64, 8192): _cfg((128, 64, 8, 4), (32, 64, 4, 3), (128, 64, 8, 3)),
    (128, 128): _cfg((128, 32, 4, 3), (32, 64, 4, 3), (64, 64, 4, 2)),
    (128, 256): _cfg((128, 32, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)),
    (128, 512): _cfg((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)),
    (128, 1024): _cfg((64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3)),
    (128, 2048): _cfg((64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 4)),
    (128, 8192): _cfg((64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3)),
}


def _generic_config(head_dim: int) -> AttentionConfig:
    """Conservative settings for GPUs that are not Hopper: tiles that fit 64 KB of shared memory at D=128."""
    bn = 64 if head_dim <= 64 else 32
    return AttentionConfig(
        fwd=KernelConfig(64, bn, 4, 2), dkdv=KernelConfig(32, bn, 4, 2), dq=KernelConfig(64, bn, 4, 2),
        short_bwd_max=64 if head_dim <= 64 else 0, short_bwd_warps=4,
    )


def _hopper_default(head_dim: int) -> AttentionConfig:
    """Hopper settings for head dims the table lacks (FA2-in-Triton shapes known to fit sm_90)."""
    return AttentionConfig(
        fwd=KernelConfig(128, 64 if head_dim <= 64 else 32, 4, 3),
        dkdv=KernelConfig(32, 128 if head_dim <= 64 else 64, 4, 3),
        dq=KernelConfig(128 if head_dim <= 64 else 64, 32, 4, 3),
        short_bwd_max=128 if head_dim <= 64 else 64,
    )


# Triton's CPU interpreter (tests): small tiles, so tiny sequences still cross tile edges; far-tile skipping
# from 17 tokens in the backward and 37 in the forward, so that tests reach each path: fused short backward
# (<= 32), tiled backward with the forward's Kmax (33-36), forward skipping with its own Kmax pass (> 36).
_INTERPRETER_CONFIG = AttentionConfig(
    fwd=KernelConfig(16, 16, 1, 1), dkdv=KernelConfig(16, 16, 1, 1), dq=KernelConfig(16, 16, 1, 1),
    fwd_skip_above=36, bwd_skip_above=16, short_bwd_max=32, short_bwd_warps=1,
)


def seqlen_bucket(max_seqlen: int) -> int:
    """The tuning-table bucket of a max sequence length (the upper edge; 8192 stands for 'longer')."""
    for edge in _SEQLEN_BUCKETS:
        if max_seqlen <= edge:
            return edge
    return 8192


# (head_dim, max_seqlen, device index) -> settings: the lookup runs twice per fwd+bwd, on the host's hot path.
_selected: dict[tuple[int, int, int], AttentionConfig] = {}


def reset_config_cache() -> None:
    """Forget cached selections (after changing ``_TUNED``, e.g. by benchmarks/tune_attention.py)."""
    _selected.clear()


def select_config(head_dim: int, max_seqlen: int, device: torch.device) -> AttentionConfig:
    """Kernel settings for this problem: the measured Hopper table, else safe generic settings."""
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (head_dim, max_seqlen, index)
    config = _selected.get(key)
    if config is None:
        config = _selected[key] = _select_uncached(head_dim, max_seqlen, index)
    return config


def _select_uncached(head_dim: int, max_seqlen: int, device_index: int) -> AttentionConfig:
    if torch.cuda.get_device_capability(device_index)[0] != 9:
        return _generic_config(head_dim)
    bucket = seqlen_bucket(max_seqlen)
    candidates = [b for (d, b) in _TUNED if d == head_dim and b <= bucket]
    if candidates:
        return _TUNED[(head_dim, max(candidates))]
    return _hopper_default(head_dim)


def _check_last_dim_contiguous(*tensors):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _aux_numel(total_tokens: int, heads: int, batch: int) -> int:
    """Size of the fp32 scratch the forward hands to the backward (``aux``): delta, (H, T), written by the dQ
    kernel, then a (Kmax, slack) pair per (sequence, head) bounding the far-tile windows."""
    return heads * total_tokens + 2 * batch * heads


# Direct launches. Triton's JIT dispatcher re-derives, on every call, each argument's specialization (dtype,
# 16-byte alignment, int value classes) and a cache key from them before it finds the compiled kernel:
# ~10-15 us of host time per launch (benchmarks/attention_host_overhead.py), which at short lengths is
# comparable to the kernels' GPU time. Our kernels are written so that a cheap key decides that
# specialization: ints that vary per batch (token and block counts) are ``do_not_specialize``; the other
# ints are q/k/v strides and the head count, which the key holds exactly, with dtype, device, head_dim and
# the constexprs; the other tensors (out, dO, dq, dk, dv: made contiguous) have the strides (H * D, D),
# fixed by the key; a call with any tensor not 16-byte aligned takes the dispatcher. (Each tensor keeps
# its own stride arguments: with one shared stride the compiler kept a single 64-bit offset tile alive
# across the whole backward kernel, measured 5-10 % slower.) MOSAIC_TRITON_DIRECT_LAUNCH=0 turns the direct path off.
_DIRECT_LAUNCH = os.environ.get("MOSAIC_TRITON_DIRECT_LAUNCH", "1") != "0"


def _qkv_layout(q, k, v, *tensors):
    """(q, k, v token and head strides as kernel arguments, the launch key of this layout).

    The key holds the facts of a call, besides constexprs and launch options, that Triton specializes our
    kernels on; it is None when the direct path must not be used (switched off, not CUDA, a tensor among
    q, k, v, ``tensors`` not 16-byte aligned).
    """
    strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2])
    if not _DIRECT_LAUNCH or q.device.type != "cuda":
        return strides, None
    addresses = q.data_ptr() | k.data_ptr() | v.data_ptr()
    for t in tensors:
        if t is not None:
            addresses |= t.data_ptr()
    if addresses & 15:
        return strides, None
    # the current device, like Triton's own per-device kernel cache: a compiled kernel is loaded into the
    # context of the device that was current at its first launch
    return strides, (torch.cuda.current_device(), q.dtype, q.shape[1], q.shape[2], strides)


class _Launcher:
    """``kernel[grid](*args, num_warps=, num_stages=)``; after the first call with a given key, Triton's compiled
    kernel for it is launched directly (``CompiledKernel[grid](*args)``, what the dispatcher itself ends with)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}

    def __call__(self, grid, key, args, num_warps, num_stages):
        """``grid``: 3-tuple; ``key``: ``_qkv_layout``'s key plus the constexprs (None: always the dispatcher);
        ``args``: every kernel argument in order, constexprs included."""
        if key is not None:
            compiled = self.compiled.get(key)
            if compiled is not None:
                compiled[grid](*args)
                return
        compiled = self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages)
        if key is not None and hasattr(compiled, "function"):  # not the interpreter
            self.compiled[key] = compiled


_launch_seq_kmax = _Launcher(_seq_kmax_kernel)
_launch_fwd = _Launcher(_fwd_kernel)
_launch_bwd_dq = _Launcher(_bwd_dq_kernel)
_launch_bwd_dkdv = _Launcher(_bwd_dkdv_kernel)
_launch_bwd_short = _Launcher(_bwd_short_kernel)


def _seq_kmax(k, cu_seqlens, max_seqlen, aux, strides, key):
    """Write Kmax per (sequence, head) into the zero-filled ``aux``."""
    total, heads, head_dim = k.shape
    block_t = 64
    num_chunks = cdiv(max_seqlen, block_t)
    _launch_seq_kmax(
        (num_chunks * heads * (cu_seqlens.numel() - 1), 1, 1), key,
        (k, cu_seqlens, aux, strides[2], strides[3], total, heads, num_chunks, head_dim, block_t), 4, 1,
    )


def _flash_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, out=None, lse=None, config=None,
               for_backward=False):
    """Launch the forward kernel. Returns out (T, H, D) contiguous in q's dtype, lse (H, T) fp32 (natural log)
    and, when ``for_backward``, the ``aux`` scratch for :func:`_flash_bwd` (else None).

    With ``for_backward`` and a backward that will skip far tiles, the forward also computes the sequences'
    Kmax and zeroes their slack: the eager backward runs on autograd's device thread, where each host-side
    op costs more than here (benchmarks/NOTES_attention.md), so it only allocates its outputs and launches.
    ``out``/``lse`` may be given (contiguous; tests poison them to prove every element is written).
    """
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    config = config or select_config(head_dim, max_seqlen, q.device)
    cfg = config.fwd
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif not out.is_contiguous():  # its strides must follow from (heads, head_dim): see _Launcher
        raise ValueError("_flash_fwd: out must be a contiguous (T, H, D) tensor")
    if lse is None:
        lse = torch.empty((heads, total), device=q.device, dtype=torch.float32)
    skip = max_seqlen > config.fwd_skip_above
    aux = None
    if for_backward or skip:
        # the skip's Kmax comes from atomics (zero start); otherwise every value is written before it is read
        aux = (torch.zeros if skip else torch.empty)(_aux_numel(total, heads, batch), device=q.device,
                                                     dtype=torch.float32)
    if total == 0 or batch == 0 or max_seqlen == 0:
        return out, lse, aux if for_backward else None
    strides, key = _qkv_layout(q, k, v, out, lse, aux, cu_seqlens, alibi_slopes)
    if skip:
        _seq_kmax(k, cu_seqlens, max_seqlen, aux, strides, key)
    write_stats = for_backward and not skip and max_seqlen > config.bwd_skip_above
    num_blocks = cdiv(max_seqlen, cfg.block_m)
    _launch_fwd(
        (num_blocks * heads * batch, 1, 1), key and (key, cfg, skip, write_stats),
        (q, k, v, out, lse, lse if aux is None else aux, cu_seqlens, alibi_slopes, *strides,
         heads * head_dim, head_dim, total, heads, num_blocks, softmax_scale * _LOG2E,
         head_dim, cfg.block_m, cfg.block_n, skip, write_stats),
        cfg.num_warps, cfg.num_stages,
    )
    return out, lse, aux if for_backward else None


def _flash_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale,
               dq=None, dk=None, dv=None, config=None, aux=None):
    """Launch the backward kernels. Returns dq, dk, dv (T, H, D), contiguous, in q's dtype.

    dlse: optional (H, T) fp32 gradient of the returned log-sum-exp. aux: the forward's scratch
    (``for_backward=True``) from a forward with the same config; without it the backward allocates its own and,
    when it skips far tiles, computes Kmax itself. dq/dk/dv may be given (contiguous; tests poison them).
    """
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    config = config or select_config(head_dim, max_seqlen, q.device)
    if dout.dtype != q.dtype or not dout.is_contiguous():  # autograd may hand over an expanded or cast one
        dout = dout.to(q.dtype).contiguous()
    if not out.is_contiguous():
        out = out.contiguous()
    if dlse is not None and (dlse.dtype != torch.float32 or not dlse.is_contiguous()):
        dlse = dlse.float().contiguous()
    if dq is None:
        # one allocation for the three (each a contiguous (T, H, D) slice)
        dq, dk, dv = torch.empty((3, total, heads, head_dim), device=q.device, dtype=q.dtype).unbind(0)
    elif not (dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()):
        raise ValueError("_flash_bwd: dq, dk, dv must be contiguous (T, H, D) tensors")
    if total == 0 or batch == 0 or max_seqlen == 0:
        return dq, dk, dv
    # token and head strides of out, dout, dq, dk, dv: all contiguous, so fixed by the launch key's (H, D)
    contiguous = (heads * head_dim, head_dim)
    qk_scale = softmax_scale * _LOG2E
    has_dlse = dlse is not None
    dlse_or_dummy = dlse if has_dlse else lse
    if max_seqlen <= config.short_bwd_max:
        block = max(16, next_pow2(max_seqlen))
        strides, key = _qkv_layout(q, k, v, out, dout, lse, dlse, dq, dk, dv, cu_seqlens, alibi_slopes)
        _launch_bwd_short(
            (heads * batch, 1, 1), key and (key, block, has_dlse, config.short_bwd_warps),
            (q, k, v, out, dout, lse, dlse_or_dummy, dq, dk, dv, cu_seqlens, alibi_slopes, *strides,
             *contiguous * 5, total, heads, qk_scale, softmax_scale, head_dim, block, has_dlse),
            config.short_bwd_warps, 1,
        )
        return dq, dk, dv
    skip = max_seqlen > config.bwd_skip_above
    own_aux = aux is None
    if own_aux:
        aux = (torch.zeros if skip else torch.empty)(_aux_numel(total, heads, batch), device=q.device,
                                                     dtype=torch.float32)
    strides, key = _qkv_layout(q, k, v, out, dout, lse, dlse, aux, dq, dk, dv, cu_seqlens, alibi_slopes)
    if own_aux and skip:
        _seq_kmax(k, cu_seqlens, max_seqlen, aux, strides, key)
    # dQ first: it also writes delta and the per-(sequence, head) slack that bounds the dK/dV window
    c = config.dq
    num_blocks = cdiv(max_seqlen, c.block_m)
    _launch_bwd_dq(
        (num_blocks * heads * batch, 1, 1), key and (key, c, skip, has_dlse),
        (q, k, v, out, dout, lse, dlse_or_dummy, aux, dq, cu_seqlens, alibi_slopes, *strides, *contiguous * 3,
         total, heads, num_blocks, qk_scale, softmax_scale, head_dim, c.block_m, c.block_n, skip, has_dlse),
        c.num_warps, c.num_stages,
    )
    c = config.dkdv
    num_blocks = cdiv(max_seqlen, c.block_n)
    _launch_bwd_dkdv(
        (num_blocks * heads * batch, 1, 1), key and (key, c, skip),
        (q, k, v, dout, lse, aux, dk, dv, cu_seqlens, alibi_slopes, *strides, *contiguous * 3,
         total, heads, num_blocks, qk_scale, softmax_scale, head_dim, c.block_m, c.block_n, skip),
        c.num_warps, c.num_stages,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# 4. Autograd: a torch custom op (what torch.compile traces) and, for eager, an autograd.Function over
#    the same launchers (the custom-op dispatch machinery costs ~0.5 ms of host time per fwd+bwd, more
#    than the kernels themselves at short lengths).
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("mosaic_embed::flash_attn_varlen_alibi_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
            alibi_slopes: torch.Tensor, softmax_scale: float,
            for_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _check_last_dim_contiguous(q, k, v)
    out, lse, aux = _flash_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale,
                               for_backward=for_backward)
    return out, lse, aux if aux is not None else lse.new_empty(0)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, for_backward):
    total, heads, _ = q.shape
    aux_numel = _aux_numel(total, heads, cu_seqlens.shape[0] - 1) if for_backward else 0
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((heads, total), dtype=torch.float32), q.new_empty((aux_numel,), dtype=torch.float32))


@torch.library.custom_op("mosaic_embed::flash_attn_varlen_alibi_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, aux: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
            alibi_slopes: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _check_last_dim_contiguous(q, k, v)
    # separate allocations: a custom op's outputs may not share storage
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return _flash_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale,
                      dq=dq, dk=dk, dv=dv, aux=aux if aux.numel() else None)


@_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, aux, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, _ = inputs
    out, lse, aux = output
    ctx.save_for_backward(q, k, v, out, lse, aux, cu_seqlens, alibi_slopes)
    ctx.max_seqlen = max_seqlen
    ctx.softmax_scale = softmax_scale
    ctx.mark_non_differentiable(aux)
    ctx.set_materialize_grads(False)  # unused outputs (lse, aux) get no zero-filled gradient


def _backward(ctx, dout, dlse, _daux):
    q, k, v, out, lse, aux, cu_seqlens, alibi_slopes = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, dlse, q, k, v, out, lse, aux, cu_seqlens, ctx.max_seqlen, alibi_slopes,
                         ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _FlashAttnVarlenAlibi(torch.autograd.Function):
    """Eager path: the same launchers as the custom op, without its per-call dispatch overhead."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, for_backward):
        q, k, v = _check_last_dim_contiguous(q, k, v)
        config = select_config(q.shape[2], max_seqlen, q.device)
        out, lse, aux = _flash_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, config=config,
                                   for_backward=for_backward)
        ctx.save_for_backward(q, k, v, out, lse, aux, cu_seqlens, alibi_slopes)
        ctx.max_seqlen = max_seqlen
        ctx.softmax_scale = softmax_scale
        ctx.config = config  # the backward reads what this forward wrote into aux for this config
        ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, aux, cu_seqlens, alibi_slopes = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _flash_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, ctx.max_seqlen, alibi_slopes,
                                ctx.softmax_scale, config=ctx.config, aux=aux)
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# 5. Public function
# --------------------------------------------------------------------------------------------------


def flash_attn_varlen_alibi(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale=None, return_lse=False):
    """Bidirectional ALiBi attention over packed variable-length sequences (FlashAttention-2 in Triton).

    Args:
        q, k, v: (T, H, D) packed tokens of all sequences, bf16 or fp16 (fp32 is accepted for testing;
            its products run in tf32 on GPU). D in (16, 32, 64, 128). The last dim must be contiguous
            or it is copied; other strides are free (e.g. views into a fused (T, 3, H, D) projection).
        cu_seqlens: (B+1,) int32 sequence boundaries on q's device, 0 first, T last.
        max_seqlen: int, the longest sequence length (sizes the grid: a smaller value leaves rows unwritten).
        alibi_slopes: (H,) fp32 per-head slopes >= 0; the score bias is ``-slope[h] * |i - j|``.
        softmax_scale: defaults to 1/sqrt(D).
        return_lse: also return the per-row log-sum-exp of the biased, scaled scores, (H, T) fp32
            (differentiable).

    Returns:
        out (T, H, D) in q's dtype, or (out, lse) when ``return_lse``.

    Under ``torch.compile`` this is the custom op ``torch.ops.mosaic_embed.flash_attn_varlen_alibi_fwd``
    (traced without a graph break, backward registered); in eager it runs the same launchers through an
    ``autograd.Function``. Tiles whose softmax weight is provably below 2^-32 of the row maximum
    (far from the diagonal on steep-slope heads) are skipped; see ``_window``.
    """
    _validate(q, k, v, cu_seqlens, max_seqlen, alibi_slopes)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    softmax_scale = float(softmax_scale)
    # (inside the op grad mode is always off: whether a backward can follow is decided here)
    for_backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if torch.compiler.is_compiling():
        out, lse, _ = torch.ops.mosaic_embed.flash_attn_varlen_alibi_fwd(
            q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, for_backward
        )
    else:
        out, lse = _FlashAttnVarlenAlibi.apply(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale,
                                               for_backward)
    return (out, lse) if return_lse else out


def _validate(q, k, v, cu_seqlens, max_seqlen, alibi_slopes):
    where = "flash_attn_varlen_alibi"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{where}: {name} must be (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if not (tuple(q.shape) == tuple(k.shape) == tuple(v.shape)):  # tuples: torch.Size == goes through sym_eq
        raise ValueError(f"{where}: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{where}: q, k, v must share a dtype among bf16/fp16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{where}: head_dim must be one of {_SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{where}: cu_seqlens must be a 1-D int32 tensor (B+1,), got {cu_seqlens.dtype} "
                         f"shape {tuple(cu_seqlens.shape)}")
    if alibi_slopes.dtype != torch.float32 or tuple(alibi_slopes.shape) != (q.shape[1],):
        raise ValueError(f"{where}: alibi_slopes must be fp32 of shape ({q.shape[1]},), got {alibi_slopes.dtype} "
                         f"shape {tuple(alibi_slopes.shape)}")
    for name, t in (("k", k), ("v", v), ("cu_seqlens", cu_seqlens), ("alibi_slopes", alibi_slopes)):
        if t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device}, q on {q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise ValueError(f"{where}: max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{where}: max_seqlen must be >= 0, got {max_seqlen}")
