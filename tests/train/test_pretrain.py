"""MLM pretraining on CPU with tiny models: end to end, exact resume, NaN stop, checkpoints, config errors."""

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerFast, TrainerCallback

import mosaic_embed  # noqa: F401  (registers the Auto classes)
from mosaic_embed.config import ConfigError, PretrainConfig, PretrainModelConfig, from_dict, load_config
from mosaic_embed.train.callbacks import SegmentLimitCallback, SegmentLimitReached, StopAtStepCallback
from mosaic_embed.train.pretrain import (
    NonFiniteLossError,
    WarmupLinearDecay,
    build_model,
    list_checkpoints,
    train_mlm,
)
from tests.helpers import run_cli_torchrun


@pytest.fixture(scope="module")
def tok():
    """A 128-entry WordLevel tokenizer with BERT's special tokens ([PAD]=0 ... [MASK]=4)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(123)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def token_data(n, seed):
    rng = np.random.default_rng(seed)
    rows = [[2] + rng.integers(5, 128, rng.integers(4, 30)).tolist() + [3] for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": rows})


def make_cfg(out, arch="mosaic_bert", **train):
    preset = "mosaic-bert-tiny" if arch == "mosaic_bert" else "bert-tiny"
    overrides = {} if arch == "mosaic_bert" else {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    base = dict(max_steps=6, global_batch_size=8, microbatch_size=4, lr=1e-3, log_every_steps=1,
                eval_every_steps=3, eval_samples=16, eval_batch_size=8, save_every_steps=2, keep_last=1,
                keep_steps=[2], dataloader_workers=0, seed=3)
    base.update(train)
    return from_dict(PretrainConfig, {"model": {"arch": arch, "preset": preset, "overrides": overrides},
                                      "train": base, "out": str(out)})


def run(cfg, tok, resume=False, callbacks=()):
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tok)
    return train_mlm(model, tok, token_data(64, 0), token_data(16, 1), cfg, resume=resume, callbacks=callbacks)


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def test_training_checkpoints_and_exact_resume(tmp_path, tok):
    a = run(make_cfg(tmp_path / "a"), tok)
    losses_a, evals_a = train_losses(tmp_path / "a")
    assert [s for s, _ in losses_a] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(x) for _, x in losses_a)
    assert [e["step"] for e in evals_a] == [3, 6] and 0.0 <= evals_a[-1]["eval_accuracy"] <= 1.0
    # keep_last=1 plus keep_steps=[2]
    assert [s for s, _ in list_checkpoints(tmp_path / "a")] == [2, 6]

    meta = json.loads((tmp_path / "a/checkpoints/step-000006/checkpoint_meta.json").read_text())
    assert meta["step"] == 6 and meta["samples_seen"] == 48
    assert 0 < meta["wall_clock_s"] <= meta["elapsed_s"]
    first = json.loads((tmp_path / "a/checkpoints/step-000002/checkpoint_meta.json").read_text())
    assert 0 < first["tokens_seen"] < meta["tokens_seen"]
    assert meta["tokens_seen"] >= 6 * 8 * 6  # 48 sequences of at least 6 tokens
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "a/checkpoints/step-000006")
    for k, v in a.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k  # the run's model is on the GPU where there is one

    # the same run, killed after step 3 (its last checkpoint is step 2), then resumed
    cfg_b = make_cfg(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run(cfg_b, tok, callbacks=[StopAtStepCallback(3)])
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2]
    b = run(cfg_b, tok, resume=True)
    losses_b, evals_b = train_losses(tmp_path / "b")
    assert losses_b == losses_a  # bitwise: floats compared with ==
    assert [e["eval_loss"] for e in evals_b] == [e["eval_loss"] for e in evals_a]
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    meta_b = json.loads((tmp_path / "b/checkpoints/step-000006/checkpoint_meta.json").read_text())
    assert meta_b["tokens_seen"] == meta["tokens_seen"]


class _PoisonAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def test_resume_from_the_last_step_trains_no_further(tmp_path, tok):
    """A run stopped after its last checkpoint (while it validated or wrote final/) resumes to the same end:
    no step past max_steps (transformers' own resume would train one), no second validation line."""
    from safetensors.torch import load_file

    cfg = make_cfg(tmp_path / "a")  # 6 steps, a checkpoint every 2, validation at 3 and 6
    run(cfg, tok)
    before = (tmp_path / "a" / "metrics.jsonl").read_text()
    (tmp_path / "a" / "metrics.jsonl").write_text(before + json.dumps({"step": 6, "eval_loss": 0.5}) + "\n")
    trainer = run(cfg, tok, resume=True)
    assert trainer.state.global_step == 6
    assert train_losses(tmp_path / "a") == train_losses_of(before)
    weights = load_file(tmp_path / "a" / "checkpoints" / "step-000006" / "model.safetensors")
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in weights.items())


def train_losses_of(text):
    rows = [json.loads(line) for line in text.splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tok):
    cfg = make_cfg(tmp_path / "r", max_steps=8, eval_every_steps=0, keep_steps=[])
    with pytest.raises(NonFiniteLossError, match="step-000004"):
        run(cfg, tok, callbacks=[_PoisonAt(5)])
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [4]
    good = AutoModelForMaskedLM.from_pretrained(tmp_path / "r/checkpoints/step-000004")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert not (tmp_path / "r/final").exists()


def test_hf_bert_baseline_trains_on_padded_batches(tmp_path, tok):
    trainer = run(make_cfg(tmp_path / "h", arch="hf_bert", max_steps=2, eval_every_steps=2, save_every_steps=0,
                           mask_prob=0.15), tok)
    assert trainer.model.config.model_type == "bert"
    losses, evals = train_losses(tmp_path / "h")
    assert len(losses) == 2 and evals and math.isfinite(evals[-1]["eval_loss"])


def test_schedule_warmup_then_decay_to_final_fraction():
    f = WarmupLinearDecay(warmup=4, total=20, final=0.02)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(19) == pytest.approx(0.02) and f(10) > f(11) > f(19)


def test_run_folder_guards(tmp_path, tok):
    cfg = make_cfg(tmp_path / "g", max_steps=2, eval_every_steps=0)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run(cfg, tok, resume=True)
    run(cfg, tok)
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg, tok)
    other = make_cfg(tmp_path / "g", max_steps=2, eval_every_steps=0, seed=4)
    with pytest.raises(ValueError, match="data order"):
        run(other, tok, resume=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="multiple of microbatch_size"):
        from_dict(PretrainConfig, {"train": {"global_batch_size": 100, "microbatch_size": 64}})
    with pytest.raises(ConfigError, match="mask_prob"):
        from_dict(PretrainConfig, {"train": {"mask_prob": 1.5}})
    with pytest.raises(ConfigError, match="unknown key 'train.learning_rate'"):
        from_dict(PretrainConfig, {"train": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match="report_to"):
        from_dict(PretrainConfig, {"train": {"report_to": ["mlflow"]}})
    with pytest.raises(ConfigError, match="vocab_size"):
        from_dict(PretrainConfig, {"model": {"overrides": {"vocab_size": 100}}})
    with pytest.raises(ValueError, match="unknown hf_bert preset"):
        build_model(PretrainModelConfig(arch="hf_bert", preset="bert-huge"), None)
    for name in ("mosaic-bert-base", "mosaic-bert-large", "bert-base", "mosaic-bert-small", "mosaic-bert-mini", "tiny",
                 "continue"):
        cfg = load_config(PretrainConfig, name)
        assert cfg.train.global_batch_size % cfg.train.microbatch_size == 0
        assert cfg.train.mask_prob == (0.15 if name in ("bert-base", "continue") else 0.30)


def test_cli_pretrain_bundled_corpus_end_to_end(tmp_path):
    from mosaic_embed.cli import main

    out = tmp_path / "run"
    args = ["pretrain", "--out", str(out), "--set", "train.max_steps=2", "--set", "train.global_batch_size=4",
            "--set", "train.microbatch_size=4", "--set", "train.eval_samples=8", "--set", "train.save_every_steps=0",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.num_proc=1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    final = out / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["step"] == 2 and manifest["tokens_seen"] > 0
    assert manifest["config"]["model"]["preset"] == "mosaic-bert-tiny"
    assert "documents" in result.output and "train" in result.output  # the corpus and shard summary is shown
    model = AutoModelForMaskedLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == 30528 and tokenizer.mask_token_id == 103
    # a second run into the same folder is refused, with a clear message and exit 2
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--resume" in again.output


def test_cli_pretrain_shows_the_corpus_summary_for_cached_shards_too(tmp_path):
    from mosaic_embed.cli import main

    outputs = []
    for name in ("first", "second"):
        args = ["pretrain", "--out", str(tmp_path / name), "--set", "train.max_steps=1", "--set",
                "train.global_batch_size=4", "--set", "train.microbatch_size=4", "--set", "train.eval_samples=4",
                "--set", "train.save_every_steps=0", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set",
                "data.num_proc=1"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output + repr(result.exception)
        outputs.append(result.output)
    assert "shards up to date" not in outputs[0] and "shards up to date" in outputs[1]
    for output in outputs:  # the corpus summary (files, documents, skips) and the shard counts, both times
        assert "139 documents" in output and "duplicate documents dropped: 0" in output and "skipped files" in output
        assert "tokens (mean length" in output


def test_cli_bad_input_leaves_no_run_folder(tmp_path):
    """A bad corpus, or a --resume/--out mistake, fails before the run folder is made or its config touched."""
    from mosaic_embed.cli import main

    out = tmp_path / "run"
    base = ["pretrain", "--out", str(out), "--set", "train.max_steps=1", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    r = CliRunner().invoke(main, [*base, "--corpus", str(tmp_path / "missing.txt")])
    assert r.exit_code == 2 and "corpus not found" in r.output and "missing.txt" in r.output, r.output
    assert not out.exists()
    # corpus paths that YAML would read as a year, a float or null stay paths (and are missing here)
    for name in ("2024", "1e5", "null"):
        r = CliRunner().invoke(main, [*base, "--corpus", name])
        assert r.exit_code == 2 and "corpus not found" in r.output and name in r.output, r.output
        assert "ConfigError" not in r.output and not out.exists()
    r = CliRunner().invoke(main, [*base, "--set", "model.overrides.hidden_sise=128"])
    assert r.exit_code == 2 and "model.overrides.hidden_sise: not a field of MosaicBertConfig" in r.output, r.output
    assert not out.exists()
    r = CliRunner().invoke(main, [*base, "--resume"])
    assert r.exit_code == 2 and "no complete checkpoint" in r.output, r.output
    assert not out.exists() and not (tmp_path / "c").exists()  # refused before tokenizing anything
    (out / "final").mkdir(parents=True)
    (out / "config.yaml").write_text("the earlier run's config\n")
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 2 and "--resume" in r.output, r.output
    assert (out / "config.yaml").read_text() == "the earlier run's config\n"


def test_time_based_checkpoints(tmp_path, tok):
    # an interval far below one step's time asks for a checkpoint after every step
    cfg = make_cfg(tmp_path / "t", max_steps=3, eval_every_steps=0, save_every_steps=0, save_every_minutes=1e-6,
                   keep_last=2, keep_steps=[])
    run(cfg, tok)
    assert [s for s, _ in list_checkpoints(tmp_path / "t")] == [2, 3]


def test_segment_limit_saves_stops_and_resumes(tmp_path, tok):
    """A command's step (or time) limit ends it with a complete checkpoint and no final/; --resume finishes the
    run with the same losses as one uninterrupted run; the run's last step is never cut."""
    cfg = make_cfg(tmp_path / "s", max_steps=5, eval_every_steps=0, save_every_steps=0, keep_steps=[], keep_last=5)
    with pytest.raises(SegmentLimitReached, match="stopped at step 2 .*2 steps.*--resume"):
        run(cfg, tok, callbacks=[SegmentLimitCallback(steps=2)])
    assert [s for s, _ in list_checkpoints(tmp_path / "s")] == [2] and not (tmp_path / "s/final").exists()
    with pytest.raises(SegmentLimitReached, match="stopped at step 4"):  # counted from where it resumed
        run(cfg, tok, resume=True, callbacks=[SegmentLimitCallback(steps=2)])
    run(cfg, tok, resume=True, callbacks=[SegmentLimitCallback(steps=1)])  # step 5 is the last: not cut
    assert [s for s, _ in list_checkpoints(tmp_path / "s")] == [2, 4]
    whole = make_cfg(tmp_path / "w", max_steps=5, eval_every_steps=0, save_every_steps=0, keep_steps=[])
    run(whole, tok)
    assert train_losses(tmp_path / "s")[0] == train_losses(tmp_path / "w")[0]
    # a time limit far below one step's time stops after the first step
    with pytest.raises(SegmentLimitReached, match="stopped at step 1 .*minutes"):
        run(make_cfg(tmp_path / "m", max_steps=3, eval_every_steps=0, save_every_steps=0, keep_steps=[]), tok,
            callbacks=[SegmentLimitCallback(minutes=1e-6)])
    with pytest.raises(ValueError, match="minutes or steps"):
        SegmentLimitCallback()


def _torchrun_pretrain(nproc, out, cache):
    """The real CLI under torchrun (gloo on CPU), 4 steps of the tiny recipe with dropout off."""
    sets = ["train.max_steps=4", "train.global_batch_size=16", "train.microbatch_size=4", "train.log_every_steps=1",
            "train.eval_every_steps=0", "train.eval_samples=32", "train.save_every_steps=0", "data.num_proc=1",
            f"data.cache_dir={cache}", "model.overrides.hidden_dropout_prob=0.0"]
    args = ["pretrain", "--recipe", "tiny", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    done = run_cli_torchrun(nproc, args, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # one corpus summary and one result line, however many ranks (the shards are cached for the second run)
    assert done.stdout.count("duplicate documents dropped") == 1 and done.stdout.count("pretrained: ") == 1, \
        done.stdout[-3000:]
    return json.loads((out / "final" / "manifest.json").read_text())


def test_two_ranks_follow_the_one_rank_run(tmp_path):
    """DDP over 2 gloo ranks at the same global batch: the union of the ranks' microbatches is the 1-rank
    step's batch (same tokens, no sample twice), so with dropout off the loss curve is the same one."""
    one = _torchrun_pretrain(1, tmp_path / "one", tmp_path / "cache")
    two = _torchrun_pretrain(2, tmp_path / "two", tmp_path / "cache")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["tokens_seen"] == two["tokens_seen"] > 0  # every sample exactly once across the ranks
    loss_one, _ = train_losses(tmp_path / "one")
    loss_two, _ = train_losses(tmp_path / "two")
    assert [s for s, _ in loss_one] == [s for s, _ in loss_two] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(loss_one, loss_two, strict=True):
        assert abs(a - b) < 1e-4 * abs(a), (loss_one, loss_two)
    # the two runs end in (numerically) the same weights
    w1 = AutoModelForMaskedLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    w2 = AutoModelForMaskedLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


# ---- --init-from: domain-adaptive pretraining from a checkpoint ------------------------------------------


def _init_corpus(path):
    from tests.helpers import TOPICS

    with open(path, "w") as f:
        for i in range(40):
            topic, text = list(TOPICS.items())[i % len(TOPICS)]
            f.write(json.dumps({"text": f"{topic} {text} " * (i % 4 + 1)}) + "\n")
    return path


def _init_args(tmp_path, init, out, *extra):
    return ["pretrain", "--corpus", str(_init_corpus(tmp_path / "corpus.jsonl")), "--recipe", "tiny",
            "--init-from", str(init), "--out", str(out), "--set", "train.max_steps=2",
            "--set", "train.global_batch_size=4", "--set", "train.microbatch_size=4", "--set", "train.eval_samples=4",
            "--set", "train.save_every_steps=0", "--set", "train.eval_every_steps=0",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.num_proc=1",
            "--set", "model.overrides={}", *extra]


def test_init_from_a_converted_bert_continues_with_its_head_and_tokenizer(tmp_path):
    """A converted BertForMaskedLM continues MLM training on a new corpus: its weights (MLM head included)
    are the start, its tokenizer makes the shards, the run moves the weights."""
    from mosaic_embed.cli import main
    from mosaic_embed.config import PretrainModelConfig
    from mosaic_embed.data.tokenizer import load_tokenizer
    from mosaic_embed.model.convert import convert_hf
    from mosaic_embed.train.pretrain import load_init_model
    from tests.helpers import tiny_bert

    converted = tmp_path / "converted"
    source = convert_hf(tiny_bert(tmp_path / "bert", seed=7, mlm=True), converted)
    tokenizer = load_tokenizer(converted)
    start = load_init_model(PretrainModelConfig(init_from=converted), tokenizer)
    for name, value in source.state_dict().items():
        assert torch.equal(start.state_dict()[name], value), name
    out = tmp_path / "run"
    r = CliRunner().invoke(main, _init_args(tmp_path, converted, out))
    assert r.exit_code == 0, r.output + repr(r.exception)
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert manifest["inputs"]["init_from"] == str(converted.resolve())
    assert manifest["config"]["data"]["tokenizer"] == str(converted)  # the checkpoint's own tokenizer
    shards = json.loads((Path(manifest["inputs"]["shards"]) / "manifest.json").read_text())
    assert shards["config"]["tokenizer"] == str(converted)
    final = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert final.config.position == "learned" and final.config.vocab_size == 128
    moved = [n for n, v in final.state_dict().items() if not torch.equal(v, source.state_dict()[n])]
    assert moved  # it trained


def test_init_from_an_encoder_only_checkpoint_gets_a_fresh_head(tmp_path, caplog):
    from mosaic_embed.config import PretrainModelConfig
    from mosaic_embed.data.tokenizer import load_tokenizer
    from mosaic_embed.model import MosaicBertModel
    from mosaic_embed.train.pretrain import load_init_model
    from tests.helpers import tiny_mosaic

    folder = tiny_mosaic(tmp_path / "enc", seed=3)
    encoder = MosaicBertModel.from_pretrained(folder)
    with caplog.at_level("WARNING"):
        model = load_init_model(PretrainModelConfig(init_from=folder), load_tokenizer(folder))
    assert "has no MLM head" in caplog.text and "fresh weights" in caplog.text
    for name, value in encoder.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], value), name


def test_init_from_refuses_another_tokenizer_and_another_architecture(tmp_path):
    from mosaic_embed.cli import main
    from tests.helpers import SPECIAL, WORDS, tiny_bert, tiny_mosaic, write_tokenizer

    folder = tiny_mosaic(tmp_path / "m", mlm=True)
    other = tmp_path / "other-tok"
    vocab = list(dict.fromkeys(SPECIAL + WORDS[::-1] + [f"t{i}" for i in range(128)]))[:128]
    write_tokenizer(other, vocab)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, _init_args(tmp_path, folder, out, "--set", f"data.tokenizer={other}"))
    assert r.exit_code == 2 and f"data.tokenizer {other} is not the tokenizer of model.init_from" in r.output, r.output
    assert not out.exists()
    bert = tiny_bert(tmp_path / "bert", mlm=True)
    r = CliRunner().invoke(main, _init_args(tmp_path, bert, out))
    assert r.exit_code == 2 and "holds a 'bert' model" in r.output and "convert --from-hf" in r.output, r.output
    assert not out.exists()
    r = CliRunner().invoke(main, _init_args(tmp_path, tmp_path / "missing", out))
    assert r.exit_code == 2 and "is not a folder" in r.output
    r = CliRunner().invoke(main, _init_args(tmp_path, folder, out, "--set", "model.overrides.hidden_size=64"))
    assert r.exit_code == 2 and "model.overrides.hidden_size=64 but the checkpoint" in r.output, r.output
    assert not out.exists()


def test_metrics_file_is_cut_back_to_what_the_run_continues_from(tmp_path):
    """On resume the file keeps one line per entry of the checkpoint's log history (not what the run logged
    after it, nor a line a kill tore mid-write); a fresh run into a folder a killed run left starts empty."""
    from types import SimpleNamespace

    from mosaic_embed.train.callbacks import JsonlMetricsCallback

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 2, 3)]
    path.write_text(lines[0] + "\n" + '{"step": 2, "lo\n' + "\n".join(lines[1:]) + "\n" + '{"step": 4, "lo')
    resumed = SimpleNamespace(is_world_process_zero=True, log_history=[{}, {}, {}])  # step 1, step 2, eval at 2
    JsonlMetricsCallback(path).on_train_begin(None, resumed, None)
    assert path.read_text() == "".join(line + "\n" for line in lines[:3])
    JsonlMetricsCallback(path).on_train_begin(None, SimpleNamespace(is_world_process_zero=True, log_history=[]), None)
    assert path.read_text() == ""
