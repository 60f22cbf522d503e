"""GLUE loaders on hand-made fixtures in each task's real TSV layout; custom tasks; bad input names file:line."""

import shutil
from pathlib import Path

import pytest

from mosaic_embed.data.glue import (
    GLUE_ORDER,
    GLUE_TASKS,
    GlueDataError,
    custom_task_spec,
    load_custom_task,
    load_glue_task,
    read_tsv_split,
    resolve_tasks,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "glue"
SHARED_TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tasks"


# Expected (size, first text_a, first text_b, first labels) of every split, read off the fixture files by eye.
EXPECTED = {
    ("mnli", "train"): (6, "The man read the book on Monday.", "A man read a book.", [0, 2, 1, 2, 0, 1]),
    ("mnli", "dev_matched"): (3, "The man read the book.", "A man read.", [0, 2, 1]),
    ("mnli", "dev_mismatched"): (3, "The year was long.", "It was a long year.", [0, 2, 1]),
    ("qnli", "train"): (4, "Where did the cat sit?", "The cat sat on the mat.", [0, 1, 0, 1]),
    ("qnli", "dev"): (2, "Who read the book?", "A man read the book.", [0, 1]),
    ("qqp", "train"): (4, "How do I read a book?", "What is the best way to read a book?", [1, 0, 1, 0]),
    ("qqp", "dev"): (3, "How do I read fast?", "How can I read faster?", [1, 0, 1]),
    ("rte", "train"): (4, "The man read the book on Monday in the park.", "A man read a book.", [0, 1, 0, 1]),
    ("rte", "dev"): (2, "The good film was the best of the year.", "The film was good.", [0, 1]),
    ("cola", "train"): (6, "The cat sat on the mat.", None, [1, 0, 1, 0, 1, 0]),
    ("cola", "dev"): (4, "The dog sat on the mat.", None, [1, 0, 1, 0]),
    ("sst2", "train"): (6, "a good and fun film ", None, [1, 0, 1, 0, 1, 0]),
    ("sst2", "dev"): (4, "a fun movie ", None, [1, 0, 1, 0]),
    ("mrpc", "train"): (4, "The man read the book on Monday.", "On Monday the man read the book.", [1, 0, 1, 0]),
    ("mrpc", "dev"): (3, "The film was good.", "It was a good film.", [1, 0, 1]),
    ("stsb", "train"): (5, "A man is reading a book.", "A man reads a book.", [5.0, 0.5, 4.2, 0.0, 3.8]),
    ("stsb", "dev"): (3, "A man is reading.", "A man reads.", [4.75, 0.25, 3.6]),
}


@pytest.mark.parametrize("task", GLUE_ORDER)
def test_every_task_loads_its_real_layout(task):
    data = load_glue_task(task, FIXTURES)
    splits = {"train": data.train, **data.evals}
    assert set(splits) == set(GLUE_TASKS[task].splits)
    for split, ex in splits.items():
        n, a, b, labels = EXPECTED[(task, split)]
        assert len(ex) == n
        assert ex.text_a[0] == a
        assert (ex.text_b[0] if ex.text_b is not None else None) == b
        assert ex.labels == pytest.approx(labels)


def test_quotes_are_plain_characters():
    # QUOTE_NONE: an unbalanced quote must neither be stripped nor swallow the following lines.
    cola = load_glue_task("cola", FIXTURES)
    assert cola.train.text_a[2] == 'She said "hello" to the dog.'
    assert len(cola.train) == 6
    sst = load_glue_task("sst2", FIXTURES)
    assert sst.train.text_a[3] == 'the worst " movie '


def test_mnli_label_order_matches_hf_glue():
    assert GLUE_TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["rte"].label_names == ("entailment", "not_entailment")


def test_resolve_tasks_orders_mnli_first():
    assert resolve_tasks("all") == list(GLUE_ORDER)
    assert resolve_tasks("rte,mnli") == ["mnli", "rte"]
    assert resolve_tasks(["STS-B", "sst2"]) == ["sst2", "stsb"]
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        resolve_tasks("wnli")


def _copy_task(tmp_path, folder):
    dst = tmp_path / "glue" / folder
    shutil.copytree(FIXTURES / folder, dst)
    return tmp_path / "glue", dst


def test_missing_file_named(tmp_path):
    root, d = _copy_task(tmp_path, "MNLI")
    (d / "dev_mismatched.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="dev_mismatched.tsv"):
        load_glue_task("mnli", root)
    with pytest.raises(FileNotFoundError, match="no RTE folder"):
        load_glue_task("rte", root)


def test_wrong_header_named(tmp_path):
    root, d = _copy_task(tmp_path, "STS-B")
    text = (d / "train.tsv").read_text().replace("sentence2\tscore", "sentence2\tlabel")
    (d / "train.tsv").write_text(text)
    with pytest.raises(GlueDataError, match=r"STS-B/train.tsv:1: header"):
        load_glue_task("stsb", root)


def test_wrong_column_count_names_line(tmp_path):
    root, d = _copy_task(tmp_path, "CoLA")
    lines = (d / "dev.tsv").read_text().splitlines()
    lines[2] = "bc01\t1\tA man read a book."  # 3 columns: the annotation column is missing
    (d / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(GlueDataError, match=r"CoLA/dev.tsv:3: 3 columns, expected 4"):
        load_glue_task("cola", root)


def test_label_out_of_range_names_line(tmp_path):
    root, d = _copy_task(tmp_path, "SST-2")
    (d / "dev.tsv").write_text("sentence\tlabel\na fun movie \t1\na dull movie \t2\n")
    with pytest.raises(GlueDataError, match=r"SST-2/dev.tsv:3: label 2 outside 0..1"):
        load_glue_task("sst2", root)
    root, d = _copy_task(tmp_path, "RTE")
    (d / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n")
    with pytest.raises(GlueDataError, match=r"RTE/dev.tsv:2: label 'neutral' is not one of"):
        load_glue_task("rte", root)
    root, d = _copy_task(tmp_path, "STS-B")
    lines = (d / "dev.tsv").read_text().splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0] + "\t7.5"
    (d / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(GlueDataError, match=r"STS-B/dev.tsv:2: score 7.5 outside"):
        load_glue_task("stsb", root)


def test_empty_split_named(tmp_path):
    root, d = _copy_task(tmp_path, "QNLI")
    (d / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n")
    with pytest.raises(GlueDataError, match=r"QNLI/dev.tsv: no examples"):
        load_glue_task("qnli", root)
    (d / "dev.tsv").write_text("")
    with pytest.raises(GlueDataError, match=r"QNLI/dev.tsv: empty file"):
        load_glue_task("qnli", root)


def test_qqp_skips_short_rows_other_tasks_do_not(tmp_path):
    root, d = _copy_task(tmp_path, "QQP")
    with open(d / "train.tsv", "a") as f:
        f.write("201841\t303951\t174364\tHow can I\n")  # the kind of truncated row the real QQP train has
    assert len(load_glue_task("qqp", root).train) == 4
    root, d = _copy_task(tmp_path, "MRPC")
    with open(d / "train.tsv", "a") as f:
        f.write("1\t1\t2\tonly one sentence\n")
    with pytest.raises(GlueDataError, match=r"MRPC/train.tsv:6: 4 columns"):
        load_glue_task("mrpc", root)


def test_custom_single_and_pair_layouts(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "train.tsv").write_text('sentence\tlabel\nit is "great\t2\nbad\t0\nok\t1\n')
    (single / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    data = load_custom_task(single, num_labels=3)
    assert data.spec.name == "single" and data.spec.metrics == ("accuracy",)
    assert data.train.text_a == ['it is "great', "bad", "ok"] and data.train.labels == [2, 0, 1]
    assert data.train.text_b is None and list(data.evals) == ["dev"]
    with pytest.raises(GlueDataError, match=r"single/train.tsv:2: label 2 outside 0..1"):
        load_custom_task(single, num_labels=2)

    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "train.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\t0.5\nc\td\t1.5\n")
    (pair / "dev.tsv").write_text("sentence1\tsentence2\tlabel\ne\tf\t2.0\n")
    data = load_custom_task(pair, num_labels=1)
    assert data.spec.is_regression and data.spec.metrics == ("pearson", "spearman")
    assert data.train.text_b == ["b", "d"] and data.train.labels == [0.5, 1.5]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.tsv").write_text("text\ttarget\nx\t1\n")
    with pytest.raises(GlueDataError, match=r"bad/train.tsv:1: header"):
        custom_task_spec(bad, 2)
    with pytest.raises(FileNotFoundError, match=r"missing/train.tsv"):
        custom_task_spec(tmp_path / "missing", 2)
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        custom_task_spec(single, 2, ["auc"])
    with pytest.raises(ValueError, match="regression"):
        custom_task_spec(single, 1, ["accuracy"])


def test_read_split_directly_reports_non_numeric_label(tmp_path):
    p = tmp_path / "dev.tsv"
    p.write_text("sentence\tlabel\nfine\tpositive\n")
    with pytest.raises(GlueDataError, match=r"dev.tsv:2: label 'positive' is not an integer"):
        read_tsv_split(p, GLUE_TASKS["sst2"])


@pytest.mark.skipif(not SHARED_TASKS.is_dir(), reason="../shared/data/tasks not present")
@pytest.mark.parametrize("name,n_train,n_dev", [("sst2_like", 9065, 1007), ("sms_spam", 4354, 483)])
def test_real_shared_tasks_in_sst2_layout(name, n_train, n_dev):
    data = load_custom_task(SHARED_TASKS / name, num_labels=2)
    assert len(data.train) == n_train and len(data.evals["dev"]) == n_dev
    assert set(data.train.labels) == {0, 1}


def test_hf_loader_maps_columns_without_network(monkeypatch):
    """nyu-mll/glue's column names and split names map onto ours (load_dataset stubbed: no network)."""
    import datasets

    from mosaic_embed.data.glue import load_task_from_hf

    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        part = {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0], "idx": [0, 1]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(part)
                                     for s in ("train", "validation_matched", "validation_mismatched")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_task_from_hf(GLUE_TASKS["mnli"])
    assert calls == [("nyu-mll/glue", "mnli")]
    assert data.train.text_a == ["p1", "p2"] and data.train.text_b == ["h1", "h2"] and data.train.labels == [2, 0]
    assert set(data.evals) == {"dev_matched", "dev_mismatched"}

    def bad_labels(name, config):
        part = {"sentence": ["s"], "label": [3], "idx": [0]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(part) for s in ("train", "validation")})

    monkeypatch.setattr(datasets, "load_dataset", bad_labels)
    with pytest.raises(GlueDataError, match=r"nyu-mll/glue/sst2/train row 0: label 3"):
        load_task_from_hf(GLUE_TASKS["sst2"])
