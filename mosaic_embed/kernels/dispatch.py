"""The one kernel dispatch point: which implementation of attention, GeGLU, the residual add + LayerNorm and the
MLM loss runs, decided in one place.

Model code calls :func:`varlen_attention`, :func:`padded_attention`, :func:`geglu`, :func:`add_layer_norm` and
:func:`mlm_loss` only. Each asks
:func:`resolve_impl`, the single resolver for every kernel, which turns a requested implementation
(``"auto"`` | ``"torch"`` | ``"triton"``) into the path that will run:

- ``"torch"``: the exact pure-torch reference (``kernels/attention.py``, ``kernels/geglu.py``,
  ``kernels/linear_cross_entropy.py``; for the LayerNorm the module itself, ``norm(residual + x)``), any device;
- ``"triton"``: the fused Triton kernel (``kernels/flash_attn_alibi.py``, ``kernels/geglu.py``,
  ``kernels/layernorm.py``, ``kernels/linear_cross_entropy.py``); CUDA tensors, or any device under
  ``TRITON_INTERPRET=1`` (CPU tests). Asked for where it cannot run, it raises: there is no silent fallback;
- ``"auto"``: triton on CUDA when Triton is installed and the inputs suit the kernel (attention: fp16/bf16,
  no attention dropout, a supported head dim; LayerNorm: see below), torch otherwise.

The residual add + LayerNorm's ``"auto"`` also weighs whether torch.compile is tracing: there it takes the
torch expression, because Inductor already fuses the add and the LayerNorm (and the dropout and bias add
before them, which an opaque custom op would cut off from the fusion), forward and backward; the kernel
pays off in eager mode (GLUE finetuning, the Encoder's default path), where the add and the LayerNorm are
separate kernels. ``"triton"`` forces the kernel in both (the custom op under compile), e.g. to measure it.

The answer is cached per question and announced once per process (a warning naming the path and why), so
a user always knows which path their numbers came from. Resolution runs outside torch.compile's graph.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import torch

from . import attention as _torch_attention
from .geglu import geglu_reference
from .launch import HAS_TRITON
from .layernorm import MAX_WIDTH as _LAYERNORM_MAX_WIDTH
from .linear_cross_entropy import linear_cross_entropy_reference

logger = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "triton")
KERNELS = ("attention", "geglu", "layernorm", "mlm_loss")

_resolved: dict[tuple, str] = {}
_announced: set[tuple[str, str, str]] = set()


def _outside_graph(fn):
    """``fn`` run outside torch.compile's graph (``torch.compiler.disable``), without importing torch._dynamo
    (~1.7 s on a small CPU) in a process that never compiles: the disabled wrapper is made at the first call
    made once dynamo is loaded (before tracing: ``warm_dispatch`` resolves everything first); until then no
    graph exists and the plain function runs."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


def _triton_importable() -> bool:
    return HAS_TRITON


def _attention_head_dims() -> tuple[int, ...] | None:
    """Head dims the Triton attention kernel supports (None if it does not say)."""
    from . import flash_attn_alibi

    return getattr(flash_attn_alibi, "_SUPPORTED_HEAD_DIMS", None)


def resolve_impl(kernel: str, impl: str, device: torch.device, dtype: torch.dtype | None = None,
                 dropout_p: float = 0.0, head_dim: int | None = None, width: int | None = None,
                 fusable: bool = True, compiling: bool = False) -> str:
    """``impl`` ("auto" | "torch" | "triton") for ``kernel`` ("attention" | "geglu" | "layernorm" | "mlm_loss")
    -> the path that runs.

    ``dtype``, ``dropout_p`` and ``head_dim`` are the facts "auto" weighs for attention (the GeGLU and MLM
    loss kernels take any float dtype). For the LayerNorm: ``width`` (H; the kernel holds a row in registers, at most
    ``kernels.layernorm.MAX_WIDTH``), ``fusable`` (False where the module would not run in the activations'
    dtype: ``low_precision_layernorm=False`` under autocast, which autocast runs in fp32) and ``compiling``
    (``torch.compiler.is_compiling()`` at the call). Cached per question; the first answer of each kind is
    announced.

    Raises:
        ValueError / RuntimeError when "triton" is asked for where it cannot run.
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    key = (kernel, impl, device.type, dtype, dropout_p, head_dim, width, fusable, compiling, interpret)
    choice = _resolved.get(key)
    if choice is None:  # every layer of every step asks the same question: answer it once per process
        choice = _resolve(kernel, impl, device.type, dtype, dropout_p, head_dim, width, fusable, compiling, interpret)
        _resolved[key] = choice
    return choice


@_outside_graph
def _resolve(kernel: str, impl: str, device_type: str, dtype: torch.dtype | None, dropout_p: float,
             head_dim: int | None, width: int | None, fusable: bool, compiling: bool, interpret: bool) -> str:
    # Outside torch.compile's graph (imports, logging); resolve_impl caches the answer.
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; kernels: {KERNELS}")
    if impl not in IMPLS:
        raise ValueError(f"{kernel} impl must be one of {IMPLS}, got {impl!r}")
    attention, layernorm = kernel == "attention", kernel == "layernorm"
    supported = _attention_head_dims() if attention and head_dim is not None else None
    too_wide = layernorm and width is not None and width > _LAYERNORM_MAX_WIDTH
    if impl == "torch":
        choice, why = "torch", f"{kernel} impl='torch'"
    elif impl == "triton":
        if attention and dropout_p > 0:
            raise ValueError(f"attn_impl='triton' has no attention dropout (dropout_p={dropout_p}); use 'torch'")
        if not _triton_importable():
            raise RuntimeError(f"{kernel} impl='triton' but the triton package is not installed; use 'torch'")
        if device_type != "cuda" and not interpret:
            raise RuntimeError(
                f"{kernel} impl='triton' needs CUDA tensors (got {device_type}; TRITON_INTERPRET=1 runs the kernel "
                "in Triton's CPU interpreter for tests); use 'torch' or 'auto'"
            )
        if supported is not None and head_dim not in supported:
            raise ValueError(f"attn_impl='triton' supports head dims {supported}, got {head_dim}; use 'torch'")
        if layernorm and not fusable:
            raise ValueError("layernorm_impl='triton' fuses a LayerNorm that runs in the activations' dtype "
                             "(low_precision_layernorm under autocast, or any outside autocast); with "
                             "low_precision_layernorm=False under autocast, autocast runs it in fp32: use 'torch' or 'auto'")
        if too_wide:
            raise ValueError(f"layernorm_impl='triton' takes rows of at most {_LAYERNORM_MAX_WIDTH} features, got "
                             f"{width}; use 'torch'")
        choice, why = "triton", f"{kernel} impl='triton'"
    elif device_type != "cuda":
        choice, why = "torch", f"impl='auto' on {device_type}"
    elif not _triton_importable():
        choice, why = "torch", "impl='auto' on CUDA without the triton package"
    elif attention and dtype not in (torch.float16, torch.bfloat16):
        choice, why = "torch", f"impl='auto' with {dtype} inputs (the Triton kernel takes fp16/bf16)"
    elif attention and dropout_p > 0:
        choice, why = "torch", f"impl='auto' with attention dropout {dropout_p} (the kernel has none)"
    elif supported is not None and head_dim not in supported:
        choice, why = "torch", f"impl='auto' with head dim {head_dim} (the kernel takes {supported})"
    elif layernorm and compiling:
        choice, why = "torch", "impl='auto' under torch.compile (Inductor fuses the dropout, add and LayerNorm itself)"
    elif layernorm and not fusable:
        choice, why = "torch", "impl='auto' with low_precision_layernorm=False under autocast (fp32 layer_norm)"
    elif too_wide:
        choice, why = "torch", f"impl='auto' with {width} features (the kernel takes at most {_LAYERNORM_MAX_WIDTH})"
    else:
        choice, why = "triton", "impl='auto' on CUDA"
    if (kernel, choice, why) not in _announced:
        _announce(kernel, choice, why)
    return choice


@_outside_graph
def _announce(kernel: str, choice: str, why: str) -> None:
    # Outside torch.compile's graph: a logging call inside it would break the graph at every layer.
    _announced.add((kernel, choice, why))
    name = {"attention": "attention", "geglu": "GeGLU", "layernorm": "residual add + LayerNorm",
            "mlm_loss": "MLM loss"}[kernel]
    logger.warning("MosaicBERT %s runs the %s path (%s)", name, choice.upper(), why)


def varlen_attention(
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
    """Bidirectional (ALiBi) attention over a packed batch of variable-length sequences.

    For every sequence b (rows ``cu_seqlens[b]:cu_seqlens[b+1]``) and head h:
    ``softmax(scale * q_i . k_j - slope_h * |i - j|)`` over keys j of the same sequence, times v_j.

    Args:
        q, k, v: (T, H, D), T = total tokens of all sequences.
        cu_seqlens: (B+1,) int32 cumulative sequence lengths, cu_seqlens[-1] == T.
        max_seqlen: the longest sequence (python int).
        alibi_slopes: (H,) float32; None means no position bias (BERT-style models with learned positions).
        impl: "torch" | "triton" | "auto" (see :func:`resolve_impl`).
        dropout_p: attention-probability dropout (torch path only); pass 0 in eval.
        softmax_scale: default 1/sqrt(D).

    Returns:
        (T, H, D) in q's dtype.
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"varlen_attention: q, k, v must share one (T, H, D) shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"varlen_attention: cu_seqlens must be 1-D int32, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if alibi_slopes is not None and alibi_slopes.shape != (q.shape[1],):
        raise ValueError(f"varlen_attention: alibi_slopes must be ({q.shape[1]},), got {tuple(alibi_slopes.shape)}")
    choice = resolve_impl("attention", impl, q.device, q.dtype, dropout_p, head_dim=q.shape[-1])
    if choice == "triton":
        from .flash_attn_alibi import flash_attn_varlen_alibi

        if alibi_slopes is None:  # zero slopes: plain softmax attention, the same kernel
            alibi_slopes = torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)
        return flash_attn_varlen_alibi(
            q, k, v, cu_seqlens, max_seqlen, alibi_slopes.to(device=q.device, dtype=torch.float32),
            softmax_scale=softmax_scale,
        )
    return _torch_attention.varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, dropout_p,
                                                   softmax_scale)


def announce_padded_attention() -> None:
    """Say once that attention runs the torch path on padded batches. ``warm_dispatch`` calls it before
    torch.compile traces: a first call inside the traced layer loop is a graph break there, and torch.compile
    then runs the whole encoder eagerly."""
    if ("attention", "torch", "unpad=False") not in _announced:
        _announce("attention", "torch", "unpad=False")


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention on a padded batch (the ``unpad=False`` ablation): always the torch path, announced once.

    q, k, v: (B, H, S, D); key_padding_mask (B, S) bool, True for real keys -> (B, H, S, D).
    """
    announce_padded_attention()
    return _torch_attention.padded_attention_torch(q, k, v, key_padding_mask, alibi_slopes, dropout_p,
                                                   softmax_scale)


def geglu(inner: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``inner`` (..., 2I) = [gate | value] -> ``GELU(gate) * value`` (..., I), exact (erf) GELU.

    impl: "triton" (the fused kernel), "torch" (the reference expression, which torch.compile fuses itself)
    or "auto" (triton on CUDA); see :func:`resolve_impl`.
    """
    if resolve_impl("geglu", impl, inner.device) == "triton":
        from .geglu import geglu_triton

        return geglu_triton(inner)
    return geglu_reference(inner)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module, impl: str = "auto") -> torch.Tensor:
    """``norm(residual + x)``: the residual add and LayerNorm that end each post-LN sublayer, fused or not.

    x, residual: (..., H). ``norm``: a ``model.blocks.MosaicBertLayerNorm`` (its ``weight``, ``bias``, ``eps``
    and ``fused_dtype``, the dtype it would return, or None where the kernel cannot match it exactly).
    impl: "triton" (the fused kernel, ``kernels/layernorm.py``), "torch" (the module on the sum, exactly as
    before the kernel existed) or "auto" (triton on CUDA in eager mode, torch under torch.compile); see
    :func:`resolve_impl`. -> (..., H) in the dtype ``norm(residual + x)`` returns.
    """
    out_dtype = norm.fused_dtype(x, residual)
    choice = resolve_impl("layernorm", impl, x.device, width=x.shape[-1], fusable=out_dtype is not None,
                          compiling=torch.compiler.is_compiling())
    if choice == "triton":
        from .layernorm import add_layer_norm_triton

        return add_layer_norm_triton(x, residual, norm.weight, norm.bias, norm.eps, out_dtype)
    return norm(residual + x)


def mlm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             impl: str = "auto") -> torch.Tensor:
    """The summed cross-entropy of the MLM decoder: ``sum_r CE(hidden_r @ weight^T + bias, targets_r)`` over
    rows whose target is not -100, a 0-d fp32 tensor, differentiable in hidden, weight and bias.

    hidden (n, H), weight (V, H), bias (V,) or None, targets (n,) int64. impl: "triton" (decoder matmul and
    loss fused in chunks, gradients computed in the forward, the (n, V) logits never kept whole), "torch"
    (the reference: logits in the input/autocast dtype, cross-entropy in fp32) or "auto" (triton on CUDA);
    see :func:`resolve_impl`. The caller divides by the number of rows it averages over.
    """
    if resolve_impl("mlm_loss", impl, hidden.device) == "triton":
        from .linear_cross_entropy import linear_cross_entropy_triton

        return linear_cross_entropy_triton(hidden, weight, bias, targets)
    return linear_cross_entropy_reference(hidden, weight, bias, targets)


def warm_dispatch(model: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Resolve MosaicBERT's attention, GeGLU, LayerNorm and MLM-loss dispatch (cached per process) before torch.compile traces
    (pretraining's ``compile_in_place``, the Encoder's ``compile``).

    The resolvers run outside the graph (``torch.compiler.disable``: imports, a one-time log line), so a
    cache miss during tracing is a graph break, and the filled cache then fails a guard: one wasted
    compilation of the whole model. Answering the questions first gives one graph on the first trace.
    ``dtype`` is the activation dtype the layers see (the autocast dtype under mixed precision). The LayerNorm
    is asked the traced question (``compiling=True``), fusable or not (whether autocast is on is known only at
    the call), except that a forced "triton" is asked only the fusable question (the other is an error, raised
    where it is asked).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", "") != "mosaic_bert":
        return
    device = torch.device(device_type)
    if not config.unpad:
        announce_padded_attention()
    head_dim = config.hidden_size // config.num_attention_heads
    for dropout_p in {0.0, float(config.attention_probs_dropout_prob)}:  # eval, train
        resolve_impl("attention", config.attn_impl, device, dtype, dropout_p, head_dim=head_dim)
    if config.mlp == "geglu" and config.hidden_act == "gelu":
        if resolve_impl("geglu", config.impl_for("geglu"), device) == "triton":
            from .geglu import register_traced_ops

            register_traced_ops()  # the triton_op torch.compile inlines (kernels/geglu.py, section 4)
    layernorm_impl = config.impl_for("layernorm")
    for fusable in (True,) if layernorm_impl == "triton" else (True, False):
        resolve_impl("layernorm", layernorm_impl, device, width=config.hidden_size, fusable=fusable, compiling=True)
    if hasattr(model, "mlm_head"):  # the masked-LM model; encoders have no MLM loss to announce
        resolve_impl("mlm_loss", config.impl_for("mlm_loss"), device)


__all__ = ["IMPLS", "KERNELS", "add_layer_norm", "geglu", "mlm_loss", "padded_attention", "resolve_impl",
           "varlen_attention", "warm_dispatch"]
