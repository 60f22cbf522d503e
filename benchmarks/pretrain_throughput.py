"""Pretraining throughput: MosaicBERT-Base vs transformers' BertForMaskedLM, full training steps (GPU).

What one step is, for every model: a global batch of 256 sequences (seq <= 128) taken from a real corpus
(default ``$MOSAIC_DATA/corpus`` or ../shared/data/corpus, tokenized by ``prepare_shards``), masked by our
MLM collator (30 %), moved host -> device (pinned, non-blocking), forward + backward under bf16 autocast
(fp32 master weights), gradient clipping, and a fused AdamW step. The batches are identical for every
model: MosaicBERT takes them packed (``input_ids`` (T,) + ``cu_seqlens``), BERT padded (B, 128).

Reported per model: real tokens/s (padding never counted), peak GPU memory, and
MFU = 6 x parameters x real tokens/s / F, where F is the bf16 FLOP/s of an 8192^3 matrix product
measured in the same run (median of CUDA-event-timed repeats). Rows:

- ``mosaic-bert-base`` eager and ``torch.compile``d through ``train/pretrain.py:compile_in_place`` as
  training does (Triton varlen ALiBi attention, fused Triton GeGLU, unpadded, bf16 LayerNorm, MLM head
  only on masked tokens, the logits and ``F.cross_entropy`` (``mlm_loss_impl="torch"``, the default);
  compiled as one graph);
- the fused loss's effect on a whole step: ``--rows mosaic-compile,mosaic-compile:mlm_loss_impl=triton`` (the
  decoder matmul and the loss fused in chunks, ``kernels/linear_cross_entropy.py``; see "Model variants");
- ``bert-base`` (transformers ``BertForMaskedLM``, SDPA attention) eager and ``torch.compile``d.

``--geglu`` also times the GeGLU kernel alone; ``--mlm-loss`` the MLM loss alone (forward + backward of
the decoder matmul and cross-entropy at Base size, fused op vs the reference under torch.compile: median
ms and peak memory of each).

Usage: python benchmarks/pretrain_throughput.py [--corpus DIR] [--steps 20] [--warmup 5]
       [--microbatch 256] [--rows mosaic-compile,mosaic-eager,bert-compile,bert-eager] [--geglu] [--layernorm]
       [--mlm-loss] [--set KEY=VALUE ...]
Writes benchmarks/results/pretrain_throughput.json (and ``--out`` if given). ``--smoke`` runs a tiny
model on CPU in fp32 to check the script itself.

Kernel micro-benchmarks (GPU, printed and stored in the JSON before the rows): ``--geglu`` times the GeGLU
kernel against torch.compile; ``--layernorm`` the fused residual add + LayerNorm (kernels/layernorm.py)
against the torch expression eager and under torch.compile, forward and backward at Base size.

Model variants: ``--set KEY=VALUE`` (repeatable; the value read as YAML) sets a ``MosaicBertConfig`` field
on every mosaic row (``PretrainModelConfig.overrides``, over the benchmark's own ``attn_impl: triton``), and
a row name may carry its own after colons, so that variants run side by side in one run, e.g.
``--rows mosaic-eager:layernorm_impl=torch,mosaic-eager:layernorm_impl=triton``. Overridden rows are
labelled with their overrides, and a run with any override writes only ``--out`` (required then): the
shipped ``results/pretrain_throughput.json`` keeps the default configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from mosaic_embed.artifacts import atomic_write_json, git_commit  # noqa: E402
from mosaic_embed.config import DataConfig, PretrainModelConfig, parse_override  # noqa: E402
from mosaic_embed.data.mlm import (  # noqa: E402
    KeyedDataset,
    MLMMasker,
    PaddedMLMCollator,
    UnpaddedMLMCollator,
    masked_rows,
)
from mosaic_embed.data.shards import load_shards, prepare_shards  # noqa: E402
from mosaic_embed.data.tokenizer import load_tokenizer  # noqa: E402
from mosaic_embed.runtime import peak_flops  # noqa: E402
from mosaic_embed.train.pretrain import build_model, check_model_overrides, compile_in_place  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "pretrain_throughput.json"


def default_corpus() -> Path:
    env = os.environ.get("MOSAIC_DATA")
    return Path(env) / "corpus" if env else ROOT.parent / "shared" / "data" / "corpus"


def geglu_kernel_times(rows: int = 30097, width: int = 3072) -> dict:
    """GeGLU forward + backward at MosaicBERT-Base size (one layer of a 256 x 128 batch), bf16, CUDA.

    Median ms (do_bench) of the fused Triton kernels (kernels/geglu.py) against the torch expression
    under torch.compile (what inductor generates for it), plus the bytes each direction must move
    (forward: read 2I + write I per row; backward: read 2I + I, write 2I) over the measured time.
    """
    import triton

    from mosaic_embed.kernels.geglu import geglu_reference, geglu_triton

    inner = torch.randn(rows, 2 * width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(geglu_reference, dynamic=True)
    out = {}
    for name, fn in (("triton", geglu_triton), ("torch_compile", compiled)):
        fwd_ms = triton.testing.do_bench(lambda fn=fn: fn(inner), return_mode="median")
        y = fn(inner)
        bwd_ms = triton.testing.do_bench(lambda y=y: torch.autograd.grad(y, inner, dout, retain_graph=True),
                                         return_mode="median")
        out[name] = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms}
    elem = 2  # bf16 bytes
    fwd_bytes, bwd_bytes = rows * 3 * width * elem, rows * 5 * width * elem
    for r in out.values():
        r["fwd_gb_per_s"] = fwd_bytes / r["fwd_ms"] / 1e6
        r["bwd_gb_per_s"] = bwd_bytes / r["bwd_ms"] / 1e6
    out["shape"] = [rows, 2 * width]
    return out


def mlm_loss_times(rows: int = 9830, hidden: int = 768, vocab: int = 30528) -> dict:
    """The MLM loss alone, forward + backward, at MosaicBERT-Base pretraining size (n = 9,830 masked rows
    of a 256 x 128 batch at 30 %), bf16 autocast over fp32 master weights (as in training), CUDA.

    Median ms (do_bench) and peak memory above the inputs of the fused op (kernels/linear_cross_entropy.py)
    against the reference (``F.linear`` + fp32 ``F.cross_entropy``) under torch.compile(dynamic=True), both
    through the dispatch's ``mlm_loss``, one function with the same gradients asked for (hidden, W, b).
    """
    import triton

    from mosaic_embed.kernels.dispatch import mlm_loss, resolve_impl

    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(rows, hidden, device="cuda", generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.02).requires_grad_()
    b = torch.zeros(vocab, device="cuda", requires_grad=True)
    t = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)

    def step(fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, b, t)
        torch.autograd.grad(loss, (h, w, b))

    def fused(h, w, b, t):
        return mlm_loss(h, w, b, t, "triton") / t.numel()

    def reference(h, w, b, t):
        return mlm_loss(h, w, b, t, "torch") / t.numel()

    out = {}
    # two functions, not one closure over impl: each gets its own compiled code
    for name, impl, f in (("triton", "triton", fused), ("torch_compile", "torch", reference)):
        resolve_impl("mlm_loss", impl, h.device)  # before tracing: a first resolution inside is a graph break
        fn = torch.compile(f, dynamic=True)
        step(fn)  # compile, autotune
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        out[name] = {"fwd_bwd_ms": triton.testing.do_bench(lambda fn=fn: step(fn), return_mode="median"),
                     "peak_mem_mib": peak}
    out["speedup"] = out["torch_compile"]["fwd_bwd_ms"] / out["triton"]["fwd_bwd_ms"]
    out["shape"] = {"rows": rows, "hidden": hidden, "vocab": vocab}
    return out


def layernorm_kernel_times(rows: int = 30097, width: int = 768) -> dict:
    """Residual add + LayerNorm at MosaicBERT-Base size (one sublayer of a 256 x 128 batch): bf16 activations,
    fp32 parameters (master weights under autocast), CUDA.

    Median ms (do_bench) of forward, backward, and forward + backward in one call, for the fused Triton
    kernel (kernels/layernorm.py), the torch expression eager (an add, then LayerNorm in bf16: what
    ``layernorm_impl="torch"`` runs) and the same expression under torch.compile (what Inductor makes of it);
    GB/s counts the bytes the fused kernel must move (forward: read x and residual, write y; backward: read
    x, residual and dy, write d_s; the per-row statistics and the parameters are negligible).
    """
    import triton

    from mosaic_embed.kernels.layernorm import add_layer_norm_reference, add_layer_norm_triton

    eps = 1e-12
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, res = (torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
              for _ in range(2))
    weight = (1 + 0.1 * torch.randn(width, device="cuda", generator=gen)).requires_grad_()
    bias = (0.1 * torch.randn(width, device="cuda", generator=gen)).requires_grad_()
    dy = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, generator=gen)
    inputs = (x, res, weight, bias)

    def torch_expr(a, r, w, b):
        return add_layer_norm_reference(a, r, w, b, eps)

    def fused(a, r, w, b):
        return add_layer_norm_triton(a, r, w, b, eps)

    out = {}
    # the backward alone is timed by replaying one graph (retain_graph), which a compiled backward that
    # donates its saved buffers refuses; donation only saves memory, so it is off for this measurement
    with torch._functorch.config.patch(donated_buffer=False):
        for name, fn in (("triton", fused), ("torch_eager", torch_expr),
                         ("torch_compile", torch.compile(torch_expr, dynamic=True))):
            fwd_ms = triton.testing.do_bench(lambda fn=fn: fn(*inputs), return_mode="median")
            y = fn(*inputs)
            bwd_ms = triton.testing.do_bench(lambda y=y: torch.autograd.grad(y, inputs, dy, retain_graph=True),
                                             return_mode="median")
            both_ms = triton.testing.do_bench(lambda fn=fn: torch.autograd.grad(fn(*inputs), inputs, dy),
                                              return_mode="median")
            out[name] = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": both_ms}
    elem = 2  # bf16 bytes
    fwd_bytes, bwd_bytes = rows * 3 * width * elem, rows * 4 * width * elem
    for r in out.values():
        r["fwd_gb_per_s"] = fwd_bytes / r["fwd_ms"] / 1e6
        r["bwd_gb_per_s"] = bwd_bytes / r["bwd_ms"] / 1e6
        r["fwd_bwd_gb_per_s"] = (fwd_bytes + bwd_bytes) / r["fwd_bwd_ms"] / 1e6
    for name in ("torch_eager", "torch_compile"):
        out[f"speedup_fwd_bwd_vs_{name}"] = out[name]["fwd_bwd_ms"] / out["triton"]["fwd_bwd_ms"]
    out["shape"] = [rows, width]
    return out


def parse_sets(items: list[str], where: str) -> dict:
    """``["layernorm_impl=triton", ...]`` -> {"layernorm_impl": "triton", ...}: MosaicBertConfig fields (no
    dots), values read as YAML; a key that names no field is an error before any row runs."""
    out = {}
    for item in items:
        path, value = parse_override(item)
        if len(path) != 1:
            raise SystemExit(f"{where} {item!r}: a MosaicBertConfig field, e.g. layernorm_impl=triton")
        out[path[0]] = value
    try:
        check_model_overrides(PretrainModelConfig(arch="mosaic_bert", overrides=out))
    except ValueError as err:  # ConfigError included
        raise SystemExit(f"{where}: {err}") from None
    return out


def make_batches(corpus: Path, n_steps: int, global_batch: int, smoke: bool):
    """Host batches for ``n_steps`` steps: lists of packed and padded collations of the same sequences."""
    tok = load_tokenizer()
    shards = prepare_shards(DataConfig(corpus=corpus, max_seq_len=128, validation_fraction=0.01,
                                       num_proc=min(8, os.cpu_count() or 1), cache_dir=Path("/tmp/mosaic_bench_cache")))
    train = load_shards(shards)["train"]
    need = n_steps * global_batch
    if len(train) < need:
        raise SystemExit(f"corpus {corpus} gives {len(train)} sequences; {need} needed")
    ds = KeyedDataset(train.select(range(need)))
    masker = MLMMasker.from_tokenizer(tok, 0.30, seed=0)
    packed_c, padded_c = UnpaddedMLMCollator(masker), PaddedMLMCollator(masker, tok.pad_token_id, pad_to_multiple_of=8)
    packed, padded = [], []
    for s in range(n_steps):
        feats = [ds[i] for i in range(s * global_batch, (s + 1) * global_batch)]
        packed.append(packed_c(feats))
        padded.append(padded_c(feats))
    pin = not smoke
    for batches in (packed, padded):
        for b in batches:
            for k, v in b.items():
                if torch.is_tensor(v) and pin:
                    b[k] = v.pin_memory()
    return tok, packed, padded


def split_micro(batch: dict, micro: int, packed: bool) -> list[dict]:
    """One global batch -> microbatches of ``micro`` sequences (host tensors)."""
    if packed:
        cu = batch["cu_seqlens"]
        b = cu.numel() - 1
        if micro >= b:
            return [batch]
        out = []
        for i in range(0, b, micro):
            lo, hi = int(cu[i]), int(cu[min(i + micro, b)])
            sub_cu = cu[i:min(i + micro, b) + 1] - cu[i]
            sub = {"input_ids": batch["input_ids"][lo:hi], "labels": batch["labels"][lo:hi],
                   "cu_seqlens": sub_cu.to(torch.int32), "max_seqlen": int((sub_cu[1:] - sub_cu[:-1]).max()),
                   "num_tokens": hi - lo}
            if "masked_rows" in batch:
                sub["masked_rows"] = masked_rows(sub["labels"])
            out.append(sub)
        return out
    b = batch["input_ids"].shape[0]
    if micro >= b:
        return [batch]
    return [{k: (v[i:i + micro] if torch.is_tensor(v) else v) for k, v in batch.items()} for i in range(0, b, micro)]


def run_row(name: str, arch: str, compile_model: str, batches: list[dict], tok, args, device,
            model_overrides: dict | None = None) -> dict:
    torch.manual_seed(0)
    preset = ("mosaic-bert-tiny" if arch == "mosaic_bert" else "bert-tiny") if args.smoke else \
        ("mosaic-bert-base" if arch == "mosaic_bert" else "bert-base")
    overrides = {"attn_impl": "triton"} if (arch == "mosaic_bert" and not args.smoke) else {}
    overrides.update(model_overrides or {})
    model = build_model(PretrainModelConfig(arch=arch, preset=preset, overrides=overrides), tok).to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-5 / 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")
    # in-place compilation (nn.Module.compile) keeps parameter names, as training needs for save_pretrained;
    # packed batches vary in length, so MosaicBERT is compiled with dynamic shapes from the start
    dynamic = True if arch == "mosaic_bert" else None
    if args.nobreak and arch == "mosaic_bert":
        # EXPERIMENT (labelled in the row): kernels/attention.py's dispatch calls importlib.util.find_spec on
        # every forward, which torch.compile cannot trace (a graph break inside every layer). Answer it once.
        from mosaic_embed.kernels import attention as _attn

        _has = _attn._triton_importable()
        _attn._triton_importable = lambda: _has
    if compile_model == "model":  # exactly what `mosaic-embed pretrain` does with train.compile
        compile_in_place(model, packed=arch == "mosaic_bert", device_type=device.type,
                         dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    elif compile_model == "layers":
        layers = model.bert.encoder.layers if arch == "mosaic_bert" else model.bert.encoder.layer
        for layer in layers:
            layer.compile(dynamic=dynamic)
    fwd = model
    packed = arch == "mosaic_bert"
    use_bf16 = device.type == "cuda"

    def step(batch: dict) -> tuple[torch.Tensor, int]:
        micro = split_micro(batch, args.microbatch, packed)
        tokens = 0
        total = torch.zeros((), device=device)
        for mb in micro:
            tokens += mb["num_tokens"]
            skip = ("num_tokens",) if args.masked_rows == "host" else ("num_tokens", "masked_rows")
            inputs = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                      for k, v in mb.items() if k not in skip}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = fwd(**inputs).loss / len(micro)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=device.type == "cuda")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, tokens

    t_compile = time.perf_counter()
    for b in batches[: args.warmup]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t_compile
    timed = batches[args.warmup:]
    losses, tokens = [], 0
    t0 = time.perf_counter()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for b in timed:
        loss, n = step(b)
        losses.append(loss)
        tokens += n
    if device.type == "cuda":
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        seconds, peak = time.perf_counter() - t0, float("nan")
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for b in timed[:3]:
                step(b)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        print(f"profile of 3 steps, {name}:\n{table}", flush=True)
        profiled = gpu_activity(prof, steps=3)
        print(f"GPU activity, {name}: {profiled}", flush=True)
    losses = [float(x) for x in losses]
    tps = tokens / seconds
    row = {"model": name, "arch": arch, "compiled": compile_model, "params": params, "overrides": overrides,
           "dispatch_graph_break_patched": bool(args.nobreak and arch == "mosaic_bert"),
           "real_tokens_per_s": tps, "mfu": 6 * params * tps / args.flops if args.flops else None,
           "peak_mem_gib": peak, "step_ms": 1e3 * seconds / len(timed), "timed_steps": len(timed),
           "real_tokens_per_step": tokens / len(timed), "warmup_s": warm_s, "microbatch": args.microbatch,
           "loss_first_last": [losses[0], losses[-1]], "finite": all(map(lambda x: x == x and abs(x) < 1e4, losses))}
    if args.profile and device.type == "cuda":
        row["profile"] = profiled
    return row


def gpu_activity(prof, steps: int) -> dict:
    """Kernel time and GPU busy fraction from a torch.profiler run of ``steps`` steps, from the device's records:
    busy time is the union of their intervals (kernels overlapping on two streams count once), so the span
    from the first to the last, less the busy time, is what the GPU spent waiting for the host."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    if not spans:
        return {}
    busy, (lo, hi) = 0.0, spans[0]
    for start, end in spans[1:]:  # union of the intervals: overlapping kernels (streams) count once
        if start > hi:
            busy, lo, hi = busy + hi - lo, start, end
        else:
            hi = max(hi, end)
    busy += hi - lo
    window = spans[-1][1] - spans[0][0]
    return {"kernel_ms_per_step": sum(e - s for s, e in spans) / 1e3 / steps,
            "busy_ms_per_step": busy / 1e3 / steps, "span_ms_per_step": window / 1e3 / steps,
            "gpu_busy_fraction": busy / window if window else None}


def run_pretrain_cli(corpus: Path, args) -> dict:
    """The real training loop: ``mosaic-embed pretrain`` as a process (MosaicBERT-Base recipe, compiled, the
    same global batch in one microbatch), its tokens/s and MFU read from metrics.jsonl after ``--warmup``
    steps. Its gap to the ``mosaic-compile`` row is what the Trainer loop costs over a bare step. A log line
    every 5 steps or fewer (the recipe's is 50): each reads the loss back, a host sync the bare step does not pay."""
    import subprocess
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="pretrain-cli-")) / "run"
    steps = args.warmup + args.steps
    log_every = min(5, args.steps)
    sets = [f"train.max_steps={steps}", f"train.global_batch_size={args.global_batch}",
            f"train.microbatch_size={args.microbatch}", "train.compile=true", "train.eval_every_steps=0",
            "train.save_every_steps=0", f"train.log_every_steps={log_every}", "train.eval_samples=256",
            f"data.cache_dir={out.parent / 'cache'}"]
    if args.smoke:
        sets += ["model.preset=mosaic-bert-tiny", "train.compile=false", "data.max_seq_len=32"]
    cmd = [sys.executable, "-m", "mosaic_embed.cli", "pretrain", "--recipe", "mosaic-bert-base", "--corpus",
           str(corpus), "--out", str(out), *[x for s in sets for x in ("--set", s)]]
    t = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep what the host set
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if proc.returncode != 0:
        return {"model": "mosaic-embed pretrain (CLI)", "error": proc.stderr[-2000:]}
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # a log line's tokens/s covers the steps since the previous one: only windows that start after the warm-up
    # (a window reaching back into it would average compilation in)
    timed = [r for r in logs if "tokens_per_s" in r and r["step"] - log_every >= args.warmup]
    if not timed:
        return {"model": "mosaic-embed pretrain (CLI)",
                "error": f"no log window after the {args.warmup} warm-up steps in {out}: give more --steps"}
    tps = statistics.mean(r["tokens_per_s"] for r in timed)
    return {"model": "mosaic-embed pretrain (CLI, mosaic-bert-base, compiled)" if not args.smoke
            else "mosaic-embed pretrain (CLI, smoke: mosaic-bert-tiny)", "arch": "mosaic_bert",
            "compiled": "model", "params": None, "real_tokens_per_s": tps,
            "mfu": statistics.mean(r["mfu"] for r in timed) if timed[0].get("mfu") is not None else None,
            "mfu_peak": timed[0].get("mfu_peak"), "timed_steps": len(timed) * log_every, "peak_mem_gib": float("nan"),
            "row_wall_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per row")
    ap.add_argument("--warmup", type=int, default=6, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--microbatch", type=int, default=256)
    ap.add_argument("--rows", default="mosaic-compile,mosaic-eager,bert-compile,bert-eager")
    ap.add_argument("--nobreak", action="store_true",
                    help="experiment: remove the find_spec graph break of the attention dispatch (labelled)")
    ap.add_argument("--geglu", action="store_true", help="also time the GeGLU kernel vs torch.compile (GPU)")
    ap.add_argument("--mlm-loss", action="store_true",
                    help="also time the fused MLM loss (decoder + cross-entropy) vs torch.compile (GPU)")
    ap.add_argument("--layernorm", action="store_true",
                    help="also time the fused add + LayerNorm kernel vs torch eager and torch.compile (GPU)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a MosaicBertConfig field for every mosaic row (repeatable), e.g. layernorm_impl=triton")
    ap.add_argument("--masked-rows", choices=("host", "device"), default="host",
                    help="MosaicBERT's labelled rows: from the collator (host, the default, as pretrain runs) or "
                         "found by the forward on the device (a sync per step: the A/B of that change)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of 3 steps per row")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU (checks the script, no figures)")
    args = ap.parse_args()
    model_sets = parse_sets(args.sets, "--set")
    row_specs = []  # (row key, its overrides)
    for spec in args.rows.split(","):
        key, *items = spec.split(":")
        if items and not key.startswith("mosaic-"):
            raise SystemExit(f"--rows {spec}: overrides are MosaicBertConfig fields, for mosaic rows only")
        row_specs.append((key, parse_sets(items, f"--rows {spec}")))
    overridden = bool(model_sets) or any(sets for _, sets in row_specs) or args.masked_rows != "host"
    if overridden and args.out is None and not args.smoke:
        raise SystemExit("--set / row overrides measure a variant: give --out (results/pretrain_throughput.json "
                         "keeps the default configuration)")
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (use --smoke to check the script on CPU)")
    corpus = args.corpus or default_corpus()
    args.flops, args.peak_note = (None, None) if args.smoke else peak_flops(device)
    if args.flops:
        print(f"MFU peak: {args.peak_note}", flush=True)
    kernel_times = {}  # JSON key -> the kernel alone (GPU only), each asked for by its flag
    for asked, key, timer in ((args.geglu, "geglu_kernel", geglu_kernel_times),
                              (args.mlm_loss, "mlm_loss", mlm_loss_times),
                              (args.layernorm, "layernorm_kernel", layernorm_kernel_times)):
        if asked and device.type == "cuda":
            kernel_times[key] = timer()
            print(f"{key}: {json.dumps(kernel_times[key])}", flush=True)
    t = time.perf_counter()
    tok, packed, padded = make_batches(corpus, args.warmup + args.steps, args.global_batch, args.smoke)
    print(f"batches ready in {time.perf_counter() - t:.1f}s", flush=True)
    specs = {  # row -> (label, arch, compilation)
        "mosaic-eager": ("mosaic-bert-base", "mosaic_bert", "none"),
        "mosaic-compile": ("mosaic-bert-base", "mosaic_bert", "model"),
        "mosaic-compile-layers": ("mosaic-bert-base", "mosaic_bert", "layers"),
        "bert-eager": ("bert-base (HF, SDPA)", "hf_bert", "none"),
        "bert-compile": ("bert-base (HF, SDPA)", "hf_bert", "model"),
    }
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "transformers": __import__("transformers").__version__,
        "matmul_tflops": args.flops / 1e12 if args.flops else None,
        "mfu_peak": args.peak_note,
        "seq_len": 128,
        "global_batch": args.global_batch,
        "corpus": str(corpus),
        "mosaic_overrides": model_sets,
        "masked_rows": args.masked_rows,
        **kernel_times,
        "rows": [],
    }
    results_paths = [None if args.smoke or overridden else RESULTS, args.out]
    for key, row_sets in row_specs:
        if key == "pretrain-cli":
            row = run_pretrain_cli(corpus, args)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            for path in filter(None, results_paths):
                atomic_write_json(path, result)
            continue
        name, arch, comp = specs[key]
        label = name + {"none": " eager", "model": " + torch.compile", "layers": " + torch.compile (per layer)"}[comp]
        sets = {**model_sets, **row_sets} if arch == "mosaic_bert" else {}
        if sets:
            label += " [" + ",".join(f"{k}={v}" for k, v in sets.items()) + "]"
        t = time.perf_counter()
        try:
            row = run_row(label, arch, comp, packed if arch == "mosaic_bert" else padded, tok, args, device, sets)
        except Exception as err:  # keep the other rows; record why this one failed
            row = {"model": label, "error": f"{type(err).__name__}: {err}"[:2000]}
            torch._dynamo.reset()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the row's model and optimizer are gone with run_row's frame
        row["row_wall_s"] = time.perf_counter() - t
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        for path in filter(None, results_paths):
            atomic_write_json(path, result)
    print(f"\n{'model':52s} {'params':>8s} {'tok/s':>10s} {'MFU':>6s} {'peak GiB':>9s}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['model']:52s} ERROR {r['error'][:120]}")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        params = f"{r['params'] / 1e6:7.1f}M" if r.get("params") else "       -"
        print(f"{r['model']:52s} {params} {r['real_tokens_per_s']:10.0f} {mfu:>6s} {r['peak_mem_gib']:9.2f}")


if __name__ == "__main__":
    main()
