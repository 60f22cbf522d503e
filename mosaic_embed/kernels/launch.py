"""Host-side helpers of the kernel launchers: whether Triton is there, integer helpers (grids, tile sizes) and
the (N, C) row view.

``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr-function wrappers that cost ~8 us per call from
Python (benchmarks/NOTES_attention.md, v3): at short lengths that is a visible share of an eager step.
"""

from __future__ import annotations

import importlib.util

import torch

# Whether Triton can be imported, looked up once: torch.compile cannot trace find_spec, and the answer never
# changes in a process. The kernel modules define their kernels only when it is True.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (N, C) with a unit last stride (a copy only when the last dim is strided)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()
