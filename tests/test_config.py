"""Typed configs (config.py), atomic artifacts (artifacts.py), the data recipes, and the data CLI commands."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from click.testing import CliRunner

from mosaic_embed.artifacts import (
    LOCK,
    FolderLockedError,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    read_manifest,
    remove_temporaries,
    sha256_file,
    sha256_json,
    write_manifest,
    writer_lock,
)
from mosaic_embed.cli import main
from mosaic_embed.config import (
    ConfigError,
    DataConfig,
    EmbedConfig,
    PretrainConfig,
    TokenizerTrainConfig,
    from_dict,
    list_recipes,
    load_config,
    parse_override,
    recipes_root,
    resolve_recipe,
    save_config,
    to_dict,
)

RECIPES_DIR = recipes_root()


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    betas: tuple[float, float] = (0.9, 0.98)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclasses.dataclass
class Outer:
    name: str = "x"
    path: Path | None = None
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    tags: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# config machinery
# ---------------------------------------------------------------------------------------------------------


def test_from_dict_coerces_only_losslessly():
    cfg = from_dict(Outer, {"path": "runs/a", "inner": {"lr": 1, "betas": [0.8, 0.9]}, "tags": ["t"],
                            "extra": {"k": 1}, "mode": "b", "flag": True})
    assert cfg.path == Path("runs/a") and isinstance(cfg.inner.lr, float) and cfg.inner.lr == 1.0
    assert cfg.inner.betas == (0.8, 0.9) and cfg.tags == ["t"] and cfg.extra == {"k": 1}
    assert from_dict(Outer, {"path": None}).path is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nmae": "x"}, "unknown key 'nmae'.*Outer takes: extra, flag, inner, mode, name, path, tags"),
        ({"inner": {"lrr": 1}}, "unknown key 'inner.lrr'"),
        ({"inner": {"steps": 2.5}}, "'inner.steps' must be an integer, got 2.5"),
        ({"inner": {"steps": True}}, "'inner.steps' must be an integer"),
        ({"flag": "yes"}, "'flag' must be true or false"),
        ({"name": 3}, "'name' must be a string"),
        ({"mode": "c"}, "'mode' = 'c' is not one of 'a', 'b'"),
        ({"tags": "t"}, "'tags' must be a list"),
        ({"inner": 3}, "'inner' must be a mapping of Inner fields"),
        ({"path": 3}, "'path' = 3 is not"),
        ({"inner": {"steps": 0}}, "inner: steps must be >= 1, got 0"),
    ],
)
def test_from_dict_errors_name_the_key_and_the_source(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(Outer, data, source="recipe.yaml")
    assert str(err.value).startswith("recipe.yaml: ")


def test_load_config_errors_name_the_file(tmp_path):
    bad_key = write_yaml(tmp_path / "bad_key.yaml", {"max_seq_len": 64, "corpuss": "x"})
    with pytest.raises(ConfigError, match=rf"{bad_key}: unknown key 'corpuss'; DataConfig takes: "):
        load_config(DataConfig, bad_key)
    bad_type = write_yaml(tmp_path / "bad_type.yaml", {"max_seq_len": "long"})
    with pytest.raises(ConfigError, match=rf"{bad_type}: 'max_seq_len' must be an integer, got 'long'"):
        load_config(DataConfig, bad_type)
    bad_value = write_yaml(tmp_path / "bad_value.yaml", {"validation_fraction": 1.5})
    with pytest.raises(ConfigError, match=rf"{bad_value}: DataConfig: validation_fraction must be in \[0, 1\)"):
        load_config(DataConfig, bad_value)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        load_config(DataConfig, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(DataConfig, tmp_path / "broken.yaml")
    (tmp_path / "latin.yaml").write_bytes(b"text_field: caf\xe9\n")
    with pytest.raises(ConfigError, match="latin.yaml: not UTF-8"):
        load_config(DataConfig, tmp_path / "latin.yaml")
    with pytest.raises(ConfigError, match="recipe file not found: .*nope.yaml"):
        load_config(DataConfig, tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(DataConfig, tmp_path / "empty.yaml") == DataConfig()


@pytest.mark.parametrize(
    "item, key, value",
    [("train.lr=3e-4", ["train", "lr"], 3e-4), ("a=1", ["a"], 1), ("a=true", ["a"], True), ("a=null", ["a"], None),
     ("a=[1, 2]", ["a"], [1, 2]), ("a=runs/x.y", ["a"], "runs/x.y"), ("a=", ["a"], ""), ("a=x=y", ["a"], "x=y"),
     ("a=title", ["a"], "title")],
)
def test_parse_override(item, key, value):
    assert parse_override(item) == (key, value)


def test_overrides_apply_after_the_recipe_and_are_checked(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"max_seq_len": 64, "seed": 1})
    cfg = load_config(DataConfig, recipe, ["seed=7", "corpus=/data/x", "num_proc=null", "validation_fraction=1e-1"])
    assert (cfg.max_seq_len, cfg.seed, cfg.corpus, cfg.num_proc, cfg.validation_fraction) == (64, 7, Path("/data/x"), None, 0.1)
    nested = load_config(Outer, None, ["inner.lr=5e-5", "inner.steps=3", "extra.free.form=1"])
    assert nested.inner.lr == 5e-5 and nested.inner.steps == 3 and nested.extra == {"free": {"form": 1}}
    with pytest.raises(ConfigError, match=r"--set 'inner.lrr=1': unknown key 'inner.lrr'; Inner takes: betas, lr, steps"):
        load_config(Outer, None, ["inner.lrr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(Outer, None, ["inner.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(Outer, None, ["inner..lr=1"])
    with pytest.raises(ConfigError, match=rf"{recipe} with --set seed=x: 'seed' must be an integer"):
        load_config(DataConfig, recipe, ["seed=x"])


def test_resolve_recipe_by_name_and_path(tmp_path):
    assert resolve_recipe("default", "data") == RECIPES_DIR / "data" / "default.yaml"
    with pytest.raises(ConfigError, match=r"no recipe 'nope' for stage 'data'.*available: \['default', 'tiny'"):
        resolve_recipe("nope", "data")
    path = write_yaml(tmp_path / "mine.yaml", {})
    assert resolve_recipe(path, "data") == path
    (tmp_path / "tiny").mkdir()  # a folder named like a recipe does not shadow it
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert resolve_recipe("tiny", "data") == RECIPES_DIR / "data" / "tiny.yaml"
    finally:
        os.chdir(cwd)


def test_save_config_round_trips(tmp_path):
    cfg = Outer(path=Path("p"), tags=["a"], inner=Inner(lr=0.5, betas=(0.1, 0.2)))
    save_config(cfg, tmp_path / "o.yaml")
    assert load_config(Outer, tmp_path / "o.yaml") == cfg
    assert to_dict(cfg)["path"] == "p" and to_dict(cfg)["inner"]["betas"] == [0.1, 0.2]


def test_data_recipes_load_and_default_matches_the_dataclass():
    assert load_config(DataConfig, "default") == DataConfig()
    tiny = load_config(DataConfig, "tiny")
    assert tiny.max_seq_len == 64 and tiny.num_proc == 1
    assert load_config(TokenizerTrainConfig, "default") == TokenizerTrainConfig()


@pytest.mark.parametrize("corpus", ["2024", "1e5", "null", "true", "[a]"])
def test_typed_flags_stay_values(corpus):
    """A path given as a flag is a path, whatever YAML would make of it (it never becomes a --set string)."""
    cfg = load_config(PretrainConfig, "tiny", out=Path("runs/x"), data={"corpus": Path(corpus)})
    assert cfg.data.corpus == Path(corpus) and cfg.out == Path("runs/x")
    assert cfg.data.max_seq_len == load_config(PretrainConfig, "tiny").data.max_seq_len  # recipe kept
    assert load_config(PretrainConfig, "tiny", data={"corpus": None}).data.corpus is None  # not given: unchanged


def test_flags_and_overrides_merge_key_by_key_and_unknown_flags_fail(tmp_path):
    cfg = load_config(PretrainConfig, "tiny", ["train.lr=1e-3"], train={"max_steps": 5})
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 5
    with pytest.raises(ConfigError, match="command-line flag 'train.max_stepz'"):
        load_config(PretrainConfig, "tiny", train={"max_stepz": 5})
    with pytest.raises(ConfigError, match="command-line flag 'bogus'"):
        load_config(DataConfig, bogus=1)
    emb = load_config(EmbedConfig, model=Path("m"), input=Path("i"), out=Path("o"), encode={"max_seq_len": 64})
    assert emb.encode.max_seq_len == 64 and emb.encode.batch_size == 128  # defaults written once, in the dataclass
    with pytest.raises(ConfigError, match="max_seq_len must be >= 3"):
        load_config(EmbedConfig, model=Path("m"), input=Path("i"), out=Path("o"), encode={"max_seq_len": 0})


def test_every_stage_has_its_recipes_in_the_package():
    for stage in ("pretrain", "glue", "contrastive", "index", "data", "tokenizer"):
        assert "tiny" in list_recipes(stage) or stage == "tokenizer", stage
    assert set(list_recipes("pretrain")) >= {"tiny", "mosaic-bert-base", "bert-base"}


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [(DataConfig, {"max_seq_len": 2}, "max_seq_len"), (DataConfig, {"validation_fraction": -0.1}, "validation_fraction"),
     (DataConfig, {"num_proc": 0}, "num_proc"), (DataConfig, {"text_field": ""}, "text_field"),
     (DataConfig, {"batch_size": 0}, "batch_size"), (TokenizerTrainConfig, {"vocab_size": 5}, "vocab_size"),
     (TokenizerTrainConfig, {"min_frequency": 0}, "min_frequency"), (TokenizerTrainConfig, {"pad_multiple": 0}, "pad_multiple")],
)
def test_data_configs_validate(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# artifacts
# ---------------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(tmp_path / "sub") == ["a.json"]
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())  # not mkstemp's private 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = atomic_write_bytes(tmp_path / "f.bin", b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_atomic_directory(tmp_path):
    out = tmp_path / "run"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing visible until complete
    assert (out / "a.txt").read_text() == "1"
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(os.listdir(out)) == ["b.txt"]  # replaced whole
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "c.txt").write_text("3")
        raise RuntimeError("stage failed")
    assert sorted(os.listdir(out)) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["run"]
    with pytest.raises(FileExistsError, match="run exists"), atomic_directory(out, overwrite=False):
        pass


def test_hashes_and_manifests(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": [1, 2], "b": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
    write_manifest(tmp_path / "run", "data", config=DataConfig(corpus=Path("c")), inputs={"x": 1},
                   timings={"t": 1.0}, custom="yes")
    m = read_manifest(tmp_path / "run", expect_stage="data")
    assert m["config"]["corpus"] == "c" and m["inputs"] == {"x": 1} and m["custom"] == "yes"
    assert m["environment"]["mosaic_embed"]
    with pytest.raises(ValueError, match="made by stage 'data', expected 'pretrain'"):
        read_manifest(tmp_path / "run", expect_stage="pretrain")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not a valid manifest"):
        read_manifest(tmp_path / "bad")


def test_writer_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import socket
    import subprocess
    import sys

    folder = tmp_path / "run"
    with writer_lock(folder, "first writer") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["what"] == "first writer"
        with pytest.raises(FolderLockedError, match=rf"run is being written by another process \(first writer, pid "
                                                     rf"{os.getpid()}"):
            with writer_lock(folder, "second writer"):
                pass
        assert lock.exists()  # the refused writer did not remove the holder's lock
    assert not (folder / LOCK).exists()
    # a dead holder's lock is stale; so is a lock whose pid now belongs to another process (pid reuse):
    # the holder's recorded start time no longer matches
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    for holder in ({"pid": int(dead.stdout), "host": host},
                   {"pid": os.getpid(), "host": host, "started": "1"}):
        (folder / LOCK).write_text(json.dumps(holder))
        with writer_lock(folder, "taker"):
            assert json.loads((folder / LOCK).read_text())["what"] == "taker"
    # another host's lock cannot be checked: refused, with how to remove it
    (folder / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(FolderLockedError, match="or delete .*writer.lock if that process is gone"):
        with writer_lock(folder):
            pass


def test_writer_lock_release_keeps_a_successors_lock_and_removes_an_empty_scratch_folder(tmp_path):
    import shutil

    folder = tmp_path / "scratch"
    with writer_lock(folder, "first", remove_empty=True):
        shutil.rmtree(folder)  # the writer removed its folder; a successor locks it anew
        folder.mkdir()
        (folder / LOCK).write_text(json.dumps({"pid": os.getpid() + 1, "host": "x", "what": "successor"}))
    assert json.loads((folder / LOCK).read_text())["what"] == "successor"  # not removed: not ours
    (folder / LOCK).unlink()
    with writer_lock(folder, "again", remove_empty=True):
        pass
    assert not folder.exists()  # nothing else in it: removed with the lock


def test_remove_temporaries_removes_only_what_atomic_writes_leave(tmp_path):
    keep = ["a.json", ".writer.lock", "b.tmp", ".hidden", "run"]
    for name in keep:
        (tmp_path / name).mkdir() if name == "run" else (tmp_path / name).write_text("x")
    gone = [".a.json.x1y2.tmp", ".run.ab12.tmp", ".run.old-123"]
    (tmp_path / gone[0]).write_text("half")
    (tmp_path / gone[1]).mkdir()
    (tmp_path / gone[1] / "f").write_text("half")
    (tmp_path / gone[2]).mkdir()
    assert sorted(remove_temporaries(tmp_path, "run")) == [tmp_path / gone[1], tmp_path / gone[2]]
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, gone[0]])  # another artifact's temporary stays
    assert remove_temporaries(tmp_path) == [tmp_path / gone[0]]
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    lines = [json.dumps({"body": f"document number {i} about whales and ships " * (1 + i % 5)}) for i in range(30)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "junk.bin").write_bytes(b"\x00\x01")
    return root


def test_cli_data_prepare(small_corpus, tmp_path):
    runner = CliRunner()
    out = tmp_path / "shards"
    args = ["data", "prepare", "--corpus", str(small_corpus), "--text-field", "body", "--out", str(out),
            "--recipe", "tiny", "--set", "max_seq_len=16", "--set", "validation_fraction=0.2"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "30 documents" in result.output and "skipped files: unsupported-type 1" in result.output
    assert "train" in result.output and "validation" in result.output and f"shards: {out}" in result.output
    manifest = read_manifest(out, expect_stage="data")
    assert manifest["config"]["max_seq_len"] == 16 and manifest["config"]["num_proc"] == 1  # --set over recipe
    assert manifest["outputs"]["validation"]["documents"] == 6
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "up to date" in again.output


@pytest.mark.parametrize(
    "extra, message",
    [(["--set", "max_seq_lenn=4"], "unknown key 'max_seq_lenn'"),
     (["--set", "max_seq_len=two"], "'max_seq_len' must be an integer"),
     (["--recipe", "nope"], "no recipe 'nope' for stage 'data'"),
     (["--text-field", "missing"], "no documents found")],
)
def test_cli_data_prepare_errors(small_corpus, tmp_path, extra, message):
    result = CliRunner().invoke(main, ["data", "prepare", "--corpus", str(small_corpus), "--text-field", "body",
                                       "--out", str(tmp_path / "s"), *extra])
    assert result.exit_code == 2
    assert "error: " in result.output and message in result.output


def test_cli_tokenizer_train(small_corpus, tmp_path):
    out = tmp_path / "tok"
    result = CliRunner().invoke(main, ["tokenizer", "train", "--corpus", str(small_corpus), "--text-field", "body",
                                       "--vocab-size", "100", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out, expect_stage="tokenizer")
    assert manifest["outputs"]["vocab_size"] % 64 == 0
    assert f"tokenizer: {out} (vocab {manifest['outputs']['vocab_size']}" in result.output
    # The trained tokenizer feeds data prepare.
    result = CliRunner().invoke(main, ["data", "prepare", "--corpus", str(small_corpus), "--text-field", "body",
                                       "--tokenizer", str(out), "--out", str(tmp_path / "s"), "--num-proc", "1"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "s")["tokenizer_info"]["special_token_ids"]["cls"] == 2


def test_data_prepare_records_resolved_paths_and_its_cache_does_not_depend_on_the_directory(small_corpus, tmp_path,
                                                                                           monkeypatch):
    from tests.helpers import write_tokenizer

    write_tokenizer(tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    args = ["data", "prepare", "--corpus", "corpus", "--text-field", "body", "--tokenizer", "tok", "--recipe", "tiny",
            "--set", "cache_dir=cache"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (shards,) = (tmp_path / "cache").glob("shards-*")
    manifest = read_manifest(shards, expect_stage="data")
    assert manifest["inputs"]["corpus"] == str(small_corpus) and manifest["inputs"]["tokenizer"] == str(tmp_path / "tok")
    assert manifest["corpus_summary"]["path"] == str(small_corpus)
    assert all(e.startswith(str(small_corpus)) for e in manifest["corpus_summary"]["examples"]["file:unsupported-type"])
    # the same inputs named from another directory: the same cache key, the shards reused
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = CliRunner().invoke(main, ["data", "prepare", "--corpus", "../corpus", "--text-field", "body",
                                      "--tokenizer", str(tmp_path / "tok"), "--recipe", "tiny", "--set",
                                      f"cache_dir={tmp_path / 'cache'}"])
    assert again.exit_code == 0 and f"up to date (cache key {shards.name[len('shards-'):]}" in again.output, again.output


@pytest.mark.slow
def test_an_installed_wheel_finds_its_recipes_from_any_directory(tmp_path):
    """Recipes are package data: a non-editable install resolves ``--recipe tiny`` from another directory."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir)], check=True, capture_output=True)
    (wheel,) = wheel_dir.glob("mosaic_embed-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = ("import mosaic_embed.config as c; from mosaic_embed.config import PretrainConfig, load_config; "
            "cfg = load_config(PretrainConfig, 'tiny'); print(c.__file__); print(cfg.train.max_steps)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env={**env, "PYTHONPATH": str(site)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    module_file, steps = proc.stdout.split()
    assert module_file.startswith(str(site))  # the installed copy, not the checkout
    assert int(steps) == load_config(PretrainConfig, "tiny").train.max_steps


def test_folder_fingerprint_is_cached_by_file_stats(tmp_path, monkeypatch):
    import mosaic_embed.artifacts as artifacts

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"a" * 100)
    (folder / "manifest.json").write_text("{}")
    first = artifacts.folder_fingerprint(folder, exclude=("manifest.json",))
    calls = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    assert artifacts.folder_fingerprint(folder, exclude=("manifest.json",)) == first and not calls  # from cache
    (folder / "weights.bin").write_bytes(b"b" * 100)  # same size, new content and mtime
    os.utime(folder / "weights.bin", ns=(1, 1))
    second = artifacts.folder_fingerprint(folder, exclude=("manifest.json",))
    assert second != first and calls
    (folder / "manifest.json").write_text('{"run": 2}')  # excluded: not part of the identity
    assert artifacts.folder_fingerprint(folder, exclude=("manifest.json",)) == second


@pytest.mark.parametrize("field,value,match", [("warmup_fraction", 1.0, "warmup_fraction"), ("lr", 0.0, "lr > 0"),
                                               ("epochs", 0.0, "epochs > 0 or max_steps")])
def test_encoder_training_stages_share_one_optimisation_check(field, value, match):
    """train-encoder and distill declare their optimisation fields once (EncoderOptimization), each with its own
    defaults, and reject the same bad values with the same message."""
    from mosaic_embed.config import ContrastiveConfig, DistillConfig, EncoderOptimization

    distill = {"teacher": "t", "student": "mosaic-bert-tiny", "corpus": "c", "out": "o"}
    assert issubclass(ContrastiveConfig, EncoderOptimization) and issubclass(DistillConfig, EncoderOptimization)
    assert (ContrastiveConfig().lr, DistillConfig(**distill).lr) == (5e-5, 1e-4)
    with pytest.raises(ValueError, match=match):
        ContrastiveConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        DistillConfig(**distill, **{field: value})
