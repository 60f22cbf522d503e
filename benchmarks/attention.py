"""Forward+backward time of the Triton varlen ALiBi FlashAttention vs three torch baselines (GPU only).

For max length L in {128, 512, 2048}: lengths uniform in [L/2, L] until ~25k real tokens, bf16,
12 heads x 64. Measured in the same run on the same data:

- ours:        ``flash_attn_varlen_alibi`` on the packed tokens (T, H, D);
- sdpa_bias:   ``F.scaled_dot_product_attention`` on the padded batch (B, H, L, D) with one additive float
               bias (ALiBi + key padding), the way a model without a varlen kernel runs;
- flex:        ``flex_attention`` (torch.compile'd) on the packed tokens (1, H, T, D) with an ALiBi
               ``score_mod`` and a document ``block_mask``;
- sdpa_nobias: SDPA's flash backend on the padded batch with no bias at all: what attention costs
               without ALiBi or padding masks (a floor for a padded kernel, not an equal task).

Each figure is the median of many CUDA-event-timed fwd+bwd steps after warm-up (gradients by
``torch.autograd.grad``, so no ``.grad`` accumulation is timed). TFLOP/s counts real tokens only:
fwd 4 n^2 D H per sequence, fwd+bwd 3.5x that. Prints a table; writes benchmarks/results/attention.json.

Usage: python benchmarks/attention.py [--lengths 128 512 2048] [--tokens 25000] [--reps 100]
       [--tuned tuned.json] (load a tuning table written by benchmarks/tune_attention.py first)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mosaic_embed.artifacts import atomic_write_text, git_commit
from mosaic_embed.kernels import flash_attn_alibi as faa

HEADS, HEAD_DIM = 12, 64
RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"


def alibi_slopes(n_heads):
    """Press et al. slopes (closest power of two, then every other slope of the next one)."""
    import math

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(pow2(n_heads))
    c = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(pow2(c) + pow2(2 * c)[0::2][: n_heads - c])


def draw_lengths(max_len, tokens, gen):
    lens = []
    while sum(lens) < tokens:
        lens.append(int(torch.randint(max_len // 2, max_len + 1, (1,), generator=gen)))
    return lens


def time_step(step, reps, warmup=10):
    """Median ms of ``step`` over ``reps`` CUDA-event-timed runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=False):
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=False))


def graph_time(step, reps):
    """Median ms of CUDA-graph replays of ``step`` (GPU time without the host's launch overhead), or None."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return time_step(graph.replay, reps)
    except Exception as exc:  # a method that cannot be captured is reported, not fatal
        print(f"  graph capture failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None


def host_time(step, reps=50):
    """Mean host-side ms to enqueue one ``step`` (synchronised before and after the loop)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / reps * 1e3


def build_case(max_len, tokens, seed):
    """Packed and padded views of one random batch, plus each method's fwd+bwd step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(seed)
    lens = draw_lengths(max_len, tokens, gen)
    batch, total = len(lens), sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    slopes = alibi_slopes(HEADS).float().to(dev)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dev, torch.bfloat16)

    q, k, v, do = (rand(total, HEADS, HEAD_DIM) for _ in range(4))
    # padded (B, H, L, D) copies of the same tokens
    pos = torch.cat([torch.arange(n) for n in lens])
    seq = torch.cat([torch.full((n,), b) for b, n in enumerate(lens)])
    flat = (seq * max_len + pos).to(dev)

    def pad(x):
        out = x.new_zeros(batch * max_len, HEADS, HEAD_DIM).index_copy(0, flat, x)
        return out.view(batch, max_len, HEADS, HEAD_DIM).transpose(1, 2).contiguous()

    qp, kp, vp, dop = (pad(x) for x in (q, k, v, do))
    keymask = torch.zeros(batch * max_len, dtype=torch.bool, device=dev)
    keymask[flat] = True
    idx = torch.arange(max_len, device=dev, dtype=torch.float32)
    alibi = -slopes[:, None, None] * (idx[:, None] - idx[None, :]).abs()  # (H, L, L)
    bias = alibi[None].expand(batch, -1, -1, -1).to(torch.bfloat16)
    bias = bias.masked_fill(~keymask.view(batch, 1, 1, max_len), torch.finfo(torch.bfloat16).min).contiguous()

    # flex: packed tokens, padded to a multiple of 128; padding tokens form their own document
    tpad = -(-total // 128) * 128
    doc = torch.full((tpad,), -1, dtype=torch.int32, device=dev)
    doc[:total] = seq.to(dev, torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        # same document => global index distance == in-document distance
        return score - slopes[h] * (q_idx - kv_idx).abs()

    block_mask = create_block_mask(mask_mod, 1, None, tpad, tpad, device=dev)
    flex = torch.compile(flex_attention)

    def fpad(x):  # (T, H, D) -> (1, H, Tpad, D)
        out = x.new_zeros(tpad, HEADS, HEAD_DIM)
        out[:total] = x
        return out.transpose(0, 1).unsqueeze(0).contiguous()

    qf, kf, vf, dof = (fpad(x) for x in (q, k, v, do))
    max_seqlen = max(lens)

    leaves = {
        "ours": [x.clone().requires_grad_() for x in (q, k, v)],
        "sdpa_bias": [x.clone().requires_grad_() for x in (qp, kp, vp)],
        "flex": [x.clone().requires_grad_() for x in (qf, kf, vf)],
        "sdpa_nobias": [x.clone().requires_grad_() for x in (qp, kp, vp)],
    }

    cu_dev = cu.to(dev)

    def ours_step():
        a, b, c = leaves["ours"]
        out = faa.flash_attn_varlen_alibi(a, b, c, cu_dev, max_seqlen, slopes)
        torch.autograd.grad(out, (a, b, c), do)

    def ours_fwd():
        a, b, c = leaves["ours"]
        with torch.no_grad():
            faa.flash_attn_varlen_alibi(a, b, c, cu_dev, max_seqlen, slopes)

    def sdpa_bias():
        a, b, c = leaves["sdpa_bias"]
        out = F.scaled_dot_product_attention(a, b, c, attn_mask=bias)
        torch.autograd.grad(out, (a, b, c), dop)

    def flex_step():
        a, b, c = leaves["flex"]
        out = flex(a, b, c, score_mod=score_mod, block_mask=block_mask)
        torch.autograd.grad(out, (a, b, c), dof)

    def sdpa_nobias():
        a, b, c = leaves["sdpa_nobias"]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(a, b, c)
        torch.autograd.grad(out, (a, b, c), dop)

    # one correctness spot check of ours against the padded-bias baseline on the real rows
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(qp.float(), kp.float(), vp.float(), attn_mask=bias.float())
        ref = ref.transpose(1, 2).reshape(batch * max_len, HEADS, HEAD_DIM)[flat]
        got = faa.flash_attn_varlen_alibi(q, k, v, cu_dev, max_seqlen, slopes).float()
        flex_out = flex(qf, kf, vf, score_mod=score_mod, block_mask=block_mask)[0].transpose(0, 1)[:total].float()
    check = {"ours_vs_sdpa_fp32_max_err": (got - ref).abs().max().item(),
             "flex_vs_sdpa_fp32_max_err": (flex_out - ref).abs().max().item()}
    def ours_noskip():
        # the same kernels with far-tile skipping off: what the exact-skip bound buys
        saved = dict(faa._TUNED)
        try:
            for key, cfg in saved.items():
                faa._TUNED[key] = dataclasses.replace(cfg, fwd_skip_above=1 << 30, bwd_skip_above=1 << 30)
            faa.reset_config_cache()
            ours_step()
        finally:
            faa._TUNED.clear()
            faa._TUNED.update(saved)
            faa.reset_config_cache()

    steps = {"ours": ours_step, "sdpa_bias": sdpa_bias, "flex": flex_step, "sdpa_nobias": sdpa_nobias,
             "ours_fwd": ours_fwd, "ours_noskip": ours_noskip}
    sum_sq = sum(n * n for n in lens)
    return lens, steps, check, sum_sq



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--tokens", type=int, default=25000)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="time every method this many times, interleaved")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tuned", type=Path, help="JSON tuning table from benchmarks/tune_attention.py")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    if args.tuned:
        import tune_attention  # noqa: PLC0415  (sibling script)

        tune_attention.install_table(json.loads(args.tuned.read_text()))

    import triton

    # bring the GPU out of its idle clocks before anything is timed
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_end = time.time() + 2.0
    while time.time() < t_end:
        a @ a
    torch.cuda.synchronize()
    del a

    rows = []
    for max_len in args.lengths:
        lens, steps, check, sum_sq = build_case(max_len, args.tokens, args.seed + max_len)
        samples = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                samples[name].append(time_step(step, args.reps))
        # median over all rounds' medians: a round disturbed by the host (these steps are short enough
        # for Python/launch overhead to matter) moves it less than a mean would
        ms = {name: statistics.median(v) for name, v in samples.items()}
        graph_ms = {name: graph_time(step, args.reps) for name, step in steps.items() if name != "ours_noskip"}
        host_ms = {name: host_time(step) for name, step in steps.items() if name != "ours_noskip"}
        print(f"L={max_len} graph: " + ", ".join(f"{k}={v if v is None else round(v, 3)}" for k, v in graph_ms.items()))
        print(f"L={max_len} host enqueue: " + ", ".join(f"{k}={v:.3f}" for k, v in host_ms.items()))
        flops = 3.5 * 4 * sum_sq * HEAD_DIM * HEADS
        cfg = faa.select_config(HEAD_DIM, max(lens), torch.device("cuda"))
        row = {
            "max_seqlen": max_len,
            "real_tokens": sum(lens),
            "ours_ms": ms["ours"],
            "sdpa_bias_ms": ms["sdpa_bias"],
            "flex_ms": ms["flex"],
            "sdpa_nobias_ms": ms["sdpa_nobias"],
            # extras
            "batch_size": len(lens),
            "ours_fwd_ms": ms["ours_fwd"],
            "ours_tflops": flops / ms["ours"] / 1e9,
            "sdpa_bias_tflops_real": flops / ms["sdpa_bias"] / 1e9,
            "speedup_vs_sdpa_bias": ms["sdpa_bias"] / ms["ours"],
            "speedup_vs_flex": ms["flex"] / ms["ours"],
            "ratio_to_sdpa_nobias": ms["ours"] / ms["sdpa_nobias"],
            "ours_noskip_ms": ms["ours_noskip"],
            "graph_ms": graph_ms,
            "graph_ours_tflops": flops / graph_ms["ours"] / 1e9 if graph_ms.get("ours") else None,
            "host_enqueue_ms": host_ms,
            "rounds_ms": samples,
            "config": repr(cfg),
            **check,
        }
        rows.append(row)
        print(f"L={max_len}: " + ", ".join(f"{k}={v:.3f}ms" for k, v in ms.items()), flush=True)

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "bfloat16",
        "reps": args.reps,
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  (fwd+bwd ms, bf16, 12x64)")
    head = (f"{'L':>5} {'tokens':>6} {'B':>4} {'ours':>7} {'sdpa+bias':>9} {'flex':>7} {'sdpa-nobias':>11} "
            f"{'x(a)':>5} {'x(b)':>5} {'/(c)':>5} {'TFLOP/s':>7} {'fwd':>6}")
    print(head)
    for r in rows:
        print(f"{r['max_seqlen']:>5} {r['real_tokens']:>6} {r['batch_size']:>4} {r['ours_ms']:>7.3f} "
              f"{r['sdpa_bias_ms']:>9.3f} {r['flex_ms']:>7.3f} {r['sdpa_nobias_ms']:>11.3f} "
              f"{r['speedup_vs_sdpa_bias']:>5.2f} {r['speedup_vs_flex']:>5.2f} {r['ratio_to_sdpa_nobias']:>5.2f} "
              f"{r['ours_tflops']:>7.1f} {r['ours_fwd_ms']:>6.3f}")
    print("targets: x(a) >= 1.5, x(b) >= 2.0, /(c) <= 1.2")
    print("\nCUDA-graph replays (GPU time, no host launch overhead), ms:")
    print(f"{'L':>5} {'ours':>7} {'sdpa+bias':>9} {'flex':>7} {'sdpa-nobias':>11} {'x(a)':>5} {'x(b)':>5} {'/(c)':>5} "
          f"{'TFLOP/s':>7} {'noskip(eager)':>13}")
    for r in rows:
        g = {k: (v if v else float("nan")) for k, v in r["graph_ms"].items()}
        print(f"{r['max_seqlen']:>5} {g['ours']:>7.3f} {g['sdpa_bias']:>9.3f} {g['flex']:>7.3f} {g['sdpa_nobias']:>11.3f} "
              f"{g['sdpa_bias'] / g['ours']:>5.2f} {g['flex'] / g['ours']:>5.2f} {g['ours'] / g['sdpa_nobias']:>5.2f} "
              f"{(r['graph_ours_tflops'] or float('nan')):>7.1f} {r['ours_noskip_ms']:>13.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
