"""Loading a checkpoint of one head into a model of another, without transformers' report of the heads.

transformers 5 prints a ``LOAD REPORT`` table whenever a checkpoint's weights and the model's differ. Some
differences are what a stage asks for: an encoder built from a pretraining run drops the MLM head
(``UNEXPECTED mlm_head.*``), a GLUE classifier starts from that run with a new pooler and classifier
(``MISSING classifier.*``). Printed on every run, such reports teach users to ignore the table, which is
the one place a real problem (an encoder weight missing, a checkpoint of another model) would show.
:func:`switching_heads` drops a report only when every key it lists is a head weight; any other key keeps
the whole report, as transformers wrote it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

#: Weights of the task heads on top of an encoder, ours and transformers' BERT: the MLM heads
#: (``mlm_head``, ``cls.predictions``), the classifiers' pooler and output layer.
HEAD_KEYS = re.compile(r"^(mlm_head|cls\.predictions|classifier|(bert\.)?pooler)\.")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPORT_LOGGER = "transformers.modeling_utils"
_HEAD_STATUSES = ("UNEXPECTED", "MISSING")


def report_keys(message: str) -> list[tuple[str, str]] | None:
    """``(key, status)`` rows of a transformers ``LOAD REPORT`` message; None if it is not one, or a row does
    not parse (a report this code does not understand is never dropped)."""
    text = _ANSI.sub("", message)
    if "LOAD REPORT" not in text:
        return None
    lines = text.splitlines()
    sep = next((i for i, line in enumerate(lines) if line and set(line) <= set("-+ ")), None)
    if sep is None:
        return None
    rows = []
    for line in lines[sep + 1:]:
        if not line.strip():
            break  # the blank line before "Notes:"
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) < 2 or not cells[0] or not cells[1]:
            return None
        rows.append((cells[0], cells[1]))
    return rows or None


class _HeadReportFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rows = report_keys(record.getMessage())
        if rows is None:
            return True
        return not all(status in _HEAD_STATUSES and HEAD_KEYS.match(key) for key, status in rows)


@contextlib.contextmanager
def switching_heads() -> Iterator[None]:
    """Within: a transformers load report that lists only head weights (``HEAD_KEYS``), unexpected or
    missing, is dropped; every other report is logged as usual."""
    logger = logging.getLogger(_REPORT_LOGGER)
    f = _HeadReportFilter()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)
