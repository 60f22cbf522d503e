"""Fused linear cross-entropy (kernels/linear_cross_entropy.py): fused path vs the fp64 reference, loss and
the gradients of hidden, weight and bias; the dispatch's ``mlm_loss``; the MLM model on either path.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (conftest) at tiny sizes in fp32 and fp16 (bf16 is
broken in the interpreter), with chunks smaller than n so that several run; on a GPU (``-m gpu``) at
MosaicBERT-Base sizes in bf16 under autocast, where its error must stay within a small factor of the unfused
torch path's and its peak memory be lower, and under torch.compile with dynamic shapes.
"""

import zlib

import pytest
import torch

from mosaic_embed.kernels import dispatch
from mosaic_embed.kernels.dispatch import mlm_loss
from mosaic_embed.kernels.linear_cross_entropy import (
    _ce_loss_grad,
    chunk_rows_for,
    linear_cross_entropy_reference,
    linear_cross_entropy_triton,
)
from mosaic_embed.model import preset_config
from mosaic_embed.model.modeling import MosaicBertForMaskedLM
from tests.helpers import packed_mlm_batch, traced_as_one_graph

# the small cases run where the kernel can: Triton's interpreter on a CPU machine, the GPU on a CUDA one
SMALL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _inputs(n, hidden, vocab, seed, ignore_every=5, device=SMALL_DEVICE):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 3  # logits of a few units
    b = torch.randn(vocab, generator=gen)
    t = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_every:
        t[::ignore_every] = -100
    return h.to(device), w.to(device), b.to(device), t.to(device)


def _run(fn, h, w, b, t, dtype, **kw):
    """loss and the gradients (hidden, weight, bias) of ``fn`` on inputs cast to ``dtype``."""
    leaves = [x.detach().to(dtype, copy=True).requires_grad_() if x is not None else None for x in (h, w, b)]
    loss = fn(*leaves, t, **kw)
    loss.backward()
    return loss, [x.grad if x is not None else None for x in leaves]


def _check(n, hidden, vocab, dtype, chunk_rows, bias=True, tol_factor=None, abs_tol=None, seed=None):
    h, w, b, t = _inputs(n, hidden, vocab, seed if seed is not None else zlib.crc32(repr((n, vocab)).encode()))
    b = b if bias else None
    ref_loss, ref_grads = _run(linear_cross_entropy_reference, h, w, b, t, torch.float64)
    loss, grads = _run(linear_cross_entropy_triton, h, w, b, t, dtype, chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    errs = [_rel(loss, ref_loss)] + [_rel(g, r) for g, r in zip(grads, ref_grads, strict=True) if r is not None]
    for g, x in zip(grads, (h, w, b), strict=True):
        if x is not None:
            assert g.dtype == dtype and g.shape == x.shape and torch.isfinite(g).all()
    if abs_tol is not None:
        assert max(errs) < abs_tol, errs
    if tol_factor is not None:  # the unfused torch path in the same low precision as the yardstick
        t_loss, t_grads = _run(linear_cross_entropy_reference, h, w, b, t, dtype)
        t_errs = [_rel(t_loss, ref_loss)] + [_rel(g, r) for g, r in zip(t_grads, ref_grads, strict=True) if r is not None]
        for e, te in zip(errs, t_errs, strict=True):
            assert e <= tol_factor * te + 1e-6, (errs, t_errs)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fp32_matches_reference_over_several_chunks(bias):
    # n = 37 in chunks of 8 (a partial last chunk), V = 203 (one partial column block), every 5th row ignored
    _check(37, 16, 203, torch.float32, chunk_rows=8, bias=bias, abs_tol=1e-5)


def test_fp16_within_torch_error():
    _check(37, 16, 203, torch.float16, chunk_rows=16, tol_factor=3.0)


def test_kernel_loops_over_column_blocks():
    """The kernel alone with BLOCK 64 < V = 203: loss and in-place gradient vs torch's softmax."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 203, generator=gen) * 4).to(SMALL_DEVICE)
    targets = torch.tensor([0, 202, -100, 64, 63, 100], device=SMALL_DEVICE)
    loss = torch.empty(6, device=SMALL_DEVICE)
    grad = logits.clone()
    _ce_loss_grad(grad, targets, loss, write_grad=True, block=64)
    x = logits.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x, targets, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, x.grad.float(), rtol=1e-5, atol=1e-6)
    assert loss[2] == 0 and not grad[2].any()
    only_loss = logits.clone()
    _ce_loss_grad(only_loss, targets, loss, write_grad=False, block=64)
    assert torch.equal(only_loss, logits)  # no gradient asked: the logits stay as they were


def test_all_rows_ignored_and_empty():
    h, w, b, t = _inputs(9, 16, 203, 1)
    t[:] = -100
    loss, grads = _run(linear_cross_entropy_triton, h, w, b, t, torch.float32, chunk_rows=4)
    assert loss.item() == 0.0 and all(not g.any() for g in grads)
    loss, grads = _run(linear_cross_entropy_triton, h[:0], w, b, t[:0], torch.float32)
    assert loss.item() == 0.0 and grads[0].shape == (0, 16) and not grads[1].any()


def test_no_grad_computes_the_loss_only():
    h, w, b, t = _inputs(11, 16, 203, 2)
    ref = linear_cross_entropy_reference(h, w, b, t)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy_triton(h, w.requires_grad_(), b, t, chunk_rows=4), ref)
    loss, gh, gw, gb = torch.ops.mosaic_embed.linear_cross_entropy(h, w, b, t, torch.float32, False, 4)
    assert gh.numel() == gw.numel() == gb.numel() == 0  # no gradient buffers
    torch.testing.assert_close(loss, ref)


def test_autocast_casts_inside_and_returns_parameter_dtype_grads():
    """fp32 master weights under an fp16 autocast: matmuls in fp16 (as nn.Linear), grads in fp32."""
    h, w, b, t = _inputs(21, 16, 203, 4)
    outs = []
    for fn, kw in ((linear_cross_entropy_reference, {}), (linear_cross_entropy_triton, {"chunk_rows": 8})):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        with torch.autocast(SMALL_DEVICE, dtype=torch.float16):
            loss = fn(*leaves, t, **kw)
        loss.backward()
        assert loss.dtype == torch.float32 and all(x.grad.dtype == torch.float32 for x in leaves)
        outs.append((loss, [x.grad for x in leaves]))
    (ref_loss, ref_grads), (loss, grads) = outs
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=1e-3)
    for g, r in zip(grads, ref_grads, strict=True):
        assert _rel(g, r) < 2e-3


def test_bad_inputs_chunk_size_and_dispatch():
    h, w, b, t = _inputs(5, 16, 203, 5)
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy_triton(h, w, b, t.int())
    with pytest.raises(ValueError, match="share a dtype"):
        linear_cross_entropy_triton(h.half(), w, b, t)
    assert chunk_rows_for(30528, torch.bfloat16) == 4096 and chunk_rows_for(30528, torch.float32) == 2048
    assert dispatch.resolve_impl("mlm_loss", "auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.resolve_impl("mlm_loss", "fused", torch.device("cpu"))
    torch.testing.assert_close(mlm_loss(h, w, b, t, "torch"), linear_cross_entropy_reference(h, w, b, t))
    torch.testing.assert_close(mlm_loss(h, w, b, t, "triton"), linear_cross_entropy_reference(h, w, b, t),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mlm_loss_impl"):
        preset_config("mosaic-bert-tiny", mlm_loss_impl="fused")
    # opt-in: the fused loss measured slower in a whole compiled step, so no attn_impl turns it on
    for attn in ("auto", "triton", "torch"):
        assert preset_config("mosaic-bert-tiny", attn_impl=attn).impl_for("mlm_loss") == "torch"
    assert preset_config("mosaic-bert-tiny", mlm_loss_impl="triton").impl_for("mlm_loss") == "triton"


def _tiny_config(**kw):
    return preset_config("mosaic-bert-tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=128, attn_impl="torch", hidden_dropout_prob=0.0, **kw)



def test_masked_lm_same_loss_and_grads_on_both_paths():
    batch = {k: (v.to(SMALL_DEVICE) if torch.is_tensor(v) else v) for k, v in packed_mlm_batch([9, 14, 6], 0).items()}
    results = []
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = MosaicBertForMaskedLM(_tiny_config(mlm_loss_impl=impl)).to(SMALL_DEVICE).train()
        out = model(**batch)
        assert out.logits is None
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the traced graph on CPU under Triton's interpreter")
def test_masked_lm_with_fused_loss_is_one_graph():
    """The fused loss is one custom op in the traced training forward (no graph break, n unbacked)."""
    model = MosaicBertForMaskedLM(_tiny_config(mlm_loss_impl="triton")).train()
    explained = traced_as_one_graph(model, packed_mlm_batch([7, 12, 5], 0))
    ops = {str(node.target) for g in explained.graphs for node in g.graph.nodes if node.op == "call_function"}
    assert any("linear_cross_entropy" in op for op in ops), ops


@pytest.mark.gpu
def test_gpu_base_size_bf16_accuracy_and_memory():
    """n = 4096 rows, H = 768, V = 30,528 under bf16 autocast with fp32 master weights: the fused path's
    error (vs fp64) within 2x the unfused path's, forward and backward, and a lower peak memory."""
    h, w, b, t = _inputs(4096, 768, 30528, 6, ignore_every=7, device="cuda")
    ref_loss, ref_grads = _run(linear_cross_entropy_reference, h, w, b, t, torch.float64)
    errs, peaks = {}, {}
    for name, fn in (("torch", linear_cross_entropy_reference), ("triton", linear_cross_entropy_triton)):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(*leaves, t)
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        assert all(x.grad.dtype == torch.float32 for x in leaves)
        errs[name] = [_rel(loss, ref_loss)] + [_rel(x.grad, r) for x, r in zip(leaves, ref_grads, strict=True)]
    for e, te in zip(errs["triton"], errs["torch"], strict=True):
        assert e <= 2.0 * te + 1e-5, errs
    assert peaks["triton"] < 0.5 * peaks["torch"], peaks
    assert dispatch.resolve_impl("mlm_loss", "auto", torch.device("cuda")) == "triton"


@pytest.mark.gpu
def test_gpu_compiled_dynamic_matches_eager():
    """The custom op under torch.compile(dynamic=True): the eager op's loss and gradients, several n."""
    def f(h, w, b, t):
        return mlm_loss(h, w, b, t, "triton") / t.numel()

    cf = torch.compile(f, dynamic=True, fullgraph=True)
    for n in (1000, 4097, 33):
        h, w, b, t = _inputs(n, 768, 30528, n, device="cuda")
        grads = []
        for fn in (f, cf):
            leaves = [x.clone().requires_grad_() for x in (h, w, b)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(*leaves, t)
            loss.backward()
            grads.append([loss.detach()] + [x.grad for x in leaves])
        for a, e in zip(*grads, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
