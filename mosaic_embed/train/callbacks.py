"""Trainer callbacks for pretraining: progress bar (loss, tokens/s, MFU, ETA), JSON-lines metrics, timed saves.

They read what :class:`mosaic_embed.train.pretrain.MLMTrainer` adds to each training log (``tokens_seen``,
``tokens_per_s``, ``mfu``, ``wall_clock_s``) and only the main process writes or prints.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..artifacts import atomic_write_text


def _fmt_rate(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps (tqdm's ETA) whose postfix shows loss, tokens/s and MFU of the last log.

    It replaces transformers' own bar and printer callbacks, which print every log as a raw dictionary.
    """

    def __init__(self, desc: str = "pretrain", peak_note: str | None = None) -> None:
        self.desc = desc
        self.peak_note = peak_note  # what the MFU is measured against (runtime.peak_flops), said once
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            if self.peak_note:
                tqdm.write(f"MFU = 6 x parameters x real tokens/s over {self.peak_note}")
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            post = {"loss": f"{logs['loss']:.4f}"}
            if "tokens_per_s" in logs:
                post["tok/s"] = _fmt_rate(logs["tokens_per_s"])
            if logs.get("mfu") is not None:
                post["mfu"] = f"{logs['mfu']:.2f}"  # over the peak named once at the start (runtime.peak_flops)
            self.bar.set_postfix(post, refresh=True)
        elif "eval_loss" in logs:
            self.bar.write(
                f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}  "
                f"eval_accuracy {logs.get('eval_accuracy', float('nan')):.4f}"
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def one_bar(trainer: Any) -> None:
    """A trainer that shows only our :class:`ProgressCallback` (built with ``disable_tqdm=True`` and given it):
    transformers' printer and bar callbacks removed, as they print each log as a raw dictionary."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgressCallback

    for cb in (PrinterCallback, HFProgressCallback):
        trainer.remove_callback(cb)


def card_widget_from_first_rows(model: Any, dataset: Any) -> None:
    """Before a sentence-transformers trainer is built: its model card's widget from the first rows of the
    training set; the trainer otherwise samples 1,000 rows for it under a progress bar of its own."""
    card = getattr(model, "model_card_data", None)
    if card is None or getattr(card, "widget", None) or not len(dataset):
        return
    column = next((c for c, f in dataset.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is not None:
        texts = dataset[:4][column]
        card.widget = [{"source_sentence": texts[0], "sentences": texts[1:] or texts[:1]}]


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log (training and validation) to ``path`` as one JSON object per line, with its step.

    At the start the file is cut back to the logs the run continues from, one line per entry of the
    trainer's log history: on resume, the checkpoint's (not the logs a killed or finished run made after
    it, such as a final validation); on a fresh run, none (a run killed before its first checkpoint leaves
    lines no run continues). A line torn by a kill is dropped. So the file holds one consistent curve.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return
        keep, kept = len(state.log_history), []
        for line in self.path.read_text(encoding="utf-8").splitlines() if keep else ():
            try:
                json.loads(line)
            except ValueError:
                continue  # torn by a kill mid-write
            kept.append(line)
            if len(kept) == keep:
                break
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step}
        for k, v in logs.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # JSON has no NaN; keep the fact visible
            record[k] = v
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _rank0_decides(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a broadcast under torch.distributed; the flag itself otherwise).

    Every rank must take the same decision to save, or the collectives inside saving would hang; clocks
    differ between ranks, so rank 0's answer is the one that counts. All ranks must call this together.
    """
    due = torch.tensor([flag], dtype=torch.int32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        due = due.to(backend_device)
        torch.distributed.broadcast(due, src=0)
    return bool(due.item())


class TimedCheckpointCallback(TrainerCallback):
    """Asks for a checkpoint every ``minutes`` of wall-clock time (rank 0's clock decides for all ranks)."""

    def __init__(self, minutes: float) -> None:
        self.interval = minutes * 60.0
        self.last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if _rank0_decides(time.monotonic() - self.last >= self.interval):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()


class StopAtStepCallback(TrainerCallback):
    """Raises ``KeyboardInterrupt`` when step ``step`` begins: simulates a run killed mid-way (tests, demos)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt(f"stopped at step {state.global_step} (StopAtStepCallback)")


class SegmentLimitReached(Exception):
    """This process's share of a run ended at its time or step limit, after writing a checkpoint.

    Not an error of the run: ``checkpoint`` is complete and ``--resume`` continues from it exactly.
    """

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"stopped at step {step} ({reason}) after saving a checkpoint; continue with --resume")
        self.step, self.reason = step, reason


class SegmentLimitCallback(TrainerCallback):
    """Ends this process's part of a run after ``minutes`` of wall-clock time or ``steps`` optimizer steps
    (counted from where it started or resumed), with a checkpoint: for jobs that run under a time limit
    (a scheduler's wall time, a device lease), which would otherwise be killed mid-step and lose
    everything since the last checkpoint.

    The limit asks for a checkpoint at the end of the step that reaches it; once that checkpoint is saved
    (complete, renamed into place) :class:`SegmentLimitReached` is raised, so no ``final/`` is written. The
    last step of the run is never cut: the run then just finishes. Rank 0's clock decides for all ranks.
    """

    def __init__(self, minutes: float | None = None, steps: int | None = None) -> None:
        if minutes is None and steps is None:
            raise ValueError("SegmentLimitCallback: give minutes or steps")
        if (minutes is not None and minutes <= 0) or (steps is not None and steps < 1):
            raise ValueError(f"SegmentLimitCallback: minutes must be > 0 and steps >= 1, got {minutes}, {steps}")
        self.minutes, self.steps = minutes, steps
        self.start = time.monotonic()
        self.start_step = 0
        self.stopping = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step, self.stopping = time.monotonic(), state.global_step, False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            return
        due = ((self.minutes is not None and time.monotonic() - self.start >= 60.0 * self.minutes)
               or (self.steps is not None and state.global_step - self.start_step >= self.steps))
        if _rank0_decides(bool(due)):
            control.should_save = True
            self.stopping = True

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:
            limit = f"{self.minutes:g} minutes" if self.minutes is not None else ""
            if self.steps is not None:
                limit = " or ".join(x for x in (limit, f"{self.steps} steps") if x)
            raise SegmentLimitReached(state.global_step, f"the limit of {limit} for this command")

