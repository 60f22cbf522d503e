"""Host (CPU) time to enqueue the attention kernels: where the eager fwd+bwd step's launch overhead goes.

At short lengths the eager step is bound by the host, not the GPU (benchmarks/NOTES_attention.md), so this
times, in microseconds per call (best batch mean over many calls, the GPU left to drain between batches):

- ``jit_launch``:      one forward kernel launch through Triton's JIT dispatcher (``kernel[grid](...)``);
- ``compiled_launch``: the same compiled kernel launched directly (``CompiledKernel[grid](*args)``), what
                       ``flash_attn_alibi._Launcher`` does after a key's first call;
- ``flash_fwd`` / ``flash_bwd``: our forward launcher (as for training: it prepares the backward's scratch) /
                       backward launcher, called directly;
- ``fwd`` / ``step``:  the public function without grad / forward + ``autograd.grad`` (what attention.py times);
- ``step_dispatcher``: the same step with direct launches off (``MOSAIC_TRITON_DIRECT_LAUNCH=0``);
- ``sdpa_step``:       SDPA forward + ``autograd.grad`` on the padded batch, for scale;
- ``python_node_step``: an identity ``autograd.Function`` + ``autograd.grad``: the autograd engine's cost for a
                       Python node (its backward runs on the engine's CUDA device thread: a GIL hand-off);
- ``*_single_thread``: the same under ``torch.autograd.set_multithreading_enabled(False)``;
- ``device_thread``:   per-call cost of single host ops when run inside a backward (autograd's device thread)
                       vs on the calling thread: the first op of a backward pays for the hand-off, and torch
                       ops stay dearer there, Triton launches do not.

Usage: python benchmarks/attention_host_overhead.py [--max-len 128] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mosaic_embed.kernels import flash_attn_alibi as faa


def per_call_us(fn, calls=200, batches=10):
    """Mean host microseconds per ``fn()`` over ``batches`` x ``calls`` calls (synchronised between batches)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        best = min(best, (t1 - t0) / calls * 1e6)
    return best


def device_thread_costs(cases, steps=300):
    """{name: {"main": us, "backward_first": us, "backward_amortized": us}} for each ``cases[name]()`` run on the
    calling thread, and inside a backward (once per backward, and the mean of 20 calls per backward)."""
    dev = torch.device("cuda")

    class InBackward(torch.autograd.Function):
        fn, calls, spent = None, 1, []

        @staticmethod
        def forward(ctx, a):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, g):
            t0 = time.perf_counter()
            for _ in range(InBackward.calls):
                InBackward.fn()
            InBackward.spent.append((time.perf_counter() - t0) / InBackward.calls * 1e6)
            return g

    leaf = torch.zeros(16, device=dev, requires_grad=True)
    grad = torch.ones(16, device=dev)

    def in_backward(fn, calls):
        InBackward.fn, InBackward.calls = fn, calls
        for i in range(20 + steps):
            if i == 20:
                torch.cuda.synchronize()
                InBackward.spent = []
            torch.autograd.grad(InBackward.apply(leaf), leaf, grad)
            if i % 50 == 49:
                torch.cuda.synchronize()
        return statistics.median(InBackward.spent)

    return {name: {"main": per_call_us(fn), "backward_first": in_backward(fn, 1),
                   "backward_amortized": in_backward(fn, 20)} for name, fn in cases.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--seqs", type=int, default=8, help="small batch: the GPU must not be the bottleneck")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cprofile", action="store_true", help="also print a cProfile of 500 fwd+bwd steps")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    heads, dim = 12, 64
    lens = [args.max_len] * args.seqs
    total = sum(lens)
    cu = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
    q, k, v, do = (torch.randn(total, heads, dim, device=dev, dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    slopes = torch.rand(heads, device=dev)
    scale = dim ** -0.5
    cfg = faa.select_config(dim, args.max_len, dev)
    c = cfg.fwd
    out = torch.empty_like(q)
    lse = torch.empty((heads, total), device=dev, dtype=torch.float32)
    nblk = -(-args.max_len // c.block_m)
    grid = (nblk * heads * len(lens), 1, 1)
    fwd_args = (q, k, v, out, lse, lse, cu, slopes, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
                heads * dim, dim, total, heads, nblk, scale * faa._LOG2E, dim, c.block_m, c.block_n, False, False)

    def jit_launch():
        return faa._fwd_kernel[grid](*fwd_args, num_warps=c.num_warps, num_stages=c.num_stages)

    compiled = jit_launch()

    def compiled_launch():
        compiled[grid](*fwd_args)

    def flash_fwd():
        faa._flash_fwd(q, k, v, cu, args.max_len, slopes, scale, for_backward=True)

    def fwd():
        with torch.no_grad():
            faa.flash_attn_varlen_alibi(q, k, v, cu, args.max_len, slopes)

    def step():
        o = faa.flash_attn_varlen_alibi(*leaves, cu, args.max_len, slopes)
        torch.autograd.grad(o, leaves, do)

    def step_dispatcher():
        faa._DIRECT_LAUNCH = False
        try:
            step()
        finally:
            faa._DIRECT_LAUNCH = True

    qp, kp, vp, dop = (t.view(len(lens), args.max_len, heads, dim).transpose(1, 2) for t in (q, k, v, do))
    pleaves = [t.clone().requires_grad_() for t in (qp, kp, vp)]
    bias = torch.zeros(len(lens), heads, args.max_len, args.max_len, device=dev, dtype=torch.bfloat16)

    def sdpa_step():
        o = F.scaled_dot_product_attention(*pleaves, attn_mask=bias)
        torch.autograd.grad(o, pleaves, dop)

    with torch.no_grad():
        o_, lse_, aux_ = faa._flash_fwd(q, k, v, cu, args.max_len, slopes, scale, for_backward=True)

    def flash_bwd():
        faa._flash_bwd(do, q, k, v, o_, lse_, None, cu, args.max_len, slopes, scale, aux=aux_)

    class Identity(torch.autograd.Function):
        """The cheapest Python autograd node: what the engine alone costs per fwd+bwd."""

        @staticmethod
        def forward(ctx, a, b, c):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, g):
            return g, g, g

    def python_node_step():
        o = Identity.apply(*leaves)
        torch.autograd.grad(o, leaves, do)

    def single_threaded(fn):  # backward on the calling thread instead of the engine's device thread
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return run

    cases = [("jit_launch", jit_launch), ("compiled_launch", compiled_launch), ("flash_fwd", flash_fwd),
             ("flash_bwd", flash_bwd), ("fwd", fwd), ("step", step), ("step_dispatcher", step_dispatcher),
             ("sdpa_step", sdpa_step),
             ("python_node_step", python_node_step), ("step_single_thread", single_threaded(step)),
             ("sdpa_step_single_thread", single_threaded(sdpa_step)),
             ("python_node_step_single_thread", single_threaded(python_node_step))]
    res = {name: per_call_us(fn) for name, fn in cases}
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            step()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    small = torch.zeros(64, device=dev)
    threads = device_thread_costs({
        "noop": lambda: None, "empty_like": lambda: torch.empty_like(q),
        "zeros_small": lambda: torch.zeros(24, device=dev),
        "slice_view": lambda: small[24:], "add_small": lambda: small.add(1.0), "jit_launch": jit_launch,
        "compiled_launch": compiled_launch, "flash_bwd": flash_bwd,
    })
    res = {"device": torch.cuda.get_device_name(), "max_len": args.max_len, "us_per_call": res,
           "device_thread_us": threads}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
