"""GLUE-style finetuning of a small pretrained model on the two real tasks in the SST-2 layout (GPU run).

Finetunes ``--model`` (a pretraining run's ``final/`` or a checkpoint folder) on ``sst2_like`` and
``sms_spam`` (``$MOSAIC_DATA/tasks`` on the GPU host, else ../shared/data/tasks), several seeds each,
with the GLUE runner (``mosaic_embed.train.glue.run_glue``: AdamW + linear warmup/decay, seq 256, the
``custom`` task recipe of recipes/glue/mosaicbert.yaml = the paper's SST-2 values unless ``--set``), and
reports dev accuracy mean/std per task, finetuning and evaluation throughput (examples/s, real tokens/s),
and the pretraining minutes read from the model folder (``checkpoint_meta.json`` or ``manifest.json``).

With ``--compare-padded`` (default on for models with the unpadded path) one more seed per task runs with
padded batches (``padded_batches: true``) in the same process: the packed/padded throughput ratio.

Usage (GPU host): python benchmarks/glue_small.py --model runs/small/final [--seeds 19,8364,717]
    [--tasks sst2_like,sms_spam] [--set hparams.custom.lr=5e-5 ...] [--max-train N]
    [--baseline-model runs/bert-small/final]   (a second model, e.g. transformers BERT, same recipe)
Writes benchmarks/results/glue_small.json (``--results`` to write elsewhere, e.g. a CPU smoke run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from mosaic_embed.artifacts import atomic_write_json, environment, git_commit  # noqa: E402
from mosaic_embed.config import GlueConfig, load_config  # noqa: E402
from mosaic_embed.train.glue import pretraining_meta, run_glue  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "glue_small.json"


def default_tasks_dir() -> Path:
    env = os.environ.get("MOSAIC_DATA")
    return Path(env) / "tasks" if env else ROOT.parent / "shared" / "data" / "tasks"


def summarize(point: dict) -> dict:
    """Per task: dev accuracy mean/std/per-seed (x100) and mean throughput."""
    out = {}
    for name, t in point["tasks"].items():
        acc = t["summary"]["dev/accuracy"]
        out[name] = {
            "dev_accuracy_mean": 100 * acc["mean"],
            "dev_accuracy_std": 100 * acc["std"],
            "dev_accuracy_per_seed": {str(s["seed"]): 100 * s["metrics"]["dev"]["accuracy"] for s in t["seeds"]},
            "seeds": [s["seed"] for s in t["seeds"]],
            "train_examples": t["train_examples"],
            "dev_examples": t["eval_examples"]["dev"],
            "steps_per_seed": t["seeds"][0]["steps"],
            "hparams": t["hparams"],
            "throughput": t["throughput"],
            "finetune_s_per_seed": sum(s["train"]["seconds"] for s in t["seeds"]) / len(t["seeds"]),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="pretrained model folder (runs/NAME/final or a checkpoint)")
    ap.add_argument("--tasks-dir", default=None, help="folder holding the task folders (default $MOSAIC_DATA/tasks)")
    ap.add_argument("--tasks", default="sst2_like,sms_spam")
    ap.add_argument("--seeds", default="19,8364,717")
    ap.add_argument("--recipe", default="mosaicbert")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-train", type=int, default=None, help="cut each train split (smoke runs only)")
    ap.add_argument("--max-eval", type=int, default=None, help="cut each dev split (smoke runs only)")
    ap.add_argument("--compare-padded", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the short throwaway runs that precede the measured ones")
    ap.add_argument("--baseline-model", default=None,
                    help="a second model folder (e.g. a transformers BERT run) finetuned the same way, side by side")
    ap.add_argument("--out", default=None, help="run folder for the GLUE runner (default runs/glue_small)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    tasks_dir = Path(args.tasks_dir) if args.tasks_dir else default_tasks_dir()
    names = [t for t in args.tasks.split(",") if t]
    custom = [{"path": str(tasks_dir / n), "num_labels": 2, "metrics": ["accuracy"], "name": n} for n in names]
    out = Path(args.out or ROOT / "runs" / "glue_small")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cfg = load_config(GlueConfig, args.recipe, args.overrides, model=args.model, out=str(out / "packed"), tasks=[],
                           custom_tasks=custom, seeds=seeds, max_train_examples=args.max_train,
                           max_eval_examples=args.max_eval)
    if args.warmup:
        # One short throwaway run per batch mode first: kernel compilation/autotuning and one-time setup then
        # land in neither measured run, so the packed and padded figures are not skewed by running order.
        for extra in ([], ["padded_batches=true"]):
            wcfg = load_config(GlueConfig, args.recipe, [*args.overrides, *extra, "log_every=0"], model=args.model,
                                    out=str(out / "warmup"), tasks=[], custom_tasks=custom[:1], seeds=seeds[:1],
                                    max_train_examples=256, max_eval_examples=256)
            run_glue(wcfg)
    t0 = time.perf_counter()
    main_res = run_glue(cfg)["points"][0]
    wall = time.perf_counter() - t0
    packed = {n: t["throughput"]["batches"] == "packed" for n, t in main_res["tasks"].items()}
    compare = args.compare_padded == "on" or (args.compare_padded == "auto" and any(packed.values()))
    padded_res = None
    if compare:
        pcfg = load_config(GlueConfig, args.recipe, [*args.overrides, "padded_batches=true"], model=args.model,
                                out=str(out / "padded"), tasks=[], custom_tasks=custom, seeds=seeds[:1],
                                max_train_examples=args.max_train, max_eval_examples=args.max_eval)
        padded_res = run_glue(pcfg)["points"][0]

    baseline = None
    if args.baseline_model:
        bcfg = load_config(GlueConfig, args.recipe, args.overrides, model=args.baseline_model, out=str(out / "baseline"),
                                tasks=[], custom_tasks=custom, seeds=seeds, max_train_examples=args.max_train,
                                max_eval_examples=args.max_eval)
        bres = run_glue(bcfg)["points"][0]
        bpre = pretraining_meta(args.baseline_model)
        baseline = {
            "model": str(args.baseline_model),
            "model_type": json.loads((Path(args.baseline_model) / "config.json").read_text()).get("model_type"),
            "pretraining": {**bpre, "minutes": None if bpre["wall_clock_s"] is None else bpre["wall_clock_s"] / 60},
            "tasks": summarize(bres),
        }

    pre = pretraining_meta(args.model)
    result = {
        "benchmark": "glue_small",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "environment": environment(),
        "git_commit": git_commit(),
        "model": str(args.model),
        "model_type": json.loads((Path(args.model) / "config.json").read_text()).get("model_type"),
        "pretraining": {**pre, "minutes": None if pre["wall_clock_s"] is None else pre["wall_clock_s"] / 60},
        "tasks_dir": str(tasks_dir),
        "subset": {"max_train": args.max_train, "max_eval": args.max_eval},
        "precision": "bf16 autocast" if torch.cuda.is_available() else "fp32",
        "tasks": summarize(main_res),
        "total_wall_s": wall,
    }
    if padded_res is not None:
        cmp = {}
        for n, t in padded_res["tasks"].items():
            a, b = main_res["tasks"][n]["seeds"][0], t["seeds"][0]
            cmp[n] = {
                "seed": b["seed"],
                "packed_train_tokens_per_s": a["train"]["tokens_per_s"],
                "padded_train_tokens_per_s": b["train"]["tokens_per_s"],
                "train_speedup": a["train"]["tokens_per_s"] / b["train"]["tokens_per_s"],
                "train_speedup_steady": (a["train"]["steady"]["tokens_per_s"] / b["train"]["steady"]["tokens_per_s"])
                if a["train"]["steady"] and b["train"]["steady"] else None,
                "packed_eval_tokens_per_s": a["eval"]["dev"]["tokens_per_s"],
                "padded_eval_tokens_per_s": b["eval"]["dev"]["tokens_per_s"],
                "eval_speedup": a["eval"]["dev"]["tokens_per_s"] / b["eval"]["dev"]["tokens_per_s"],
                "padded_dev_accuracy": 100 * b["metrics"]["dev"]["accuracy"],
                "packed_dev_accuracy_same_seed": 100 * a["metrics"]["dev"]["accuracy"],
            }
        result["packed_vs_padded"] = cmp
    if baseline is not None:
        result["baseline"] = baseline
    atomic_write_json(args.results, result)

    pm = result["pretraining"]["minutes"]
    print(f"\nmodel {args.model} ({result['model_type']}), pretraining "
          f"{'unknown' if pm is None else f'{pm:.1f} min'}, device {result['device']}")
    print(f"{'task':<12} {'dev acc (mean ± std)':>22} {'seeds':>6} {'train ex/s':>11} {'train tok/s':>12} "
          f"{'eval ex/s':>10} {'batches':>8}")
    for n, t in result["tasks"].items():
        th = t["throughput"]
        print(f"{n:<12} {t['dev_accuracy_mean']:>13.2f} ± {t['dev_accuracy_std']:<6.2f} {len(t['seeds']):>6} "
              f"{th['train_examples_per_s']:>11.1f} {th['train_tokens_per_s']:>12.0f} "
              f"{th['eval_examples_per_s']:>10.1f} {th['batches']:>8}")
    if baseline is not None:
        bm = baseline["pretraining"]["minutes"]
        print(f"baseline {baseline['model']} ({baseline['model_type']}), pretraining "
              f"{'unknown' if bm is None else f'{bm:.1f} min'}")
        for n, t in baseline["tasks"].items():
            th = t["throughput"]
            print(f"{n:<12} {t['dev_accuracy_mean']:>13.2f} ± {t['dev_accuracy_std']:<6.2f} {len(t['seeds']):>6} "
                  f"{th['train_examples_per_s']:>11.1f} {th['train_tokens_per_s']:>12.0f} "
                  f"{th['eval_examples_per_s']:>10.1f} {th['batches']:>8}")
    for n, c in result.get("packed_vs_padded", {}).items():
        print(f"{n}: packed/padded train tokens/s x{c['train_speedup']:.2f}, eval x{c['eval_speedup']:.2f}")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
