"""transformers' load report: dropped when it lists only head weights (an MLM checkpoint loaded as an encoder
or a new classifier), kept whole when anything else differs."""

from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file, save_file

import mosaic_embed  # noqa: F401  (registers MosaicBERT)
from mosaic_embed.model.loading import report_keys, switching_heads
from tests.helpers import tiny_bert, tiny_mosaic


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def reports():
    handler = _Records()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _load(kind, folder):
    from transformers import AutoModel, AutoModelForSequenceClassification

    if kind == "encoder":
        return AutoModel.from_pretrained(folder)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)


@pytest.mark.parametrize("make", [tiny_mosaic, tiny_bert])
@pytest.mark.parametrize("kind", ["encoder", "classifier"])
def test_head_only_reports_are_dropped(tmp_path, reports, make, kind):
    mlm = make(tmp_path / "mlm", mlm=True)
    _load(kind, mlm)
    assert len(reports) == 1 and "LOAD REPORT" in reports[0]  # transformers reports it ...
    rows = report_keys(reports[0])
    assert rows and {s for _, s in rows} <= {"UNEXPECTED", "MISSING"}
    reports.clear()
    with switching_heads():
        _load(kind, mlm)
    assert reports == []  # ... and within switching_heads it is expected, so dropped
    _load(kind, mlm)
    assert len(reports) == 1  # the filter is gone after the block


def test_a_report_with_another_key_is_kept_whole(tmp_path, reports):
    mlm = tiny_mosaic(tmp_path / "mlm", mlm=True)
    weights = load_file(mlm / "model.safetensors")
    dropped = next(k for k in weights if "encoder" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, mlm / "model.safetensors", metadata={"format": "pt"})
    with switching_heads():
        _load("encoder", mlm)
    assert len(reports) == 1
    keys = dict(report_keys(reports[0]))
    assert keys[dropped.removeprefix("bert.")] == "MISSING" and any(k.startswith("mlm_head.") for k in keys)


def test_report_keys_parses_only_what_it_understands():
    assert report_keys("some other warning") is None
    table = "X LOAD REPORT from: p\nKey | Status | \n----+-------+-\na.b | UNEXPECTED | \nc | MISSING | \n\nNotes:"
    assert report_keys(table) == [("a.b", "UNEXPECTED"), ("c", "MISSING")]
    assert report_keys(table.replace("c | MISSING", "garbled")) is None


def test_an_mlm_folder_opened_as_an_encoder_reports_nothing(tmp_path, reports):
    from mosaic_embed.encode.st import load_sentence_transformer

    load_sentence_transformer(tiny_mosaic(tmp_path / "mlm", mlm=True))
    assert not [m for m in reports if "LOAD REPORT" in m]
