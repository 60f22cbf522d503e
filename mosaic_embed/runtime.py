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
import time
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


#: Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets: the MFU denominator only where no
#: measurement can be made. Matched against ``torch.cuda.get_device_name()``; longest key first.
NOMINAL_BF16_PEAKS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
    "RTX 4090": 165e12,
}
_peaks: dict[tuple, tuple[float | None, str]] = {}


def peak_flops(device: torch.device | str, configured_tflops: float | None = None,
               measure: bool = True) -> tuple[float | None, str]:
    """The one MFU denominator of every stage and benchmark: ``(FLOP/s per device, what it is)``.

    In order: a configured figure; else the measured rate of a large matmul in the compute dtype on this
    device (bf16 8192^3 on CUDA, fp32 1024^3 on a CPU; ~0.1 s, once per process), the ceiling a model's
    matmuls can reach here; else (``measure=False``) the datasheet's dense bf16 figure of a known GPU; else
    None. MFU is then ``k x parameters x real tokens/s / peak`` (k = 6 training, 2 forward only).
    """
    device = torch.device(device)
    key = (device.type, device.index, configured_tflops, measure)
    if key in _peaks:
        return _peaks[key]
    if configured_tflops:
        found = (configured_tflops * 1e12, f"the configured peak of {configured_tflops:.1f} TFLOP/s")
    elif measure:
        cuda = device.type == "cuda"
        size, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        reps = 20 if cuda else 5
        for _ in range(3):
            a @ b
        synchronize(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        rate = 2 * size**3 * reps / (time.perf_counter() - t)
        shown = f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.0f} GFLOP/s"
        found = (rate, f"the measured {str(dtype).replace('torch.', '')} {size}^3 matmul rate on this "
                       f"{'GPU' if cuda else 'CPU'} ({shown})")
        del a, b
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key_name = next((k for k in sorted(NOMINAL_BF16_PEAKS, key=len, reverse=True) if k in name), None)
        found = ((NOMINAL_BF16_PEAKS[key_name], f"the nominal dense bf16 peak of the {key_name} "
                  f"({NOMINAL_BF16_PEAKS[key_name] / 1e12:.0f} TFLOP/s, datasheet)") if key_name
                 else (None, f"no known peak for {name}"))
    else:
        found = (None, "no peak (not measured)")
    _peaks[key] = found
    return found


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU): for host clocks around device work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


__all__ = ["NOMINAL_BF16_PEAKS", "PRECISIONS", "WarmupLinearDecay", "autocast", "dist_state", "is_main_process",
           "peak_flops", "resolve_device", "resolve_precision", "synchronize"]
