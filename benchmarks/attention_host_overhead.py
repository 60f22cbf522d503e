"""Host (CPU) time to enqueue the attention kernels: where the eager fwd+bwd step's launch overhead goes.

At short lengths the eager step is bound by the host, not the GPU (benchmarks/NOTES_attention.md), so this
times, in microseconds per call (mean over many calls, the GPU left to drain between batches of calls):

- ``jit_launch``:      one forward kernel launch through Triton's JIT dispatcher (``kernel[grid](...)``);
- ``compiled_launch``: the same compiled kernel launched directly (``CompiledKernel[grid](*args)``), i.e.
                       without argument binding, specialization and cache-key work;
- ``flash_fwd``:       our forward launcher (allocations + one launch);
- ``fwd`` / ``step``:  the public function without grad / forward + ``autograd.grad`` (what attention.py times);
- ``flash_bwd``:       our backward launcher alone;
- ``sdpa_step``:       SDPA forward + ``autograd.grad`` on the padded batch, for scale;
- ``python_node_step``: an identity ``autograd.Function`` + ``autograd.grad``: the autograd engine's cost for a
                       Python node (its backward runs on the engine's CUDA device thread: a GIL hand-off);
- ``*_single_thread``: the same under ``torch.autograd.set_multithreading_enabled(False)``.

Usage: python benchmarks/attention_host_overhead.py [--max-len 128] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
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
    grid = (nblk * heads * len(lens),)
    pos = (q, k, v, out, lse, cu, slopes, lse, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
           *out.stride()[:2], total, heads, nblk, scale * faa._LOG2E)
    const = dict(HEAD_DIM=dim, BLOCK_M=c.block_m, BLOCK_N=c.block_n, SKIP=False)

    def jit_launch():
        return faa._fwd_kernel[grid](*pos, **const, num_warps=c.num_warps, num_stages=c.num_stages)

    compiled = jit_launch()
    full = list(pos) + [const[name] for name in faa._fwd_kernel.arg_names[len(pos):]]
    runner = compiled[(grid[0], 1, 1)]

    def compiled_launch():
        runner(*full)

    def flash_fwd():
        faa._flash_fwd(q, k, v, cu, args.max_len, slopes, scale)

    def fwd():
        with torch.no_grad():
            faa.flash_attn_varlen_alibi(q, k, v, cu, args.max_len, slopes)

    def step():
        o = faa.flash_attn_varlen_alibi(*leaves, cu, args.max_len, slopes)
        torch.autograd.grad(o, leaves, do)

    qp, kp, vp, dop = (t.view(len(lens), args.max_len, heads, dim).transpose(1, 2) for t in (q, k, v, do))
    pleaves = [t.clone().requires_grad_() for t in (qp, kp, vp)]
    bias = torch.zeros(len(lens), heads, args.max_len, args.max_len, device=dev, dtype=torch.bfloat16)

    def sdpa_step():
        o = F.scaled_dot_product_attention(*pleaves, attn_mask=bias)
        torch.autograd.grad(o, pleaves, dop)

    with torch.no_grad():
        o_, lse_, _ = faa._flash_fwd(q, k, v, cu, args.max_len, slopes, scale)

    def flash_bwd():
        faa._flash_bwd(do, q, k, v, o_, lse_, None, cu, args.max_len, slopes, scale)

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
             ("flash_bwd", flash_bwd), ("fwd", fwd), ("step", step), ("sdpa_step", sdpa_step),
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
    res = {"device": torch.cuda.get_device_name(), "max_len": args.max_len, "us_per_call": res}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
