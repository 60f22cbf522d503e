"""GLUE finetuning speed: MosaicBERT vs transformers' BERT of the same size, through the same runner.

Both models start from random weights of one shape (``--size``: MosaicBERT-Small is 8 x 512 with GeGLU;
its BERT twin is transformers' ``BertForMaskedLM`` 8 x 512, SDPA attention, the same vocabulary), saved
with the bundled tokenizer, and are finetuned by ``mosaic_embed.train.glue.run_glue`` (one seed, the same
recipe and examples) on a real task in the SST-2 layout (``--task``). Throughput does not depend on what
the weights learnt; accuracy is printed only as a sanity check (random weights).

Rows: ours (packed batches: no padding tokens; on CUDA each training step is a CUDA graph replay, the
runner's default, see ``train/graphed_steps.py``), ours packed with eager steps (``cuda_graphs=false``), ours
with padded batches (eager), BERT (padded: its only form, eager).
Figures per row: training examples/s after the runner's warm-up steps (``train.steady``), evaluation
examples/s, both as ratios over BERT. Each model first runs a short throwaway finetuning (kernel
compilation, allocator growth) so the order of the rows does not matter.

    python benchmarks/glue_throughput.py --out benchmarks/results/glue_throughput.json   # GPU host
    python benchmarks/glue_throughput.py --size tiny --max-train 64 --device cpu --out /tmp/g.json   # smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # glue_small.py: where the task folders are

SIZES = {"small": "mosaic-bert-small", "base": "mosaic-bert-base", "tiny": "mosaic-bert-tiny"}


def build_models(root: Path, size: str) -> dict[str, Path]:
    """Random-weight twins of one shape, each a pretraining-style folder (config, weights, tokenizer)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from mosaic_embed.data.tokenizer import load_tokenizer, padded_vocab_size
    from mosaic_embed.model import MosaicBertForMaskedLM, preset_config

    tok = load_tokenizer(None)
    cfg = preset_config(SIZES[size], vocab_size=padded_vocab_size(tok))
    torch.manual_seed(0)
    ours = MosaicBertForMaskedLM(cfg)
    bert = BertForMaskedLM(BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=512, attn_implementation="sdpa"))
    out = {}
    for name, model in (("mosaic_bert", ours), ("bert", bert)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def finetune(model: Path, task: Path, out: Path, max_train: int | None, max_eval: int | None,
             overrides: list[str]) -> dict:
    from mosaic_embed.config import GlueConfig, load_config
    from mosaic_embed.train.glue import run_glue

    custom = [{"path": str(task), "num_labels": 2, "metrics": ["accuracy"], "name": task.name}]
    cfg = load_config(GlueConfig, "mosaicbert", [*overrides, "log_every=0"], model=str(model), out=str(out),
                      tasks=[], custom_tasks=custom, seeds=[19], max_train_examples=max_train,
                      max_eval_examples=max_eval)
    t = time.perf_counter()
    point = run_glue(cfg)["points"][0]
    (seed,) = point["tasks"][task.name]["seeds"]
    steady = seed["train"]["steady"] or seed["train"]
    return {"train_examples_per_s": steady["examples_per_s"], "train_tokens_per_s": steady["tokens_per_s"],
            "train_examples_per_s_with_warmup": seed["train"]["examples_per_s"], "steps": seed["steps"],
            "batches": seed["batches"], "cuda_graphs": seed.get("cuda_graphs"), "eval_examples_per_s": seed["eval"]["dev"]["examples_per_s"],
            "dev_accuracy": seed["metrics"]["dev"]["accuracy"], "wall_s": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", type=Path, default=None, help="a task folder in the SST-2 layout (default sst2_like)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--max-train", type=int, default=None, help="cut the train split (default: all of it)")
    ap.add_argument("--max-eval", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="GlueConfig override for every row (e.g. hparams.custom.batch_size=32)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import torch
    from glue_small import default_tasks_dir

    from mosaic_embed.artifacts import atomic_write_json, git_commit

    task = args.task or default_tasks_dir() / "sst2_like"
    overrides = [*args.overrides, f"device={args.device}"]
    work = Path(tempfile.mkdtemp(prefix="glue-throughput-"))
    models = build_models(work, args.size)
    for name, folder in models.items():  # warm-up: compilation and allocator growth land in no measured row
        finetune(folder, task, work / f"warmup-{name}", 256, 256, overrides)
    rows = {
        "ours (packed)": finetune(models["mosaic_bert"], task, work / "packed", args.max_train, args.max_eval, overrides),
        "ours (packed, eager steps)": finetune(models["mosaic_bert"], task, work / "packed-eager", args.max_train,
                                              args.max_eval, [*overrides, "cuda_graphs=false"]),
        "ours (padded)": finetune(models["mosaic_bert"], task, work / "padded", args.max_train, args.max_eval,
                                  [*overrides, "padded_batches=true"]),
        "bert (transformers, SDPA)": finetune(models["bert"], task, work / "bert", args.max_train, args.max_eval,
                                              overrides),
    }
    base = rows["bert (transformers, SDPA)"]
    for r in rows.values():
        r["train_speedup"] = r["train_examples_per_s"] / base["train_examples_per_s"]
        r["eval_speedup"] = r["eval_examples_per_s"] / base["eval_examples_per_s"]
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu",
        "commit": git_commit(), "torch": torch.__version__, "size": args.size, "task": task.name,
        "max_train": args.max_train, "max_eval": args.max_eval, "overrides": args.overrides,
        "note": "random weights of one shape; one seed; train examples/s after the runner's warm-up steps",
        "target": "ours >= 2x bert in train and eval examples/s (issue 15)",
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    print(f"{'row':28s} {'train ex/s':>11s} {'x bert':>7s} {'eval ex/s':>10s} {'x bert':>7s} {'batches':>8s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['train_examples_per_s']:11.0f} {r['train_speedup']:7.2f} "
              f"{r['eval_examples_per_s']:10.0f} {r['eval_speedup']:7.2f} {r['batches']:>8s}")
    return result


if __name__ == "__main__":
    main()
