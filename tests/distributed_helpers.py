"""Running the real CLI under ``torchrun`` with gloo ranks on CPU (tests of multi-process stages)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli_torchrun(nproc: int, cli_args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m mosaic_embed.cli ARGS``.

    The launcher's rank variables are dropped from the environment, so a test run inside another torchrun
    does not inherit them; one thread per rank keeps two ranks from fighting over two cores; GPUs are hidden,
    so the ranks are CPU (gloo) ranks on a GPU machine too.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "mosaic_embed.cli", *cli_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
