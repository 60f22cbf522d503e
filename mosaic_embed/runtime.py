"""Decisions every stage shares, each made in exactly one place: device, precision, rank/world, LR schedule.

Two places that decide the same thing will one day disagree (DESIGN.md, style 11), so pretraining, GLUE,
contrastive training, distillation, embedding and search all call these functions:

- :func:`resolve_device`: ``"auto"`` is ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU;
- :func:`resolve_precision`: ``"auto"`` is bf16 on CUDA and fp32 elsewhere; an explicit ``"bf16"`` without
  a CUDA device is an error (bf16 on a CPU is an emulation, many times slower than fp32, never what a user
  wants by accident);
- :func:`dist_state`: rank and world size through accelerate's ``PartialState`` (gloo for CPU ranks,
  NCCL for GPU ranks), never by reading ``RANK``/``WORLD_SIZE`` in each stage;
- :class:`WarmupLinearDecay`: the one learning-rate schedule (linear warmup, then linear decay).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(name: str | None = "auto") -> torch.device:
    """``"auto"`` (or None) -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; any other name is
    checked (``cuda`` on a machine without CUDA is a :class:`ConfigError`, not a late CUDA traceback)."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", _local_rank_gpu())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: this machine has no CUDA device; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine shows {torch.cuda.device_count()} CUDA device(s)")
    return device


def _local_rank_gpu() -> int:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local} but this machine shows {torch.cuda.device_count()} CUDA device(s): start at most "
            "one process per GPU (torchrun --nproc_per_node), or run CPU ranks (--device cpu)"
        )
    return local


def resolve_precision(precision: str, device: torch.device | str, field: str = "precision") -> torch.dtype:
    """The compute dtype of a stage: ``"auto"`` = bf16 on CUDA, fp32 elsewhere; ``"fp32"``; ``"bf16"`` (CUDA only).

    ``field`` names the config key in errors (``train.precision``)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"{field} {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError(f"{field}: bf16 needs a CUDA device (this run is on {device.type}); use 'auto' or 'fp32'")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for ``dtype`` (bf16 autocast), or a disabled autocast for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32)


def dist_state(device: torch.device | str | None = None) -> Any:
    """accelerate's ``PartialState`` (a process-wide singleton): ``.process_index``, ``.num_processes``,
    ``.is_main_process``, ``.wait_for_everyone()``. Under ``torchrun`` it starts the process group: NCCL when
    the ranks run on GPUs, gloo when ``device`` is a CPU (or the machine has no CUDA)."""
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    if not cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _local_rank_gpu()  # a clear error before NCCL's
    return PartialState(cpu=cpu)


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process)."""
    return dist_state().is_main_process


class WarmupLinearDecay:
    """LR multiplier at scheduler step ``s`` (0-based): linear warmup to 1 over ``warmup`` steps, then linear
    decay reaching ``final`` at the last step ``total - 1``. The one schedule of every stage that trains
    (pretraining: ``final`` = 2 % as in the paper; GLUE finetuning: 0). A callable object, not a lambda, so
    ``LambdaLR.state_dict`` stores its settings with a checkpoint."""

    def __init__(self, warmup: int, total: int, final: float = 0.0):
        if total < 1 or warmup < 0 or not 0.0 <= final <= 1.0:
            raise ValueError(f"WarmupLinearDecay: need total >= 1, warmup >= 0, final in [0, 1]; got "
                             f"{warmup}, {total}, {final}")
        self.warmup, self.total, self.final = warmup, total, final

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        frac = min(1.0, (s - self.warmup + 1) / span)
        return 1.0 - (1.0 - self.final) * frac

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self)


__all__ = ["PRECISIONS", "WarmupLinearDecay", "autocast", "dist_state", "is_main_process", "resolve_device",
           "resolve_precision"]
