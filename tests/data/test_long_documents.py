"""A corpus holding one huge single-line file: reading it and preparing shards from it stay within a memory
bound set by the settings, not by the file (issue 17, #7). Peak resident memory is measured in a fresh
subprocess, against the same process's peak before the file is read.

The peak is the kernel's high-water mark of the process's own memory (``VmHWM``). ``resource.getrusage``'s
``ru_maxrss`` would not do: Linux carries it over from the parent through fork and exec, so a child of this
(large) test process reports the parent's peak and could never show a growth.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from Linux's /proc")
MB = 1 << 20
WORDS = ["whale", "sea", "ship", "Ahab", "the", "a", "of", "and", '"quoted"', "café", "naïve", "line\n"]


def huge_text(n_chars: int) -> str:
    """``n_chars`` characters of words, quotes, non-ASCII and newlines (escapes in JSON), one document; it
    repeats itself, so the tests read it with dedup off."""
    unit = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(997)) + " "
    return (unit * (n_chars // len(unit) + 1))[:n_chars]


def run_measured(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON line with its measurements."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


PEAK = """
    def peak():  # bytes: this process's resident-memory high-water mark since it started
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
"""

READ = PEAK + """
    import json, sys
    from mosaic_embed.data.corpus import CorpusStats, iter_documents

    before = peak()
    stats, longest = CorpusStats(), 0
    for doc in iter_documents(sys.argv[1], stats=stats, dedup=False):
        longest = max(longest, len(doc))
    print(json.dumps({"before": before, "after": peak(), "chars": stats.characters, "longest": longest,
                      "split": stats.split_documents, "docs": stats.documents}))
"""


@pytest.mark.parametrize("shape", ["txt", "jsonl", "json"])
def test_reading_a_huge_single_line_file_holds_bounded_memory(tmp_path, shape):
    text = huge_text(48 * MB)
    path = tmp_path / f"big.{shape}"
    if shape == "txt":
        path.write_text(text, encoding="utf-8")
    elif shape == "jsonl":  # one line, the text between other keys (escaped: ASCII only)
        path.write_text(json.dumps({"id": 1, "text": text, "tags": ["a"] * 10}) + "\n", encoding="utf-8")
    else:  # one list holding one huge object
        path.write_text(json.dumps([{"meta": {"n": [1, 2]}, "text": text}]), encoding="utf-8")
    assert path.stat().st_size > 48 * MB
    got = run_measured(READ, str(path))
    assert got["chars"] == len(text) and got["docs"] == 1 and got["split"] == 1 and got["longest"] <= 100_000
    # the text alone is 48 MB as a str: reading it whole (as before pieces) costs that at least; measured ~6 MB
    growth = (got["after"] - got["before"]) / MB
    assert growth < 24, f"{shape}: peak memory grew by {growth:.0f} MB while reading a {len(text) / MB:.0f} MB document"


PREPARE = PEAK + """
    import json, sys
    from pathlib import Path
    from mosaic_embed.config import DataConfig
    from mosaic_embed.data.shards import prepare_shards

    peaks = []
    for corpus in sys.argv[1:]:  # a small corpus first: every import and first-use allocation is then made
        cfg = DataConfig(corpus=Path(corpus), out=Path(corpus).parent / "shards", num_proc=1, batch_size=16,
                         max_document_chars=10_000, validation_fraction=0.0, dedup=False)
        out = prepare_shards(cfg)
        peaks.append(peak())
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"peaks": peaks, "summary": manifest["corpus_summary"], "train": manifest["outputs"]["train"]}))
"""


def test_data_prepare_of_a_huge_single_line_file_holds_bounded_memory(tmp_path):
    small, big = tmp_path / "small" / "doc.txt", tmp_path / "big" / "doc.txt"
    for path, n in ((small, 200_000), (big, 6 * MB)):
        path.parent.mkdir()
        path.write_text(huge_text(n), encoding="utf-8")
    got = run_measured(PREPARE, str(small), str(big))
    summary = got["summary"]
    assert summary["documents"] == 1 and summary["split_documents"] == 1 and summary["pieces"] >= 600
    assert got["train"]["documents"] == 1 and got["train"]["tokens"] > 1_000_000
    # measured: the whole line tokenized as one document (before pieces) took 700 MB above the small corpus's
    # peak; in pieces of 10,000 characters, 16 to a batch, 36 MB
    growth = (got["peaks"][1] - got["peaks"][0]) / MB
    assert growth < 200, f"peak memory grew by {growth:.0f} MB for a 6 MB single-line document"
