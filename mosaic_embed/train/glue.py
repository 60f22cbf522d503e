"""GLUE finetuning and evaluation: ``run_glue(cfg)`` behind ``mosaic-embed glue``.

For every task and seed: load the checkpoint with ``AutoModelForSequenceClassification`` (a new head
with the task's number of labels), finetune it with AdamW + linear warmup/decay at sequence length 256,
evaluate on the dev split(s), and record the GLUE metrics and the run's own throughput. The paper's
staging is kept: MNLI runs first, and RTE, MRPC and STS-B start from the MNLI-finetuned backbone
(encoder weights from MNLI, classification head new) when MNLI is part of the run.

Batches are *unpadded* when the model's forward takes ``cu_seqlens`` (MosaicBERT): the examples of a
batch are concatenated into ``input_ids (T,)`` with ``cu_seqlens (B+1,)`` and ``max_seqlen``, so no
compute is spent on padding. Models without that path (transformers' BERT, the baseline) get padded
``(B, S)`` batches with ``attention_mask``, padded only to the longest example of the batch.

With ``checkpoints`` (a glob over ``runs/NAME/checkpoints/*``) every checkpoint is evaluated in turn and
its pretraining wall-clock time (``checkpoint_meta.json``) is recorded: the points of a Pareto curve of
accuracy against pretraining time (``mosaic-embed plot pareto``).

Outputs in ``cfg.out``: ``results.json`` (every seed's metrics, means and spreads, throughput, the GLUE
average), ``results.md`` (the table), ``config.yaml`` and ``manifest.json``; all written atomically.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    remove_temporaries,
    write_manifest,
    writer_lock,
)
from ..config import GlueConfig, GlueTaskHParams, save_config, to_dict
from ..data import packing
from ..data.glue import GLUE_TASKS, Examples, TaskData, load_custom_task, load_glue_task, resolve_tasks
from ..runtime import WarmupLinearDecay, autocast, resolve_device, resolve_precision
from .checkpoints import pretraining_meta
from .glue_metrics import compute_metrics, glue_average, mean_std, task_score
from .graphed_steps import GraphedSteps

log = logging.getLogger(__name__)

RESULTS_KIND = "mosaic_embed.glue_results"
WARMUP_STEPS = 10  # steps left out of the "steady" training throughput
READBACK_STEPS = 25  # losses are copied to the host (and checked for NaN/inf) this often


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# model loading and staging
# ----------------------------------------------------------------------------------------------------------


def supports_packed(model: torch.nn.Module) -> bool:
    """True when ``model.forward`` takes unpadded input (``cu_seqlens``, ``max_seqlen``): MosaicBERT."""
    params = inspect.signature(model.forward).parameters
    return "cu_seqlens" in params and "max_seqlen" in params


#: The task head: the weights that are NOT carried over from the MNLI model (the paper's staging loads the
#: MNLI checkpoint with ``load_ignore_keys=[...classifier*]``: encoder and pooler carry over). Both
#: transformers' BERT and MosaicBERT name their output layer ``classifier``.
HEAD_PREFIX = "classifier."


def load_classifier(model_dir: str | Path, num_labels: int, backbone_from: str | Path | None = None):
    """``AutoModelForSequenceClassification`` from ``model_dir`` with a new ``num_labels`` head.

    With ``backbone_from`` (a finetuned classifier folder, e.g. the MNLI model), every weight except the
    output layer (``classifier.*``) -- the encoder and the pooler -- is replaced by that folder's; the
    output layer stays freshly initialised for the new label set. A weight the donor lacks, or a shape that
    differs, is an error: a silently partial transfer would be a wrong result.
    """
    import transformers

    from ..model.loading import switching_heads  # (also registers MosaicBERT with the Auto classes)

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model folder not found")
    with switching_heads():  # the MLM head stays behind, pooler and classifier start new: expected
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels)
    if backbone_from is None:
        return model
    donor = transformers.AutoModelForSequenceClassification.from_pretrained(str(backbone_from))
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    theirs = {k: v for k, v in donor.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    if len(ours) == len(model.state_dict()):
        raise ValueError(f"{model_dir}: the classifier has no '{HEAD_PREFIX}*' head weights to keep apart")
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise ValueError(f"{backbone_from}: lacks weights {missing[:3]} of {model_dir}")
    for k, v in ours.items():
        if theirs[k].shape != v.shape:
            raise ValueError(f"{backbone_from}: {k} has shape {tuple(theirs[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: theirs[k] for k in ours}, strict=False)
    del donor
    return model


# ----------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoded:
    """A tokenized split: per-example token ids and segment ids (lists of int), and labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: np.ndarray  # (N,) int64 class ids or float32 scores

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, examples: Examples, max_seq_len: int, regression: bool) -> Encoded:
    """Tokenize ``[CLS] a [SEP] (b [SEP])`` truncated to ``max_seq_len`` (longest-first for pairs)."""
    enc = tokenizer(
        examples.text_a, examples.text_b, truncation=True, max_length=max_seq_len,
        return_token_type_ids=True, return_attention_mask=False,
    )
    ids = enc["input_ids"]
    tt = enc.get("token_type_ids") or [[0] * len(x) for x in ids]
    labels = np.asarray(examples.labels, dtype=np.float32 if regression else np.int64)
    return Encoded(ids, tt, labels)


def collate(enc: Encoded, idx: Sequence[int], packed: bool, pad_id: int, device: torch.device) -> dict[str, Any]:
    """Model inputs for the examples ``idx``: packed (``input_ids``/``token_type_ids`` (T,), ``cu_seqlens``,
    ``max_seqlen``) or padded to the longest example ((B, S) with ``attention_mask``); see ``data/packing.py``."""
    seqs = [enc.input_ids[i] for i in idx]
    types = [enc.token_type_ids[i] for i in idx]
    if packed:
        return packing.packed_inputs(seqs, types, device=device)
    return packing.padded_inputs(seqs, types, pad_id, device=device)


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


# ----------------------------------------------------------------------------------------------------------
# one finetuning run
# ----------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logits(model, batch: dict[str, Any]) -> torch.Tensor:
    out = model(**batch)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return torch.nn.functional.mse_loss(logits.view(-1), labels.view(-1))
    return torch.nn.functional.cross_entropy(logits, labels)


@torch.no_grad()
def evaluate(model, enc: Encoded, regression: bool, batch_size: int, packed: bool, pad_id: int,
             device: torch.device, dtype: torch.dtype) -> tuple[np.ndarray, dict[str, float]]:
    """Predictions for every example (class ids or scores, in input order) and the pass's throughput.

    Examples are batched in order of length: padded batches then waste little, and the order of the
    predictions is restored afterwards.
    """
    model.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))
    preds = np.empty(len(enc), dtype=np.float32 if regression else np.int64)
    tokens = 0
    _sync(device)
    t0 = time.perf_counter()
    outs = []  # stay on the device until the end: a readback per batch would stall the queue every batch
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = collate(enc, idx, packed, pad_id, device)
        with autocast(device, dtype):
            logits = _logits(model, batch)
        outs.append(logits.view(-1) if regression else logits.argmax(-1))
        tokens += sum(len(enc.input_ids[j]) for j in idx)
    if outs:
        preds[order] = torch.cat(outs).cpu().numpy()
    dt = max(time.perf_counter() - t0, 1e-9)
    return preds, {"examples": len(enc), "tokens": tokens, "seconds": dt,
                   "examples_per_s": len(enc) / dt, "tokens_per_s": tokens / dt}


def finetune_one(
    model_dir: Path,
    task: TaskData,
    hp: GlueTaskHParams,
    seed: int,
    cfg: GlueConfig,
    tokenizer,
    encoded: dict[str, Encoded],
    backbone_from: Path | None = None,
    save_to: Path | None = None,
) -> dict[str, Any]:
    """Finetune one seed of one task and evaluate it; returns metrics per eval split and throughput.

    The optimizer is AdamW over all parameters (the reference applies decoupled decay to every weight),
    ``weight_decay = hp.weight_decay / hp.lr`` (the decoupled value, see :class:`GlueTaskHParams`);
    linear warmup over ``warmup_fraction`` of the steps, then linear decay to 0.
    """
    spec = task.spec
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    torch.manual_seed(seed)  # the new head's init
    model = load_classifier(model_dir, spec.num_labels, backbone_from).to(device)
    packed = not cfg.padded_batches and supports_packed(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train = encoded["train"]
    steps_per_epoch = math.ceil(len(train) / hp.batch_size)
    total = max(1, math.ceil(hp.epochs * steps_per_epoch))
    warmup = int(hp.warmup_fraction * total)
    graphs = packed and cfg.cuda_graphs and device.type == "cuda"
    # A captured step reads the learning rate from a device tensor that the scheduler fills in place.
    lr = torch.tensor(hp.lr, device=device) if graphs else hp.lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            weight_decay=hp.weight_decay / hp.lr, capturable=graphs,
                            fused=device.type == "cuda")  # one kernel for the whole step, not a few per tensor
    sched = WarmupLinearDecay(warmup, total, final=0.0).scheduler(opt)
    graphed = GraphedSteps(model, opt, spec.is_regression, device, dtype, hp.batch_size, cfg.max_seq_len,
                           pad_id) if graphs else None
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.as_tensor(train.labels)
    model.train()
    step, tokens, seen = 0, 0, 0
    # Losses stay on the device until read back every READBACK_STEPS steps (or at a log line): reading a
    # loss synchronises the GPU, and one read per step would stall the host from queueing the next batch.
    pending: list[torch.Tensor] = []
    recent: collections.deque[float] = collections.deque(maxlen=max(50, cfg.log_every))

    def read_back() -> None:
        if not pending:
            return
        values = torch.stack(pending).float().cpu().tolist()
        first = step - len(values) + 1
        pending.clear()
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise FloatingPointError(f"{spec.name} seed {seed}: loss is {v} at step {first + i} of {total}")
        recent.extend(values)

    # Throughput is also measured after the first WARMUP_STEPS steps: kernel compilation/autotuning and
    # allocator growth happen there, and short finetuning runs would otherwise under-report the steady rate.
    warm_at: tuple[float, int, int] | None = None
    _sync(device)
    t0 = time.perf_counter()
    while step < total:
        for idx in _batches(len(train), hp.batch_size, gen):
            if graphed is not None:
                loss = graphed.step([train.input_ids[j] for j in idx], [train.token_type_ids[j] for j in idx],
                                    train.labels[idx])
            else:
                batch = collate(train, idx, packed, pad_id, device)
                y = packing.to_device(labels_t[idx], device)
                with autocast(device, dtype):
                    logits = _logits(model, batch)
                loss = _loss(logits, y, spec.is_regression)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            seen += len(idx)
            tokens += sum(len(train.input_ids[j]) for j in idx)
            pending.append(loss.detach())
            if step == WARMUP_STEPS:
                _sync(device)
                warm_at = (time.perf_counter(), seen, tokens)
            logging_now = bool(cfg.log_every) and step % cfg.log_every == 0
            if logging_now or step % READBACK_STEPS == 0 or step >= total:
                read_back()
            if logging_now:
                window = list(recent)[-cfg.log_every:]
                log.info("%s seed %d: step %d/%d loss %.4f lr %.2e", spec.name, seed, step, total,
                         float(np.mean(window)), float(sched.get_last_lr()[0]))
            if step >= total:
                break
    read_back()
    _sync(device)
    t_end = time.perf_counter()
    train_s = max(t_end - t0, 1e-9)
    steady = None
    if warm_at is not None and step > WARMUP_STEPS:
        dt = max(t_end - warm_at[0], 1e-9)
        steady = {"examples_per_s": (seen - warm_at[1]) / dt, "tokens_per_s": (tokens - warm_at[2]) / dt,
                  "after_steps": WARMUP_STEPS}
    result: dict[str, Any] = {
        "seed": seed,
        "init": "mnli" if backbone_from is not None else "pretrained",
        "batches": "packed" if packed else "padded",
        "cuda_graphs": graphed.summary() if graphed is not None else None,
        "steps": total,
        "final_loss": float(np.mean(list(recent)[-50:])),
        "train": {"examples": seen, "tokens": tokens, "seconds": train_s,
                  "examples_per_s": seen / train_s, "tokens_per_s": tokens / train_s, "steady": steady},
        "eval": {},
        "metrics": {},
    }
    for split, enc in encoded.items():
        if split == "train":
            continue
        preds, thr = evaluate(model, enc, spec.is_regression, cfg.eval_batch_size, packed, pad_id, device, dtype)
        result["metrics"][split] = compute_metrics(spec.metrics, preds, enc.labels)
        result["eval"][split] = thr
    result["score"] = task_score(result["metrics"], spec.score_metrics or spec.metrics)
    # STS-B's leaderboard score averages Pearson and Spearman; the reference code scores Spearman only.
    result["score_leaderboard"] = task_score(result["metrics"], spec.metrics)
    if save_to is not None:
        with atomic_directory(save_to) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------------
# a whole model: every task x seed
# ----------------------------------------------------------------------------------------------------------


def load_tasks(cfg: GlueConfig) -> list[TaskData]:
    """GLUE tasks (in run order, MNLI first) then custom tasks, cut to ``max_*_examples``."""
    tasks = [load_glue_task(n, cfg.data_dir) for n in (resolve_tasks(cfg.tasks) if cfg.tasks else [])]
    for ct in cfg.custom_tasks:
        tasks.append(load_custom_task(ct.path, ct.num_labels, ct.metrics or None, ct.name))
    names = [t.spec.name for t in tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"task names must be unique, got {sorted(dup)} twice (give custom tasks a name)")
    for t in tasks:
        t.train = t.train.subset(cfg.max_train_examples)
        t.evals = {k: v.subset(cfg.max_eval_examples) for k, v in t.evals.items()}
    return tasks


def evaluate_model(model_dir: str | Path, cfg: GlueConfig, out: Path, tasks: list[TaskData],
                   run_dir: Path | None = None) -> dict[str, Any]:
    """Finetune + evaluate ``model_dir`` on every task and seed; returns one result point (see module doc).

    Paths in the point: the model resolved; saved models relative to ``run_dir`` (default ``out``), the
    folder the results are written to, so that the folder can move.
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir).resolve()
    run_dir = Path(run_dir if run_dir is not None else out)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    point: dict[str, Any] = {"model": str(model_dir), "pretrain": pretraining_meta(model_dir), "tasks": {}}
    mnli_model: Path | None = None
    for task in tasks:
        spec = task.spec
        hp = cfg.task_hparams(spec.name)
        from_mnli = spec.from_mnli if hp.from_mnli is None else hp.from_mnli
        if from_mnli and mnli_model is None:
            log.warning("%s: MNLI is not part of this run: starting from the pretrained weights, not from "
                        "the MNLI-finetuned ones (the paper's staging)", spec.name)
        t0 = time.perf_counter()
        encoded = {"train": encode(tokenizer, task.train, cfg.max_seq_len, spec.is_regression)}
        encoded.update({k: encode(tokenizer, v, cfg.max_seq_len, spec.is_regression) for k, v in task.evals.items()})
        tokenize_s = time.perf_counter() - t0
        runs = []
        for i, seed in enumerate(hp.seeds):
            # The first MNLI seed's model is the starting point of the staged tasks (as in the reference).
            keep = spec.name == "mnli" and i == 0
            save_to = out / "models" / f"{spec.name}-seed{seed}" if (keep or cfg.save_models) else None
            log.info("%s: seed %d (%d train examples, %s)", spec.name, seed, len(task.train),
                     "from MNLI" if from_mnli and mnli_model else "from pretrained")
            r = finetune_one(model_dir, task, hp, seed, cfg, tokenizer, encoded,
                             backbone_from=mnli_model if from_mnli else None, save_to=save_to)
            if save_to is not None:  # relative to the results folder, which may move
                r["saved"] = save_to.resolve().relative_to(run_dir.resolve()).as_posix()
            log.info("%s seed %d: %s", spec.name, seed, json.dumps(r["metrics"]))
            runs.append(r)
            if keep:
                mnli_model = save_to
        summary: dict[str, Any] = {}
        for split in task.evals:
            for metric in spec.metrics:
                summary[f"{split}/{metric}"] = mean_std([r["metrics"][split][metric] for r in runs])
        summary["score"] = mean_std([r["score"] for r in runs])
        summary["score_leaderboard"] = mean_std([r["score_leaderboard"] for r in runs])
        point["tasks"][spec.name] = {
            "glue": spec.name in GLUE_TASKS,
            "metrics": list(spec.metrics),
            "score_metrics": list(spec.score_metrics or spec.metrics),
            "hparams": to_dict(hp),
            "train_examples": len(task.train),
            "eval_examples": {k: len(v) for k, v in task.evals.items()},
            "tokenize_s": tokenize_s,
            "seeds": runs,
            "summary": summary,
            "throughput": {
                "train_examples_per_s": float(np.mean([r["train"]["examples_per_s"] for r in runs])),
                "train_tokens_per_s": float(np.mean([r["train"]["tokens_per_s"] for r in runs])),
                "train_steady_tokens_per_s": float(np.mean([r["train"]["steady"]["tokens_per_s"] for r in runs]))
                if all(r["train"]["steady"] for r in runs) else None,
                "eval_examples_per_s": float(np.mean([e["examples_per_s"] for r in runs for e in r["eval"].values()])),
                "eval_tokens_per_s": float(np.mean([e["tokens_per_s"] for r in runs for e in r["eval"].values()])),
                "batches": runs[0]["batches"],
            },
        }
    glue = {n: t for n, t in point["tasks"].items() if t["glue"]}
    if glue:
        point["glue_average"] = glue_average({n: [r["score"] for r in t["seeds"]] for n, t in glue.items()})
        point["glue_average_leaderboard"] = glue_average(
            {n: [r["score_leaderboard"] for r in t["seeds"]] for n, t in glue.items()})
        point["glue_average"]["complete"] = len(glue) == len(GLUE_TASKS)
    return point


# ----------------------------------------------------------------------------------------------------------
# checkpoints (Pareto points) and the entry point
# ----------------------------------------------------------------------------------------------------------


def find_checkpoints(pattern: str) -> list[Path]:
    """Checkpoint folders matching ``pattern``, ordered by pretraining step (``checkpoint_meta.json``)."""
    found = [Path(p) for p in glob.glob(pattern) if Path(p).is_dir()]
    if not found:
        raise FileNotFoundError(f"--checkpoints {pattern!r}: no folder matches")
    models = [p for p in found if (p / "config.json").is_file()]
    if not models:
        raise FileNotFoundError(f"--checkpoints {pattern!r}: no matching folder holds a model (config.json)")

    def key(p: Path) -> tuple[float, str]:
        meta = pretraining_meta(p)
        if meta["step"] is not None:
            return float(meta["step"]), p.name
        m = re.search(r"(\d+)$", p.name)
        return (float(m.group(1)) if m else math.inf), p.name

    return sorted(models, key=key)


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` if it looks like a checkpoint to finetune (``config.json`` and tokenizer files), else a
    FileNotFoundError naming it: raised before any output exists, instead of a hub-lookup traceback or a
    tokenizer error that does not say which folder was wrong."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model folder not found")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json); give a save_pretrained "
                                "folder such as runs/NAME/final or runs/NAME/checkpoints/step-N")
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise FileNotFoundError(f"{model_dir}: no tokenizer files (tokenizer.json, vocab.txt) beside the model")
    return model_dir


def run_glue(cfg: GlueConfig) -> dict[str, Any]:
    """Finetune and evaluate ``cfg.model`` (or every checkpoint in ``cfg.checkpoints``) on the configured tasks.

    Returns the results dict also written to ``cfg.out/results.json``: ``{"kind", "run", "points": [...]}``
    with one point per model (a single model gives one point), each with per-task seeds, mean/std
    summaries, throughput, the pretraining time, and the GLUE average when GLUE tasks ran.
    """
    out = Path(cfg.out)
    models = find_checkpoints(cfg.checkpoints) if cfg.checkpoints else [Path(cfg.model)]
    # resolved: results and manifest name the models wherever they are read from
    models = [check_model_dir(m).resolve() for m in models]
    resolve_precision(cfg.precision, resolve_device(cfg.device))  # an impossible precision fails before any output
    tasks = load_tasks(cfg)  # load (and validate) every file before the first finetuning step
    with writer_lock(out, "mosaic-embed glue"):  # one writer per output folder
        remove_temporaries(out)
        save_config(cfg, out / "config.yaml")
        t0 = time.perf_counter()
        results: dict[str, Any] = {
            "kind": RESULTS_KIND,
            "run": _run_name(models[0]) if cfg.checkpoints else models[0].name,
            "points": [],
        }
        for m in models:
            sub = out / m.name if cfg.checkpoints else out
            log.info("evaluating %s", m)
            point = evaluate_model(m, cfg, sub, tasks, run_dir=out)
            results["points"].append(point)
            _write_results(out, results)  # after every point: a long Pareto sweep keeps what it has done
        write_manifest(out, "glue", cfg,
                       inputs={"models": [str(m) for m in models],
                               "checkpoints": str(Path(cfg.checkpoints).expanduser().absolute())
                               if cfg.checkpoints else None,
                               "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
                               "custom_tasks": [str(Path(ct.path).resolve()) for ct in cfg.custom_tasks]},
                       outputs={"results": "results.json", "table": "results.md"},
                       timings={"total_s": time.perf_counter() - t0})
    return results


def _run_name(checkpoint: Path) -> str:
    # runs/NAME/checkpoints/step-000100 -> NAME
    parent = checkpoint.parent
    return parent.parent.name if parent.name == "checkpoints" else parent.name


def _write_results(out: Path, results: dict[str, Any]) -> None:
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown_table(results))


def _fmt(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s["n"] > 1 else f"{100 * s['mean']:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    """The results as Markdown: per model point, one row per task (metrics x100, mean ± std over seeds)."""
    lines = [f"# GLUE results: {results['run']}", ""]
    for p in results["points"]:
        pre = p["pretrain"]
        hours = f"{pre['wall_clock_s'] / 3600:.3f} h" if pre.get("wall_clock_s") is not None else "unknown"
        lines += [f"## {p['model']}", "", f"pretraining time: {hours}"
                  + (f", step {pre['step']}" if pre.get("step") is not None else ""), ""]
        lines += ["| task | seeds | metrics (dev, ×100, mean ± std) | score | init | batches "
                  "| train ex/s | train tok/s | eval ex/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, t in p["tasks"].items():
            metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in t["summary"].items()
                                if k not in ("score", "score_leaderboard"))
            th = t["throughput"]
            lines.append(
                f"| {name} | {len(t['seeds'])} | {metrics} | {_fmt(t['summary']['score'])} "
                f"| {t['seeds'][0]['init']} | {th['batches']} | {th['train_examples_per_s']:.1f} "
                f"| {th['train_tokens_per_s']:.0f} | {th['eval_examples_per_s']:.1f} |"
            )
        if "glue_average" in p:
            g, gl = p["glue_average"], p["glue_average_leaderboard"]
            tag = "" if g["complete"] else f" (over {g['tasks']} of 8 tasks)"
            lines += ["", f"**GLUE average{tag}: {100 * g['mean']:.2f} ± {100 * g['std']:.2f}** "
                      f"(leaderboard-style STS-B: {100 * gl['mean']:.2f})"]
        lines.append("")
    lines += [
        "GLUE average: mean over tasks of each task's seed-mean score; MNLI = (m + mm)/2, QQP/MRPC = "
        "(acc + F1)/2, STS-B = Spearman (leaderboard-style: (Pearson + Spearman)/2), CoLA = Matthews, "
        "accuracy otherwise (the MosaicBERT reference code's rule).", "",
    ]
    return "\n".join(lines)
