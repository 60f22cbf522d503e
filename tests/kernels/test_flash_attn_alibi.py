"""Triton FlashAttention-with-ALiBi kernel vs the fp32 torch reference (forward, dq, dk, dv).

The yardstick (flash-attention's tests): the kernel's error against the fp32 reference must stay
within 2x the error that plain torch in the same low precision makes against it, plus a small atol.
CPU runs use Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) at tiny sizes; the
``gpu`` tests run real sizes. Inputs are fresh random draws in every check (the seed is in the message).
"""

import dataclasses
import math
import random

import pytest
import torch

from mosaic_embed.kernels import flash_attn_alibi as faa

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _slopes(kind, heads):
    if kind == "alibi":  # Press et al. geometric slopes 2^(-8/H * (i+1)) (H a power of two here)
        return torch.tensor([2.0 ** (-8.0 / heads * (i + 1)) for i in range(heads)], dtype=torch.float32)
    if kind == "zero":
        return torch.zeros(heads, dtype=torch.float32)
    if kind == "steep":
        return torch.linspace(0.25, 2.0, heads, dtype=torch.float32)
    raise ValueError(kind)


def _inputs(lens, heads, head_dim, dtype, slopes="alibi", seed=None):
    seed = random.getrandbits(31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    q, k, v, do = (torch.randn(total, heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(4))
    return q, k, v, do, cu.to(DEVICE), _slopes(slopes, heads).to(DEVICE), seed


def _reference_grads(q, k, v, do, cu, slopes, upcast):
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    if upcast:
        qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = faa.attention_reference(qr, kr, vr, cu, slopes, upcast=upcast)
    grads = torch.autograd.grad(out, (qr, kr, vr), do.to(out.dtype))
    return (out, *grads)


def _kernel_grads(q, k, v, do, cu, max_len, slopes):
    qk, kk, vk = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = faa.flash_attn_varlen_alibi(qk, kk, vk, cu, max_len, slopes)
    grads = torch.autograd.grad(out, (qk, kk, vk), do)
    return (out, *grads)


def _check_against_reference(lens, heads, head_dim, dtype, slopes="alibi", factor=2.0):
    q, k, v, do, cu, sl, seed = _inputs(lens, heads, head_dim, dtype, slopes)
    got = _kernel_grads(q, k, v, do, cu, max(lens), sl)
    ref = _reference_grads(q, k, v, do, cu, sl, upcast=True)
    low = _reference_grads(q, k, v, do, cu, sl, upcast=False)
    for name, g, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low, strict=False):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values (seed {seed})"
        err = (g.float() - r).abs().max().item()
        if dtype == torch.float32:
            # same precision as the reference: only summation order differs (tf32 products on GPU)
            bound = (1e-4 if DEVICE.type == "cpu" else 1e-2) * (1.0 + r.abs().max().item())
        else:
            bound = factor * (lo.float() - r).abs().max().item() + 1e-3 * (1.0 + r.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (lens {lens[:8]}..., seed {seed})"


# ----------------------------------------------------------------------------- small (CPU interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens", [[1, 7, 16, 33], [30, 1, 7], [40, 3, 17]], ids=["tiled", "short", "fwd-skip"])
def test_matches_fp32_reference_small(dtype, lens):
    # lengths 1 and non-multiples of the interpreter's 16-wide tiles; steep slopes so that far tiles are
    # skipped; max length 30 runs the fused short-sequence backward, 33 the tiled one with the Kmax the
    # forward computed on the way, 40 also skips in the forward (after its own Kmax pass)
    _check_against_reference(lens, heads=2, head_dim=32, dtype=dtype, slopes="steep")


def _backward_modes(base):
    return {
        "short": dataclasses.replace(base, short_bwd_max=1 << 30),
        "tiled": dataclasses.replace(base, short_bwd_max=0),
    }


@pytest.mark.parametrize("lens", [[5, 16, 20], [5, 40, 20]], ids=["fwd-no-skip", "fwd-skip"])
def test_every_output_element_written_and_backward_paths_agree(lens):
    """Poisoned (NaN) outputs must be overwritten everywhere; the fused and tiled backward agree, and the
    tiled one gives the same gradients with the forward's aux scratch as with its own."""
    q, k, v, do, cu, sl, seed = _inputs(lens, 2, 32, torch.float16, slopes="steep")
    scale = 1 / math.sqrt(32)
    total, heads, dim = q.shape
    nan = float("nan")
    out = torch.full_like(q, nan)
    lse = torch.full((heads, total), nan, device=DEVICE)
    base = faa.select_config(dim, max(lens), DEVICE)
    _, _, aux = faa._flash_fwd(q, k, v, cu, max(lens), sl, scale, out=out, lse=lse, config=base, for_backward=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), f"unwritten forward output (seed {seed})"
    grads = {}
    for mode, cfg in {**_backward_modes(base), "tiled+aux": _backward_modes(base)["tiled"]}.items():
        dq, dk, dv = (torch.full_like(q, nan) for _ in range(3))
        faa._flash_bwd(do, q, k, v, out, lse, None, cu, max(lens), sl, scale, dq=dq, dk=dk, dv=dv, config=cfg,
                       aux=aux.clone() if mode == "tiled+aux" else None)
        for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
            assert torch.isfinite(g).all(), f"unwritten {name} ({mode} backward, seed {seed})"
        grads[mode] = (dq, dk, dv)
    for mode in ("tiled", "tiled+aux"):
        for a, b in zip(grads["short"], grads[mode], strict=True):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=f"{mode} vs short backward (seed {seed})")


@pytest.mark.parametrize("lens", [[3, 18], [3, 40]], ids=["short-bwd", "tiled-bwd"])
def test_lse_and_its_gradient(lens):
    q, k, v, do, cu, sl, seed = _inputs(lens, 2, 32, torch.float32)
    dlse = torch.randn(2, sum(lens), device=DEVICE)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = faa.flash_attn_varlen_alibi(*leaves, cu, max(lens), sl, return_lse=True)
    assert lse.shape == (2, sum(lens)) and lse.dtype == torch.float32
    got = torch.autograd.grad((out * do).sum() + (lse * dlse).sum(), leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = faa.attention_reference(*ref_leaves, cu, sl, return_lse=True)
    want = torch.autograd.grad((ref_out * do).sum() + (ref_lse * dlse).sum(), ref_leaves)
    tol = 1e-4 if DEVICE.type == "cpu" else 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol, msg=f"lse (seed {seed})")
    for g, w in zip(got, want, strict=False):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=f"grad through lse (seed {seed})")


def test_strided_inputs_from_fused_projection():
    """q, k, v as views of one (T, 3, H, D) tensor (token stride 3*H*D) give the same result."""
    lens = [9, 17]
    qkv = torch.randn(sum(lens), 3, 2, 32, device=DEVICE, dtype=torch.float16)
    cu = torch.tensor([0, 9, 26], dtype=torch.int32, device=DEVICE)
    sl = _slopes("alibi", 2).to(DEVICE)
    got = faa.flash_attn_varlen_alibi(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, 17, sl)
    want = faa.flash_attn_varlen_alibi(*(qkv[:, i].contiguous() for i in range(3)), cu, 17, sl)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_compiles_without_graph_break_cpu():
    """Dynamo traces the custom op (fake impl + autograd registration) with fullgraph=True."""
    lens = [4, 11]
    q, k, v, do, cu, sl, _ = _inputs(lens, 2, 32, torch.float32)

    def f(q, k, v):
        return faa.flash_attn_varlen_alibi(q * 1.0, k, v, cu, 11, sl).sum(dim=-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = compiled(*leaves)
    out.sum().backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = f(*ref_leaves)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(leaves, ref_leaves, strict=False):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(cu=a["cu"].long()), "cu_seqlens"),
        (lambda a: a.update(sl=a["sl"].half()), "alibi_slopes"),
        (lambda a: a.update(sl=a["sl"][:1]), "alibi_slopes"),
        (lambda a: a.update(k=a["k"][:, :, :16]), "shapes differ"),
        (lambda a: a.update(q=a["q"][:, :, :24], k=a["k"][:, :, :24], v=a["v"][:, :, :24]), "head_dim"),
        (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), "dtype"),
        (lambda a: a.update(q=a["q"][0]), "total_tokens, heads, head_dim"),
    ],
)
def test_bad_input_raises(change, message):
    q, k, v, _, cu, sl, _ = _inputs([3, 4], 2, 32, torch.float16)
    args = dict(q=q, k=k, v=v, cu=cu, sl=sl)
    change(args)
    with pytest.raises(ValueError, match=message):
        faa.flash_attn_varlen_alibi(args["q"], args["k"], args["v"], args["cu"], 4, args["sl"])


# ----------------------------------------------------------------------------- real sizes (GPU)


def _random_lens(rng, count, low, high):
    return [rng.randint(low, high) for _ in range(count)]


_rng = random.Random(1234)  # the length mixes are fixed for reproducible test ids; the data is fresh
GPU_CASES = [
    # (lengths, head_dim, slopes)
    ([1], 64, "alibi"),
    ([1, 1, 2, 3, 1], 32, "alibi"),
    ([127, 128, 129, 1, 64, 65], 64, "alibi"),
    (_random_lens(_rng, 40, 1, 128), 32, "steep"),
    (_random_lens(_rng, 40, 64, 128), 128, "alibi"),
    (_random_lens(_rng, 24, 1, 256), 64, "zero"),
    (_random_lens(_rng, 16, 200, 512), 128, "alibi"),
    (_random_lens(_rng, 10, 300, 1000), 32, "alibi"),
    ([1023, 1, 1000, 777], 64, "steep"),
    (_random_lens(_rng, 6, 1024, 2048), 64, "alibi"),
    ([2047, 13, 1500], 128, "zero"),
    ([4096, 3001, 1], 64, "alibi"),
    ([8192, 5], 64, "alibi"),
    ([8191, 4097], 128, "steep"),
    ([8192], 32, "zero"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_matches_fp32_reference_gpu(case, dtype):
    lens, head_dim, slopes = GPU_CASES[case]
    _check_against_reference(lens, heads=4, head_dim=head_dim, dtype=dtype, slopes=slopes)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("mode", ["short", "tiled"])
def test_every_output_element_written_gpu(head_dim, mode):
    lens = [1, 100, 128, 64, 7] if mode == "short" else [1, 129, 300, 64, 1000]
    q, k, v, do, cu, sl, seed = _inputs(lens, 4, head_dim, torch.bfloat16)
    total, heads, _ = q.shape
    cfg = _backward_modes(faa.select_config(head_dim, max(lens), DEVICE))[mode]
    out = torch.full_like(q, float("nan"))
    lse = torch.full((heads, total), float("nan"), device=DEVICE)
    _, _, aux = faa._flash_fwd(q, k, v, cu, max(lens), sl, 0.125, out=out, lse=lse, config=cfg, for_backward=True)
    dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
    faa._flash_bwd(do, q, k, v, out, lse, None, cu, max(lens), sl, 0.125, dq=dq, dk=dk, dv=dv, config=cfg, aux=aux)
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"unwritten {name} ({mode} backward, seed {seed})"


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu():
    lens = [100, 37, 128]
    q, k, v, do, cu, sl, _ = _inputs(lens, 4, 64, torch.bfloat16)

    def f(q, k, v):
        return faa.flash_attn_varlen_alibi(q * 2.0, k, v, cu, 128, sl).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled(*leaves).backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    f(*ref_leaves).backward()
    for a, b in zip(leaves, ref_leaves, strict=False):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("lens", [[34, 7, 20], [40, 7, 35]], ids=["fwd-no-skip", "fwd-skip"])
def test_second_backward_over_the_same_graph_gives_the_same_gradients(lens):
    """The forward hands its aux scratch (Kmax, the slack's zeros) to the backward: a second backward through the
    same graph (retain_graph) reuses it and must give identical gradients (lengths > the interpreter's 32-token
    fused backward: the tiled path)."""
    q, k, v, do, cu, sl, seed = _inputs(lens, 2, 32, torch.float16, slopes="steep")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = faa.flash_attn_varlen_alibi(*leaves, cu, max(lens), sl)
    first = torch.autograd.grad(out, leaves, do, retain_graph=True)
    second = torch.autograd.grad(out, leaves, do)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), f"second backward differs (seed {seed})"
    _check_against_reference(lens, heads=2, head_dim=32, dtype=torch.float16, slopes="steep")


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: records direct launches."""

    function = object()

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args: self.launches.append((grid, args))


class _FakeKernel:
    """Stands in for a @triton.jit kernel: records dispatcher launches, returns one compiled kernel per call."""

    def __init__(self):
        self.dispatched = []
        self.compiled = []

    def __getitem__(self, grid):
        def run(*args, num_warps, num_stages):
            self.dispatched.append((grid, args, num_warps, num_stages))
            self.compiled.append(_FakeCompiled())
            return self.compiled[-1]
        return run


def test_launcher_dispatches_once_per_key_then_launches_directly():
    kernel = _FakeKernel()
    launch = faa._Launcher(kernel)
    launch((3, 1, 1), ("layout", 1), (1, 2, "c"), 4, 2)  # first call of a key: Triton's dispatcher
    launch((5, 1, 1), ("layout", 1), (7, 8, "c"), 4, 2)  # same key: the compiled kernel, new grid and args
    launch((6, 1, 1), ("layout", 2), (9, 9, "c"), 8, 3)  # another key: the dispatcher again
    launch((2, 1, 1), None, (0, 0, "c"), 4, 2)  # no key (misaligned, interpreter, switched off): always dispatched
    launch((2, 1, 1), None, (0, 0, "c"), 4, 2)
    assert [d[0] for d in kernel.dispatched] == [(3, 1, 1), (6, 1, 1), (2, 1, 1), (2, 1, 1)]
    assert kernel.dispatched[1][2:] == (8, 3)
    assert kernel.compiled[0].launches == [((5, 1, 1), (7, 8, "c"))]
    assert all(not c.launches for c in kernel.compiled[1:])


def test_launch_key_only_for_aligned_cuda_tensors(monkeypatch):
    q, k, v, _, cu, sl, _ = _inputs([3, 4], 2, 32, torch.float16)
    strides, key = faa._qkv_layout(q, k, v, cu, sl)
    assert strides == (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2])
    if DEVICE.type != "cuda":
        assert key is None  # the interpreter: always Triton's own launch path
        return
    assert key == (torch.cuda.current_device(), q.dtype, 2, 32, strides)
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)[1:].view_as(q)  # 2-byte offset
    assert faa._qkv_layout(shifted, k, v, cu, sl)[1] is None
    assert faa._qkv_layout(q, k, v, cu, sl, None)[1] == key  # None tensors (no dlse) are skipped
    monkeypatch.setattr(faa, "_DIRECT_LAUNCH", False)
    assert faa._qkv_layout(q, k, v, cu, sl)[1] is None


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[100, 128, 7], [1, 300, 129, 1000], [2000, 1500, 3]], ids=["short", "tiled", "skip"])
def test_direct_launch_matches_dispatcher_gpu(lens, monkeypatch):
    """The same step through Triton's dispatcher and through the direct path gives identical bits; inputs that
    are not 16-byte aligned take the dispatcher and stay correct."""
    q, k, v, do, cu, sl, seed = _inputs(lens, 4, 64, torch.bfloat16, slopes="steep")
    direct = _kernel_grads(q, k, v, do, cu, max(lens), sl)
    direct_again = _kernel_grads(q, k, v, do, cu, max(lens), sl)  # now every launch is a cache hit
    monkeypatch.setattr(faa, "_DIRECT_LAUNCH", False)
    dispatched = _kernel_grads(q, k, v, do, cu, max(lens), sl)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), direct, direct_again, dispatched, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), f"{name}: direct vs dispatched launch differ (seed {seed})"
    monkeypatch.setattr(faa, "_DIRECT_LAUNCH", True)
    shifted = [torch.empty(x.numel() + 1, dtype=x.dtype, device=DEVICE)[1:].view_as(x).copy_(x) for x in (q, k, v)]
    assert faa._qkv_layout(*shifted)[1] is None
    got = _kernel_grads(*shifted, do, cu, max(lens), sl)
    for name, a, c in zip(("out", "dq", "dk", "dv"), got, dispatched, strict=True):
        torch.testing.assert_close(a, c, atol=0, rtol=0, msg=f"{name}: misaligned inputs (seed {seed})")
