"""Measure tile shapes / num_warps / num_stages of the varlen ALiBi attention kernels (GPU only).

For each head dim and max-length bucket it times every candidate of the forward kernel, of the
dK/dV kernel (with the dQ kernel fixed) and of the dQ kernel (with the best dK/dV), on a batch drawn like
the benchmark's (lengths uniform in [L/2, L], about 25k tokens, 12 heads), and prints/writes the winners
as a table for ``flash_attn_alibi._TUNED``. (An fp32-atomic dQ inside the dK/dV kernel lost to the separate
dQ kernel in every bucket and was removed; see benchmarks/NOTES_attention.md.)

Candidates are compiled first in parallel worker processes (Triton's on-disk cache then serves the
timing process), because compiling ~100 kernels one after another would take minutes of GPU lease.

Usage: python benchmarks/tune_attention.py [--head-dims 32 64 128] [--lengths 128 512 2048 8192]
       [--out tuned.json] [--workers 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from mosaic_embed.kernels import flash_attn_alibi as faa

HEADS = 12

FWD = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
       (128, 64, 4, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 4)]
DKDV = [(16, 64, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3),
        (64, 128, 8, 2), (16, 128, 4, 4), (32, 64, 4, 4), (64, 64, 4, 2)]
DQ = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 2),
      (128, 64, 4, 3), (64, 32, 4, 4)]


def install_table(table: dict) -> None:
    """Load a table written by this script into ``flash_attn_alibi._TUNED`` (keys 'head_dim,bucket')."""
    for key, entry in table.items():
        d, b = (int(x) for x in key.split(","))
        faa._TUNED[(d, b)] = faa.AttentionConfig(
            fwd=faa.KernelConfig(*entry["fwd"]), dkdv=faa.KernelConfig(*entry["dkdv"]),
            dq=faa.KernelConfig(*entry["dq"]),
            short_bwd_max=entry["short_bwd_max"], short_bwd_warps=entry["short_bwd_warps"],
        )
    faa.reset_config_cache()


def _config(d, fwd=None, dkdv=None, dq=None):
    """Tiled-backward settings (the fused short-sequence backward is measured separately)."""
    base = faa._hopper_default(d)
    return faa.AttentionConfig(
        fwd=faa.KernelConfig(*fwd) if fwd else base.fwd,
        dkdv=faa.KernelConfig(*dkdv) if dkdv else base.dkdv,
        dq=faa.KernelConfig(*dq) if dq else base.dq,
        short_bwd_max=0,
    )


def _batch(d, max_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = max(25000, 4 * max_len)
    lens = []
    while sum(lens) < tokens:
        lens.append(int(torch.randint(max(1, max_len // 2), max_len + 1, (1,), generator=gen)))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).cuda()
    q, k, v, do = (torch.randn(sum(lens), HEADS, d, generator=gen).cuda().bfloat16() for _ in range(4))
    slopes = torch.tensor([2.0 ** (-8.0 / HEADS * (i + 1)) for i in range(HEADS)]).cuda()
    return q, k, v, do, cu, max(lens), slopes, lens


def _jobs(head_dims):
    jobs = []
    for d in head_dims:
        jobs += [("fwd", d, c) for c in FWD]
        jobs += [("dkdv", d, c) for c in DKDV]
        jobs += [("dq", d, c) for c in DQ]
    return jobs


def _run(kind, q, k, v, do, cu, max_len, slopes, cfg, out=None, lse=None, aux=None):
    """The forward (as in training: it also prepares the backward's scratch) or the backward given that scratch."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kind == "fwd":
        return lambda: faa._flash_fwd(q, k, v, cu, max_len, slopes, scale, config=cfg, for_backward=True)
    return lambda: faa._flash_bwd(do, q, k, v, out, lse, None, cu, max_len, slopes, scale, config=cfg, aux=aux)


def compile_only(jobs):
    """Worker: launch each candidate once on a tiny batch so Triton compiles and caches it."""
    for kind, d, c in jobs:
        for length in (64, 300, 1500):  # the skip constexprs: none, backward only, forward and backward
            q, k, v, do, cu, max_len, slopes, _ = _batch(d, length)
            cfg = _config(d, **{kind: c})
            try:
                out, lse, aux = faa._flash_fwd(q, k, v, cu, max_len, slopes, 0.1, config=cfg, for_backward=True)
                if kind != "fwd":
                    _run(kind, q, k, v, do, cu, max_len, slopes, cfg, out, lse, aux)()
                torch.cuda.synchronize()
            except Exception as exc:  # out of shared memory etc.: reported, skipped later
                print(f"compile failed {kind} d={d} {c}: {type(exc).__name__}: {exc}"[:300], flush=True)
                break


def precompile(head_dims, workers):
    jobs = _jobs(head_dims)
    chunks = [jobs[i::workers] for i in range(workers)]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--compile-only", json.dumps(c)]) for c in chunks if c]
    for p in procs:
        p.wait()
    print(f"precompiled {len(jobs)} candidates in {time.time() - t0:.0f}s with {len(procs)} workers", flush=True)


def bench(fn):
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as exc:
        print(f"  skipped: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return float("inf")


def tune(d, max_len):
    q, k, v, do, cu, max_seqlen, slopes, lens = _batch(d, max_len, seed=max_len)
    base = _config(d)
    out, lse, aux = faa._flash_fwd(q, k, v, cu, max_seqlen, slopes, 1.0 / math.sqrt(d), config=base,
                                   for_backward=True)
    times = {"fwd": {}, "dkdv": {}, "dq": {}}
    for c in FWD:
        times["fwd"][c] = bench(_run("fwd", q, k, v, do, cu, max_seqlen, slopes, _config(d, fwd=c)))
    for c in DKDV:
        times["dkdv"][c] = bench(_run("bwd", q, k, v, do, cu, max_seqlen, slopes, _config(d, dkdv=c), out, lse, aux))
    best_dkdv = min(times["dkdv"], key=times["dkdv"].get)
    for c in DQ:
        times["dq"][c] = bench(_run("bwd", q, k, v, do, cu, max_seqlen, slopes, _config(d, dkdv=best_dkdv, dq=c),
                                    out, lse, aux))
    best = {kind: min(t, key=t.get) for kind, t in times.items()}
    tiled = times["dq"][best["dq"]]
    chosen = _config(d, fwd=best["fwd"], dkdv=best_dkdv, dq=best["dq"])
    noskip = dataclasses.replace(chosen, fwd_skip_above=1 << 30, bwd_skip_above=1 << 30)
    short = {}
    if max_len <= 128:
        for warps in (4, 8):
            cfg = dataclasses.replace(chosen, short_bwd_max=128, short_bwd_warps=warps)
            short[warps] = bench(_run("bwd", q, k, v, do, cu, max_seqlen, slopes, cfg, out, lse, aux))
    short_warps = min(short, key=short.get) if short else 8
    use_short = bool(short) and short[short_warps] < tiled
    entry = {
        "short_bwd_max": 128 if use_short else 0,
        "short_bwd_warps": short_warps,
        "short_bwd_ms": {str(w): t for w, t in short.items()},
        "fwd_noskip_ms": bench(_run("fwd", q, k, v, do, cu, max_seqlen, slopes, noskip)),
        "bwd_noskip_ms": bench(_run("bwd", q, k, v, do, cu, max_seqlen, slopes, noskip, out, lse, aux)),
        "fwd": best["fwd"],
        "dkdv": best_dkdv,
        "dq": best["dq"],
        "fwd_ms": times["fwd"][best["fwd"]],
        "bwd_ms": tiled,
        "default_fwd_ms": bench(_run("fwd", q, k, v, do, cu, max_seqlen, slopes, base)),
        "default_bwd_ms": bench(_run("bwd", q, k, v, do, cu, max_seqlen, slopes, base, out, lse, aux)),
        "tokens": sum(lens),
        "all_ms": {kind: {",".join(map(str, c)): t for c, t in tt.items()} for kind, tt in times.items()},
    }
    return entry


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 256, 1024, 8192])
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("tuned_attention.json"))
    ap.add_argument("--compile-only", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_only:
        compile_only([(k, d, tuple(c)) for k, d, c in json.loads(args.compile_only)])
        return
    precompile(args.head_dims, args.workers)
    table = {}
    for d in args.head_dims:
        for max_len in args.lengths:
            t0 = time.time()
            e = tune(d, max_len)
            table[f"{d},{faa.seqlen_bucket(max_len)}"] = e
            print(f"d={d} L={max_len}: fwd {e['fwd']} {e['fwd_ms']:.3f}ms (default {e['default_fwd_ms']:.3f}) | "
                  f"bwd dkdv {e['dkdv']} dq {e['dq']} {e['bwd_ms']:.3f}ms (default {e['default_bwd_ms']:.3f}) "
                  f"short {e['short_bwd_ms']} noskip fwd {e['fwd_noskip_ms']:.3f} bwd {e['bwd_noskip_ms']:.3f} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
            args.out.write_text(json.dumps(table, indent=1) + "\n")  # after each entry: partial runs count
    print("\n_TUNED entries:")
    for key, e in table.items():
        d, b = key.split(",")
        print(f"    ({d}, {b}): AttentionConfig(KernelConfig{tuple(e['fwd'])}, KernelConfig{tuple(e['dkdv'])}, "
              f"KernelConfig{tuple(e['dq'])}, short_bwd_max={e['short_bwd_max']}, "
              f"short_bwd_warps={e['short_bwd_warps']}),")


if __name__ == "__main__":
    main()
