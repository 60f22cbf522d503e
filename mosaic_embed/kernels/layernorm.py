"""Fused residual add + LayerNorm, forward and backward, in Triton: ``LN(x + residual)``.

Both sublayers of a post-LN BERT block end with ``norm(hidden + dropout(sublayer_out))``. In eager mode
(GLUE finetuning, the Encoder's default inference path) that is an add kernel (read 2, write 1 row of H)
and a LayerNorm kernel (read 1, write 1), and in backward LayerNorm's input gradient, then the add's
gradient routed to both inputs. Here one program per row reads ``x`` and ``residual`` once and writes
``y``; the backward reads ``x``, ``residual`` and ``dy`` once and writes ``d_s``, which is both ``d_x``
and ``d_residual`` (the add's gradient is the identity on each input).

Saved for backward: ``x``, ``residual`` and the per-row fp32 mean and rstd; the sum ``s = x + residual``
is recomputed, not saved. Saving ``s`` would cost a forward write of N*H (and the inference path, which
saves nothing, would pay for it too, or need a second kernel), while in a post-LN block ``residual`` is
the input of the preceding Linear (``Wqkv`` or ``wi``), which autograd keeps alive anyway for its weight
gradient: keeping ``x`` costs the same N*H memory that a saved ``s`` would, and the traffic is equal
(saved: fwd write + bwd read of s; recomputed: bwd reads of x and residual).

Precision: ``x`` and ``residual`` are summed in fp32 (without rounding ``s`` to the input dtype first),
mean/rstd and the normalisation are fp32, the affine parameters are read as they are stored (fp32 master
weights under bf16 activations: no bf16 copy of them), ``y`` is written in the requested output dtype.
Backward: ``d_s`` in the promoted dtype of ``x`` and ``residual`` (what autograd gives the sum), the
weight and bias gradients as fp32 partial sums per block of rows (stage 1, in the kernel) reduced by
``torch.sum`` (stage 2), returned in the parameters' dtype.

File order (DESIGN.md): pure-torch reference -> ``@triton.jit`` kernels -> launchers -> torch custom
op (what torch.compile traces, backward registered) and an ``autograd.Function`` for eager -> the public
:func:`add_layer_norm_triton`. Which of reference and kernel runs is decided in ``kernels/dispatch.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .launch import HAS_TRITON, as_rows, cdiv, next_pow2

__all__ = ["MAX_WIDTH", "add_layer_norm_reference", "add_layer_norm_triton"]

#: The widest row one program normalises (BLOCK = next power of two of H, the row held in registers).
MAX_WIDTH = 8192

if HAS_TRITON:
    import triton
    import triton.language as tl


# --------------------------------------------------------------------------------------------------
# 1. Pure-torch reference
# --------------------------------------------------------------------------------------------------


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """``LayerNorm(x + residual)`` over the last dim, computed in the inputs' (promoted) dtype, differentiable.

    The parameters are cast to that dtype, as ``MosaicBertLayerNorm`` does in low precision; fp32 or fp64
    inputs give the ground truth of the tests. x, residual (..., H); weight, bias (H,) -> (..., H).
    """
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight.to(s.dtype), bias.to(s.dtype), eps)


# --------------------------------------------------------------------------------------------------
# 2. Triton kernels. Forward: grid (N,), program r owns row r (BLOCK >= H columns, masked). Backward:
#    grid (G,), program g owns rows g*R .. g*R+R-1 and writes its fp32 partial dweight/dbias to row g of
#    (G, H) buffers. fp32 arithmetic throughout.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _add_ln_fwd_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, width, stride_x, stride_res,
                           stride_y, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        s += tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(s, axis=0) / width
        centered = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / width + eps)  # biased variance, as LayerNorm
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = centered * rstd * w + b
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _add_ln_bwd_kernel(x_ptr, res_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, ds_ptr, dw_ptr, db_ptr, n_rows, width,
                           rows_per_program, stride_x, stride_res, stride_dy, stride_ds, BLOCK: tl.constexpr):
        # d_s = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)), xhat = (s - mean) * rstd
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        db = tl.zeros((BLOCK,), dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        last = tl.minimum(first + rows_per_program, n_rows)
        for row in range(first, last):
            s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            s += tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(mask, (s - mean) * rstd, 0.0)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / width
            c2 = tl.sum(wdy, axis=0) / width
            ds = (wdy - (xhat * c1 + c2)) * rstd
            tl.store(ds_ptr + row * stride_ds + cols, ds.to(ds_ptr.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        tl.store(dw_ptr + pid * width + cols, dw, mask=mask)
        tl.store(db_ptr + pid * width + cols, db, mask=mask)


# --------------------------------------------------------------------------------------------------
# 3. Launchers: (N, H) row-major views; BLOCK = next power of two of H; 4 warps up to BLOCK 1024
#    (8 contiguous elements per thread: 16-byte accesses in bf16/fp16), more for wider rows.
#    Backward: at most _BWD_PROGRAMS programs (several per SM on an H100/H200, 132 SMs), so the
#    partial-sum buffers stay small (1024 x 768 fp32 = 3 MB at Base, against 46 MB of d_s).
# --------------------------------------------------------------------------------------------------

_BWD_PROGRAMS = 1024


def _num_warps(block: int) -> int:
    return min(max(block // 256, 4), 16)


def _add_ln_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (..., H) -> y (..., H) in out_dtype, mean (N,) and rstd (N,) fp32."""
    xs, rs = as_rows(x), as_rows(residual)
    n, width = xs.shape
    y = torch.empty((n, width), device=x.device, dtype=out_dtype)
    mean = torch.empty(n, device=x.device, dtype=torch.float32)
    rstd = torch.empty(n, device=x.device, dtype=torch.float32)
    if n and width:
        block = next_pow2(width)
        _add_ln_fwd_kernel[(n,)](
            xs, rs, weight.contiguous(), bias.contiguous(), y, mean, rstd, width, xs.stride(0), rs.stride(0), y.stride(0), eps,
            BLOCK=block, num_warps=_num_warps(block),
        )
    return y.view(x.shape), mean, rstd


def _add_ln_bwd(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> d_s (..., H) in the promoted dtype of x and residual; d_weight, d_bias (H,) in weight's dtype."""
    xs, rs, dys = as_rows(x), as_rows(residual), as_rows(dy)
    n, width = xs.shape
    ds = torch.empty((n, width), device=x.device, dtype=torch.promote_types(x.dtype, residual.dtype))
    programs = min(n, _BWD_PROGRAMS)
    if not (programs and width):
        zeros = torch.zeros(width, device=x.device, dtype=weight.dtype)
        return ds.view(x.shape), zeros, zeros.clone()
    rows_per_program = cdiv(n, programs)
    programs = cdiv(n, rows_per_program)  # no program without rows
    dw = torch.empty((programs, width), device=x.device, dtype=torch.float32)
    db = torch.empty((programs, width), device=x.device, dtype=torch.float32)
    block = next_pow2(width)
    _add_ln_bwd_kernel[(programs,)](
        xs, rs, weight.contiguous(), dys, mean, rstd, ds, dw, db, n, width, rows_per_program, xs.stride(0), rs.stride(0),
        dys.stride(0), ds.stride(0), BLOCK=block, num_warps=_num_warps(block),
    )
    return ds.view(x.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------------------------
# 4. Autograd: a torch custom op (what torch.compile traces, an opaque node it never splits) and, for
#    eager, an autograd.Function over the same launchers (no custom-op dispatch overhead per call).
#    Both route d_s to x and residual, each in its own dtype (a no-op cast when they share one).
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("mosaic_embed::add_layer_norm_fwd", mutates_args=())
def _add_ln_fwd_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_ln_fwd(x, residual, weight, bias, eps, out_dtype)


@_add_ln_fwd_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    n = x.shape[:-1].numel()
    stats = x.new_empty((n,), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("mosaic_embed::add_layer_norm_bwd", mutates_args=())
def _add_ln_bwd_op(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_ln_bwd(dy, x, residual, weight, mean, rstd)


@_add_ln_bwd_op.register_fake
def _(dy, x, residual, weight, mean, rstd):
    ds = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return ds, torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, _bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    ds, dw, db = _add_ln_bwd_op(dy, x, residual, weight, mean, rstd)
    return ds.to(x.dtype), ds.to(residual.dtype), dw, db, None, None


_add_ln_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _AddLayerNorm(torch.autograd.Function):
    """Eager path: the same launchers as the custom op."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype):
        y, mean, rstd = _add_ln_fwd(x, residual, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, residual, weight, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, residual, weight, mean, rstd = ctx.saved_tensors
        ds, dw, db = _add_ln_bwd(dy, x, residual, weight, mean, rstd)
        return ds.to(x.dtype), ds.to(residual.dtype), dw, db, None, None


# --------------------------------------------------------------------------------------------------
# 5. Public function
# --------------------------------------------------------------------------------------------------

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _validate(x, residual, weight, bias, out_dtype) -> None:
    if x.dim() < 1 or residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: x and residual must share one (..., H) shape, got {tuple(x.shape)} "
                         f"and {tuple(residual.shape)}")
    width = x.shape[-1]
    if weight is None or bias is None or weight.shape != (width,) or bias.shape != (width,):
        raise ValueError(f"add_layer_norm: weight and bias must both be ({width},) (an elementwise-affine "
                         "LayerNorm over the last dim)")
    if width > MAX_WIDTH:
        raise ValueError(f"add_layer_norm: rows of at most {MAX_WIDTH} features, got {width}")
    for name, dtype in (("x", x.dtype), ("residual", residual.dtype), ("weight", weight.dtype),
                        ("bias", bias.dtype), ("out_dtype", out_dtype)):
        if dtype not in _FLOATS:
            raise ValueError(f"add_layer_norm: {name} must be fp16/bf16/fp32, got {dtype}")


def add_layer_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused ``LayerNorm(x + residual)`` over the last dim, differentiable in all four tensors.

    x, residual (..., H) (H <= :data:`MAX_WIDTH`; their dtypes may differ); weight, bias (H,) in any float
    dtype (fp32 master weights with bf16 activations are read as they are). Arithmetic in fp32; ``y`` in
    ``out_dtype`` (default: the promoted dtype of x and residual); gradients of x and residual in their own
    dtypes, of weight and bias in theirs. CUDA tensors (or any device under ``TRITON_INTERPRET=1``).
    Under torch.compile this is the custom op ``torch.ops.mosaic_embed.add_layer_norm_fwd`` (backward
    ``add_layer_norm_bwd``); in eager an ``autograd.Function``.
    """
    if not HAS_TRITON:
        raise RuntimeError("add_layer_norm_triton needs the triton package")
    out_dtype = out_dtype or torch.promote_types(x.dtype, residual.dtype)
    _validate(x, residual, weight, bias, out_dtype)
    if torch.compiler.is_compiling():
        return torch.ops.mosaic_embed.add_layer_norm_fwd(x, residual, weight, bias, float(eps), out_dtype)[0]
    return _AddLayerNorm.apply(x, residual, weight, bias, float(eps), out_dtype)
