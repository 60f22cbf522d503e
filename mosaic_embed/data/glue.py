"""GLUE tasks: a registry of the eight tasks and loaders for the original TSV layout, HF ``datasets`` and custom tasks.

Every task becomes a :class:`TaskData`: one training split and one or more evaluation splits of
:class:`Examples` (``text_a``, optional ``text_b``, ``labels``). Labels are integers ``0..num_labels-1``
for classification and floats for regression (``num_labels == 1``, STS-B). String labels in the TSVs
(MNLI, QNLI, RTE) are mapped to the same integers ``nyu-mll/glue`` on the HF hub uses, so a model
finetuned from either source predicts the same label ids.

Column layouts are those of the original GLUE distribution (the ``download_glue_data.py`` folders):

=======  =========================================  ==========  ===========  =====================
task     files                                      header      text columns label column
=======  =========================================  ==========  ===========  =====================
CoLA     train.tsv, dev.tsv                         none        3            1 (0/1)
SST-2    train.tsv, dev.tsv                         yes         0            1 (0/1)
MRPC     train.tsv, dev.tsv                         yes         3, 4         0 "Quality" (0/1)
QQP      train.tsv, dev.tsv                         yes         3, 4         5 "is_duplicate" (0/1)
STS-B    train.tsv, dev.tsv                         yes         7, 8         9 "score" (0..5 float)
MNLI     train.tsv, dev_matched/mismatched.tsv      yes         8, 9         last "gold_label" (str)
QNLI     train.tsv, dev.tsv                         yes         1, 2         3 "label" (str)
RTE      train.tsv, dev.tsv                         yes         1, 2         3 "label" (str)
=======  =========================================  ==========  ===========  =====================

CoLA's rows are ``source, label, original annotation ('*' or empty), sentence``. MNLI's train has 12
columns (``label1`` then ``gold_label``), its dev files 16 (``label1..label5``, ``gold_label``): the label
is therefore read from the last column. TSVs are read with ``csv.QUOTE_NONE`` because GLUE sentences
contain unbalanced double quotes that a quoting reader would swallow across lines.

Custom tasks (``--task-dir DIR``) use the SST-2 layout (header ``sentence<TAB>label``) or the pair layout
(header ``sentence1<TAB>sentence2<TAB>label``) with ``train.tsv`` and ``dev.tsv``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: Metric names understood by :mod:`mosaic_embed.train.glue_metrics`.
METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: where its files are, which columns hold text and label, how it is scored.

    ``splits`` maps our split names to file names inside ``<data_dir>/<folder>/``; the first one is the
    training split, the others are evaluated. ``text_cols``/``label_col`` are 0-based column indices
    (``label_col=-1``: the last column). ``header`` names the expected header cells at those indices
    (``None``: the file has no header). ``label_names`` maps string labels to ids; ``None`` means the
    label cell is the id itself (or a float score for regression).
    """

    name: str
    folder: str
    splits: dict[str, str]
    text_cols: tuple[int, ...]
    label_col: int
    header: tuple[str, ...] | None
    num_columns: tuple[int, ...]
    num_labels: int
    metrics: tuple[str, ...]
    label_names: tuple[str, ...] | None = None
    hf_config: str | None = None
    hf_splits: dict[str, str] = dataclasses.field(default_factory=dict)
    hf_text: tuple[str, ...] = ()
    from_mnli: bool = False
    score_range: tuple[float, float] | None = None  # regression targets must lie inside it
    # The metrics that make the task's score in the GLUE average (the MosaicBERT reference code scores
    # STS-B by Spearman only while reporting Pearson too); empty = all of ``metrics``.
    score_metrics: tuple[str, ...] = ()
    skip_short_rows: bool = False

    @property
    def train_split(self) -> str:
        return next(iter(self.splits))

    @property
    def eval_splits(self) -> list[str]:
        return list(self.splits)[1:]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS: dict[str, TaskSpec] = {
    "mnli": TaskSpec(
        name="mnli", folder="MNLI",
        splits={"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
        text_cols=(8, 9), label_col=-1, header=("sentence1", "sentence2", "gold_label"), num_columns=(12, 16),
        num_labels=3, metrics=("accuracy",), label_names=("entailment", "neutral", "contradiction"),
        hf_config="mnli", hf_splits={"train": "train", "dev_matched": "validation_matched",
                                     "dev_mismatched": "validation_mismatched"},
        hf_text=("premise", "hypothesis"),
    ),
    "qnli": TaskSpec(
        name="qnli", folder="QNLI", splits={"train": "train.tsv", "dev": "dev.tsv"},
        text_cols=(1, 2), label_col=3, header=("question", "sentence", "label"), num_columns=(4,),
        num_labels=2, metrics=("accuracy",), label_names=("entailment", "not_entailment"),
        hf_config="qnli", hf_splits={"train": "train", "dev": "validation"}, hf_text=("question", "sentence"),
    ),
    # The original QQP train.tsv holds a handful of rows with missing fields; the reference GLUE
    # processors drop them, so does this loader (counted and logged). Any other task treats them as errors.
    "qqp": TaskSpec(
        name="qqp", folder="QQP", splits={"train": "train.tsv", "dev": "dev.tsv"},
        text_cols=(3, 4), label_col=5, header=("question1", "question2", "is_duplicate"), num_columns=(6,),
        num_labels=2, metrics=("accuracy", "f1"),
        hf_config="qqp", hf_splits={"train": "train", "dev": "validation"}, hf_text=("question1", "question2"),
        skip_short_rows=True,
    ),
    "rte": TaskSpec(
        name="rte", folder="RTE", splits={"train": "train.tsv", "dev": "dev.tsv"},
        text_cols=(1, 2), label_col=3, header=("sentence1", "sentence2", "label"), num_columns=(4,),
        num_labels=2, metrics=("accuracy",), label_names=("entailment", "not_entailment"),
        hf_config="rte", hf_splits={"train": "train", "dev": "validation"}, hf_text=("sentence1", "sentence2"),
        from_mnli=True,
    ),
    "cola": TaskSpec(
        name="cola", folder="CoLA", splits={"train": "train.tsv", "dev": "dev.tsv"},
        text_cols=(3,), label_col=1, header=None, num_columns=(4,),
        num_labels=2, metrics=("matthews",),
        hf_config="cola", hf_splits={"train": "train", "dev": "validation"}, hf_text=("sentence",),
    ),
    "sst2": TaskSpec(
        name="sst2", folder="SST-2", splits={"train": "train.tsv", "dev": "dev.tsv"},
        text_cols=(0,), label_col=1, header=("sentence", "label"), num_columns=(2,),
        num_labels=2, metrics=("accuracy",),
        hf_config="sst2", hf_splits={"train": "train", "dev": "validation"}, hf_text=("sentence",),
    ),
    "mrpc": TaskSpec(
        name="mrpc", folder="MRPC", splits={"train": "train.tsv", "dev": "dev.tsv"},
        text_cols=(3, 4), label_col=0, header=("#1 String", "#2 String", "Quality"), num_columns=(5,),
        num_labels=2, metrics=("accuracy", "f1"),
        hf_config="mrpc", hf_splits={"train": "train", "dev": "validation"}, hf_text=("sentence1", "sentence2"),
        from_mnli=True,
    ),
    "stsb": TaskSpec(
        name="stsb", folder="STS-B", splits={"train": "train.tsv", "dev": "dev.tsv"},
        text_cols=(7, 8), label_col=9, header=("sentence1", "sentence2", "score"), num_columns=(10,),
        num_labels=1, metrics=("pearson", "spearman"), score_metrics=("spearman",), score_range=(0.0, 5.0),
        hf_config="stsb", hf_splits={"train": "train", "dev": "validation"}, hf_text=("sentence1", "sentence2"),
        from_mnli=True,
    ),
}

#: The order the tasks run in: MNLI first, because RTE, MRPC and STS-B start from its finetuned weights.
GLUE_ORDER = ("mnli", "qnli", "qqp", "sst2", "cola", "rte", "mrpc", "stsb")


@dataclasses.dataclass
class Examples:
    """One split: parallel lists of texts and labels (int class ids, or float scores for regression)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float]
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> Examples:
        """The first ``n`` examples (all when ``n`` is None): quick runs and smoke tests."""
        if n is None or n >= len(self):
            return self
        return Examples(self.text_a[:n], None if self.text_b is None else self.text_b[:n], self.labels[:n],
                        f"{self.source}[:{n}]")


@dataclasses.dataclass
class TaskData:
    """A task's spec with its loaded training split and evaluation splits (name -> examples)."""

    spec: TaskSpec
    train: Examples
    evals: dict[str, Examples]


class GlueDataError(ValueError):
    """A GLUE/task file that does not fit its layout; the message names the file and the line."""


# ----------------------------------------------------------------------------------------------------------
# TSV reading
# ----------------------------------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, cells) for each line of a TSV; quotes are ordinary characters (QUOTE_NONE)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: drop a BOM (MRPC files may carry one)
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            for row in reader:
                yield reader.line_num, row
        except UnicodeDecodeError as err:
            raise GlueDataError(f"{path}: not UTF-8 text near line {reader.line_num + 1} ({err})") from None
        except csv.Error as err:
            raise GlueDataError(f"{path}:{reader.line_num}: {err}") from None


def _parse_label(cell: str, spec: TaskSpec, where: str) -> int | float:
    cell = cell.strip()
    if spec.is_regression:
        try:
            value = float(cell)
        except ValueError:
            raise GlueDataError(f"{where}: score {cell!r} is not a number") from None
        if not math.isfinite(value):
            raise GlueDataError(f"{where}: score {cell!r} is not finite")
        if spec.score_range is not None and not spec.score_range[0] <= value <= spec.score_range[1]:
            lo, hi = spec.score_range
            raise GlueDataError(f"{where}: score {value} outside the task's range [{lo}, {hi}]")
        return value
    if spec.label_names is not None:
        try:
            return spec.label_names.index(cell)
        except ValueError:
            raise GlueDataError(
                f"{where}: label {cell!r} is not one of {list(spec.label_names)} for task {spec.name}"
            ) from None
    try:
        label = int(cell)
    except ValueError:
        raise GlueDataError(f"{where}: label {cell!r} is not an integer class id") from None
    if not 0 <= label < spec.num_labels:
        raise GlueDataError(f"{where}: label {label} outside 0..{spec.num_labels - 1} for task {spec.name}")
    return label


def read_tsv_split(path: str | Path, spec: TaskSpec) -> Examples:
    """Read one split of ``spec`` from a TSV in its original layout; strict: any misfit names file and line."""
    path = Path(path)
    text_a: list[str] = []
    text_b: list[str] | None = [] if len(spec.text_cols) == 2 else None
    labels: list = []
    skipped: list[int] = []
    rows = _rows(path)
    expected_cols = spec.num_columns
    if spec.header is not None:
        first = next(rows, None)
        if first is None:
            raise GlueDataError(f"{path}: empty file (expected a header line)")
        lineno, header = first
        cells = [header[i] if -len(header) <= i < len(header) else None for i in (*spec.text_cols, spec.label_col)]
        if len(header) not in expected_cols or tuple(cells) != spec.header:
            want = dict(zip((*spec.text_cols, spec.label_col), spec.header, strict=True))
            raise GlueDataError(
                f"{path}:{lineno}: header {header!r} does not match the {spec.name} layout "
                f"({len(expected_cols) > 1 and 'one of ' or ''}{'/'.join(map(str, expected_cols))} columns, "
                f"column index -> name {want})"
            )
        expected_cols = (len(header),)  # MNLI: train and dev differ; within a file every row must match
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line (trailing newline)
        if len(row) not in expected_cols:
            if spec.skip_short_rows and len(row) < max(expected_cols):
                skipped.append(lineno)
                continue
            raise GlueDataError(
                f"{where}: {len(row)} columns, expected {'/'.join(map(str, expected_cols))} for task {spec.name}"
            )
        texts = [row[i] for i in spec.text_cols]
        if any(not t.strip() for t in texts):
            if spec.skip_short_rows:
                skipped.append(lineno)
                continue
            raise GlueDataError(f"{where}: empty text")
        labels.append(_parse_label(row[spec.label_col], spec, where))
        text_a.append(texts[0])
        if text_b is not None:
            text_b.append(texts[1])
    if skipped:
        log.warning("%s: skipped %d malformed rows (first at line %d), as the GLUE reference processors do",
                    path, len(skipped), skipped[0])
    if not labels:
        raise GlueDataError(f"{path}: no examples (empty split)")
    return Examples(text_a, text_b, labels, str(path))


def load_task_from_dir(spec: TaskSpec, data_dir: str | Path) -> TaskData:
    """Load a task from the original GLUE layout: ``<data_dir>/<folder>/<split file>``; fully offline."""
    folder = Path(data_dir) / spec.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no {spec.folder} folder for task {spec.name} in --data-dir {data_dir}")
    loaded = {split: read_tsv_split(folder / fname, spec) for split, fname in spec.splits.items()}
    train = loaded.pop(spec.train_split)
    return TaskData(spec, train, loaded)


def load_task_from_hf(spec: TaskSpec, dataset: str = "nyu-mll/glue") -> TaskData:
    """Load a task from the HF hub (``nyu-mll/glue``); needs the network or a warm HF cache."""
    if spec.hf_config is None:
        raise ValueError(f"task {spec.name} has no HF dataset config")
    hint = "pass --data-dir with the GLUE TSVs (original layout) to run offline"
    try:
        import datasets
    except ImportError:
        raise ValueError(f"HF datasets is not installed: cannot load {dataset}/{spec.hf_config}; {hint}") from None
    try:
        ds = datasets.load_dataset(dataset, spec.hf_config)
    except (OSError, ConnectionError, ValueError) as err:  # offline, no cache, hub errors
        raise ValueError(f"cannot load {dataset}/{spec.hf_config} from the HF hub ({type(err).__name__}: "
                         f"{err}); {hint}") from err
    splits: dict[str, Examples] = {}
    for ours, theirs in spec.hf_splits.items():
        if theirs not in ds:
            raise GlueDataError(f"{dataset}/{spec.hf_config}: no split '{theirs}' (has {list(ds)})")
        part = ds[theirs]
        missing = [c for c in (*spec.hf_text, "label") if c not in part.column_names]
        if missing:
            raise GlueDataError(f"{dataset}/{spec.hf_config}/{theirs}: missing columns {missing}")
        labels = list(part["label"])
        if not labels:
            raise GlueDataError(f"{dataset}/{spec.hf_config}/{theirs}: no examples (empty split)")
        for i, y in enumerate(labels):
            if not spec.is_regression and not 0 <= int(y) < spec.num_labels:
                raise GlueDataError(f"{dataset}/{spec.hf_config}/{theirs} row {i}: label {y} outside the task's range")
        splits[ours] = Examples(
            list(part[spec.hf_text[0]]),
            list(part[spec.hf_text[1]]) if len(spec.hf_text) == 2 else None,
            [float(y) for y in labels] if spec.is_regression else [int(y) for y in labels],
            f"{dataset}/{spec.hf_config}/{theirs}",
        )
    train = splits.pop(spec.train_split)
    return TaskData(spec, train, splits)


# ----------------------------------------------------------------------------------------------------------
# custom tasks
# ----------------------------------------------------------------------------------------------------------

_SINGLE_HEADER = ("sentence", "label")
_PAIR_HEADER = ("sentence1", "sentence2", "label")


def custom_task_spec(task_dir: str | Path, num_labels: int, metrics: Sequence[str] | None = None,
                     name: str | None = None) -> TaskSpec:
    """The spec of a custom task folder (``train.tsv`` + ``dev.tsv``), layout read from ``train.tsv``'s header.

    ``sentence<TAB>label`` (the SST-2 layout) or ``sentence1<TAB>sentence2<TAB>label`` (pairs). Labels are
    class ids ``0..num_labels-1``; ``num_labels=1`` makes a regression task with float scores.
    """
    task_dir = Path(task_dir)
    if num_labels < 1:
        raise ValueError(f"--num-labels must be >= 1, got {num_labels}")
    train = task_dir / "train.tsv"
    first = next(_rows(train), None)
    if first is None:
        raise GlueDataError(f"{train}: empty file (expected a header line)")
    header = tuple(c.strip() for c in first[1])
    if header == _SINGLE_HEADER:
        text_cols, ncols = (0,), 2
    elif header == _PAIR_HEADER:
        text_cols, ncols = (0, 1), 3
    else:
        raise GlueDataError(
            f"{train}:1: header {list(header)} is neither {list(_SINGLE_HEADER)} nor {list(_PAIR_HEADER)}"
        )
    if metrics is None or not len(metrics):
        metrics = ("pearson", "spearman") if num_labels == 1 else ("accuracy",)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric {bad[0]!r}; choose from {list(METRICS)}")
    if num_labels == 1 and any(m in ("accuracy", "f1", "matthews") for m in metrics):
        raise ValueError(f"metrics {list(metrics)}: a regression task (num_labels=1) takes pearson/spearman")
    if num_labels > 1 and any(m in ("pearson", "spearman") for m in metrics):
        raise ValueError(f"metrics {list(metrics)}: pearson/spearman need a regression task (num_labels=1)")
    if "f1" in metrics and num_labels != 2:
        raise ValueError("metric f1 is the binary F1 of class 1: it needs num_labels=2")
    return TaskSpec(
        name=name or task_dir.name, folder=str(task_dir), splits={"train": "train.tsv", "dev": "dev.tsv"},
        text_cols=text_cols, label_col=ncols - 1, header=header, num_columns=(ncols,),
        num_labels=num_labels, metrics=tuple(metrics),
    )


def load_custom_task(task_dir: str | Path, num_labels: int, metrics: Sequence[str] | None = None,
                     name: str | None = None) -> TaskData:
    """Load a custom task folder (see :func:`custom_task_spec`)."""
    spec = custom_task_spec(task_dir, num_labels, metrics, name)
    loaded = {split: read_tsv_split(Path(task_dir) / fname, spec) for split, fname in spec.splits.items()}
    train = loaded.pop(spec.train_split)
    return TaskData(spec, train, loaded)


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"all"`` or ``"mnli,sst2"`` (or a list) -> GLUE task names in run order (MNLI first); unknown = error."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    names = [t.strip().lower().replace("-", "") for t in tasks if t.strip()]
    if "all" in names:
        return list(GLUE_ORDER)
    aliases = {"sst": "sst2", "sts": "stsb", "stsb": "stsb"}
    names = [aliases.get(n, n) for n in names]
    unknown = [n for n in names if n not in GLUE_TASKS]
    if unknown:
        raise ValueError(f"unknown GLUE task {unknown[0]!r}; choose from all, {', '.join(GLUE_ORDER)}")
    return [n for n in GLUE_ORDER if n in names]


def load_glue_task(name: str, data_dir: str | Path | None = None) -> TaskData:
    """A GLUE task from ``data_dir`` (original layout, offline) or, without one, from the HF hub."""
    spec = GLUE_TASKS[name]
    if data_dir is not None:
        return load_task_from_dir(spec, data_dir)
    return load_task_from_hf(spec)
