"""``mosaic-embed embed`` killed with SIGKILL at seeded points, then run again: the same vectors, bit for bit,
as an uninterrupted run, and nothing half-written left. And two real ``embed`` processes on one ``--out``:
one writes, the other is refused with the lock error and leaves the first one's folder alone."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mosaic_embed.cli import main
from mosaic_embed.config import EmbedConfig, EncodeConfig
from mosaic_embed.encode import build_encoder, embed_file, load_embeddings, save_encoder
from tests.helpers import TOPICS, WORDS, tiny_mosaic
from tests.reliability.harness import (
    KillPoint,
    cli,
    env,
    file_appears,
    kill_at,
    leftovers,
    one_thread,
    seeded_delays,
    start,
    wait_until,
)

SEED = 23
N_DOCS, WINDOW = 3000, 100  # 30 windows: the unit of progress and of resumption


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An encoder, an input of N_DOCS records, and the vectors of an uninterrupted run."""
    root = tmp_path_factory.mktemp("embed-kill")
    backbone = tiny_mosaic(root / "backbone")
    save_encoder(build_encoder(backbone, "mean", True, max_seq_len=48, device="cpu"), root / "encoder")
    rng = random.Random(SEED)
    topics = list(TOPICS.values())
    with open(root / "docs.jsonl", "w") as f:
        for i in range(N_DOCS):
            text = " ".join([rng.choice(topics)] + rng.choices(WORDS, k=rng.randint(1, 30)))
            f.write(json.dumps({"_id": f"d{i}", "text": text}) + "\n")
    with one_thread():
        embed_file(config(root, root / "reference"), show_progress=False)
    return root


def config(root: Path, out: Path) -> EmbedConfig:
    return EmbedConfig(model=root / "encoder", input=root / "docs.jsonl", out=out, window=WINDOW,
                       encode=EncodeConfig(device="cpu"))


def args(root: Path, out: Path) -> list[str]:
    return ["embed", "--model", str(root / "encoder"), "--input", str(root / "docs.jsonl"), "--out", str(out),
            "--window", str(WINDOW), "--device", "cpu"]


def windows_done(out: Path, n: int):
    def condition() -> bool:
        try:
            return len(json.loads((out / "progress" / "rank-0.json").read_text())["done"]) >= n
        except (OSError, ValueError):
            return False
    return condition


def assert_same_as_reference(root: Path, out: Path) -> None:
    vectors, ids = load_embeddings(out)
    ref_vectors, ref_ids = load_embeddings(root / "reference")
    assert ids == ref_ids and vectors.dtype == ref_vectors.dtype
    assert np.array_equal(np.asarray(vectors), np.asarray(ref_vectors))
    assert json.loads((out / "manifest.json").read_text())["stage"] == "embed"


def test_embed_killed_at_seeded_points_resumes_to_the_same_vectors(setup, tmp_path):
    root = setup
    rng = random.Random(SEED)
    delays = seeded_delays(SEED, 3, 0.0, 0.3)
    points = [("while validating and hashing the input", lambda out: file_appears(out / ".writer.lock"), delays[0]),
              ("after a few windows", lambda out: windows_done(out, rng.randint(2, 8)), delays[1] / 10),
              ("after most windows", lambda out: windows_done(out, rng.randint(15, 25)), delays[2] / 10)]
    landed = []
    for i, (name, milestone, delay) in enumerate(points):
        out = tmp_path / f"emb{i}"
        killed = kill_at(cli(*args(root, out)), KillPoint(name, milestone(out), delay), tmp_path / f"{i}.log")
        assert killed.killed or killed.returncode == 0, killed.log[-3000:]
        landed.append(killed.killed)
        if killed.killed:
            # nothing half-visible: an interrupted folder is never taken for a result
            if out.exists():
                with pytest.raises(ValueError, match="incomplete"):
                    load_embeddings(out)
            with one_thread():
                result = CliRunner().invoke(main, args(root, out))
            assert result.exit_code == 0, result.output[-3000:] + repr(result.exception)
        assert_same_as_reference(root, out)
        assert leftovers(out) == [], name
    assert sum(landed) >= 2, f"most kills should land before the run ends: {landed}"


def test_two_embed_processes_on_one_folder_one_writes_the_other_is_refused(setup, tmp_path):
    """Both are real ``mosaic-embed embed`` processes. The first is frozen (SIGSTOP) while it holds the
    folder, so that the second certainly starts while the first is writing, whatever the machine's speed."""
    root, out = setup, tmp_path / "emb"
    first = start(cli(*args(root, out)), tmp_path / "first.log")
    try:
        assert wait_until(first, file_appears(out / ".writer.lock")), (tmp_path / "first.log").read_text()
        os.killpg(first.pid, signal.SIGSTOP)
        assert (out / ".writer.lock").exists(), "the first writer finished before it could be held"
        second = subprocess.run(cli(*args(root, out)), capture_output=True, text=True, env=env(), timeout=180)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is being written by another process (mosaic-embed embed, pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and (out / ".writer.lock").exists()  # the first one's folder kept
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert first.wait(timeout=180) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert_same_as_reference(root, out)
    assert leftovers(out) == []
