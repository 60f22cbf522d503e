"""The command answers at once: ``--version``, ``--help`` and argument or config errors import no torch,
transformers, datasets or sentence-transformers (issue 17, #13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "datasets", "sentence_transformers", "faiss", "numpy", "tokenizers")


def console_command() -> list[str]:
    """The installed ``mosaic-embed`` script beside this interpreter (what a user runs), else ``python -m``."""
    script = Path(sys.executable).parent / "mosaic-embed"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mosaic_embed.cli"]


@pytest.mark.parametrize("args, code, says", [
    (["--version"], 0, "mosaic-embed, version"),
    (["pretrain", "--help"], 0, "MLM-pretrain an encoder"),
    (["pretrain", "--out", "x", "--bogus"], 2, "No such option '--bogus'"),
])
def test_the_console_command_answers_within_a_second_and_a_half(args, code, says):
    # this checkout's package, not another one an editable install may point the script at
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start = time.perf_counter()
    done = subprocess.run(console_command() + args, capture_output=True, text=True, env=env, timeout=60)
    seconds = time.perf_counter() - start
    assert done.returncode == code and says in done.stdout + done.stderr, done.stdout + done.stderr
    assert seconds < 1.5, f"mosaic-embed {' '.join(args)} took {seconds:.2f} s"


# Every command's --help, and a config error per stage (raised after parsing, before the stage's imports).
PROBE = """
    import contextlib, io, json, sys
    import click
    from mosaic_embed.cli import main

    def commands(group, path):
        for name, cmd in group.commands.items():
            yield [*path, name]
            if isinstance(cmd, click.Group):
                yield from commands(cmd, [*path, name])

    calls = [[*p, "--help"] for p in commands(main, [])] + json.loads(sys.argv[1])
    codes = []
    for args in calls:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                main(args, prog_name="mosaic-embed")
            except SystemExit as stop:
                codes.append([args, stop.code, err.getvalue()[:300]])
    print(json.dumps({"codes": codes, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""

ERRORS = [
    ["data", "prepare", "--set", "max_seq_len=2"],
    ["tokenizer", "train", "--out", "t", "--vocab-size", "3"],
    ["pretrain", "--out", "r", "--set", "train.max_stepz=1"],
    ["glue", "--out", "g"],
    ["train-encoder", "--set", "batch_size=1"],
    ["embed", "--model", "m", "--input", "i", "--out", "o", "--max-seq-len", "0"],
    ["eval-retrieval", "--model", "m"],
    ["index", "build", "--embeddings", "e", "--out", "o", "--set", "factory= "],
    ["index", "search", "--query", "q"],
]


def test_every_help_and_config_error_imports_nothing_heavy():
    script = f"HEAVY = {HEAVY!r}\n" + textwrap.dedent(PROBE)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(ERRORS)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    helps = [c for c in got["codes"] if c[0][-1] == "--help"]
    assert len(helps) >= 14 and all(code == 0 for _, code, _ in helps), helps
    errors = [c for c in got["codes"] if c[0][-1] != "--help"]
    assert [args for args, _, _ in errors] == ERRORS
    for args, code, err in errors:
        assert code == 2 and "error: " in err, (args, code, err)
    assert got["heavy"] == [], f"imported at parse time: {got['heavy']}"
