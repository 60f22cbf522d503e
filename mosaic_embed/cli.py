"""The ``mosaic-embed`` command: one thin click command per pipeline stage.

Each command turns its typed options into its stage's config with the one entry point,
``config.load_config(Cls, --recipe, --set overrides, **typed flags)`` (a flag not given is None and
changes nothing; a path stays a path), then calls the stage's plain Python function. No logic lives here.

Start-up is kept cheap: this module and ``mosaic_embed/__init__`` import neither torch nor transformers, so
``--help``, ``--version`` and argument errors answer at once; each command imports what it runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__
from .config import ConfigError


def recipe_options(func):
    """``--recipe NAME|PATH`` and repeatable ``--set dotted.key=value`` for a stage's config."""
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a recipe key (dotted), e.g. --set train.lr=3e-4.")(func)
    return click.option("--recipe", "recipe", default=None,
                        help="Recipe name (mosaic_embed/recipes/<stage>/) or a YAML path.")(func)


def _path(value: str | None) -> Path | None:
    return Path(value) if value is not None else None


def _flag(value: bool) -> bool | None:
    """A click is_flag option: given -> True, not given -> None (leave the recipe's value)."""
    return True if value else None


class _Group(click.Group):
    """Turns the project's expected errors (bad config, bad input files, a locked folder) into one clear
    line and exit status 2."""

    def invoke(self, ctx):
        from .artifacts import FolderLockedError

        # A stage shows one progress bar of its own, not transformers' bar per model load and save ("Loading
        # weights", "Writing model shards"). transformers reads this when first imported, inside the command.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

        try:
            result = super().invoke(ctx)
        except (ConfigError, FileNotFoundError, FileExistsError, ValueError, FolderLockedError) as err:
            if isinstance(err, click.ClickException):
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        _close_process_group()
        return result


def _close_process_group() -> None:
    """After a command that ran under torchrun: every rank waits for the others, then tears the process group
    down. Left to interpreter exit, gloo's threads can abort a rank that finished first ("terminate called
    without an active exception", SIGABRT; seen once in CI's two-rank train-encoder test), and torchrun then
    fails the whole run. Only on success: a rank that failed is stopped by torchrun, not waited for."""
    dist = sys.modules.get("torch.distributed")  # never imported here: only a command that used it pays
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="mosaic-embed")
def main() -> None:
    """Pretrain a MosaicBERT encoder on your corpus; finetune it for GLUE-style tasks and embeddings."""


# ---- data: corpus -> tokenizer -> shards -----------------------------------------------------------------


@main.group()
def data() -> None:
    """Read a corpus and turn it into token shards."""


@main.group()
def tokenizer() -> None:
    """Train or inspect WordPiece tokenizers."""


@data.command("prepare")
@click.option("--corpus", type=click.Path(), default=None,
              help="Corpus file or folder (.txt .md .jsonl[.gz] .json .csv .tsv .parquet); default: the bundled sample.")
@click.option("--text-field", default=None, help="JSON key / CSV, TSV, Parquet column holding the text (default: text).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(), default=None,
              help="Tokenizer folder (mosaic-embed tokenizer train, save_pretrained); default: bundled bert-base-uncased.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Shards folder; default: a cache folder keyed by the inputs (cache_dir).")
@click.option("--num-proc", type=int, default=None, help="Tokenizer processes (default: all cores).")
@click.option("--force", is_flag=True, help="Rebuild even if the shards are up to date.")
@recipe_options
def data_prepare_cmd(corpus, text_field, tokenizer_path, out, num_proc, force, recipe, overrides):
    """Read a corpus, tokenize it into train/validation shards; print the corpus summary and shard counts."""
    from .config import DataConfig, load_config

    cfg = load_config(DataConfig, recipe, overrides, corpus=_path(corpus), text_field=text_field,
                      tokenizer=tokenizer_path, out=_path(out), num_proc=num_proc, force=_flag(force))
    from .artifacts import read_manifest
    from .data.shards import format_shards_summary, prepare_shards

    path = prepare_shards(cfg, log=click.echo)
    click.echo(format_shards_summary(read_manifest(path, expect_stage="data")))
    click.echo(f"shards: {path} (corpus summary: {path / 'corpus_summary.json'})")


@tokenizer.command("train")
@click.option("--corpus", type=click.Path(), default=None, help="Corpus file or folder; default: the bundled sample.")
@click.option("--vocab-size", type=int, default=None, help="Learned vocabulary size (padded with [unusedN] to a multiple of 64).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output tokenizer folder.")
@click.option("--text-field", default=None, help="JSON key / column holding the text (default: text).")
@click.option("--min-frequency", type=int, default=None, help="Minimum count of a learned piece (default: 2).")
@recipe_options
def tokenizer_train_cmd(corpus, vocab_size, out, text_field, min_frequency, recipe, overrides):
    """Train a WordPiece tokenizer (BERT-style, uncased by default) on a corpus; save it as an HF tokenizer."""
    import dataclasses

    from .artifacts import read_manifest
    from .config import TokenizerTrainConfig, load_config
    from .data.corpus import bundled_corpus_path, format_corpus_summary
    from .data.tokenizer import train_tokenizer

    cfg = load_config(TokenizerTrainConfig, recipe, overrides, corpus=_path(corpus), vocab_size=vocab_size,
                      out=_path(out), text_field=text_field, min_frequency=min_frequency)
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("corpus", "vocab_size", "out")}
    path = train_tokenizer(cfg.corpus or bundled_corpus_path(), cfg.vocab_size, cfg.out, **options)
    manifest = read_manifest(path, expect_stage="tokenizer")
    click.echo(format_corpus_summary(manifest["corpus_summary"]))
    o = manifest["outputs"]
    click.echo(f"tokenizer: {path} (vocab {o['vocab_size']:,} = {o['learned_vocab_size']:,} learned + "
               f"{o['unused_tokens_added']} [unusedN] padding; trained in {manifest['timings']['train_s']} s)")


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True, help="Demo run folder.")
def demo_cmd(out):
    """Run the pipeline's stages on the bundled sample corpus (mosaic_embed/demo.py: run_demo)."""
    from .demo import run_demo

    run_demo(out, log=click.echo)


# ---- pretrain: shards -> MLM pretraining (train/pretrain.py) ---------------------------------------------


@main.command("pretrain")
@click.option("--corpus", type=click.Path(), default=None,
              help="Corpus file or folder; default: the bundled sample corpus (and the 'tiny' recipe).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder (runs/NAME).")
@click.option("--init-from", type=click.Path(file_okay=False), default=None,
              help="Continue from this model folder's weights (domain-adaptive pretraining) instead of random ones.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--stop-after-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Save a checkpoint and stop this command after this many minutes of training (exit status 4; "
                   "continue with --resume): for jobs under a time limit.")
@click.option("--stop-after-steps", type=click.IntRange(min=1), default=None,
              help="The same after this many optimizer steps of this command.")
@recipe_options
def pretrain_cmd(corpus, out, init_from, resume, stop_after_minutes, stop_after_steps, recipe, overrides):
    """MLM-pretrain an encoder: corpus -> shards -> training -> OUT/final (save_pretrained + manifest).

    Recipes: mosaic-bert-base (default with --corpus; a GPU recipe), mosaic-bert-large, bert-base (the HF
    BERT baseline), mosaic-bert-small, mosaic-bert-mini, tiny (default without --corpus; CPU-sized),
    continue (domain-adaptive pretraining with --init-from; its tokenizer and architecture are kept).
    Multi-GPU: ``torchrun --nproc_per_node N -m mosaic_embed.cli pretrain ...`` (same global batch).
    Exit status: 0 finished (OUT/final written), 2 bad input, 3 loss became NaN/inf, 4 stopped at
    --stop-after-minutes/--stop-after-steps with a checkpoint (not finished; --resume continues it).
    """
    from .config import PretrainConfig, load_config

    if recipe is None:
        recipe = "mosaic-bert-base" if corpus else "tiny"
    cfg = load_config(PretrainConfig, recipe, overrides, out=_path(out), data={"corpus": _path(corpus)},
                      model={"init_from": _path(init_from)})
    from .runtime import is_main_process
    from .train.callbacks import SegmentLimitCallback, SegmentLimitReached
    from .train.pretrain import NonFiniteLossError, pretrain

    limits = []
    if stop_after_minutes is not None or stop_after_steps is not None:
        limits.append(SegmentLimitCallback(stop_after_minutes, stop_after_steps))

    try:
        run_dir = pretrain(cfg, resume=resume, log=click.echo, callbacks=limits)
    except NonFiniteLossError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(3)
    except SegmentLimitReached as stop:
        if is_main_process():
            click.echo(f"{cfg.out}: {stop}")
        sys.exit(4)
    if is_main_process():
        click.echo(f"pretrained: {run_dir / 'final'}")


# ---- glue: finetune + evaluate, Pareto plots (train/glue.py, plot.py) ------------------------------------


@main.command("glue")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="A model folder (runs/NAME/final, or any BERT checkpoint AutoModelForSequenceClassification loads).")
@click.option("--checkpoints", default=None, metavar="GLOB",
              help="Evaluate every checkpoint matching GLOB (e.g. 'runs/NAME/checkpoints/*'): Pareto points.")
@click.option("--tasks", default=None, help="all | comma-separated GLUE tasks (mnli,qnli,qqp,sst2,cola,rte,mrpc,stsb).")
@click.option("--seeds", default=None, help="Comma-separated seeds for every task (default: each task's recipe seeds).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="GLUE in its original TSV layout (MNLI/, SST-2/, ...); without it: HF nyu-mll/glue (online).")
@click.option("--task-dir", type=click.Path(file_okay=False), default=None,
              help="A custom task folder (train.tsv, dev.tsv; SST-2 or sentence1/sentence2/label layout).")
@click.option("--num-labels", type=int, default=None, help="Classes of --task-dir (1 = regression).")
@click.option("--metric", "metrics", multiple=True, help="Metric(s) of --task-dir: accuracy, f1, matthews, pearson, spearman.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder (results.json, results.md).")
@recipe_options
def glue_cmd(model, checkpoints, tasks, seeds, data_dir, task_dir, num_labels, metrics, out, recipe, overrides):
    """Finetune and evaluate a checkpoint (or every checkpoint of a run) on GLUE and custom tasks."""
    import logging

    from .config import CustomTaskConfig, GlueConfig, load_config

    task_list = None
    if tasks is not None:
        task_list = [t for t in tasks.split(",") if t.strip()]
    elif task_dir is not None:
        task_list = []  # only the custom task unless --tasks asks for GLUE too
    seed_list = None
    if seeds is not None:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter(f"{seeds!r}: expected comma-separated integers", param_hint="--seeds") from None
    custom = None
    if task_dir is not None:
        if num_labels is None:
            raise ConfigError("--task-dir needs --num-labels N (1 = regression)")
        custom = [vars(CustomTaskConfig(path=Path(task_dir), num_labels=num_labels, metrics=list(metrics)))]
    elif num_labels is not None or metrics:
        raise ConfigError("--num-labels/--metric describe a custom task: give --task-dir too")
    cfg = load_config(GlueConfig, recipe, overrides, model=_path(model), checkpoints=checkpoints,
                      data_dir=_path(data_dir), out=_path(out), tasks=task_list, seeds=seed_list,
                      custom_tasks=custom)
    from .train.glue import run_glue

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run_glue(cfg)
    for p in results["points"]:
        g = p.get("glue_average")
        summary = ", ".join(f"{n} {100 * t['summary']['score']['mean']:.2f}" for n, t in p["tasks"].items())
        click.echo(f"{p['model']}: {summary}" + (f"; GLUE average {100 * g['mean']:.2f}" if g else ""))
    click.echo(f"wrote {cfg.out}/results.json and results.md")


@main.group()
def plot() -> None:
    """Plots of run results."""


@plot.command("pareto")
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output path without suffix (writes .png and .svg).")
@click.option("--label", "labels", multiple=True, help="Curve label per GLUE RESULTS file (default: the run name).")
@click.option("--run", "runs", multiple=True, help="A run of a Pareto study file to draw (repeatable; default: all).")
@click.option("--title", default=None)
def plot_pareto_cmd(results, out, labels, runs, title):
    """Score (per task + average) vs pretraining time, error bars over seeds: one curve per GLUE RESULTS file
    (mosaic-embed glue --checkpoints) or per run of a Pareto study file (benchmarks/pareto/run.py)."""
    from .plot import plot_pareto

    for path in plot_pareto(results, out, title=title, labels=labels or None, runs=runs or None):
        click.echo(f"wrote {path}")


# ---- model: checkpoint conversion (model/convert.py) -----------------------------------------------------


@main.command("convert")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Original MosaicBERT weights (mosaicml/examples bert_layers.py names): .pt/.bin/.safetensors, "
                   "or a Composer checkpoint (state dict under ['state']['model'], 'model.' prefix).")
@click.option("--from-hf", "from_hf", type=click.Path(file_okay=False), default=None,
              help="A transformers BERT folder (BertModel, BertForMaskedLM) or a sentence-transformers folder "
                   "around one (e.g. all-MiniLM-L6-v2): converted to MosaicBERT in BERT mode.")
@click.option("--config", "config", default=None,
              help="With --checkpoint: a preset name (mosaic-bert-base|large|small|mini|tiny; default base) or a "
                   "config.json path.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option("--trust-pickle", is_flag=True, help="Unpickle arbitrary objects (Composer checkpoints); trusted files only.")
def convert_cmd(checkpoint, from_hf, config, out, trust_pickle):
    """Convert an original MosaicBERT checkpoint, or a transformers BERT / sentence-transformers folder, into
    a folder AutoModel* (or SentenceTransformer) loads and our packed Encoder runs."""
    if (checkpoint is None) == (from_hf is None):
        raise click.UsageError("give one of --checkpoint FILE (original MosaicBERT) or --from-hf DIR (transformers BERT)")
    if from_hf is not None:
        if config is not None or trust_pickle:
            raise click.UsageError("--config and --trust-pickle go with --checkpoint; --from-hf reads the folder's config")
        from .model.convert import convert_hf

        model = convert_hf(from_hf, out)
        kind = "sentence-transformers folder, " if (Path(from_hf) / "modules.json").is_file() else ""
        click.echo(f"wrote {out} ({kind}{type(model).__name__} in BERT mode, {model.num_parameters():,} parameters)")
        return
    from .model.convert import convert_checkpoint

    model = convert_checkpoint(checkpoint, config or "mosaic-bert-base", out, trust_pickle=trust_pickle)
    click.echo(f"wrote {out} ({type(model).__name__}, {model.num_parameters():,} parameters)")


# ---- encoders: contrastive training, embedding, retrieval evaluation (train/contrastive.py, encode/) -------


def encode_options(func):
    """The :class:`~mosaic_embed.config.EncodeConfig` flags shared by every command that runs an encoder."""
    for decorator in reversed([
        click.option("--max-seq-len", type=int, default=None,
                     help="Truncation length (default: the encoder's; ALiBi encoders may go longer)."),
        click.option("--batch-size", type=int, default=None, help="Texts per batch where sentence-transformers runs the encoder (default: 128)."),
        click.option("--max-tokens", type=int, default=None,
                     help="Real tokens per packed batch (default: 32768 on GPU, 4096 on CPU)."),
        click.option("--device", default=None, help="auto, cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when present)."),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile the MosaicBERT layers (default: off; ~7 % faster on GPU after ~10 s of "
                          "compilation: for millions of texts)."),
        click.option("--truncate-dim", type=int, default=None,
                     help="Keep the first N dimensions (an encoder trained with Matryoshka dimensions)."),
    ]):
        func = decorator(func)
    return func


def _encode_flags(max_seq_len, batch_size, max_tokens, device, compile_, truncate_dim) -> dict:
    return {"max_seq_len": max_seq_len, "batch_size": batch_size, "max_tokens": max_tokens, "device": device,
            "compile": compile_, "truncate_dim": truncate_dim}


def _int_list(value: str | None, flag: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers", param_hint=flag) from None


@main.command("train-encoder")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="Backbone folder (runs/NAME/final, a converted BERT) or a sentence-transformers folder.")
@click.option("--pairs", default=None, help="Pairs .jsonl[.gz] / .tsv, a BEIR folder, or 'auto' (mine from --corpus).")
@click.option("--corpus", type=click.Path(), default=None, help="Corpus file/folder for --pairs auto.")
@click.option("--mining", type=click.Choice(["mixed", "first-sentence", "spans", "simcse"]), default=None,
              help="How --pairs auto mines pairs (default: mixed cropping; simcse = dropout views).")
@click.option("--teacher", type=click.Path(file_okay=False), default=None,
              help="A sentence-transformers folder that filters mined pairs and mines hard negatives.")
@click.option("--teacher-filter", type=int, default=None,
              help="Keep a pair only if the teacher ranks its positive within this top-k (0 = off).")
@click.option("--hard-negatives", type=int, default=None, help="Hard negatives per pair mined by --teacher (0 = off).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder (a sentence-transformers model).")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default=None, help="Pooling (default: mean).")
@click.option("--loss", type=click.Choice(["mnrl", "cached_mnrl"]), default=None, help="Ranking loss (default: mnrl).")
@click.option("--matryoshka-dims", default=None, help="Comma-separated leading dimensions to train too, e.g. 256,128,64.")
@click.option("--query-prompt", default=None, help="Text prepended to queries (stored in the encoder folder).")
@click.option("--document-prompt", default=None, help="Text prepended to documents (stored in the encoder folder).")
@click.option("--batch-size", type=int, default=None, help="Pairs per device batch (in-batch negatives).")
@click.option("--max-seq-len", type=int, default=None, help="Training truncation length (default: 128).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps.")
@click.option("--eval-fraction", type=float, default=None, help="Hold out this share of the pairs for an IR evaluation.")
@click.option("--eval-steps", type=int, default=None, help="Evaluate every N steps during training (default: at the end).")
@click.option("--eval-beir", type=click.Path(file_okay=False), default=None, help="BEIR folder to evaluate on.")
@recipe_options
def train_encoder_cmd(model, pairs, corpus, mining, teacher, teacher_filter, hard_negatives, out, pooling, loss,
                      matryoshka_dims, query_prompt, document_prompt, batch_size, max_seq_len, max_steps,
                      eval_fraction, eval_steps, eval_beir, recipe, overrides):
    """Contrastive training (in-batch + hard negatives) of a backbone or an encoder into a sentence encoder.

    Recipes: default (labelled pairs), adapt (label-free: mined pairs filtered by --teacher, with hard
    negatives), tiny (CI).
    """
    from .config import ContrastiveConfig, load_config

    cfg = load_config(ContrastiveConfig, recipe, overrides, model=model, pairs=pairs, corpus=corpus, mining=mining,
                      teacher=teacher, teacher_filter=teacher_filter, hard_negatives=hard_negatives, out=_path(out),
                      pooling=pooling, loss=loss, matryoshka_dims=_int_list(matryoshka_dims, "--matryoshka-dims"),
                      query_prompt=query_prompt, document_prompt=document_prompt, batch_size=batch_size,
                      max_seq_len=max_seq_len, max_steps=max_steps, eval_fraction=eval_fraction,
                      eval_steps=eval_steps, eval_beir=eval_beir)
    from .train.contrastive import NothingLearnedError, train_encoder

    try:
        path = train_encoder(cfg, log=click.echo)
    except NothingLearnedError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(3)
    click.echo(f"wrote {path}")


@main.command("distill")
@click.option("--teacher", type=click.Path(file_okay=False), default=None,
              help="The teacher: a sentence-transformers folder (e.g. all-MiniLM-L6-v2).")
@click.option("--student", default=None,
              help="A MosaicBERT folder (runs/NAME/final, a converted BERT, an encoder) or a preset name "
                   "(mosaic-bert-small, ...: random weights with the teacher's tokenizer).")
@click.option("--corpus", type=click.Path(), default=None, help="Your text: a corpus file or folder.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output encoder folder.")
@click.option("--loss", type=click.Choice(["cosine", "mse"]), default=None, help="Distillation loss (default: cosine).")
@click.option("--max-passages", type=int, default=None, help="Use at most this many passages (a seeded sample).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (default: one epoch).")
@click.option("--batch-size", type=int, default=None, help="Passages per batch (default: 64).")
@click.option("--pairs", default=None,
              help="Then train-encoder on these pairs (a .jsonl/.tsv file or a BEIR folder); OUT.distilled keeps "
                   "the student before it.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where passages and teacher embeddings are kept (default: OUT/../.distill-cache).")
@click.option("--eval-beir", type=click.Path(file_okay=False), default=None, help="Evaluate the result on a BEIR folder.")
@recipe_options
def distill_cmd(teacher, student, corpus, out, loss, max_passages, max_steps, batch_size, pairs, cache_dir, eval_beir,
                recipe, overrides):
    """Distill a teacher encoder into a MosaicBERT student on your own text (teacher embeddings cached on disk)."""
    from .config import DistillConfig, load_config
    from .train.distill import distill

    cfg = load_config(DistillConfig, recipe, overrides, teacher=_path(teacher), student=student,
                      corpus=_path(corpus), out=_path(out), loss=loss, max_passages=max_passages,
                      max_steps=max_steps, batch_size=batch_size, cache_dir=_path(cache_dir),
                      eval_beir=_path(eval_beir), finetune={"pairs": pairs})
    click.echo(f"wrote {distill(cfg)}")


@main.command("embed")
@click.option("--model", type=click.Path(file_okay=False), default=None, help="Encoder folder (train-encoder output).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False), default=None, help="JSON lines (.gz ok).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder (embeddings.npy, ids.jsonl).")
@click.option("--text-field", default=None, help="JSON key of the text (default: text).")
@click.option("--title-field", default=None, help="Prepended to the text when present ('' = none; default: title).")
@click.option("--id-field", default=None, help="Record id field (default: _id, then id, then the row number).")
@click.option("--window", type=int, default=None, help="Texts sorted by length together; the checkpoint unit (default 16384).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None, help="Stored vectors (default: float16).")
@click.option("--prompt-name", default=None,
              help="The encoder's prompt for these texts: document (default) or query, or another name it defines.")
@encode_options
@recipe_options
def embed_cmd(model, input_path, out, text_field, title_field, id_field, window, dtype, prompt_name, max_seq_len,
              batch_size, max_tokens, device, compile_, truncate_dim, recipe, overrides):
    """Embed a JSON-lines file into memory-mapped .npy + ids; resumable; multi-GPU under torchrun."""
    from .config import EmbedConfig, load_config

    cfg = load_config(EmbedConfig, recipe, overrides, model=_path(model), input=_path(input_path), out=_path(out),
                      text_field=text_field, title_field=title_field, id_field=id_field, window=window, dtype=dtype,
                      prompt_name=prompt_name,
                      encode=_encode_flags(max_seq_len, batch_size, max_tokens, device, compile_, truncate_dim))
    from .encode import embed_file

    click.echo(f"wrote {embed_file(cfg)}")


@main.command("eval-retrieval")
@click.option("--model", type=click.Path(file_okay=False), default=None, help="Encoder folder.")
@click.option("--beir", "beir_dir", type=click.Path(file_okay=False), default=None, help="BEIR folder.")
@click.option("--split", default=None, help="qrels split (default: test).")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None, help="Also write the metrics as JSON.")
@encode_options
@recipe_options
def eval_retrieval_cmd(model, beir_dir, split, out_json, max_seq_len, batch_size, max_tokens, device, compile_,
                       truncate_dim, recipe, overrides):
    """nDCG@10, recall@10/100 and MRR@10 of an encoder on a BEIR split (exact search)."""
    from .config import RetrievalEvalConfig, load_config

    cfg = load_config(RetrievalEvalConfig, recipe, overrides, model=_path(model), beir=_path(beir_dir), split=split,
                      out=_path(out_json),
                      encode=_encode_flags(max_seq_len, batch_size, max_tokens, device, compile_, truncate_dim))
    from .artifacts import atomic_write_json
    from .index.evaluate import evaluate_encoder

    result = evaluate_encoder(cfg.model, cfg.beir, split=cfg.split, settings=cfg.encode)
    for key in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
        click.echo(f"{key:>10s}  {result[key]:.4f}")
    click.echo(f"({result['n_queries']} queries, {result['n_docs']} documents, max_seq_len {result['max_seq_len']})")
    if cfg.out:
        atomic_write_json(cfg.out, result)


# ---- index: documents -> vector store (FAISS + SQLite + BM25) -> search, serve (index/) ---------------------


@main.group()
def index() -> None:
    """Build, change, search and serve a vector store (dense, lexical and hybrid search)."""


def _source_options(func):
    """``--input FILE`` (embedded here) or ``--embeddings DIR`` (the output of `embed`)."""
    func = click.option("--embeddings", type=click.Path(file_okay=False), default=None,
                        help="Output folder of `embed` (its input file supplies texts and metadata).")(func)
    return click.option("--input", "input_path", type=click.Path(dir_okay=False), default=None,
                        help="JSON lines: _id/id, text, title, other fields = metadata; embedded and chunked here.")(func)


def _one_source(input_path, embeddings) -> None:
    if (input_path is None) == (embeddings is None):
        raise click.UsageError("give one of --input FILE or --embeddings DIR")


@index.command("build")
@_source_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder (new, or a store to rebuild).")
@click.option("--model", type=click.Path(file_okay=False), default=None, help="Encoder folder (with --input).")
@click.option("--no-texts", is_flag=True, help="With --embeddings: store ids only (no texts, no lexical search).")
@click.option("--like", type=click.Path(file_okay=False), default=None,
              help="With --embeddings: build a shard with this IVF store's trained quantizers and config.")
@click.option("--first-key", type=int, default=None, help="With --like: the shard's first key (disjoint per shard).")
@click.option("--auto", is_flag=True, help="Choose Flat / HNSW / IVF-PQ from the size and --memory, saying why.")
@click.option("--memory", "memory_gb", type=float, default=None, help="GB of memory the index may use (with --auto).")
@encode_options
@recipe_options
def index_build_cmd(input_path, embeddings, out, model, no_texts, like, first_key, auto, memory_gb, max_seq_len,
                    batch_size, max_tokens, device, compile_, truncate_dim, recipe, overrides):
    """Build a store (recipes/index: exact, hnsw, ivfpq, sq8, binary; any FAISS factory via --set factory=...)."""
    from .config import EncodeConfig, IndexConfig, load_config

    _one_source(input_path, embeddings)
    if like is not None:
        from .index.shards import build_shard
        from .index.store import VectorStore

        if embeddings is None or first_key is None or auto or recipe or overrides:
            raise click.UsageError("--like builds a shard from --embeddings with --first-key; its config is the "
                                   "template's (no --recipe, --set or --auto)")
        path = build_shard(embeddings, out, like, first_key, with_texts=not no_texts)
        click.echo(f"{path}: shard of {VectorStore(path).manifest['outputs']['count']} chunks, keys from {first_key}")
        return
    if auto and not memory_gb:
        raise click.UsageError("--auto needs --memory GB")
    cfg = load_config(IndexConfig, recipe, overrides)
    if input_path is not None and model is None:
        raise click.UsageError("--input needs --model (the encoder that embeds the documents and the queries)")
    from .index import ingest
    from .index.store import VectorStore

    encoder = None
    if input_path is not None:
        from .encode import Encoder

        settings = load_config(EncodeConfig, None, (), **_encode_flags(max_seq_len, batch_size, max_tokens, device,
                                                                     compile_, truncate_dim))
        encoder = Encoder.load(model, settings)
    if auto:
        n = ingest.count_source(input_path, embeddings)
        dim = encoder.dim if encoder is not None else ingest.embeddings_dim(embeddings)
        cfg, reason = ingest.auto_config(cfg, n, dim, memory_gb)
        click.echo(f"--auto: {reason}")
    if encoder is not None:
        path = ingest.build_from_input(input_path, out, cfg, encoder, show_progress=True)
    else:
        path = ingest.build_from_embeddings(embeddings, out, cfg, with_texts=not no_texts)
    store = VectorStore(path)
    t = store.manifest["timings"]
    click.echo(f"{path}: {len(store)} chunks of {store.manifest['outputs']['documents']} documents, dim {store.dim}, "
               f"index {cfg.factory} (train {t['train_s']:.1f} s, add {t['add_s']:.1f} s), "
               f"lexical {'on' if store.lexical is not None else 'off'}")


@index.command("merge")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("shards", nargs=-1, required=True, type=click.Path(file_okay=False))
def index_merge_cmd(out, shards):
    """Merge IVF shards built with the same --like template into one store."""
    from .index.shards import merge_stores
    from .index.store import VectorStore

    store = VectorStore(merge_stores(out, shards))
    click.echo(f"{out}: {len(store)} chunks from {len(shards)} shards, index {store.config.factory}")


def _change_options(func):
    for decorator in reversed([
        click.argument("store", type=click.Path(file_okay=False)),
        _source_options,
        click.option("--model", type=click.Path(file_okay=False), default=None,
                     help="A copy of the store's encoder, if it moved (its identity is checked)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda."),
    ]):
        func = decorator(func)
    return func


def _add(store, input_path, embeddings, model, device, upsert: bool) -> None:
    from .index import ingest

    _one_source(input_path, embeddings)
    if input_path is not None:
        result = ingest.add_from_input(store, input_path, upsert, model, device, show_progress=True)
    else:
        result = ingest.add_from_embeddings(store, embeddings, upsert)
    click.echo(f"{store}: {result['chunks_added']} chunks added, {result['chunks_removed']} replaced or removed")


@index.command("add")
@_change_options
def index_add_cmd(store, input_path, embeddings, model, device):
    """Add documents (an id already in the store is an error: use upsert)."""
    _add(store, input_path, embeddings, model, device, upsert=False)


@index.command("upsert")
@_change_options
def index_upsert_cmd(store, input_path, embeddings, model, device):
    """Add documents, replacing every chunk of those already in the store."""
    _add(store, input_path, embeddings, model, device, upsert=True)


@index.command("delete")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--ids", "ids", multiple=True, help="Document ids, comma-separated (repeatable).")
@click.option("--where", default=None, help='Metadata filter, e.g. \'lang = "en" and year >= 2020\'.')
def index_delete_cmd(store, ids, where):
    """Delete documents by id and/or by metadata filter (every chunk of each)."""
    from .index.store import open_writer

    doc_ids = [i for item in ids for i in item.split(",") if i]
    if not doc_ids and where is None:
        raise click.UsageError("give --ids and/or --where")
    with open_writer(store, what="mosaic-embed index delete") as writer:
        n = writer.delete(doc_ids=doc_ids, where=where)
    click.echo(f"{store}: {n} chunks deleted")


@index.command("compact")
@click.argument("store", type=click.Path(file_okay=False))
def index_compact_cmd(store):
    """Rebuild the index without its tombstones (deletions an HNSW index cannot apply)."""
    from .index.store import VectorStore, open_writer

    with open_writer(store, what="mosaic-embed index compact") as writer:
        writer.compact()
    click.echo(f"{store}: compacted; {VectorStore(store).info()['tombstones']} tombstones left")


@index.command("info")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
def index_info_cmd(store, as_json):
    """Counts, tombstones, index type, encoder and fusion settings of a store."""
    import json

    from .index.store import VectorStore

    info = VectorStore(store).info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if value is not None and key not in ("encoder", "fusion"):  # fusion_note says it in words (--json: all)
            click.echo(f"{key:>16s}  {value}")
    enc = info.get("encoder") or {}
    click.echo(f"{'encoder':>16s}  {enc.get('path')} (max_seq_len {enc.get('max_seq_len')}, pooling "
               f"{enc.get('pooling')}, identity {str(enc.get('identity'))[:12]})")


def _read_queries(path: str) -> list[str]:
    """Queries from a file: JSON lines with ``text`` or ``query`` (BEIR queries.jsonl), else one per line."""
    from .data.corpus import iter_jsonl, iter_lines

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"queries file not found: {p}")
    if p.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        out = []
        for lineno, obj in iter_jsonl(p):
            text = obj.get("text", obj.get("query"))
            if not isinstance(text, str):
                raise ValueError(f"{p}:{lineno}: no 'text' or 'query' string")
            out.append(text)
        return out
    return [line.strip() for _, line in iter_lines(p) if line.strip()]


@index.command("search")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None, help="Store folder.")
@click.option("--query", "queries", multiple=True, help="Query text (repeatable).")
@click.option("--queries", "queries_file", type=click.Path(dir_okay=False), default=None,
              help="File of queries: JSON lines with text/query, or one per line.")
@click.option("-k", "--top-k", "k", type=int, default=None, help="Hits per query (default: 5).")
@click.option("--mode", type=click.Choice(["dense", "lexical", "hybrid"]), default=None,
              help="Default: the store's (index info; set by index tune).")
@click.option("--where", default=None, help='Metadata filter, e.g. \'lang = "en" and year >= 2020\'.')
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="A copy of the store's encoder, if it moved (its identity is checked).")
@click.option("--force", is_flag=True, help="Use --model even if it is not the encoder that built the store.")
@click.option("--device", default=None, help="auto, cpu, cuda (default: auto).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per query.")
@recipe_options
def index_search_cmd(store_dir, queries, queries_file, k, mode, where, model, force, device, as_json, recipe,
                     overrides):
    """Search with the store's encoder (the settings it was built with): dense, lexical or hybrid."""
    import json

    from .config import SearchConfig, load_config

    cfg = load_config(SearchConfig, recipe, overrides, store=_path(store_dir), k=k, mode=mode, where=where,
                      model=_path(model), force=_flag(force), device=device)
    texts = list(queries) + (_read_queries(queries_file) if queries_file else [])
    if not texts:
        raise click.UsageError("give --query TEXT (repeatable) or --queries FILE")
    from .index.store import VectorStore

    store = VectorStore(cfg.store)
    store.allowed_keys(cfg.where)  # a bad filter fails before the encoder loads
    mode = cfg.mode or store.fusion.mode
    encoder = store.encoder(cfg.model, force=cfg.force, device=cfg.device) if mode != "lexical" else None
    if cfg.mode is None and not as_json:
        click.echo(f"mode {mode} ({store.fusion.describe()})", err=True)
    results = store.search_texts(texts, k=cfg.k, where=cfg.where, mode=mode, encoder=encoder)
    for query, result in zip(texts, results, strict=True):
        if as_json:
            click.echo(json.dumps({"query": query, **result.to_dict()}, ensure_ascii=False))
            continue
        click.echo(f"query: {query}")
        for rank, h in enumerate(result.hits, 1):
            snippet = (h.text or "").replace("\n", " ")[:100]
            click.echo(f"  {rank}. {h.score:.3f}  {h.id}#{h.chunk}  {snippet}")
        if not result.complete:
            click.echo(f"  ({len(result.hits)} of {min(cfg.k, result.available)} hits: {result.note})")


def _eval_source(beir_dir, split, queries_file, qrels_file):
    from .index.evaluate import load_eval_queries

    if (beir_dir is None) == (queries_file is None):
        raise click.UsageError("give --beir DIR, or --queries FILE with --qrels FILE")
    return load_eval_queries(beir_dir, split, queries_file, qrels_file)


def _eval_options(func):
    for decorator in reversed([
        click.argument("store", type=click.Path(file_okay=False)),
        click.option("--beir", "beir_dir", type=click.Path(file_okay=False), default=None, help="BEIR folder."),
        click.option("--split", default="test", show_default=True, help="qrels split of --beir."),
        click.option("--queries", "queries_file", type=click.Path(dir_okay=False), default=None,
                     help="Queries JSON lines (_id, text), instead of --beir."),
        click.option("--qrels", "qrels_file", type=click.Path(dir_okay=False), default=None,
                     help="qrels TSV (query-id, corpus-id, score), with --queries."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda."),
    ]):
        func = decorator(func)
    return func


@index.command("tune")
@_eval_options
def index_tune_cmd(store, beir_dir, split, queries_file, qrels_file, device):
    """Choose the default mode and the hybrid fusion on validation queries; stored in the manifest."""
    from .index.evaluate import tune_store

    queries, qrels = _eval_source(beir_dir, split, queries_file, qrels_file)
    fusion = tune_store(store, queries, qrels, device=device)
    scores = fusion.tuned["scores"]
    best_hybrid = max((n for n in scores if "@" in n), key=lambda n: scores[n])
    click.echo(f"nDCG@10 on {len(queries)} validation queries: dense {scores['dense']:.4f}, lexical "
               f"{scores['lexical']:.4f}, best hybrid {best_hybrid} {scores[best_hybrid]:.4f}")
    click.echo(f"{store}: {fusion.describe()}")


@index.command("eval")
@_eval_options
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None, help="Also write the metrics as JSON.")
def index_eval_cmd(store, beir_dir, split, queries_file, qrels_file, device, out_json):
    """nDCG@10 and recall@k through the store: dense, lexical and hybrid side by side."""
    from .artifacts import atomic_write_json
    from .index.evaluate import evaluate_store

    queries, qrels = _eval_source(beir_dir, split, queries_file, qrels_file)
    result = evaluate_store(store, queries, qrels, device=device)
    click.echo(f"{'mode':>8s}  {'ndcg@10':>8s}  {'recall@10':>9s}  {'recall@100':>10s}")
    for mode, m in result["modes"].items():
        click.echo(f"{mode:>8s}  {m['ndcg@10']:8.4f}  {m['recall@10']:9.4f}  {m['recall@100']:10.4f}")
    click.echo(f"({result['n_queries']} queries; default mode {result['default_mode']}; {result['fusion_note']})")
    if out_json:
        atomic_write_json(out_json, result)


@index.command("serve")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--writable", is_flag=True, help="Allow POST /documents and DELETE /documents/{id}.")
@click.option("--device", default="auto", show_default=True, help="Where the encoder runs: auto, cpu, cuda.")
@click.option("--search-device", default=None, help="cuda: search an exact (Flat) store on the GPU with torch.")
@click.option("--batch-ms", type=float, default=None, help="How long a query waits for others to share its forward (default 2).")
@click.option("--max-batch", type=int, default=None, help="Most queries embedded in one forward (default 64).")
@click.option("--no-batching", is_flag=True, help="Embed each request on its own (for comparison).")
def index_serve_cmd(store, host, port, writable, device, search_device, batch_ms, max_batch, no_batching):
    """Serve a store over HTTP (FastAPI + uvicorn): /search, /embed, /documents, /health, /info."""
    from .config import ServeConfig
    from .index.serve import run_server

    cfg = ServeConfig(store=Path(store), host=host, port=port, writable=writable, device=device,
                      search_device=search_device, batching=not no_batching, **{k: v for k, v in (("batch_ms", batch_ms), ("max_batch", max_batch))
                                                   if v is not None})
    run_server(cfg)


if __name__ == "__main__":
    main()
