"""Fused residual add + LayerNorm (kernels/layernorm.py): kernel vs fp64 reference, forward and backward; the
dispatch's choice; the model with ``layernorm_impl="triton"`` against ``"torch"``.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest) at tiny sizes in fp32 and fp16 (not bf16:
the interpreter's bf16 is not trusted); on a GPU (``-m gpu``) at MosaicBERT-Base sizes in bf16, where the
kernel's error must stay within a small factor of plain torch's bf16 error, and under torch.compile.
"""

import logging
import zlib

import pytest
import torch

from mosaic_embed.kernels import dispatch
from mosaic_embed.kernels.layernorm import MAX_WIDTH, add_layer_norm_reference, add_layer_norm_triton
from mosaic_embed.model import MosaicBertConfig, MosaicBertForMaskedLM, MosaicBertModel, preset_config
from mosaic_embed.model.blocks import MosaicBertLayerNorm

# the small cases run where the kernel can: Triton's interpreter on a CPU machine, the GPU on a CUDA one
SMALL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-12  # MosaicBERT's layer_norm_eps


@pytest.fixture(autouse=True)
def fresh_resolution():
    """resolve_impl caches its answer per process; each test here asks afresh."""
    dispatch._resolved.clear()
    yield
    dispatch._resolved.clear()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(rows, width, dtype, param_dtype, device, res_dtype=None):
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(repr((rows, width, dtype, param_dtype)).encode()))
    x = torch.randn(rows, width, generator=gen) * 0.5
    res = torch.randn(rows, width, generator=gen) * 2 + 0.3  # an offset: the mean matters
    w = 1 + 0.2 * torch.randn(width, generator=gen)
    b = 0.1 * torch.randn(width, generator=gen)
    dy = torch.randn(rows, width, generator=gen)
    dtypes = (dtype, res_dtype or dtype, param_dtype, param_dtype)
    return [t.to(device=device, dtype=d) for t, d in zip((x, res, w, b), dtypes, strict=True)], dy.to(device)


def _grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return out, [t.grad for t in leaves]


def _check(rows, width, dtype, param_dtype, device, tol_factor=None, abs_tol=None):
    tensors, dy = _inputs(rows, width, dtype, param_dtype, device)
    ref, ref_grads = _grads(lambda *t: add_layer_norm_reference(*t, EPS), [t.double() for t in tensors], dy)
    out, grads = _grads(lambda *t: add_layer_norm_triton(*t, EPS), tensors, dy)
    assert out.dtype == dtype and out.shape == (rows, width) and torch.isfinite(out).all()
    for g, t in zip(grads, tensors, strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape and torch.isfinite(g).all()
    errors = [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    if abs_tol is not None:
        assert max(errors) < abs_tol, errors
    if tol_factor is not None:  # plain torch in the low precision (parameters cast to it) as the yardstick
        low = [t.to(dtype) for t in tensors]
        t_out, t_grads = _grads(lambda *t: add_layer_norm_reference(*t, EPS), low, dy)
        yardstick = [_rel(t_out, ref)] + [_rel(g, r) for g, r in zip(t_grads, ref_grads, strict=True)]
        for name, err, base in zip(("y", "dx", "dresidual", "dweight", "dbias"), errors, yardstick, strict=True):
            assert err <= tol_factor * base + 1e-6, (name, err, base)
    return grads


@pytest.mark.parametrize("width", [48, 64])  # 48: BLOCK 64 with masked columns
def test_fp32_matches_reference(width):
    _check(37, width, torch.float32, torch.float32, SMALL_DEVICE, abs_tol=1e-5)


@pytest.mark.parametrize("width", [48, 64])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["fp16-params", "fp32-params"])
def test_fp16_within_torch_error(width, param_dtype):
    """fp16 activations, with parameters in fp16 or fp32 (master weights): gradients in each tensor's dtype."""
    _check(37, width, torch.float16, param_dtype, SMALL_DEVICE, tol_factor=2.0)


def test_dx_and_dresidual_are_one_gradient_and_mixed_dtypes():
    """d_x == d_residual (the add routes d_s to both); with fp16 x and fp32 residual the sum is fp32 (torch's
    promotion), each gradient comes back in its own input's dtype, and out_dtype sets y's."""
    (x, res, w, b), dy = _inputs(9, 48, torch.float16, torch.float32, SMALL_DEVICE, res_dtype=torch.float32)
    out, (dx, dres, dw, db) = _grads(lambda *t: add_layer_norm_triton(*t, EPS), [x, res, w, b], dy)
    assert out.dtype == torch.float32 and dx.dtype == torch.float16 and dres.dtype == torch.float32
    torch.testing.assert_close(dx, dres.half())
    ref, ref_grads = _grads(lambda *t: add_layer_norm_reference(*t, EPS), [x, res, w, b], dy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip((dx, dres, dw, db), ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3)
    assert add_layer_norm_triton(x, res, w, b, EPS, out_dtype=torch.float16).dtype == torch.float16


def test_three_dims_strided_rows_and_empty():
    base = torch.randn(2, 5, 80, device=SMALL_DEVICE)
    x = base[..., :48]  # row stride 80, unit last stride: used as is
    res = torch.randn(2, 5, 48, device=SMALL_DEVICE)
    w, b = torch.randn(48, device=SMALL_DEVICE), torch.randn(48, device=SMALL_DEVICE)
    torch.testing.assert_close(add_layer_norm_triton(x, res, w, b, 1e-5), add_layer_norm_reference(x, res, w, b, 1e-5),
                               rtol=1e-5, atol=1e-5)
    empty = torch.randn(0, 48, device=SMALL_DEVICE, requires_grad=True)
    wl = w.clone().requires_grad_()
    out = add_layer_norm_triton(empty, empty.detach(), wl, b, 1e-5)
    assert out.shape == (0, 48)
    out.sum().backward()
    assert empty.grad.shape == (0, 48) and wl.grad.shape == (48,) and not wl.grad.any()


def test_bad_input():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="share one"):
        add_layer_norm_triton(x, torch.randn(3, 9), torch.ones(8), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="elementwise-affine"):
        add_layer_norm_triton(x, x, torch.ones(8), None, 1e-5)
    wide = torch.randn(1, MAX_WIDTH + 1)
    with pytest.raises(ValueError, match="at most"):
        add_layer_norm_triton(wide, wide, torch.ones(MAX_WIDTH + 1), torch.zeros(MAX_WIDTH + 1), 1e-5)


# ---------------------------------------------------------------------------------------------------------
# dispatch and the module
# ---------------------------------------------------------------------------------------------------------


def _resolve(impl, device, **facts):
    return dispatch.resolve_impl("layernorm", impl, torch.device(device), width=facts.pop("width", 768), **facts)


def test_auto_is_triton_in_eager_on_cuda_and_torch_under_compile(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: True)
    dispatch._announced.clear()
    with caplog.at_level(logging.WARNING, logger="mosaic_embed.kernels.dispatch"):
        assert _resolve("auto", "cuda") == "triton"
        assert _resolve("auto", "cuda", compiling=True) == "torch"
        assert _resolve("auto", "cuda", fusable=False) == "torch"
        assert _resolve("auto", "cuda", width=MAX_WIDTH + 1) == "torch"
        assert _resolve("auto", "cpu") == "torch"
        assert _resolve("triton", "cuda", compiling=True) == "triton"
        assert _resolve("torch", "cuda") == "torch"
    said = " ".join(r.message for r in caplog.records)
    assert "residual add + LayerNorm" in said and "torch.compile" in said


def test_triton_where_it_cannot_match_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="low_precision_layernorm=False under autocast"):
        _resolve("triton", SMALL_DEVICE, fusable=False)
    with pytest.raises(ValueError, match="at most"):
        _resolve("triton", SMALL_DEVICE, width=MAX_WIDTH + 1)
    if SMALL_DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="CUDA"):
            _resolve("triton", "cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        _resolve("fused", "cpu")


def _norm(width, low_precision, seed=0):
    torch.manual_seed(seed)
    norm = MosaicBertLayerNorm(width, EPS, low_precision).to(SMALL_DEVICE)
    with torch.no_grad():
        norm.weight.add_(0.2 * torch.randn_like(norm.weight))
        norm.bias.add_(0.1 * torch.randn_like(norm.bias))
    return norm


def test_add_and_norm_matches_the_module_outside_autocast():
    norm = _norm(48, low_precision=True)
    (x, res, _, _), dy = _inputs(37, 48, torch.float32, torch.float32, SMALL_DEVICE)
    expected, exp_grads = _grads(lambda a, r: norm(r + a), [x, res], dy)
    for impl in ("triton", "torch", "auto"):
        out, grads = _grads(lambda a, r, impl=impl: norm.add_and_norm(a, r, impl), [x, res], dy)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, exp_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_add_and_norm_follows_the_low_precision_rule_under_autocast():
    """Under an fp16 autocast: a low-precision norm gives fp16 from the kernel as from the module (fp32
    parameters, their gradients fp32); ``low_precision=False`` keeps the module's own path (auto) and refuses
    the kernel (triton): autocast's layer_norm rule is not the kernel's to copy."""
    device = SMALL_DEVICE
    (x, res, _, _), dy = _inputs(37, 64, torch.float16, torch.float32, device)
    norm = _norm(64, low_precision=True)
    with torch.autocast(device, dtype=torch.float16):
        expected = norm(res + x)
        out = norm.add_and_norm(x, res, "triton")
        out.backward(dy.half())
    assert out.dtype == expected.dtype == torch.float16
    assert norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=4e-3)
    plain = _norm(64, low_precision=False)
    with torch.autocast(device, dtype=torch.float16):
        expected = plain(res + x)
        torch.testing.assert_close(plain.add_and_norm(x, res, "auto"), expected, rtol=0, atol=0)
        with pytest.raises(ValueError, match="autocast"):
            plain.add_and_norm(x, res, "triton")


def test_config_field_and_what_none_means():
    assert preset_config("mosaic-bert-tiny").impl_for("layernorm") == "auto"
    assert preset_config("mosaic-bert-tiny", attn_impl="torch").impl_for("layernorm") == "torch"
    assert preset_config("mosaic-bert-tiny", attn_impl="triton").impl_for("layernorm") == "auto"
    assert preset_config("mosaic-bert-tiny", attn_impl="torch", layernorm_impl="triton").impl_for("layernorm") == "triton"
    with pytest.raises(ValueError, match="layernorm_impl"):
        MosaicBertConfig(layernorm_impl="fused")


# ---------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------


def _tiny(**kw):
    return preset_config("mosaic-bert-tiny", attn_impl="torch", **kw)


def _packed(seed=0, lens=(5, 9, 3)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (sum(lens),), generator=gen)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu, max(lens)


def _model_run(model, ids, cu, max_seqlen):
    out = model(ids.to(SMALL_DEVICE), cu_seqlens=cu.to(SMALL_DEVICE), max_seqlen=max_seqlen).last_hidden_state
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_model_triton_layernorm_matches_torch():
    """A tiny MosaicBertModel with the kernel in every sublayer: same outputs and gradients as the torch path,
    and the same parameter names (checkpoints load either way)."""
    torch.manual_seed(0)
    ref = MosaicBertModel(_tiny(layernorm_impl="torch")).to(SMALL_DEVICE).eval()
    fused = MosaicBertModel(_tiny(layernorm_impl="triton")).to(SMALL_DEVICE).eval()
    fused.load_state_dict(ref.state_dict(), strict=True)
    batch = _packed()
    out_ref, grads_ref = _model_run(ref, *batch)
    out, grads = _model_run(fused, *batch)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["triton", "auto"])
def test_masked_lm_traces_as_one_graph_with_the_kernel(impl):
    """Under torch.compile the forced kernel is the opaque custom op (no graph break), and "auto" is the torch
    expression; the aot_eager compile of the forced kernel gives eager's loss and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MosaicBertForMaskedLM(_tiny(layernorm_impl=impl)).to(SMALL_DEVICE).train()
    dispatch.warm_dispatch(model, SMALL_DEVICE, torch.float32)
    ids, cu, max_seqlen = _packed(1)
    labels = torch.where(torch.arange(ids.numel()) % 3 == 0, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "labels": labels, "cu_seqlens": cu, "max_seqlen": max_seqlen}
    batch = {k: (v.to(SMALL_DEVICE) if torch.is_tensor(v) else v) for k, v in batch.items()}
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explained = torch._dynamo.explain(model)(**batch)
        assert explained.graph_break_count == 0, explained.break_reasons
        ops = [n for n in explained.graphs[0].graph.nodes if "add_layer_norm_fwd" in str(n.target)]
        assert len(ops) == (4 if impl == "triton" else 0)  # 2 layers x 2 sublayers; auto: Inductor's to fuse
        if impl == "triton":
            model.config.hidden_dropout_prob = 0.0
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            model(**batch).loss.backward()
            eager = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            compiled(**batch).loss.backward()
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-6, msg=n)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------
# GPU: MosaicBERT-Base sizes (one layer of a 256 x 128 batch) in bf16
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32-params", "bf16-params"])
def test_gpu_base_size_bf16(param_dtype):
    _check(32768, 768, torch.bfloat16, param_dtype, "cuda", tol_factor=2.0)
    assert _resolve("auto", "cuda") == "triton"


@pytest.mark.gpu
def test_gpu_base_size_timing_against_torch(capsys):
    """Not a gate: prints the kernel's and eager torch's forward + backward time at Base size."""
    import triton

    (x, res, w, b), dy = _inputs(32768, 768, torch.bfloat16, torch.float32, "cuda")
    leaves = [t.requires_grad_() for t in (x, res, w, b)]

    def step(fn):
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, dy.to(out.dtype))

    def torch_expr(a, r, wt, bs):  # what MosaicBertLayerNorm does in bf16 on the eager sum
        return add_layer_norm_reference(a, r, wt, bs, EPS)

    kernel = triton.testing.do_bench(lambda: step(lambda *t: add_layer_norm_triton(*t, EPS)), return_mode="median")
    eager = triton.testing.do_bench(lambda: step(torch_expr), return_mode="median")
    with capsys.disabled():
        print(f"\nadd + LayerNorm fwd+bwd (32768, 768) bf16: triton {kernel:.3f} ms, torch eager {eager:.3f} ms")


@pytest.mark.gpu
def test_gpu_compiled_dynamic_custom_op():
    """The forced kernel under torch.compile(dynamic=True): the custom op gives eager's values and gradients."""
    norm = MosaicBertLayerNorm(768, EPS, low_precision=True).cuda()

    def f(a, r):
        return norm.add_and_norm(a, r, "triton") * 2.0

    assert _resolve("triton", "cuda", compiling=True) == "triton"  # resolved before tracing (warm_dispatch's job)
    cf = torch.compile(f, dynamic=True, fullgraph=True)
    for n in (257, 1000, 33):
        a = torch.randn(n, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn(n, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(n, 768, device="cuda", dtype=torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = f(a, r)
        ga, gr = torch.autograd.grad(out, (a, r), g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cout = cf(a, r)
        ca, cr = torch.autograd.grad(cout, (a, r), g)
        torch.testing.assert_close(cout, out, rtol=0, atol=0)
        torch.testing.assert_close(ca, ga, rtol=0, atol=0)
        torch.testing.assert_close(cr, gr, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_model_bf16_autocast_triton_matches_torch():
    """mosaic-bert-tiny at hidden 768 under bf16 autocast: the kernel path within bf16 noise of the torch path."""
    torch.manual_seed(0)
    kw = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, attn_impl="triton")
    ref = MosaicBertModel(preset_config("mosaic-bert-tiny", layernorm_impl="torch", **kw)).cuda().eval()
    fused = MosaicBertModel(preset_config("mosaic-bert-tiny", layernorm_impl="triton", **kw)).cuda().eval()
    fused.load_state_dict(ref.state_dict())
    ids, cu, max_seqlen = _packed(2, lens=(100, 128, 77, 3))
    outs = []
    for model in (ref, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(model(ids.cuda(), cu_seqlens=cu.cuda(), max_seqlen=max_seqlen).last_hidden_state.float())
    assert _rel(outs[1], outs[0]) < 2e-2
