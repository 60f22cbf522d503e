"""Shared fixtures of the encoder tests: three tiny encoder folders and a documents file."""

from __future__ import annotations

import json

import pytest

from mosaic_embed.encode import build_encoder, save_encoder
from tests.helpers import TOPICS, tiny_bert, tiny_mosaic

TEXTS = [f"{t} {body} " * (i % 4 + 1) for i, (t, body) in enumerate(list(TOPICS.items()) * 4)] + ["a", "cat dog"]


@pytest.fixture(scope="session")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    out = {}
    for name, make, pooling in (("mosaic-mean", tiny_mosaic, "mean"), ("mosaic-cls", tiny_mosaic, "cls"),
                                ("bert", tiny_bert, "mean")):
        backbone = make(root / f"{name}-backbone")
        save_encoder(build_encoder(backbone, pooling, True, max_seq_len=48, device="cpu"), root / name)
        out[name] = root / name
    return out


N_TEXTS = len(TEXTS)


def write_docs(path, n=N_TEXTS):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"doc{i}", "title": "t" if i % 3 == 0 else "", "text": TEXTS[i % len(TEXTS)]}) + "\n")
            if i % 5 == 0:
                f.write("\n")  # blank lines are skipped, not records
    return path


