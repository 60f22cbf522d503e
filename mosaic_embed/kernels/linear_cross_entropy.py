"""The MLM head's decoder matmul fused with its cross-entropy: the (n, V) logits are never kept whole.

The masked-LM loss is ``sum_r CE(h_r @ W^T + b, t_r)`` over the n labelled rows, W (V, H) the decoder
(tied to the word embeddings), V = 30,528. Unfused (``F.linear`` then ``F.cross_entropy`` under bf16
autocast) it materialises the (n, V) bf16 logits, an fp32 copy for the softmax and an fp32 gradient: at
MosaicBERT-Base pretraining (256 x 128 tokens, 30 % masked, n ~ 9.8k) about 3 GB of memory and traffic.

Here the rows are taken in chunks; for each chunk

1. ``logits = h_c @ W^T (+ b)`` (cuBLAS, in the compute dtype);
2. one Triton program per row computes the loss (online max / log-sum-exp in fp32) and overwrites the
   logits IN PLACE with ``d loss / d logits = softmax - onehot`` (0 for rows whose target is -100);
3. ``grad_h_c = grad_logits @ W``, ``grad_W += grad_logits^T @ h_c``, ``grad_b += grad_logits.sum(0)``;

so the gradients are computed during the forward (the idea of Liger-Kernel's fused linear cross-entropy)
and the backward only scales the saved gradients by the incoming ``grad_output``. Peak extra memory is one
chunk of logits plus the gradient buffers (which autograd would hold anyway).

Choices:

- chunk rows: the largest power of two whose logits stay within :data:`_CHUNK_BYTES` (256 MiB), i.e. 4096
  rows at V = 30,528 in bf16 (2048 in fp32), so Base's ~9.8k rows run in 3 chunks. Bigger chunks buy
  nothing (each chunk's three matmuls are already large, compute-bound GEMMs; W is re-read 3 times per
  chunk, 47 MB each in bf16, small beside the chunk's 250 MB of logits), smaller ones more launches and
  more W reads. A power of two keeps every full chunk a whole number of cuBLAS tiles (64/128/256 rows)
  and the set of GEMM shapes small (full chunks share one shape; only the last one differs).
- weight/bias gradient: accumulated in an fp32 buffer across chunks and returned in the parameter's dtype
  (fp32 master weights under autocast). Each chunk's ``grad_logits^T @ h_c`` runs in the compute dtype
  (fp32 accumulation inside cuBLAS, one rounding to bf16, as the unfused ``nn.Linear`` backward under
  autocast does for the whole batch) and is added in fp32; with fp32 compute it is an ``addmm_`` into the
  buffer (no temporary). The hidden gradient is written chunk by chunk in the hidden's dtype.
- autocast: a custom op does not see autocast, so the public function reads the autocast dtype (as
  ``nn.Linear`` would) and passes it as the op's ``compute_dtype``; the op casts hidden, W and b to it and
  runs with autocast off.
- no gradient needed (eval, ``no_grad``, or no input requiring grad): the kernel writes no gradient and
  no gradient buffer is allocated; the op returns the loss only.

File order (DESIGN.md): pure-torch reference -> ``@triton.jit`` kernel -> launcher and the chunked fused
function -> torch custom op (what torch.compile traces, one opaque node; backward registered) -> the
public :func:`linear_cross_entropy_triton`. Unlike ``geglu.py`` there is no separate eager
``autograd.Function``: the op runs once per step, so the custom-op dispatch overhead (microseconds) that
justified it there does not matter, and one path is used in eager and compiled code alike. Which of
reference and fused path runs is decided in ``kernels/dispatch.py`` (kernel ``"mlm_loss"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .launch import HAS_TRITON, next_pow2

__all__ = ["IGNORE_INDEX", "linear_cross_entropy_reference", "linear_cross_entropy_triton"]

if HAS_TRITON:
    import triton
    import triton.language as tl

IGNORE_INDEX = -100  # target value of rows that are not predicted (transformers' and torch's convention)


# --------------------------------------------------------------------------------------------------
# 1. Pure-torch reference
# --------------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   targets: torch.Tensor) -> torch.Tensor:
    """``sum_r CE(hidden_r @ weight^T + bias, targets_r)`` over rows whose target is not -100; 0-d fp32.

    hidden (n, H), weight (V, H), bias (V,) or None, targets (n,) int64. The logits are formed in the input
    dtype (the autocast dtype under autocast, as ``nn.Linear``), the cross-entropy in fp32 (what autocast
    does for ``F.cross_entropy``); differentiable. Materialises the (n, V) logits.
    """
    logits = F.linear(hidden, weight, bias)  # (n, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


# --------------------------------------------------------------------------------------------------
# 2. Triton kernel: grid (rows,); program r owns row r of a (rows, V) logits chunk and loops over V in
#    BLOCK columns twice: (max, sum of exp) online, then the gradient written over the logits. fp32.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _ce_loss_grad_kernel(logits_ptr, targets_ptr, loss_ptr, vocab, stride_row,
                             IGNORE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row)
        valid = target != IGNORE
        # pass 1: running max m and sum of exp(x - m) over the row (online log-sum-exp)
        m = float("-inf")
        s = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.where(valid, target, 0)  # an ignored row reads column 0, harmlessly
        x_t = tl.load(row_ptr + t).to(tl.float32)  # read before pass 2 overwrites the row
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
        if WRITE_GRAD:
            # pass 2: d loss / d x = softmax(x) - onehot(t), zero on ignored rows, over the logits in place
            keep = tl.where(valid, 1.0, 0.0)
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < vocab
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                grad = (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)) * keep
                tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# 3. Launcher and the chunked fused function. BLOCK up to 4096 columns with 8 warps: 16 contiguous
#    elements per thread (32-byte accesses in bf16); V = 30,528 takes 8 blocks per pass.
# --------------------------------------------------------------------------------------------------

_MAX_BLOCK = 4096
_CHUNK_BYTES = 256 * 2**20  # bound on one chunk's logits (see the module docstring)


def _ce_loss_grad(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, write_grad: bool,
                  block: int | None = None) -> None:
    """logits (rows, V) with a unit last stride, targets (rows,) int64 -> loss (rows,) fp32 written; with
    ``write_grad`` the logits are overwritten by ``softmax - onehot`` (0 on ignored rows), in their dtype.

    Targets must be -100 or in [0, V) (not checked: checking would cost a device sync)."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = block or min(_MAX_BLOCK, next_pow2(vocab))
    _ce_loss_grad_kernel[(rows,)](
        logits, targets, loss, vocab, logits.stride(0),
        IGNORE=IGNORE_INDEX, WRITE_GRAD=write_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )


def chunk_rows_for(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: the largest power of two with ``rows * vocab * itemsize <= _CHUNK_BYTES`` (>= 1)."""
    per_row = vocab * torch.empty((), dtype=dtype).element_size()
    return max(1, 1 << max(0, (_CHUNK_BYTES // per_row).bit_length() - 1))


def _fused(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           compute_dtype: torch.dtype, compute_grad: bool, chunk_rows: int):
    """(loss 0-d fp32, grad_hidden, grad_weight, grad_bias); the gradients are (0,) when not computed
    (``grad_bias`` also when there is no bias). Gradients are of the summed loss (grad_output = 1)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    chunk = chunk_rows if chunk_rows > 0 else chunk_rows_for(vocab, compute_dtype)
    with torch.autocast(device.type, enabled=False):  # the casts below are the autocast; matmuls as written
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        targets = targets.contiguous()
        losses = torch.empty(n, device=device, dtype=torch.float32)  # (n,)
        if compute_grad:
            grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)  # (n, H)
            grad_w = torch.zeros(weight.shape, device=device, dtype=torch.float32)  # (V, H) accumulator
            grad_b = torch.zeros(vocab, device=device, dtype=torch.float32) if bias is not None else None
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            h = hidden[start:stop].to(compute_dtype)  # (c, H)
            logits = F.linear(h, w, b)  # (c, V), contiguous
            _ce_loss_grad(logits, targets[start:stop], losses[start:stop], compute_grad)
            if not compute_grad:
                continue
            grad_logits = logits  # (c, V): softmax - onehot, written in place by the kernel
            grad_hidden[start:stop] = grad_logits @ w  # (c, H), cast to hidden's dtype
            if grad_w.dtype == compute_dtype:
                grad_w.addmm_(grad_logits.t(), h)  # (V, c) @ (c, H)
            else:
                grad_w += grad_logits.t() @ h  # in the compute dtype, summed in fp32
            if grad_b is not None:
                grad_b += grad_logits.sum(0, dtype=torch.float32)
        loss = losses.sum()
    if not compute_grad:
        return loss, _nothing(hidden), _nothing(hidden), _nothing(hidden)
    return (loss, grad_hidden, grad_w.to(weight.dtype),
            grad_b.to(bias.dtype) if grad_b is not None else _nothing(hidden))


def _nothing(like: torch.Tensor) -> torch.Tensor:
    """The (0,) placeholder of a gradient not computed (a fresh tensor each time: op outputs must not alias)."""
    return like.new_empty((0,))


# --------------------------------------------------------------------------------------------------
# 4. Autograd: a torch custom op (torch.compile traces it as one opaque node, with dynamic n) whose
#    backward scales the gradients its forward saved.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("mosaic_embed::linear_cross_entropy", mutates_args=())
def _linear_ce_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                  compute_dtype: torch.dtype, compute_grad: bool, chunk_rows: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fused(hidden, weight, bias, targets, compute_dtype, compute_grad, chunk_rows)


@_linear_ce_op.register_fake
def _(hidden, weight, bias, targets, compute_dtype, compute_grad, chunk_rows):
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, _nothing(hidden), _nothing(hidden), _nothing(hidden)
    return (loss, torch.empty_like(hidden, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else _nothing(hidden))


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.has_bias = inputs[2] is not None


def _backward(ctx, grad_loss, *_unused_grads):
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_hidden.dim() != 2 and any(need[:3]):  # never: the public function asks for grads when needed
        raise RuntimeError("linear_cross_entropy: backward through a forward run without gradients")
    return (grad_hidden * grad_loss if need[0] else None,
            grad_weight * grad_loss if need[1] else None,
            grad_bias * grad_loss if ctx.has_bias and need[2] else None,
            None, None, None, None)


_linear_ce_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# 5. Public function
# --------------------------------------------------------------------------------------------------


def _validate(hidden, weight, bias, targets) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be (n, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0] or targets.dtype != torch.int64:
        raise ValueError(f"linear_cross_entropy: targets must be ({hidden.shape[0]},) int64, got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"linear_cross_entropy: {name} must be fp16/bf16/fp32, got {t.dtype}")


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Fused ``linear_cross_entropy_reference``: the summed cross-entropy (0-d fp32) of
    ``hidden @ weight^T + bias`` against ``targets`` (-100 = ignored), differentiable in hidden, weight, bias.

    hidden (n, H), weight (V, H), bias (V,) or None, targets (n,) int64, all on one CUDA device (or any
    device under ``TRITON_INTERPRET=1``). Under autocast the matmuls run in the autocast dtype, as
    ``nn.Linear`` would; otherwise hidden and weight must share a dtype. Gradients come back in each
    input's dtype. ``chunk_rows``: rows per chunk (default :func:`chunk_rows_for`; tests set it small).
    The op is ``torch.ops.mosaic_embed.linear_cross_entropy`` in eager and compiled code alike.
    """
    if not HAS_TRITON:
        raise RuntimeError("linear_cross_entropy_triton needs the triton package")
    _validate(hidden, weight, bias, targets)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"linear_cross_entropy: hidden, weight and bias must share a dtype outside autocast, got "
                         f"{hidden.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")
    else:
        compute_dtype = hidden.dtype
    compute_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    loss, *_ = torch.ops.mosaic_embed.linear_cross_entropy(hidden, weight, bias, targets, compute_dtype,
                                                           compute_grad, chunk_rows or 0)
    return loss
