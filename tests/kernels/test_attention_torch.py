"""The torch attention path vs an independent eager softmax(QK^T + ALiBi) reference; slopes; dispatch."""

import logging
import math

import pytest
import torch

from mosaic_embed.kernels import dispatch
from mosaic_embed.kernels.attention import alibi_bias, alibi_slopes
from mosaic_embed.kernels.dispatch import varlen_attention as varlen_alibi_attention


def resolve_attn_impl(impl, device, dtype, dropout_p, head_dim=None):
    return dispatch.resolve_impl("attention", impl, device, dtype, dropout_p, head_dim)


def eager_reference(q, k, v, seqlens, slopes, scale):
    """Loop over sequences and heads: softmax(scale * q k^T - slope |i - j|) v, nothing shared with the code."""
    outs, start = [], 0
    for n in seqlens:
        qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]  # (n, H, D)
        heads = []
        for h in range(q.shape[1]):
            scores = qs[:, h] @ ks[:, h].T * scale  # (n, n)
            i = torch.arange(n, dtype=q.dtype)
            if slopes is not None:
                scores = scores - float(slopes[h]) * (i[:, None] - i[None, :]).abs()
            heads.append(torch.softmax(scores, dim=-1) @ vs[:, h])  # (n, D)
        outs.append(torch.stack(heads, dim=1))
        start += n
    return torch.cat(outs)


def make(seqlens, heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(seqlens)
    q, k, v = (torch.randn(total, heads, dim, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize(
    "seqlens,heads,dim,use_alibi",
    [([5, 1, 9, 3], 4, 8, True), ([17], 3, 16, True), ([2, 33, 7], 6, 4, True), ([4, 6], 2, 8, False)],
)
def test_torch_path_matches_eager_reference_forward_and_backward(seqlens, heads, dim, use_alibi):
    q, k, v, cu = make(seqlens, heads, dim, torch.float64)
    slopes = alibi_slopes(heads) if use_alibi else None
    out = varlen_alibi_attention(q, k, v, cu, max(seqlens), slopes, impl="torch")
    assert out.shape == q.shape
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref = eager_reference(q, k, v, seqlens, slopes, 1 / math.sqrt(dim))
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_torch_path_fp32_and_custom_scale():
    seqlens = [7, 3, 12]
    q, k, v, cu = make(seqlens, 4, 8, torch.float32, seed=1)
    slopes = alibi_slopes(4)
    out = varlen_alibi_attention(q, k, v, cu, 12, slopes, impl="torch", softmax_scale=0.3)
    ref = eager_reference(q.double(), k.double(), v.double(), seqlens, slopes, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_max_seqlen_larger_than_needed_changes_nothing():
    seqlens = [4, 2]
    q, k, v, cu = make(seqlens, 2, 4, torch.float64)
    a = varlen_alibi_attention(q, k, v, cu, 4, alibi_slopes(2), impl="torch")
    b = varlen_alibi_attention(q, k, v, cu, 10, alibi_slopes(2), impl="torch")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_attention_dropout_only_in_torch_path_and_only_when_asked():
    q, k, v, cu = make([6, 4], 2, 4, torch.float32)
    base = varlen_alibi_attention(q, k, v, cu, 6, alibi_slopes(2), impl="torch", dropout_p=0.0)
    torch.manual_seed(0)
    dropped = varlen_alibi_attention(q, k, v, cu, 6, alibi_slopes(2), impl="torch", dropout_p=0.5)
    assert not torch.allclose(base, dropped)
    with pytest.raises(ValueError, match="dropout"):
        resolve_attn_impl("triton", torch.device("cuda"), torch.bfloat16, 0.1)


def test_alibi_slopes_power_of_two_and_not():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0 ** -(2 * i) for i in range(1, 5)]))
    # 12 heads (Press et al.): the 8-head slopes, then every other slope of 16 heads: 2^-0.5, 2^-1.5, ...
    expected = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected))
    assert torch.allclose(alibi_slopes(6), torch.tensor([0.25, 0.0625, 2 ** -6, 2 ** -8, 0.5, 0.125]))
    assert alibi_slopes(12).dtype == torch.float32


def test_alibi_bias_by_hand():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), 3)
    assert bias.shape == (2, 3, 3)
    assert bias[0].tolist() == [[0.0, -0.5, -1.0], [-0.5, 0.0, -0.5], [-1.0, -0.5, 0.0]]
    assert bias[1, 0, 2].item() == -0.5
    assert alibi_bias(torch.tensor([1.0]), 2, 4).shape == (1, 2, 4)


@pytest.fixture(autouse=True)
def fresh_resolution():
    """resolve_impl caches its answer per process; each test here asks afresh."""
    dispatch._resolved.clear()
    yield
    dispatch._resolved.clear()


def test_auto_resolves_to_torch_on_cpu_and_says_so_once(caplog):
    dispatch._announced.clear()
    with caplog.at_level(logging.WARNING, logger="mosaic_embed.kernels.dispatch"):
        for _ in range(3):
            assert resolve_attn_impl("auto", torch.device("cpu"), torch.float32, 0.0) == "torch"
    assert sum("TORCH path" in r.message for r in caplog.records) == 1


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_attn_impl("triton", torch.device("cpu"), torch.bfloat16, 0.0)
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        resolve_attn_impl("triton", torch.device("cuda"), torch.bfloat16, 0.0)
    assert resolve_attn_impl("auto", torch.device("cuda"), torch.bfloat16, 0.0) == "torch"
    with pytest.raises(ValueError, match="impl"):
        resolve_attn_impl("flash", torch.device("cpu"), torch.float32, 0.0)


def test_bad_inputs_are_rejected():
    q, k, v, cu = make([3, 2], 2, 4, torch.float32)
    with pytest.raises(ValueError, match="int32"):
        varlen_alibi_attention(q, k, v, cu.long(), 3, alibi_slopes(2))
    with pytest.raises(ValueError, match="alibi_slopes"):
        varlen_alibi_attention(q, k, v, cu, 3, alibi_slopes(3))
    with pytest.raises(ValueError, match="shape"):
        varlen_alibi_attention(q, k[:4], v, cu, 3, alibi_slopes(2))
