"""Data-parallel scaling of pretraining: 1 vs N GPUs through the real pipeline (``pretrain`` under torchrun).

Both runs train MosaicBERT-Base from the same seed on the same corpus with the same global batch and the
same per-GPU microbatch (so 1 GPU accumulates N microbatches where N GPUs take one each): the per-step
losses of the first ``--steps`` steps must agree within noise (dropout draws differ per rank), and the
tokens/s ratio is the scaling. Tokens/s is the mean of the per-step figures the trainer logs, after
``--skip`` warm-up steps. Writes benchmarks/results/pretrain_multi_gpu.json:
``{"device", "speedup", "tokens_per_s": {"1": .., "N": ..}, "loss_1gpu": [...], "loss_2gpu": [...]}``.

Usage (a host with 2 GPUs): python benchmarks/pretrain_multi_gpu.py [--gpus 2] [--steps 50] [--noise-seed 1]
``--smoke``: a tiny model on CPU, 2 gloo processes (checks the launch, sharding and loss agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pretrain_multi_gpu.json"


def default_corpus() -> Path:
    env = os.environ.get("MOSAIC_DATA")
    return Path(env) / "corpus" if env else ROOT.parent / "shared" / "data" / "corpus"


def launch(nproc: int, run_dir: Path, args, seed: int | None = None) -> dict:
    """One pretraining run on ``nproc`` processes; returns its per-step losses and tokens/s."""
    if args.smoke:
        recipe = "tiny"
        sets = ["train.global_batch_size=16", "train.microbatch_size=8", "data.num_proc=1"]
    else:
        recipe = "mosaic-bert-base"
        sets = [f"train.global_batch_size={args.global_batch}", f"train.microbatch_size={args.microbatch}",
                f"train.compile={str(args.compile).lower()}", "train.dataloader_workers=4"]
    sets += [f"train.seed={seed}"] if seed is not None else []
    sets += [f"train.max_steps={args.steps}", "train.log_every_steps=1", "train.eval_every_steps=0",
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
    tps = [r["tokens_per_s"] for r in train[args.skip:]]
    return {"loss": [r["loss"] for r in train], "tokens_per_s": statistics.mean(tps) if tps else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of tokens/s (warm-up)")
    ap.add_argument("--global-batch", type=int, default=512)
    ap.add_argument("--microbatch", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
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
        args.steps, args.skip = min(args.steps, 6), 1
    import shutil

    results = {}
    for n in (1, args.gpus):
        run_dir = args.work / f"run-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        results[n] = launch(n, run_dir, args)
    noise = None
    if args.noise_seed is not None:
        run_dir = args.work / f"run-1-seed{args.noise_seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        noise = launch(1, run_dir, args, seed=args.noise_seed)
    import torch

    one, many = results[1], results[args.gpus]
    out = {
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke, gloo)"),
        "gpus": args.gpus,
        "global_batch": 16 if args.smoke else args.global_batch,
        "microbatch_per_gpu": 8 if args.smoke else args.microbatch,
        "speedup": (many["tokens_per_s"] / one["tokens_per_s"]) if one["tokens_per_s"] else None,
        "tokens_per_s": {"1": one["tokens_per_s"], str(args.gpus): many["tokens_per_s"]},
        "loss_1gpu": one["loss"],
        f"loss_{args.gpus}gpu": many["loss"],
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(one["loss"], many["loss"], strict=True)),
        "compile": bool(args.compile),
    }
    if noise is not None:
        # the same 1-GPU run from another seed (init, data order, masks, dropout): the spread two equally
        # valid runs show; the 1-vs-N difference should be no larger
        out[f"loss_1gpu_seed{args.noise_seed}"] = noise["loss"]
        out["max_abs_loss_diff_other_seed"] = max(abs(a - b) for a, b in zip(one["loss"], noise["loss"], strict=True))
        out["mean_abs_loss_diff"] = statistics.mean(abs(a - b) for a, b in zip(one["loss"], many["loss"], strict=True))
        out["mean_abs_loss_diff_other_seed"] = statistics.mean(
            abs(a - b) for a, b in zip(one["loss"], noise["loss"], strict=True))
    path = args.out or (RESULTS if not args.smoke else args.work / "pretrain_multi_gpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("loss_")}, indent=2))
    print("loss 1 vs", args.gpus, ":", [f"{a:.4f}/{b:.4f}" for a, b in zip(one["loss"], many["loss"], strict=False)])


if __name__ == "__main__":
    main()
