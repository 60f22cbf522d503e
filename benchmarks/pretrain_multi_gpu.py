"""Data-parallel scaling of pretraining: 1 vs N GPUs through the real pipeline (``pretrain`` under torchrun).

Every run trains MosaicBERT-Base on the same corpus with the same global batch and the same per-GPU
microbatch (so 1 GPU accumulates N microbatches where N GPUs take one each). Two measurements:

- loss: ``--steps`` steps logged every step, 1 vs N GPUs from the same seed. The per-step losses must agree
  within noise (dropout draws differ per rank); ``--noise-seed`` adds a 1-GPU run from another seed, the
  spread between two equally valid runs, to judge "within noise" against.
- throughput: ``--throughput-steps`` steps logged every ``--log-every`` steps (a production logging rate:
  every log is a host-GPU sync), eager and/or compiled (``--modes``). Tokens/s = real tokens of all ranks
  after the first ``--skip`` steps (warm-up, compilation) / their wall time, from the trainer's windows.
  The per-step-logged loss runs' tokens/s is reported beside it.

Writes benchmarks/results/pretrain_multi_gpu.json: ``{"device", "speedup", "tokens_per_s": {"1": .., "N": ..},
"loss_1gpu": [...], "loss_2gpu": [...], ...}`` (speedup and tokens_per_s of the first mode in ``--modes``).

Usage (a host with 2 GPUs): python benchmarks/pretrain_multi_gpu.py [--gpus 2] [--steps 50] [--noise-seed 1]
       [--modes compiled eager]
``--smoke``: a tiny model on CPU, 2 gloo processes (checks the launch, sharding and loss agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pretrain_multi_gpu.json"


def default_corpus() -> Path:
    env = os.environ.get("MOSAIC_DATA")
    return Path(env) / "corpus" if env else ROOT.parent / "shared" / "data" / "corpus"


def launch(nproc: int, name: str, args, *, steps: int, log_every: int, mode: str = "eager",
           seed: int | None = None) -> dict:
    """One pretraining run on ``nproc`` processes; returns its logged losses and aggregate tokens/s."""
    run_dir = args.work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.smoke:
        recipe = "tiny"
        sets = ["train.global_batch_size=16", "train.microbatch_size=8", "data.num_proc=1"]
    else:
        recipe = "mosaic-bert-base"
        sets = [f"train.global_batch_size={args.global_batch}", f"train.microbatch_size={args.microbatch}",
                "train.dataloader_workers=4"]
    sets += [f"train.compile={str(mode != 'eager').lower()}"]
    if mode != "eager":
        sets += [f"train.compile_split_at_ddp_buckets={str(mode == 'compiled-split').lower()}"]
    sets += [f"train.seed={seed}"] if seed is not None else []
    sets += [f"train.max_steps={steps}", f"train.log_every_steps={log_every}", "train.eval_every_steps=0",
             "train.eval_samples=64", "train.save_every_steps=0", f"data.cache_dir={args.cache}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mosaic_embed.cli", "pretrain", "--recipe", recipe, "--corpus", str(args.corpus),
           "--out", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    # each log row covers the steps since the previous one: its seconds = its tokens / its tokens/s
    timed, prev_tokens = [], 0
    for r in train:
        timed.append((r["step"], r["tokens_seen"] - prev_tokens, (r["tokens_seen"] - prev_tokens) / r["tokens_per_s"]))
        prev_tokens = r["tokens_seen"]
    kept = [(tok, sec) for step, tok, sec in timed if step - log_every >= args.skip]
    tps = sum(t for t, _ in kept) / sum(s for _, s in kept) if kept else None
    return {"loss": [r["loss"] for r in train], "tokens_per_s": tps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50, help="steps of the per-step-logged loss runs")
    ap.add_argument("--throughput-steps", type=int, default=110)
    ap.add_argument("--log-every", type=int, default=10, help="logging interval of the throughput runs")
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of tokens/s (warm-up, compile)")
    ap.add_argument("--modes", nargs="+", choices=["eager", "compiled", "compiled-split"],
                    default=None,
                    help="throughput runs (compiled: one graph, all-reduce after the backward; compiled-split: "
                         "the graph split at DDP buckets); the first one gives the headline speedup "
                         "(default: compiled compiled-split eager; eager with --smoke)")
    ap.add_argument("--global-batch", type=int, default=512)
    ap.add_argument("--microbatch", type=int, default=256)
    ap.add_argument("--noise-seed", type=int, default=None,
                    help="also train 1 GPU from this other seed: the seed-to-seed loss spread that 'within noise' means")
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mosaic_multi_gpu"))
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here instead of benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, 2 gloo processes")
    args = ap.parse_args()
    args.corpus = args.corpus or (ROOT / "mosaic_embed" / "resources" / "corpus" if args.smoke else default_corpus())
    args.cache = args.work / "cache"
    if args.smoke:
        args.steps, args.throughput_steps, args.log_every, args.skip = min(args.steps, 6), 6, 2, 2
    args.modes = args.modes or (["eager"] if args.smoke else ["compiled", "compiled-split", "eager"])
    n = args.gpus
    import torch

    out = {
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke, gloo)"),
        "gpus": n,
        "global_batch": 16 if args.smoke else args.global_batch,
        "microbatch_per_gpu": 8 if args.smoke else args.microbatch,
    }
    path = args.out or (RESULTS if not args.smoke else args.work / "pretrain_multi_gpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every pair of runs, so a run cut short keeps what was measured
        path.write_text(json.dumps(out, indent=2) + "\n")

    one = launch(1, "loss-1", args, steps=args.steps, log_every=1)
    many = launch(n, f"loss-{n}", args, steps=args.steps, log_every=1)
    out.update({
        "loss_1gpu": one["loss"],
        f"loss_{n}gpu": many["loss"],
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(one["loss"], many["loss"], strict=True)),
        "mean_abs_loss_diff": statistics.mean(abs(a - b) for a, b in zip(one["loss"], many["loss"], strict=True)),
        "per_step_logging": {"compile": False, "speedup": many["tokens_per_s"] / one["tokens_per_s"],
                             "tokens_per_s": {"1": one["tokens_per_s"], str(n): many["tokens_per_s"]}},
    })
    save()
    if args.noise_seed is not None:
        # the same 1-GPU run from another seed (init, data order, masks, dropout): the spread of two equally
        # valid runs; the 1-vs-N difference should be far below it
        noise = launch(1, f"loss-1-seed{args.noise_seed}", args, steps=args.steps, log_every=1, seed=args.noise_seed)
        out[f"loss_1gpu_seed{args.noise_seed}"] = noise["loss"]
        out["max_abs_loss_diff_other_seed"] = max(abs(a - b) for a, b in zip(one["loss"], noise["loss"], strict=True))
        out["mean_abs_loss_diff_other_seed"] = statistics.mean(
            abs(a - b) for a, b in zip(one["loss"], noise["loss"], strict=True))
        save()
    out["throughput"] = {}
    one_gpu = {}  # the graph split only matters under DDP: one 1-GPU compiled run serves both compiled modes
    for mode in args.modes:
        base = "eager" if mode == "eager" else "compiled"
        if base not in one_gpu:
            one_gpu[base] = launch(1, f"tput-{base}-1", args, steps=args.throughput_steps, log_every=args.log_every,
                                   mode=mode)
        runs = {1: one_gpu[base], n: launch(n, f"tput-{mode}-{n}", args, steps=args.throughput_steps,
                                            log_every=args.log_every, mode=mode)}
        out["throughput"][mode] = {
            "speedup": runs[n]["tokens_per_s"] / runs[1]["tokens_per_s"],
            "tokens_per_s": {str(k): r["tokens_per_s"] for k, r in runs.items()},
            "steps": args.throughput_steps, "log_every_steps": args.log_every, "skipped_steps": args.skip,
        }
        if mode == args.modes[0]:
            out["speedup"] = out["throughput"][mode]["speedup"]
            out["tokens_per_s"] = out["throughput"][mode]["tokens_per_s"]
            out["mode"] = mode
        save()
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("loss_")}, indent=2))
    print(f"loss 1 vs {n}:", [f"{a:.4f}/{b:.4f}" for a, b in zip(one["loss"], many["loss"], strict=False)])


if __name__ == "__main__":
    main()
