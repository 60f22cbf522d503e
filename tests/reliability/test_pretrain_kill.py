"""``mosaic-embed pretrain`` killed with SIGKILL at seeded points, then run again: nothing lost, nothing
half-visible, and the same losses and final weights, bit for bit, as a run that was never interrupted.

The run: the tiny recipe on the bundled corpus, 8 steps of 8 sequences, a checkpoint every 2 steps (the
last 2 kept). Kill points, each a seeded delay after its milestone: while the shards are being built (a
cache of its own), after the checkpoint of step 4 (the later steps and checkpoints), after the final
validation is logged (``final/`` being written; the run then resumes from its last checkpoint, at the end). The killed run is a real process; the run after it is the same command (``--resume`` when a
complete checkpoint exists), in this process with the same single thread (in a CPU subprocess on a GPU
machine).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mosaic_embed.cli import main
from mosaic_embed.data.shards import load_shards
from mosaic_embed.train.pretrain import list_checkpoints
from tests.reliability.harness import (
    KillPoint,
    cli,
    count_at_least,
    env,
    file_contains,
    kill_at,
    leftovers,
    one_thread,
    seeded_delays,
)

SEED = 17
SETS = ["train.max_steps=8", "train.global_batch_size=8", "train.microbatch_size=8", "train.save_every_steps=2",
        "train.keep_last=2", "train.eval_every_steps=0", "train.eval_samples=16", "train.log_every_steps=1",
        "data.num_proc=1"]


def args(out: Path, cache: Path, resume: bool = False) -> list[str]:
    sets = [*SETS, f"data.cache_dir={cache}"]
    return ["pretrain", "--recipe", "tiny", "--out", str(out), *[a for s in sets for a in ("--set", s)]] \
        + (["--resume"] if resume else [])


def run_to_end(out: Path, cache: Path, resume: bool = False) -> None:
    """The command run to completion: in this process (one thread, like the killed runs), or, where this
    process would train on a GPU, in a subprocess on the CPU like the killed runs (the same arithmetic)."""
    if torch.cuda.is_available():
        done = subprocess.run(cli(*args(out, cache, resume)), capture_output=True, text=True, env=env(), timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return
    with one_thread():
        result = CliRunner().invoke(main, args(out, cache, resume))
    assert result.exit_code == 0, result.output[-3000:] + repr(result.exception)


def curve(run: Path) -> list[tuple]:
    """Every training loss and the final validation, by step (timings left out)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("eval_accuracy")) for r in rows
            if "loss" in r or "eval_loss" in r]


def assert_complete(run: Path, cache: Path) -> None:
    """What a killed run left: every checkpoint it lists is whole, ``final/`` whole or absent, shards whole."""
    for _, ckpt in list_checkpoints(run):
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
            assert (ckpt / name).is_file(), f"{ckpt} is listed as complete but has no {name}"
    if (run / "final").exists():
        assert (run / "final" / "manifest.json").is_file() and (run / "final" / "model.safetensors").is_file()
    for shards in cache.glob("shards-*"):
        load_shards(shards)  # a visible shards folder loads


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-reference")
    run_to_end(root / "run", root / "cache")
    return root


def test_pretrain_killed_at_seeded_points_resumes_to_the_uninterrupted_result(reference, tmp_path):
    ref_run, shared_cache = reference / "run", reference / "cache"
    ref_curve, ref_weights = curve(ref_run), load_file(ref_run / "final" / "model.safetensors")
    assert [s for s, loss, *_ in ref_curve if loss is not None] == list(range(1, 9))
    delays = seeded_delays(SEED, 3, 0.0, 1.0)
    points = []
    for i, (name, delay) in enumerate(zip(["building the shards", "after checkpoint 4", "after the final validation"],
                                          [2 * delays[0], delays[1], delays[2] / 2], strict=True)):
        run = tmp_path / f"run{i}"
        cache = tmp_path / "fresh-cache" if i == 0 else shared_cache
        condition = {0: count_at_least(cache, ".shards-*.writer", 1),
                     1: count_at_least(run / "checkpoints", "step-000004/checkpoint_meta.json", 1),
                     2: file_contains(run / "metrics.jsonl", "eval_loss")}[i]
        points.append((run, cache, KillPoint(name, condition, delay)))

    landed = []
    for run, cache, point in points:
        killed = kill_at(cli(*args(run, cache)), point, tmp_path / f"{run.name}.log")
        assert killed.killed or killed.returncode == 0, killed.log[-3000:]
        landed.append(killed.killed)
        assert_complete(run, cache)
        if killed.killed:
            run_to_end(run, cache, resume=bool(list_checkpoints(run)))
        # nothing lost: the same curve and weights as the run that was never interrupted
        assert curve(run) == ref_curve, point.name
        weights = load_file(run / "final" / "model.safetensors")
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights), point.name
        assert [s for s, _ in list_checkpoints(run)] == [6, 8]
        # nothing half-visible: no temporaries, staging folders or locks left by the killed writer
        assert leftovers(run, cache) == [], point.name
    assert sum(landed) >= 2, f"most kills should land before the run ends: {landed}"
