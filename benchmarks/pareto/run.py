"""MosaicBERT vs transformers' BERT (and the paper's Fig. 4 ablations): accuracy vs pretraining time (issue 16).

The paper's central claim (Portes et al. 2023, Fig. 1B) at small scale, on one GPU: every model of the study
(``study.yaml``: recipes under ``recipes/``) gets its learning rate from a short sweep, is pretrained for the
same wall-clock budget with a checkpoint every few minutes, and every checkpoint is finetuned on the two
GLUE-layout tasks with several seeds; the points go to ``benchmarks/results/pareto.json`` and the curves
(mean of the tasks, error bars over seeds) to ``pareto.png`` through ``mosaic-embed plot pareto``.

Phases, each a subcommand, idempotent and resumable (state in ``--work``; what is finished also in
``--results``, so a later session on a fresh machine skips it):

  sweep     per model, ``sweep_steps`` steps at each grid value (a run with its own warmup and decay, via
            ``mosaic-embed pretrain``); the winner has the lowest validation MLM loss (15 % masking for every
            model); a winner at the edge of the grid extends it by ``sweep_factor`` (``sweep_extend`` times)
  pretrain  per model, ``mosaic-embed pretrain`` at the winning lr for ``budget_minutes`` of training: the steps
            are the budget times the steps/s of the winning sweep run (so the schedule anneals at the budget),
            a checkpoint every ``checkpoint_every_minutes`` (none deleted)
  finetune  every checkpoint and the final model x tasks x seeds: ``mosaic_embed.train.glue.run_glue``
            (the GLUE recipe's custom-task hparams), ``--jobs`` worker processes at a time
  merge     finished models -> ``--results`` (replacing runs of the same name, keeping the others)
  plot      ``mosaic-embed plot pareto`` on ``--results`` -> ``pareto.png`` and ``.svg`` beside it
  all       sweep, pretrain, finetune, merge, plot
  status    what is done and what is left (also printed at the end of every command)

Time limits: with ``--deadline-min M`` a command starts no work it cannot finish in M minutes, and stops a
pretraining run that would overrun with a checkpoint (``mosaic-embed pretrain --stop-after-minutes``); run the
same command again with ``--resume`` to continue. A partial run is never continued without ``--resume``.
Exit status: 0 = nothing left of what was asked, 4 = stopped at the deadline with work left, 1 = a failure.
``--export DIR`` (e.g. ``$OUT`` on a lent GPU machine) copies pareto.json/.png/.svg, a tarball of the light
files of the work folder (logs, metrics, sweep and finetuning records; no weights) and status.txt there.

``--tiny``: the same phases on a CPU in about a minute (``tiny.yaml``: tiny models, a few steps, the bundled
corpus, two generated 2-class tasks); tests/test_benchmarks.py runs it. See README.md for the GPU plan.

Usage: python benchmarks/pareto/run.py {status,sweep,pretrain,finetune,merge,plot,all} [--work runs/pareto]
       [--models a,b] [--corpus DIR] [--tasks-dir DIR] [--deadline-min 9] [--resume] [--jobs 8] [--export $OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:  # the package of this tree, also when run as a script
    sys.path.insert(0, str(ROOT))

from mosaic_embed.artifacts import (  # noqa: E402
    atomic_write_json,
    atomic_write_text,
    git_commit,
    read_json,
    writer_lock,
)
from mosaic_embed.config import ConfigError, from_dict, load_yaml, to_dict  # noqa: E402
from mosaic_embed.train.checkpoints import list_checkpoints, pretraining_meta  # noqa: E402  (no torch import)

PARETO_KIND = "mosaic_embed.pareto"  # = mosaic_embed.plot.PARETO_KIND (not imported: plot imports matplotlib)
EXIT_DEADLINE = 4  # this script's and `mosaic-embed pretrain`'s "stopped with a checkpoint, resumable"
EXIT_NAN = 3  # `mosaic-embed pretrain`: the loss became NaN/inf
KEEP_ALL = 1_000_000  # train.keep_last: no checkpoint of a Pareto run is ever deleted


# ----------------------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelPlan:
    """One model of the study: a pretraining recipe (a file under recipes/ or a path) and its sweep grid.

    ``lr_from``: take that model's sweep winner instead of a grid of its own (one run at it still measures
    this model's throughput). ``finetune``: "all" checkpoints (a curve) or only the "final" model (an
    ablation's end point).
    """

    recipe: str
    lrs: list[float] = dataclasses.field(default_factory=list)
    lr_from: str | None = None
    label: str | None = None
    finetune: Literal["all", "final"] = "all"

    def __post_init__(self):
        if bool(self.lrs) == bool(self.lr_from):
            raise ValueError("give a sweep grid (lrs) or lr_from (another model's winner), not both or neither")
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be positive learning rates, got {self.lrs}")
        self.lrs = sorted(set(self.lrs))


@dataclasses.dataclass
class TaskPlan:
    """A GLUE-layout task folder (train.tsv, dev.tsv) under --tasks-dir, and the dev metric reported."""

    name: str
    num_labels: int = 2
    metric: str = "accuracy"


@dataclasses.dataclass
class Estimates:
    """Seconds assumed before anything was measured on this machine (deadline decisions, status)."""

    sweep_run_s: float = 75.0  # one sweep run: start-up, warm compile, sweep_steps steps, validation
    pretrain_overhead_s: float = 90.0  # start-up, compile, validations and checkpoint writes beyond the budget
    finetune_unit_s: float = 45.0  # one (checkpoint, task, seed)


@dataclasses.dataclass
class StudyConfig:
    """The whole study (``study.yaml``; ``tiny.yaml`` for the CPU mode). Unknown keys are errors."""

    models: dict[str, ModelPlan]
    tasks: list[TaskPlan]
    seeds: list[int]
    budget_minutes: float = 5.0  # wall-clock pretraining per model (train time: no validation, no saving)
    checkpoint_every_minutes: float = 1.0
    max_points: int | None = None  # finetune at most this many checkpoints (evenly spread, the final included)
    pretrain_steps: int | None = None  # fixed steps instead of budget x measured steps/s (tiny mode)
    pretrain_evals: int = 4  # validations during pretraining (excluded from its wall clock)
    sweep_steps: int = 300
    # the one run of an ``lr_from`` model (its throughput and a divergence check): shorter than a sweep run,
    # its steady steps/s is measured after the first quarter of the steps all the same
    probe_steps: int = 150
    sweep_extend: int = 1
    sweep_factor: float = 2.0
    pretrain_overrides: list[str] = dataclasses.field(default_factory=list)  # --set for every pretraining run
    glue_recipe: str = "mosaicbert"
    glue_overrides: list[str] = dataclasses.field(default_factory=list)
    max_train_examples: int | None = None  # finetuning subsets: tiny mode only, never for reported numbers
    max_eval_examples: int | None = None
    estimates: Estimates = dataclasses.field(default_factory=Estimates)

    def __post_init__(self):
        if not self.models or not self.tasks or not self.seeds:
            raise ValueError("models, tasks and seeds must each name at least one")
        if self.budget_minutes <= 0 or self.checkpoint_every_minutes <= 0:
            raise ValueError("budget_minutes and checkpoint_every_minutes must be > 0")
        if self.pretrain_steps is not None and self.pretrain_steps < 1:
            raise ValueError(f"pretrain_steps must be >= 1, got {self.pretrain_steps}")
        if (self.sweep_steps < 1 or self.probe_steps < 1 or self.pretrain_evals < 0 or self.sweep_extend < 0
                or self.sweep_factor <= 1):
            raise ValueError("sweep_steps >= 1, probe_steps >= 1, pretrain_evals >= 0, sweep_extend >= 0 and "
                             "sweep_factor > 1")
        if self.max_points is not None and self.max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {self.max_points}")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: a name twice in {names}")
        order = list(self.models)
        for name, plan in self.models.items():
            if plan.lr_from is not None and (plan.lr_from not in self.models or order.index(plan.lr_from) > order.index(name)
                                             or self.models[plan.lr_from].lr_from is not None):
                raise ValueError(f"models.{name}.lr_from: {plan.lr_from!r} must be a model with a grid of its own, "
                                 "listed before it")

    def run_steps(self, model: str) -> int:
        """Steps of each of ``model``'s sweep runs (one probe run for an ``lr_from`` model)."""
        return self.probe_steps if self.models[model].lr_from is not None else self.sweep_steps


def load_study(path: Path) -> StudyConfig:
    study = from_dict(StudyConfig, load_yaml(path), source=str(path))
    for name, plan in study.models.items():
        recipe_path(plan.recipe, name)  # a missing recipe fails before any work
    return study


def recipe_path(recipe: str, model: str = "") -> Path:
    path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else HERE / "recipes" / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"model {model!r}: recipe not found: {path}")
    return path


def shown(path: Path) -> str:
    """A path as recorded in results: relative to the project when inside it (the results travel)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def lr_tag(lr: float) -> str:
    return format(lr, ".3g")


# ----------------------------------------------------------------------------------------------------------
# the command: clock, subprocesses, work folder
# ----------------------------------------------------------------------------------------------------------


class DeadlineStop(Exception):
    """The command's deadline came (or would come) before the next piece of work could finish."""


class Ctx:
    """What one command works with: the study, folders, the clock, and where its processes log."""

    def __init__(self, args: argparse.Namespace):
        self.t0 = time.monotonic()
        self.args = args
        self.tiny = args.tiny
        self.study_path = Path(args.study) if args.study else HERE / ("tiny.yaml" if args.tiny else "study.yaml")
        self.study = load_study(self.study_path)
        self.work = Path(args.work).resolve()
        self.results = Path(args.results).resolve() if args.results else (
            self.work / "pareto.json" if args.tiny else ROOT / "benchmarks" / "results" / "pareto.json")
        if args.models:
            names = [m for m in args.models.split(",") if m]
            unknown = [m for m in names if m not in self.study.models]
            if unknown:
                raise ConfigError(f"--models: {unknown[0]!r} is not in {self.study_path} "
                                  f"(models: {', '.join(self.study.models)})")
        else:
            names = list(self.study.models)
        self.models = names
        self.corpus = Path(args.corpus).resolve() if args.corpus else (None if args.tiny else default_data() / "corpus")
        self.tasks_dir = Path(args.tasks_dir).resolve() if args.tasks_dir else (
            self.work / "tiny-tasks" if args.tiny else default_data() / "tasks")
        self.deadline_s = args.deadline_min * 60.0 if args.deadline_min else None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if self.tiny:  # tiny matrices gain nothing from threads, and lose much to them on a busy machine
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.previous = read_results(self.results)

    # ---- clock ----

    def elapsed_s(self) -> float:
        return time.monotonic() - self.t0

    def remaining_s(self) -> float:
        return math.inf if self.deadline_s is None else self.deadline_s - self.elapsed_s()

    def check_fits(self, estimate_s: float, what: str) -> None:
        """Refuse to start ``what`` when it would not finish before the deadline, unless no command could fit
        it (then it runs and stops with a checkpoint)."""
        if self.deadline_s is None or estimate_s <= self.remaining_s() or estimate_s > self.deadline_s - 30:
            return
        raise DeadlineStop(f"{what} (~{estimate_s / 60:.1f} min) does not fit in the "
                           f"{max(self.remaining_s(), 0) / 60:.1f} min left before the deadline")

    # ---- folders ----

    def sweep_dir(self, model: str) -> Path:
        return self.work / "sweep" / model

    def pretrain_dir(self, model: str) -> Path:
        return self.work / "pretrain" / model

    def plan_path(self, model: str) -> Path:
        return self.work / "pretrain" / f"{model}.plan.json"

    def finetune_dir(self, model: str) -> Path:
        return self.work / "finetune" / model

    def record_path(self, model: str) -> Path:
        return self.work / "runs" / f"{model}.json"

    def log_path(self, name: str) -> Path:
        path = self.work / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ---- the pretraining CLI ----

    def pretrain_cli(self, model: str, out: Path, sets: list[str], log: Path, resume: bool = False,
                     stop_after_steps: int | None = None) -> tuple[int, float]:
        """``mosaic-embed pretrain`` for ``model`` into ``out`` (logged to ``log``); returns (exit status, seconds).

        With a deadline the run gets ``--stop-after-minutes`` so that it saves and stops in time (exit 4)."""
        cmd = [sys.executable, "-m", "mosaic_embed.cli", "pretrain", "--recipe",
               str(recipe_path(self.study.models[model].recipe, model)), "--out", str(out)]
        if self.corpus is not None:
            cmd += ["--corpus", str(self.corpus)]
        for s in [f"data.cache_dir={self.work / 'cache'}", *self.study.pretrain_overrides, *sets]:
            cmd += ["--set", s]
        if resume:
            cmd.append("--resume")
        hard_timeout = None
        if self.deadline_s is not None:
            # a minute for start-up before the training clock starts, saving the checkpoint and exiting
            minutes = max(0.25, (self.remaining_s() - 60.0) / 60.0)
            cmd += ["--stop-after-minutes", f"{minutes:.3f}"]
            hard_timeout = max(60.0, self.remaining_s() + 20.0)
        if stop_after_steps is not None:
            cmd += ["--stop-after-steps", str(stop_after_steps)]
        return run_logged(cmd, log, self.env, hard_timeout)


def default_data() -> Path:
    env = os.environ.get("MOSAIC_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout: float | None) -> tuple[int, float]:
    """Run ``cmd`` in its own process group, stdout and stderr to ``log``; killed (group) after ``timeout``."""
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = -signal.SIGTERM
    return rc, time.monotonic() - t0


def log_tail(log: Path, lines: int = 25) -> str:
    """The last lines of a log, progress-bar redraws left out."""
    text = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
    kept = [line for line in text if line.strip() and "%|" not in line]  # tqdm bars: "pretrain:  40%|████ ..."
    return "\n".join(kept[-lines:])


def read_results(path: Path) -> dict[str, Any]:
    """The study's results file (runs finished in earlier sessions, sweeps), or an empty one."""
    if not path.is_file():
        return {"kind": PARETO_KIND, "runs": [], "sweeps": {}}
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") != PARETO_KIND:
        raise ValueError(f"{path}: not a Pareto study file (kind {PARETO_KIND!r})")
    data.setdefault("runs", [])
    data.setdefault("sweeps", {})
    return data


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def throughput(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """From a run's metrics.jsonl: the median logged tokens/s and MFU, and the steady steps/s (from the logs
    after the first quarter of the steps, where compilation and warm-up are over)."""
    logs = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    if not logs:
        return {"tokens_per_s": None, "mfu": None, "steps_per_s": None}
    last = logs[-1]["step"]
    steady = [r for r in logs if r["step"] >= 0.25 * last]
    if len(steady) >= 2 and steady[-1]["wall_clock_s"] > steady[0]["wall_clock_s"]:
        steps_per_s = (steady[-1]["step"] - steady[0]["step"]) / (steady[-1]["wall_clock_s"] - steady[0]["wall_clock_s"])
    else:
        steps_per_s = last / max(logs[-1]["wall_clock_s"], 1e-9)
    mfu = [r["mfu"] for r in logs if isinstance(r.get("mfu"), int | float)]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in logs),
            "mfu": statistics.median(mfu) if mfu else None, "steps_per_s": steps_per_s}


def run_state(run_dir: Path) -> tuple[str, int | None]:
    """("done" | "partial" | "none", the latest checkpoint step) of a pretraining run folder."""
    if (run_dir / "final" / "manifest.json").is_file():
        return "done", None
    ckpts = list_checkpoints(run_dir)
    return ("partial", ckpts[-1][0]) if ckpts else ("none", None)


def fresh_folder(run_dir: Path) -> None:
    """A run that never saved a checkpoint left only logs behind: start it over from an empty folder."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


# ----------------------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------------------


def sweep_record_path(ctx: Ctx, model: str, lr: float) -> Path:
    return ctx.sweep_dir(model) / f"lr-{lr_tag(lr)}.json"


def sweep_records(ctx: Ctx, model: str) -> dict[str, dict[str, Any]]:
    """The finished sweep runs of ``model`` (this work folder's, then those in the results file)."""
    known = dict(ctx.previous.get("sweeps", {}).get(model, {}).get("runs", {}))
    folder = ctx.sweep_dir(model)
    if folder.is_dir():
        for p in sorted(folder.glob("lr-*.json")):
            rec = read_json(p)
            known[lr_tag(rec["lr"])] = rec
    return known


def sweep_grid(ctx: Ctx, model: str, records: dict[str, dict[str, Any]]) -> tuple[list[float], float | None]:
    """(the learning rates to have run, the winner once all of them have): the study's grid, extended by
    ``sweep_factor`` past an edge that wins, at most ``sweep_extend`` times."""
    plan, study = ctx.study.models[model], ctx.study
    if plan.lr_from is not None:  # one run at the other model's winner: this model's throughput, and a check
        parent = sweep_grid(ctx, plan.lr_from, sweep_records(ctx, plan.lr_from))[1]
        if parent is None:
            raise ConfigError(f"{model}: takes its lr from {plan.lr_from}, whose sweep is not finished")
        rec = records.get(lr_tag(parent))
        if rec is not None and rec["diverged"]:
            raise RuntimeError(f"{model}: diverged at {plan.lr_from}'s winner lr {parent:g}; give it a grid")
        return [parent], (parent if rec is not None else None)
    grid = list(plan.lrs)
    for _ in range(study.sweep_extend + 1):
        if any(lr_tag(lr) not in records for lr in grid):
            return grid, None
        losses = {lr: records[lr_tag(lr)]["eval_loss"] for lr in grid}
        finite = {lr: v for lr, v in losses.items() if v is not None and math.isfinite(v)}
        if not finite:
            raise RuntimeError(f"{model}: every learning rate of the sweep diverged ({grid}); lower the grid")
        best = min(finite, key=finite.get)
        extended = len(grid) - len(plan.lrs)
        if len(grid) < 2 or extended >= study.sweep_extend or best not in (grid[0], grid[-1]):
            return grid, best
        grid = sorted([*grid, best * study.sweep_factor if best == grid[-1] else best / study.sweep_factor])
    return grid, None  # pragma: no cover (the loop returns)


def sweep_summary(ctx: Ctx, model: str) -> dict[str, Any] | None:
    records = sweep_records(ctx, model)
    grid, best = sweep_grid(ctx, model, records)
    if best is None:
        return None
    win = records[lr_tag(best)]
    plan = ctx.study.models[model]
    return {"recipe": plan.recipe, "steps": ctx.study.run_steps(model), "lr_from": plan.lr_from,
            "grid": list(plan.lrs) or grid, "tried": grid, "winner": best,
            "winner_at_edge": best in (grid[0], grid[-1]) and len(grid) > 1,
            "criterion": "validation MLM loss (15 % masking) after the sweep run",
            "steps_per_s": win["steps_per_s"], "tokens_per_s": win["tokens_per_s"],
            "runs": {lr_tag(lr): records[lr_tag(lr)] for lr in grid}}


def sweep_model(ctx: Ctx, model: str) -> dict[str, Any]:
    """Run the missing sweep runs of ``model``; returns its summary (winner and all losses)."""
    while True:
        records = sweep_records(ctx, model)
        grid, best = sweep_grid(ctx, model, records)
        if best is not None:
            summary = sweep_summary(ctx, model)
            atomic_write_json(ctx.sweep_dir(model) / "summary.json", summary)
            return summary
        lr = next(lr for lr in grid if lr_tag(lr) not in records)
        run_sweep_lr(ctx, model, lr, records)


def run_sweep_lr(ctx: Ctx, model: str, lr: float, records: dict[str, dict[str, Any]]) -> None:
    run_dir = ctx.sweep_dir(model) / f"lr-{lr_tag(lr)}"
    state, step = run_state(run_dir)
    if state == "partial" and not ctx.args.resume:
        raise ConfigError(f"{run_dir} is a sweep run stopped at step {step}: pass --resume to continue it")
    if state == "none":
        done = [r["process_s"] for r in records.values() if r.get("process_s")]
        ctx.check_fits(statistics.mean(done) if done else ctx.study.estimates.sweep_run_s, f"sweep run {model} lr {lr:g}")
        fresh_folder(run_dir)
    steps = ctx.study.run_steps(model)
    sets = [f"train.lr={lr!r}", f"train.max_steps={steps}", "train.eval_every_steps=0",
            "train.save_every_steps=0", "train.save_every_minutes=0"]
    print(f"sweep {model}: lr {lr:g} ({'resuming' if state == 'partial' else f'{steps} steps'})",
          flush=True)
    log = ctx.log_path(f"sweep-{model}-lr-{lr_tag(lr)}")
    rc, seconds = ctx.pretrain_cli(model, run_dir, sets, log, resume=state == "partial",
                                   stop_after_steps=ctx.args.segment_steps)
    record: dict[str, Any] = {"lr": lr, "steps": steps, "process_s": round(seconds, 1)}
    if rc == EXIT_NAN:
        record.update(eval_loss=None, eval_accuracy=None, diverged=True, steps_per_s=None, tokens_per_s=None)
    elif rc == 0:
        manifest = read_json(run_dir / "final" / "manifest.json")
        final = manifest.get("final_eval") or {}
        record.update(eval_loss=final.get("eval_loss"), eval_accuracy=final.get("eval_accuracy"), diverged=False,
                      wall_clock_s=manifest["timings"]["wall_clock_s"], tokens_seen=manifest["tokens_seen"],
                      **throughput(read_metrics(run_dir)))
        if record["eval_loss"] is None:
            raise RuntimeError(f"{run_dir}: the final manifest has no validation loss")
    elif rc == EXIT_DEADLINE:
        raise DeadlineStop(f"sweep run {model} lr {lr:g} stopped with a checkpoint (resume with --resume)")
    else:
        raise RuntimeError(f"sweep run {model} lr {lr:g} failed (exit {rc}); {log}:\n{log_tail(log)}")
    atomic_write_json(sweep_record_path(ctx, model, lr), record)
    loss = "diverged" if record["diverged"] else f"eval loss {record['eval_loss']:.4f}"
    print(f"sweep {model}: lr {lr:g}: {loss} ({seconds:.0f} s)", flush=True)


# ----------------------------------------------------------------------------------------------------------
# pretrain
# ----------------------------------------------------------------------------------------------------------


def pretrain_model(ctx: Ctx, model: str) -> None:
    """Pretrain ``model`` at its sweep's winner for the budget (or continue it with --resume)."""
    run_dir, plan_path = ctx.pretrain_dir(model), ctx.plan_path(model)
    state, step = run_state(run_dir)
    if state == "done":
        return
    if state == "partial":
        if not ctx.args.resume:
            raise ConfigError(f"{run_dir} is a pretraining run stopped at step {step}: pass --resume to continue it")
        plan = read_json(plan_path)
    else:
        summary = sweep_summary(ctx, model)
        if summary is None:
            raise ConfigError(f"{model}: its learning-rate sweep is not finished (run the sweep phase first)")
        study = ctx.study
        if study.pretrain_steps is not None:
            max_steps = study.pretrain_steps
            estimate = (statistics.mean(r["process_s"] for r in summary["runs"].values())
                        * max_steps / study.run_steps(model))
        else:
            if not summary["steps_per_s"]:
                raise RuntimeError(f"{model}: its sweep run measured no steps/s (no training log in its metrics)")
            max_steps = max(1, round(study.budget_minutes * 60.0 * summary["steps_per_s"]))
            estimate = study.budget_minutes * 60.0 + study.estimates.pretrain_overhead_s
        ctx.check_fits(estimate, f"pretraining {model}")
        warm_compile_cache(ctx, model)
        # a model finetuned at its end point only needs no timed checkpoints and one validation, at the end
        curve = study.models[model].finetune == "all"
        plan = {"model": model, "recipe": study.models[model].recipe, "lr": summary["winner"],
                "max_steps": max_steps, "steps_per_s_from_sweep": summary["steps_per_s"],
                "budget_minutes": study.budget_minutes,
                "checkpoint_every_minutes": study.checkpoint_every_minutes if curve else 0.0,
                "eval_every_steps": max(1, max_steps // study.pretrain_evals) if curve and study.pretrain_evals else 0,
                "segments": 0, "stops": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fresh_folder(run_dir)
        atomic_write_json(plan_path, plan)
    sets = [f"train.lr={plan['lr']!r}", f"train.max_steps={plan['max_steps']}",
            f"train.save_every_minutes={plan['checkpoint_every_minutes']!r}", f"train.keep_last={KEEP_ALL}",
            f"train.eval_every_steps={plan['eval_every_steps']}", "train.save_every_steps=0"]
    print(f"pretrain {model}: lr {plan['lr']:g}, {plan['max_steps']} steps"
          + (f", resuming at step {step}" if state == "partial" else ""), flush=True)
    log = ctx.log_path(f"pretrain-{model}")
    rc, seconds = ctx.pretrain_cli(model, run_dir, sets, log, resume=state == "partial",
                                   stop_after_steps=ctx.args.segment_steps)
    plan["segments"] += 1
    if rc == EXIT_DEADLINE:
        _, stopped_at = run_state(run_dir)
        plan["stops"].append(stopped_at)  # a checkpoint of the time limit, not of the schedule: not a point
        atomic_write_json(plan_path, plan)
        raise DeadlineStop(f"pretraining {model} stopped at step {stopped_at} with a checkpoint "
                           "(continue with --resume)")
    atomic_write_json(plan_path, plan)
    if rc == EXIT_NAN:
        raise RuntimeError(f"pretraining {model} diverged at lr {plan['lr']:g} (the sweep's winner); {log}:\n"
                           f"{log_tail(log)}\nchange its grid in {ctx.study_path} and delete {run_dir}, "
                           f"{plan_path} and {ctx.sweep_dir(model)} to run it again")
    if rc != 0:
        raise RuntimeError(f"pretraining {model} failed (exit {rc}); {log}:\n{log_tail(log)}")
    print(f"pretrain {model}: done in {seconds / 60:.1f} min ({len(model_points(ctx, model))} points)", flush=True)


def warm_compile_cache(ctx: Ctx, model: str, steps: int = 20) -> None:
    """Compile ``model`` once into torch's on-disk caches before its measured run, when no sweep run of it
    happened on this machine (its sweep came from an earlier session): the measured run then pays a warm
    compilation, as the runs whose sweep ran just before it do, not a cold one."""
    from mosaic_embed.config import PretrainConfig, load_config

    recipe = recipe_path(ctx.study.models[model].recipe, model)
    if not load_config(PretrainConfig, recipe, ctx.study.pretrain_overrides).train.compile:
        return
    if any(ctx.sweep_dir(model).glob("lr-*/final")) or (ctx.work / "warmup" / f"{model}.done").is_file():
        return
    out = ctx.work / "warmup" / model
    fresh_folder(out)
    print(f"pretrain {model}: warming the compile cache ({steps} steps)", flush=True)
    log = ctx.log_path(f"warmup-{model}")
    rc, seconds = ctx.pretrain_cli(model, out, [f"train.max_steps={steps}", "train.eval_every_steps=0",
                                                "train.save_every_steps=0", "train.save_every_minutes=0"], log)
    if rc not in (0, EXIT_NAN):
        raise RuntimeError(f"compile warm-up of {model} failed (exit {rc}); {log}:\n{log_tail(log)}")
    shutil.rmtree(out, ignore_errors=True)
    atomic_write_text(ctx.work / "warmup" / f"{model}.done", f"{seconds:.1f} s\n")


def model_points(ctx: Ctx, model: str) -> list[dict[str, Any]]:
    """The Pareto points of a finished pretraining run: its timed checkpoints (not the ones a time limit
    forced) and the final model, each with its pretraining minutes, tokens and step."""
    run_dir = ctx.pretrain_dir(model)
    plan = read_json(ctx.plan_path(model))
    final = pretraining_meta(run_dir / "final")
    points = []
    if ctx.study.models[model].finetune == "all":
        # a checkpoint within half an interval of the final model is left out: the final model stands for it
        last = final["wall_clock_s"] - 30.0 * plan["checkpoint_every_minutes"]
        for step, path in list_checkpoints(run_dir):
            meta = pretraining_meta(path)
            if step not in plan["stops"] and step < final["step"] and meta["wall_clock_s"] < last:
                points.append((path.name, path, meta))
        k = None if ctx.study.max_points is None else ctx.study.max_points - 1
        if k is not None and len(points) > k:  # k checkpoints evenly spread over the run
            points = [points[i] for i in sorted({round((j + 1) * (len(points) - 1) / (k + 1)) for j in range(k)})]
    points.append(("final", run_dir / "final", final))
    return [{"point": name, "path": str(path), "step": meta["step"], "minutes": meta["wall_clock_s"] / 60.0,
             "tokens": meta["tokens_seen"]} for name, path, meta in points]


# ----------------------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------------------


def unit_record_path(ctx: Ctx, model: str, point: str, task: str, seed: int) -> Path:
    return ctx.finetune_dir(model) / point / f"{task}-seed{seed}.json"


def model_units(ctx: Ctx, model: str) -> list[tuple[dict[str, Any], TaskPlan, int]]:
    return [(p, t, s) for p in model_points(ctx, model) for t in ctx.study.tasks for s in ctx.study.seeds]


def glue_config(ctx: Ctx, point: dict[str, Any], task: TaskPlan, seed: int, out: Path):
    from mosaic_embed.config import GlueConfig, load_config

    custom = [{"path": str(ctx.tasks_dir / task.name), "num_labels": task.num_labels, "metrics": [task.metric],
               "name": task.name}]
    return load_config(GlueConfig, ctx.study.glue_recipe, ctx.study.glue_overrides, model=Path(point["path"]),
                       out=out, tasks=[], custom_tasks=custom, seeds=[seed],
                       max_train_examples=ctx.study.max_train_examples, max_eval_examples=ctx.study.max_eval_examples)


def unit_record(model: str, point: dict[str, Any], task: TaskPlan, seed: int, results: dict[str, Any],
                seconds: float) -> dict[str, Any]:
    """The light record of one finetuning run, from run_glue's results."""
    t = results["points"][0]["tasks"][task.name]
    run = t["seeds"][0]
    (split, metrics), = run["metrics"].items()  # a custom task has one evaluation split (dev)
    return {"model": model, "point": point["point"], "step": point["step"], "minutes": point["minutes"],
            "tokens": point["tokens"], "task": task.name, "seed": seed, "metric_name": task.metric,
            "metric": metrics[task.metric], "split": split, "finetune_steps": run["steps"],
            "train_s": run["train"]["seconds"], "unit_s": round(seconds, 2), "batches": run["batches"],
            "hparams": t["hparams"], "train_examples": t["train_examples"], "eval_examples": t["eval_examples"]}


def finetune(ctx: Ctx, models: list[str]) -> None:
    """Finetune every missing (checkpoint, task, seed) of ``models`` with ``--jobs`` worker processes."""
    todo, done_s = [], []
    for model in models:
        if run_state(ctx.pretrain_dir(model))[0] != "done":
            continue
        for point, task, seed in model_units(ctx, model):
            rec = unit_record_path(ctx, model, point["point"], task.name, seed)
            if rec.is_file():
                done_s.append(read_json(rec)["unit_s"])
            elif not (Path(point["path"]) / "config.json").is_file():
                raise FileNotFoundError(f"{point['path']}: the checkpoint to finetune is gone; delete "
                                        f"{ctx.pretrain_dir(model)} and {ctx.plan_path(model)} to pretrain again")
            else:
                todo.append((model, point, task, seed))
    if not todo:
        return
    from mosaic_embed.train.glue import run_glue  # the function the workers run (imports torch)

    jobs = max(1, ctx.args.jobs)
    print(f"finetune: {len(todo)} runs (checkpoint x task x seed) on {jobs} worker(s)", flush=True)
    # workers start with spawn (CUDA cannot be forked) and split the cores between them
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                                                "TRANSFORMERS_VERBOSITY", "PYTHONPATH")}
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
                      TRANSFORMERS_VERBOSITY="error", PYTHONPATH=ctx.env["PYTHONPATH"])
    failures: list[str] = []
    pending: dict[concurrent.futures.Future, tuple] = {}
    stopped = None
    try:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < jobs and stopped is None:
                    estimate = statistics.mean(done_s) if done_s else ctx.study.estimates.finetune_unit_s
                    if ctx.remaining_s() < estimate:
                        stopped = f"{len(queue)} finetuning runs left at the deadline"
                        break
                    model, point, task, seed = queue.pop(0)
                    out = ctx.finetune_dir(model) / point["point"] / f"{task.name}-seed{seed}"
                    cfg = glue_config(ctx, point, task, seed, out)
                    pending[pool.submit(run_glue, cfg)] = (model, point, task, seed, time.monotonic())
                if not pending:
                    break
                finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in finished:
                    model, point, task, seed, t0 = pending.pop(fut)
                    what = f"{model} {point['point']} {task.name} seed {seed}"
                    try:
                        results = fut.result()
                    except Exception as err:  # noqa: BLE001  (one failed run must not lose the others)
                        failures.append(f"{what}: {type(err).__name__}: {err}")
                        print(f"finetune {what}: FAILED: {err}", flush=True)
                        continue
                    rec = unit_record(model, point, task, seed, results, time.monotonic() - t0)
                    atomic_write_json(unit_record_path(ctx, model, point["point"], task.name, seed), rec)
                    done_s.append(rec["unit_s"])
                    print(f"finetune {what}: {task.metric} {100 * rec['metric']:.2f} ({rec['unit_s']:.0f} s)",
                          flush=True)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if failures:
        raise RuntimeError("finetuning runs failed:\n  " + "\n  ".join(failures))
    if stopped:
        raise DeadlineStop(stopped)


# ----------------------------------------------------------------------------------------------------------
# records, merge, plot, status, export
# ----------------------------------------------------------------------------------------------------------


def finished_record(ctx: Ctx, model: str) -> dict[str, Any] | None:
    """The run record of ``model`` once pretrained and finetuned everywhere (written to work/runs/), else None."""
    if ctx.record_path(model).is_file():
        return read_json(ctx.record_path(model))
    if run_state(ctx.pretrain_dir(model))[0] != "done":
        return None
    units = model_units(ctx, model)
    paths = [unit_record_path(ctx, model, p["point"], t.name, s) for p, t, s in units]
    if not all(p.is_file() for p in paths):
        return None
    recs = [read_json(p) for p in paths]
    run_dir, plan = ctx.pretrain_dir(model), read_json(ctx.plan_path(model))
    manifest = read_json(run_dir / "final" / "manifest.json")
    thr = throughput(read_metrics(run_dir))
    final_pts = [r for r in recs if r["point"] == "final"]
    per_task = {t.name: [r["metric"] for r in final_pts if r["task"] == t.name] for t in ctx.study.tasks}
    mean = statistics.mean(statistics.mean(v) for v in per_task.values())
    record = {
        "name": model,
        "label": ctx.study.models[model].label or model,
        "recipe": shown(recipe_path(ctx.study.models[model].recipe, model)),
        "lr": plan["lr"],
        "tokens_per_s": thr["tokens_per_s"],
        "mfu": thr["mfu"],
        "steps_per_s": thr["steps_per_s"],
        "parameters": manifest["outputs"].get("parameters"),
        "max_steps": plan["max_steps"],
        "budget_minutes": None if ctx.study.pretrain_steps else plan["budget_minutes"],
        "checkpoint_every_minutes": plan["checkpoint_every_minutes"],
        "segments": plan["segments"],
        "final": {"minutes": manifest["timings"]["wall_clock_s"] / 60.0, "tokens": manifest["tokens_seen"],
                  "step": manifest["step"], "mlm": manifest.get("final_eval"),
                  "mean_metric": mean, "per_task": {k: statistics.mean(v) for k, v in per_task.items()}},
        "points": [{"minutes": r["minutes"], "tokens": r["tokens"], "task": r["task"], "seed": r["seed"],
                    "metric": r["metric"], "metric_name": r["metric_name"], "step": r["step"],
                    "checkpoint": r["point"]} for r in recs],
        "sweep": sweep_summary(ctx, model),
        "finetune": {"glue_recipe": ctx.study.glue_recipe, "overrides": ctx.study.glue_overrides,
                     "hparams": recs[0]["hparams"], "train_examples": {r["task"]: r["train_examples"] for r in recs},
                     "unit_s_mean": statistics.mean(r["unit_s"] for r in recs)},
        "device": device_name(),
        "environment": manifest.get("environment"),
        "git_commit": git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(ctx.record_path(model), record)
    return record


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else "cpu"


def merge(ctx: Ctx) -> dict[str, Any]:
    """Finished models of this work folder -> the results file (runs of the same name replaced)."""
    data = read_results(ctx.results)
    runs = {r["name"]: r for r in data["runs"]}
    sweeps = dict(data["sweeps"])
    for model in ctx.study.models:
        summary = sweep_summary(ctx, model) if ctx.sweep_dir(model).is_dir() else None
        if summary is not None:
            sweeps[model] = summary
        rec = finished_record(ctx, model)
        if rec is not None:
            runs[model] = rec
    order = list(ctx.study.models)
    before = json.dumps({k: v for k, v in data.items() if k != "updated"}, sort_keys=True)
    data = dict(data)
    data.update({
        "kind": PARETO_KIND,
        "benchmark": "pareto",
        "git_commit": git_commit(),  # of the last merge; every run records its own, with its versions and device
        "study": to_dict(ctx.study) | {"file": shown(ctx.study_path)},
        "runs": sorted(runs.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order)),
        "sweeps": sweeps,
        "table": [{"name": r["name"], "lr": r["lr"], "tokens_per_s": r["tokens_per_s"],
                   "final_minutes": r["final"]["minutes"], "final_mean_metric": r["final"]["mean_metric"],
                   **{f"final_{k}": v for k, v in r["final"]["per_task"].items()},
                   "final_mlm_accuracy": (r["final"]["mlm"] or {}).get("eval_accuracy")} for r in runs.values()],
    })
    # unchanged: leave the file, and the plot drawn from it, alone
    if json.dumps({k: v for k, v in data.items() if k != "updated"}, sort_keys=True) != before:
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(ctx.results, data)
        print(f"merge: {len(data['runs'])} runs in {ctx.results}", flush=True)
    ctx.previous = data
    return data


def plot(ctx: Ctx) -> None:
    if not read_results(ctx.results)["runs"]:
        print("plot: no finished run yet", flush=True)
        return
    out = ctx.results.with_suffix(".png")
    if out.is_file() and out.stat().st_mtime >= ctx.results.stat().st_mtime:
        return  # drawn from this very file already
    cmd = [sys.executable, "-m", "mosaic_embed.cli", "plot", "pareto", str(ctx.results), "--out", str(out)]
    log = ctx.log_path("plot")
    rc, _ = run_logged(cmd, log, ctx.env, 300)
    if rc != 0:
        raise RuntimeError(f"mosaic-embed plot pareto failed (exit {rc}); {log}:\n{log_tail(log)}")
    print(f"plot: {out}", flush=True)


def status_lines(ctx: Ctx) -> tuple[list[str], bool]:
    """A table of every model's progress, what is left of --models (with a rough device-time estimate), and
    whether anything is."""
    study, est = ctx.study, ctx.study.estimates
    lines = [f"{'model':<26} {'sweep':<22} {'pretrain':<30} finetune", "-" * 96]
    left_s, left = 0.0, False
    done_names = {r["name"] for r in ctx.previous.get("runs", [])}
    n_units = len(study.tasks) * len(study.seeds)

    def points_est(model: str) -> int:
        if study.models[model].finetune == "final":
            return 1
        n = 1 + math.ceil(study.budget_minutes / study.checkpoint_every_minutes - 0.5)
        return min(n, study.max_points or n)
    for model in study.models:
        records = sweep_records(ctx, model)
        try:
            grid, best = sweep_grid(ctx, model, records)
            sweep = (f"lr {best:g} ({len(grid)} runs)" if best is not None
                     else f"{sum(lr_tag(lr) in records for lr in grid)}/{len(grid)} runs")
        except (ConfigError, RuntimeError) as err:  # waits for another model's sweep, or failed
            grid, best, sweep = [None], None, "waiting" if isinstance(err, ConfigError) else "failed"
        state, step = run_state(ctx.pretrain_dir(model))
        mine = model in ctx.models
        if model in done_names and state != "done":
            lines.append(f"{model:<26} {sweep:<22} {'in the results file':<30} done")
            continue
        if mine and best is None:
            left_s += sum(lr_tag(lr) not in records for lr in grid) * est.sweep_run_s
        fin = "-"
        if state == "done":
            pts = model_points(ctx, model)
            units = model_units(ctx, model)
            n = sum(unit_record_path(ctx, model, p["point"], t.name, s).is_file() for p, t, s in units)
            pre = f"done: {len(pts)} points, {pts[-1]['minutes']:.1f} min"
            fin = f"{n}/{len(units)} runs"
            if mine and n < len(units):
                left, left_s = True, left_s + (len(units) - n) * est.finetune_unit_s / max(1, ctx.args.jobs)
        else:
            pre = f"stopped at step {step}" if state == "partial" else "-"
            if mine:
                left = True
                left_s += est.pretrain_overhead_s + (study.budget_minutes * 60 if study.pretrain_steps is None
                                                     else est.sweep_run_s * study.pretrain_steps / study.sweep_steps)
                left_s += points_est(model) * n_units * est.finetune_unit_s / max(1, ctx.args.jobs)
        lines.append(f"{model:<26} {sweep:<22} {pre:<30} {fin}")
    if left:
        lines.append(f"left for {', '.join(ctx.models)}: roughly {left_s / 60:.0f} min of device time "
                     f"(estimates of {ctx.study_path.name})")
    table = ctx.previous.get("table") or []
    if table:
        tasks = [t.name for t in study.tasks]
        lines += ["", f"{'finished run':<26} {'lr':>8} {'tokens/s':>10} {'minutes':>8} {'mean':>6} "
                  + " ".join(f"{t[:10]:>10}" for t in tasks) + f" {'MLM acc':>8}"]
        for r in table:
            lines.append(f"{r['name']:<26} {r['lr']:>8.2g} {r['tokens_per_s'] or 0:>10,.0f} {r['final_minutes']:>8.2f} "
                         f"{100 * r['final_mean_metric']:>6.2f} "
                         + " ".join(f"{100 * r.get(f'final_{t}', float('nan')):>10.2f}" for t in tasks)
                         + f" {float('nan') if r['final_mlm_accuracy'] is None else r['final_mlm_accuracy']:>8.3f}")
    return lines, left


#: What comes back from a lent machine is at most 8 files of 16 MiB: the tarball stays under this.
EXPORT_LIMIT = 15 << 20


def light_tarball(work: Path, patterns: tuple[str, ...]) -> bytes:
    """The small files of the work folder as a .tar.gz: no weights, no tokenizer copies, no shards."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for pattern in patterns:
            for path in sorted(work.rglob(pattern)):
                rel = path.relative_to(work)
                if (rel.parts[0] in ("cache", "tiny-tasks") or path.name.startswith((".", "tokenizer"))
                        or path.name == "special_tokens_map.json" or path.stat().st_size > 4 << 20):
                    continue
                tar.add(path, arcname=f"pareto_work/{rel}")
    return buf.getvalue()


def export(ctx: Ctx, dest: Path, lines: list[str]) -> None:
    """Copy what a lent machine must give back into ``dest``: results, plots, light files, the status."""
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".png", ".svg"):
        src = ctx.results.with_suffix(suffix)
        if src.is_file():
            shutil.copy2(src, dest / src.name)
    records = ("*.json", "metrics.jsonl", "config.yaml", "results.md")
    data = light_tarball(ctx.work, (*records, "*.log"))
    if len(data) > EXPORT_LIMIT:  # the logs are the bulk; the records must come back
        lines = [*lines, "(pareto_work.tar.gz: logs left out, over the size that comes back)"]
        data = light_tarball(ctx.work, records)
    if len(data) <= EXPORT_LIMIT:
        (dest / "pareto_work.tar.gz").write_bytes(data)
    else:
        lines = [*lines, f"(pareto_work.tar.gz not written: {len(data) >> 20} MiB even without logs)"]
    atomic_write_text(dest / "status.txt", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------
# tiny mode data
# ----------------------------------------------------------------------------------------------------------

_TINY_WORDS = ("the whale ship sea captain boat harpoon deck sail crew voyage ocean storm wave island "
               "man day night old great white long time head water side way eye hand").split()
_TINY_TASKS = {
    "tiny_sentiment": (("good", "great", "happy", "fine", "glad"), ("bad", "sad", "poor", "awful", "grim")),
    "tiny_topic": (("sea", "wave", "ocean", "sail", "boat"), ("land", "road", "town", "field", "hill")),
}


def write_tiny_tasks(folder: Path, n_train: int = 48, n_dev: int = 24) -> None:
    """Two generated 2-class tasks in the SST-2 layout: label 1 when the sentence holds a word of the first
    list, 0 for the second (a few filler words around it)."""
    rng = random.Random(0)
    for name, (pos, neg) in _TINY_TASKS.items():
        for split, n in (("train", n_train), ("dev", n_dev)):
            rows = ["sentence\tlabel"]
            for i in range(n):
                label = i % 2
                words = [rng.choice(_TINY_WORDS) for _ in range(rng.randint(3, 8))]
                words.insert(rng.randint(0, len(words)), rng.choice(pos if label else neg))
                rows.append(f"{' '.join(words)}\t{label}")
            atomic_write_text(folder / name / f"{split}.tsv", "\n".join(rows) + "\n")


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------

PHASES = ("status", "sweep", "pretrain", "finetune", "merge", "plot", "all")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=PHASES)
    ap.add_argument("--work", default=None, help="work folder (default runs/pareto, runs/pareto-tiny with --tiny)")
    ap.add_argument("--study", default=None, help="study YAML (default study.yaml, tiny.yaml with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="CPU mode: tiny models, generated tasks, bundled corpus")
    ap.add_argument("--models", default=None, help="comma-separated models of the study to work on (default all)")
    ap.add_argument("--corpus", default=None, help="pretraining corpus (default $MOSAIC_DATA/corpus or "
                                                   "../shared/data/corpus; --tiny: the bundled one)")
    ap.add_argument("--tasks-dir", default=None, help="folder of the task folders (default $MOSAIC_DATA/tasks)")
    ap.add_argument("--results", default=None, help="the results file (default benchmarks/results/pareto.json; "
                                                    "--tiny: WORK/pareto.json)")
    ap.add_argument("--deadline-min", type=float, default=None,
                    help="start nothing that cannot finish within this many minutes of the command's start")
    ap.add_argument("--resume", action="store_true", help="continue runs a deadline stopped")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                    help="finetuning worker processes (default: half the cores, at most 8)")
    ap.add_argument("--export", default=None, help="copy results, plots, light files and the status here at the end")
    ap.add_argument("--segment-steps", type=int, default=None,
                    help="stop every pretraining process after this many steps with a checkpoint (tests, demos)")
    args = ap.parse_args(argv)
    if args.work is None:
        args.work = str(ROOT / "runs" / ("pareto-tiny" if args.tiny else "pareto"))
    return args


def run_phases(ctx: Ctx) -> int:
    """The phases the command asks for, in order; the progress table (and the export) whatever happens."""
    args, rc, left = ctx.args, 0, True
    try:
        if args.tiny and not args.tasks_dir:
            write_tiny_tasks(ctx.tasks_dir)
        steps = {"all": ("sweep", "pretrain", "finetune", "merge", "plot")}.get(args.phase, (args.phase,))
        done_before = {r["name"] for r in ctx.previous["runs"]}
        todo = [m for m in ctx.models if m not in done_before]
        for m in sorted(set(ctx.models) & done_before, key=ctx.models.index) if args.phase != "status" else ():
            print(f"{m}: finished in an earlier session ({ctx.results}); skipped", flush=True)
        try:
            for step in steps:
                if step == "sweep":
                    for m in todo:
                        s = sweep_model(ctx, m)
                        print(f"sweep {m}: winner lr {s['winner']:g}"
                              + (" (at the grid's edge)" if s["winner_at_edge"] else ""), flush=True)
                elif step == "pretrain":
                    for m in todo:
                        pretrain_model(ctx, m)
                elif step == "finetune":
                    finetune(ctx, todo)
                elif step == "merge":
                    merge(ctx)
                elif step == "plot":
                    plot(ctx)
        except DeadlineStop as stop:
            print(f"deadline: {stop}", flush=True)
            rc = EXIT_DEADLINE
            merge(ctx)  # what is finished (sweeps included) goes into the results file now
    finally:
        try:
            lines, left = status_lines(ctx)
        except Exception as err:  # noqa: BLE001  (never hide the error that brought us here)
            lines = [f"(no progress table: {type(err).__name__}: {err})"]
        lines.append(f"elapsed {ctx.elapsed_s() / 60:.1f} min; "
                     + ("work left: run again with --resume" if left else "nothing left for these models"))
        print("\n".join(lines), flush=True)
        if args.export:
            export(ctx, Path(args.export), lines)
    if rc == 0 and left and args.phase == "all":
        rc = EXIT_DEADLINE
    return rc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ctx = Ctx(args)
        ctx.work.mkdir(parents=True, exist_ok=True)
        with writer_lock(ctx.work, "benchmarks/pareto/run.py"):  # one command at a time per work folder
            return run_phases(ctx)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as err:  # the lock's error is a RuntimeError
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
