"""Fused GeGLU kernel (kernels/geglu.py): kernel vs fp32 reference, forward and backward.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest) at tiny sizes in fp32 and fp16; on a
GPU (``-m gpu``) at MosaicBERT-Base sizes in bf16, where the kernel's error must stay within a small
factor of plain torch's bf16 error, and under torch.compile with dynamic shapes (the custom op path).
"""

import zlib

import pytest
import torch

from mosaic_embed.kernels import dispatch
from mosaic_embed.kernels.dispatch import geglu
from mosaic_embed.kernels.geglu import geglu_reference, geglu_triton


def resolve_geglu_impl(impl, device):
    return dispatch.resolve_impl("geglu", impl, device)

# the small cases run where the kernel can: Triton's interpreter on a CPU machine, the GPU on a CUDA one
SMALL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check(shape, dtype, device, tol_factor=None, abs_tol=None):
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    inner32 = (torch.randn(shape, generator=gen) * 2).to(device)
    dout32 = torch.randn((*shape[:-1], shape[-1] // 2), generator=gen).to(device)
    ref_in = inner32.double().requires_grad_()
    ref = geglu_reference(ref_in)
    ref.backward(dout32.double())
    k_in = inner32.to(dtype).requires_grad_()
    out = geglu_triton(k_in)
    out.backward(dout32.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    assert k_in.grad.dtype == dtype and k_in.grad.shape == k_in.shape
    assert torch.isfinite(out).all() and torch.isfinite(k_in.grad).all()
    err_f, err_b = _rel(out, ref), _rel(k_in.grad, ref_in.grad)
    if abs_tol is not None:
        assert err_f < abs_tol and err_b < abs_tol, (err_f, err_b)
    if tol_factor is not None:  # plain torch in the same low precision as the yardstick
        t_in = inner32.to(dtype).requires_grad_()
        t_out = geglu_reference(t_in)
        t_out.backward(dout32.to(dtype))
        assert err_f <= tol_factor * _rel(t_out, ref) + 1e-6, (err_f, _rel(t_out, ref))
        assert err_b <= tol_factor * _rel(t_in.grad, ref_in.grad) + 1e-6, (err_b, _rel(t_in.grad, ref_in.grad))


@pytest.mark.parametrize("shape", [(5, 16), (3, 4, 2 * 1030), (9, 2)])
def test_geglu_fp32_matches_reference(shape):
    # 1030 > BLOCK (1024): a partial last column tile; (9, 2): I = 1
    _check(shape, torch.float32, SMALL_DEVICE, abs_tol=1e-5)


def test_geglu_fp16_within_torch_error():
    _check((7, 2 * 48), torch.float16, SMALL_DEVICE, tol_factor=3.0)


def test_geglu_strided_rows_and_empty():
    base = torch.randn(6, 40, device=SMALL_DEVICE)
    inner = base[:, :32]  # row stride 40, unit last stride: used as is
    torch.testing.assert_close(geglu_triton(inner), geglu_reference(inner), rtol=1e-5, atol=1e-6)
    empty = torch.randn(0, 8, device=SMALL_DEVICE, requires_grad=True)
    out = geglu_triton(empty)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert empty.grad.shape == (0, 8)


def test_geglu_bad_input_and_dispatch():
    with pytest.raises(ValueError, match="even last dim"):
        geglu_triton(torch.randn(3, 5))
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_geglu_impl("cuda", torch.device("cpu"))
    assert resolve_geglu_impl("auto", torch.device("cpu")) == "torch"
    x = torch.randn(4, 10)
    torch.testing.assert_close(geglu(x), geglu_reference(x))
    x = x.to(SMALL_DEVICE)
    torch.testing.assert_close(geglu(x, impl="triton"), geglu_reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_geglu_gpu_base_size(dtype):
    _check((3001, 2 * 3072), dtype, "cuda", tol_factor=2.0)
    assert resolve_geglu_impl("auto", torch.device("cuda")) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("traced", [False, True], ids=["opaque-custom-op", "triton-op"])
def test_geglu_gpu_compiled_dynamic(traced, monkeypatch):
    """Both compiled forms under torch.compile(dynamic=True): same values and gradients as eager, several
    lengths. The triton_op (what warm_dispatch registers) and the opaque custom op (a compile without it)."""
    from mosaic_embed.kernels import geglu as geglu_module

    if traced:
        geglu_module.register_traced_ops()
    else:
        monkeypatch.setattr(geglu_module, "_traced_fwd", None)
    torch._dynamo.reset()

    def f(x):
        return geglu(x) * 2.0

    cf = torch.compile(f, dynamic=True, fullgraph=True)
    for n in (257, 1000, 33):
        x = torch.randn(n, 2 * 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn(n, 3072, device="cuda", dtype=torch.bfloat16)
        f(x).backward(g)
        out = cf(x2)
        out.backward(g)
        torch.testing.assert_close(out, f(x.detach()), rtol=0, atol=0)
        torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=0)


def test_warm_dispatch_registers_the_traced_op_for_the_kernel_path():
    """Compiling through warm_dispatch gets the triton_op; a process that never compiles never registers it
    (registering imports torch._dynamo: tests/encode/test_st.py checks an embedding process stays without it)."""
    from mosaic_embed.kernels import geglu as geglu_module
    from mosaic_embed.model import MosaicBertModel, preset_config

    cfg = preset_config("mosaic-bert-tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, vocab_size=128, attn_impl="torch", geglu_impl="triton")
    dispatch.warm_dispatch(MosaicBertModel(cfg), SMALL_DEVICE, torch.float32)
    assert geglu_module._traced_fwd is not None
    assert hasattr(torch.ops.mosaic_embed, "geglu_fwd_traced") and hasattr(torch.ops.mosaic_embed, "geglu_fwd")
