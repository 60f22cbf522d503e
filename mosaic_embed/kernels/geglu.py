"""Fused GeGLU, forward and backward, in Triton: ``GELU(gate) * value`` from one fused projection.

MosaicBERT's feed-forward computes ``inner = x @ [W1 | V]`` (N, 2I) in one matrix product, then
``h = GELU(inner[:, :I]) * inner[:, I:]`` (N, I), with exact (erf) GELU. Both directions are purely
memory-bound:

- forward: read ``inner`` once (2I per row), write ``h`` (I per row);
- backward: read ``inner`` and ``dh`` once, write ``d_inner`` (2I per row) directly into the layout the
  fused projection's backward consumes (gate gradient in the first half, value gradient in the second).

Why a kernel: torch.compile lowers the backward of ``chunk`` + GELU + mul to one pointwise kernel over
the concatenated (N, 2I) gradient in which every output element loads both the gate and the value
element it depends on, i.e. ``inner`` and ``dh`` are each read twice (measured on an H100 at about half
of HBM bandwidth, 12 % of a MosaicBERT-Base step). Here one program owns a (row, column-tile) pair of
the I-space and writes both halves, so every byte is read once.

File order (DESIGN.md): pure-torch reference -> ``@triton.jit`` kernels -> launchers -> torch custom
op (what torch.compile traces, backward registered) and an ``autograd.Function`` for eager -> the public
:func:`geglu_triton`. Which of reference and kernel runs is decided in ``kernels/dispatch.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .launch import HAS_TRITON, as_rows, cdiv

__all__ = ["geglu_reference", "geglu_triton"]

if HAS_TRITON:
    import triton
    import triton.language as tl


# --------------------------------------------------------------------------------------------------
# 1. Pure-torch reference
# --------------------------------------------------------------------------------------------------


def geglu_reference(inner: torch.Tensor) -> torch.Tensor:
    """``GELU(gate) * value`` with exact (erf) GELU; ``inner`` (..., 2I) = [gate | value] -> (..., I).

    Computed in ``inner``'s dtype (fp32 inputs give the ground truth of the tests); differentiable.
    """
    gate, value = inner.chunk(2, dim=-1)  # each (..., I)
    return F.gelu(gate) * value


# --------------------------------------------------------------------------------------------------
# 2. Triton kernels: grid (rows, cdiv(I, BLOCK)); program (r, c) owns columns c*BLOCK.. of row r in the
#    I-space, i.e. inner[r, c*BLOCK..] (gate) and inner[r, I + c*BLOCK..] (value). fp32 arithmetic.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _load_gate_value(inner_ptr, width, stride_in, BLOCK: tl.constexpr):
        """This program's (row, column tile): row, columns, mask, and the fp32 gate and value tiles."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate_ptr = inner_ptr + row * stride_in + cols
        gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(gate_ptr + width, mask=mask, other=0.0).to(tl.float32)
        return row, cols, mask, gate, value

    @triton.jit
    def _geglu_fwd_kernel(inner_ptr, out_ptr, width, stride_in, stride_out, BLOCK: tl.constexpr):
        row, cols, mask, gate, value = _load_gate_value(inner_ptr, width, stride_in, BLOCK)
        gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(out_ptr + row * stride_out + cols, (gelu * value).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_bwd_kernel(inner_ptr, dout_ptr, dinner_ptr, width, stride_in, stride_dout, stride_din,
                          BLOCK: tl.constexpr):
        row, cols, mask, gate, value = _load_gate_value(inner_ptr, width, stride_in, BLOCK)
        dout = tl.load(dout_ptr + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))  # Phi(gate)
        pdf = 0.3989422804014327 * tl.exp(-0.5 * gate * gate)  # phi(gate)
        d_gate = dout * value * (cdf + gate * pdf)  # d GELU(x)/dx = Phi(x) + x phi(x)
        d_value = dout * gate * cdf
        dgate_ptr = dinner_ptr + row * stride_din + cols
        tl.store(dgate_ptr, d_gate.to(dinner_ptr.dtype.element_ty), mask=mask)
        tl.store(dgate_ptr + width, d_value.to(dinner_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# 3. Launchers: (N, 2I) row-major views; BLOCK 1024 with 4 warps = 8 contiguous elements per thread
#    (16-byte accesses in bf16/fp16).
# --------------------------------------------------------------------------------------------------

_BLOCK = 1024
_NUM_WARPS = 4


def _eager(kernel):
    return kernel


def _geglu_fwd(inner: torch.Tensor, launch=_eager) -> torch.Tensor:
    """inner (..., 2I) -> out (..., I) in inner's dtype. ``launch``: how a kernel is called (the op passes
    ``torch.library.wrap_triton``, which torch.compile traces)."""
    rows = as_rows(inner)
    n, width = rows.shape[0], rows.shape[1] // 2
    out = torch.empty((n, width), device=inner.device, dtype=inner.dtype)
    if n and width:
        launch(_geglu_fwd_kernel)[(n, cdiv(width, _BLOCK))](
            rows, out, width, rows.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
    return out.view(*inner.shape[:-1], width)


def _geglu_bwd(inner: torch.Tensor, dout: torch.Tensor, launch=_eager) -> torch.Tensor:
    """inner (..., 2I), dout (..., I) -> d_inner (..., 2I) = [d gate | d value] in inner's dtype."""
    rows, drows = as_rows(inner), as_rows(dout.to(inner.dtype))
    n, width = rows.shape[0], rows.shape[1] // 2
    dinner = torch.empty((n, 2 * width), device=inner.device, dtype=inner.dtype)
    if n and width:
        launch(_geglu_bwd_kernel)[(n, cdiv(width, _BLOCK))](
            rows, drows, dinner, width, rows.stride(0), drows.stride(0), dinner.stride(0),
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )
    return dinner.view(inner.shape)


# --------------------------------------------------------------------------------------------------
# 4. Autograd: torch ops (what torch.compile traces) and, for eager, an autograd.Function over the same
#    launchers (no op dispatch per call).
#    - ``geglu_fwd_traced`` / ``geglu_bwd_traced``: ``torch.library.triton_op``s. Unlike an opaque
#      ``custom_op``, they show torch.compile their kernel launches, and Inductor calls the kernels from its
#      generated code: no Python launcher runs per call. An opaque op's launch cost ~0.2 ms of host time per
#      call in a profiled compiled pretraining step (24 calls a step at Base size), while the host barely kept
#      ahead of the GPU; a whole step ran 1.02x faster with these (benchmarks/results/pretrain_kernels.json).
#      Registering one imports torch._dynamo (seconds on a small CPU, which a process that only embeds never
#      needs), so :func:`register_traced_ops` registers them on demand: ``dispatch.warm_dispatch`` calls it
#      before every compile this package makes.
#    - ``geglu_fwd`` / ``geglu_bwd``: the same as opaque custom ops, registered at import (cheap): what a
#      torch.compile that did not warm the dispatch first traces.
# --------------------------------------------------------------------------------------------------


def _fwd_impl(inner: torch.Tensor) -> torch.Tensor:
    return _geglu_fwd(inner)


def _bwd_impl(inner: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    return _geglu_bwd(inner, dout)


def _fwd_traced_impl(inner: torch.Tensor) -> torch.Tensor:
    return _geglu_fwd(inner, torch.library.wrap_triton)


def _bwd_traced_impl(inner: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    return _geglu_bwd(inner, dout, torch.library.wrap_triton)


def _setup_context(ctx, inputs, output):
    (inner,) = inputs
    ctx.save_for_backward(inner)


def _with_backward(fwd, bwd):
    def backward(ctx, dout):
        (inner,) = ctx.saved_tensors
        return bwd(inner, dout)

    fwd.register_autograd(backward, setup_context=_setup_context)
    return fwd


_opaque_bwd = torch.library.custom_op("mosaic_embed::geglu_bwd", _bwd_impl, mutates_args=())
_opaque_bwd.register_fake(lambda inner, dout: torch.empty_like(inner, memory_format=torch.contiguous_format))
_opaque_fwd = torch.library.custom_op("mosaic_embed::geglu_fwd", _fwd_impl, mutates_args=())
_opaque_fwd.register_fake(lambda inner: inner.new_empty((*inner.shape[:-1], inner.shape[-1] // 2)))
_with_backward(_opaque_fwd, _opaque_bwd)
_traced_fwd = None  # set by register_traced_ops


def register_traced_ops() -> None:
    """Register the ``triton_op`` pair (see above) once; later calls do nothing."""
    global _traced_fwd
    if _traced_fwd is None and HAS_TRITON:
        _traced_fwd = _with_backward(
            torch.library.triton_op("mosaic_embed::geglu_fwd_traced", _fwd_traced_impl, mutates_args=()),
            torch.library.triton_op("mosaic_embed::geglu_bwd_traced", _bwd_traced_impl, mutates_args=()),
        )


class _GeGLU(torch.autograd.Function):
    """Eager path: the same launchers as the custom op."""

    @staticmethod
    def forward(ctx, inner):
        ctx.save_for_backward(inner)
        return _geglu_fwd(inner)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        (inner,) = ctx.saved_tensors
        return _geglu_bwd(inner, dout)


# --------------------------------------------------------------------------------------------------
# 5. Public functions
# --------------------------------------------------------------------------------------------------


def _validate(inner: torch.Tensor) -> None:
    if inner.dim() < 1 or inner.shape[-1] % 2:
        raise ValueError(f"geglu: inner must be (..., 2I) with an even last dim, got shape {tuple(inner.shape)}")
    if inner.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"geglu: inner must be fp16/bf16/fp32, got {inner.dtype}")


def geglu_triton(inner: torch.Tensor) -> torch.Tensor:
    """Fused ``GELU(gate) * value`` (exact GELU) on ``inner`` (..., 2I) -> (..., I), differentiable.

    CUDA tensors (or any device under ``TRITON_INTERPRET=1``); arithmetic in fp32, output and input
    gradient in ``inner``'s dtype. Under torch.compile this is the op ``geglu_fwd_traced`` (a ``triton_op``,
    once :func:`register_traced_ops` ran) or else the opaque custom op ``geglu_fwd``; in eager an
    ``autograd.Function``.
    """
    if not HAS_TRITON:
        raise RuntimeError("geglu_triton needs the triton package")
    _validate(inner)
    if torch.compiler.is_compiling():
        return _traced_fwd(inner) if _traced_fwd is not None else _opaque_fwd(inner)
    return _GeGLU.apply(inner)
