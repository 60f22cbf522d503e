"""The ``mosaic-embed`` command: one thin click command per pipeline stage.

Each command turns its typed options into its stage's config with the one entry point,
``config.load_config(Cls, --recipe, --set overrides, **typed flags)`` (a flag not given is None and
changes nothing; a path stays a path), then calls the stage's plain Python function. No logic lives here.

Start-up is kept cheap: this module and ``mosaic_embed/__init__`` import neither torch nor transformers, so
``--help``, ``--version`` and argument errors answer at once; each command imports what it runs.
"""

from __future__ import annotations

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

        try:
            return super().invoke(ctx)
        except (ConfigError, FileNotFoundError, FileExistsError, ValueError, FolderLockedError) as err:
            if isinstance(err, click.ClickException):
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


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
    from .artifacts import read_manifest
    from .config import DataConfig, load_config
    from .data.shards import format_shards_summary, prepare_shards

    cfg = load_config(DataConfig, recipe, overrides, corpus=_path(corpus), text_field=text_field,
                      tokenizer=tokenizer_path, out=_path(out), num_proc=num_proc, force=_flag(force))
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
    BERT baseline), mosaic-bert-small, mosaic-bert-mini, tiny (default without --corpus; CPU-sized).
    Multi-GPU: ``torchrun --nproc_per_node N -m mosaic_embed.cli pretrain ...`` (same global batch).
    Exit status: 0 finished (OUT/final written), 2 bad input, 3 loss became NaN/inf, 4 stopped at
    --stop-after-minutes/--stop-after-steps with a checkpoint (not finished; --resume continues it).
    """
    from .config import PretrainConfig, load_config
    from .train.callbacks import SegmentLimitCallback, SegmentLimitReached
    from .train.pretrain import NonFiniteLossError, pretrain

    if recipe is None:
        recipe = "mosaic-bert-base" if corpus else "tiny"
    cfg = load_config(PretrainConfig, recipe, overrides, out=_path(out), data={"corpus": _path(corpus)},
                      model={"init_from": _path(init_from)})
    limits = []
    if stop_after_minutes is not None or stop_after_steps is not None:
        limits.append(SegmentLimitCallback(stop_after_minutes, stop_after_steps))
    from .runtime import is_main_process

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

    from .config import GlueConfig, load_config
    from .train.glue import custom_task_from_cli, run_glue

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
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
        custom = [vars(custom_task_from_cli(task_dir, num_labels, metrics))]
    elif num_labels is not None or metrics:
        raise ConfigError("--num-labels/--metric describe a custom task: give --task-dir too")
    cfg = load_config(GlueConfig, recipe, overrides, model=_path(model), checkpoints=checkpoints,
                      data_dir=_path(data_dir), out=_path(out), tasks=task_list, seeds=seed_list,
                      custom_tasks=custom)
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


# ---- model: original MosaicBERT checkpoint conversion (model/convert.py) ---------------------------------


@main.command("convert")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="Original MosaicBERT weights (mosaicml/examples bert_layers.py names): .pt/.bin/.safetensors, "
                   "or a Composer checkpoint (state dict under ['state']['model'], 'model.' prefix).")
@click.option("--config", "config", default="mosaic-bert-base", show_default=True,
              help="A preset name (mosaic-bert-base|large|small|mini|tiny) or a config.json path.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model folder (save_pretrained).")
@click.option("--trust-pickle", is_flag=True, help="Unpickle arbitrary objects (Composer checkpoints); trusted files only.")
def convert_cmd(checkpoint, config, out, trust_pickle):
    """Convert an original MosaicBERT checkpoint into a folder AutoModel* loads."""
    from .model.convert import convert_checkpoint

    model = convert_checkpoint(checkpoint, config, out, trust_pickle=trust_pickle)
    click.echo(f"wrote {out} ({type(model).__name__}, {model.num_parameters():,} parameters)")


# ---- encoders: contrastive training, embedding, retrieval evaluation (train/contrastive.py, encode/) -------


def encode_options(func):
    """The :class:`~mosaic_embed.config.EncodeConfig` flags shared by every command that runs an encoder."""
    for decorator in reversed([
        click.option("--max-seq-len", type=int, default=None,
                     help="Truncation length (default: the encoder's; ALiBi encoders may go longer)."),
        click.option("--batch-size", type=int, default=None, help="Texts per batch on CPU (default: 128)."),
        click.option("--max-tokens", type=int, default=None,
                     help="Real tokens per packed batch (default: 32768 on GPU; --batch-size texts on CPU)."),
        click.option("--device", default=None, help="auto, cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when present)."),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile the MosaicBERT layers (default: off; ~7 %% faster on GPU after ~10 s of "
                          "compilation: for millions of texts)."),
    ]):
        func = decorator(func)
    return func


def _encode_flags(max_seq_len, batch_size, max_tokens, device, compile_) -> dict:
    return {"max_seq_len": max_seq_len, "batch_size": batch_size, "max_tokens": max_tokens, "device": device,
            "compile": compile_}


@main.command("train-encoder")
@click.option("--model", type=click.Path(file_okay=False), default=None, help="Backbone folder, e.g. runs/NAME/final.")
@click.option("--pairs", default=None, help="Pairs .jsonl[.gz] / .tsv, a BEIR folder, or 'auto' (mine from --corpus).")
@click.option("--corpus", type=click.Path(), default=None, help="Corpus file/folder for --pairs auto.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder (a sentence-transformers model).")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default=None, help="Pooling (default: mean).")
@click.option("--loss", type=click.Choice(["mnrl", "cached_mnrl"]), default=None, help="Ranking loss (default: mnrl).")
@click.option("--batch-size", type=int, default=None, help="Pairs per device batch (in-batch negatives).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps.")
@click.option("--eval-beir", type=click.Path(file_okay=False), default=None, help="BEIR folder to evaluate on.")
@recipe_options
def train_encoder_cmd(model, pairs, corpus, out, pooling, loss, batch_size, max_steps, eval_beir, recipe, overrides):
    """Contrastive training (in-batch + hard negatives) of a backbone into a sentence encoder."""
    from .config import ContrastiveConfig, load_config
    from .train.contrastive import train_encoder

    cfg = load_config(ContrastiveConfig, recipe, overrides, model=model, pairs=pairs, corpus=corpus, out=_path(out),
                      pooling=pooling, loss=loss, batch_size=batch_size, max_steps=max_steps, eval_beir=eval_beir)
    click.echo(f"wrote {train_encoder(cfg)}")


@main.command("embed")
@click.option("--model", type=click.Path(file_okay=False), default=None, help="Encoder folder (train-encoder output).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False), default=None, help="JSON lines (.gz ok).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder (embeddings.npy, ids.jsonl).")
@click.option("--text-field", default=None, help="JSON key of the text (default: text).")
@click.option("--title-field", default=None, help="Prepended to the text when present ('' = none; default: title).")
@click.option("--id-field", default=None, help="Record id field (default: _id, then id, then the row number).")
@click.option("--window", type=int, default=None, help="Texts sorted by length together; the checkpoint unit (default 16384).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None, help="Stored vectors (default: float16).")
@encode_options
@recipe_options
def embed_cmd(model, input_path, out, text_field, title_field, id_field, window, dtype, max_seq_len, batch_size,
              max_tokens, device, compile_, recipe, overrides):
    """Embed a JSON-lines file into memory-mapped .npy + ids; resumable; multi-GPU under torchrun."""
    from .config import EmbedConfig, load_config
    from .encode import embed_file

    cfg = load_config(EmbedConfig, recipe, overrides, model=_path(model), input=_path(input_path), out=_path(out),
                      text_field=text_field, title_field=title_field, id_field=id_field, window=window, dtype=dtype,
                      encode=_encode_flags(max_seq_len, batch_size, max_tokens, device, compile_))
    click.echo(f"wrote {embed_file(cfg)}")


@main.command("eval-retrieval")
@click.option("--model", type=click.Path(file_okay=False), default=None, help="Encoder folder.")
@click.option("--beir", "beir_dir", type=click.Path(file_okay=False), default=None, help="BEIR folder.")
@click.option("--split", default=None, help="qrels split (default: test).")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None, help="Also write the metrics as JSON.")
@encode_options
@recipe_options
def eval_retrieval_cmd(model, beir_dir, split, out_json, max_seq_len, batch_size, max_tokens, device, compile_,
                       recipe, overrides):
    """nDCG@10, recall@10/100 and MRR@10 of an encoder on a BEIR split (exact search)."""
    from .artifacts import atomic_write_json
    from .config import RetrievalEvalConfig, load_config
    from .index.evaluate import evaluate_encoder

    cfg = load_config(RetrievalEvalConfig, recipe, overrides, model=_path(model), beir=_path(beir_dir), split=split,
                      out=_path(out_json), encode=_encode_flags(max_seq_len, batch_size, max_tokens, device, compile_))
    result = evaluate_encoder(cfg.model, cfg.beir, split=cfg.split, settings=cfg.encode)
    for key in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
        click.echo(f"{key:>10s}  {result[key]:.4f}")
    click.echo(f"({result['n_queries']} queries, {result['n_docs']} documents, max_seq_len {result['max_seq_len']})")
    if cfg.out:
        atomic_write_json(cfg.out, result)


# ---- index: embeddings -> FAISS vector store -> search (index/store.py) -----------------------------------


@main.group()
def index() -> None:
    """Build and query a FAISS vector store over embedded documents."""


@index.command("build")
@click.option("--embeddings", required=True, type=click.Path(file_okay=False), help="Output folder of `embed`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder to write.")
@click.option("--no-texts", is_flag=True, help="Store ids only, not the documents' texts.")
@recipe_options
def index_build_cmd(embeddings, out, no_texts, recipe, overrides):
    """Index embeddings (recipes/index: exact, hnsw, ivfpq; any FAISS factory via --set factory=...)."""
    from .config import IndexConfig, load_config
    from .index.store import VectorStore, build_store_from_embeddings

    cfg = load_config(IndexConfig, recipe, overrides)
    path = build_store_from_embeddings(embeddings, out, cfg, with_texts=not no_texts)
    store = VectorStore(path)
    t = store.manifest["timings"]
    click.echo(f"{path}: {len(store)} vectors of dim {store.dim}, index {cfg.factory} "
               f"(train {t['train_s']:.1f} s, add {t['add_s']:.1f} s)")


@index.command("search")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None, help="Store folder.")
@click.option("--query", "queries", required=True, multiple=True, help="Query text (repeatable).")
@click.option("-k", "--top-k", "k", type=int, default=None, help="Hits per query (default: 5).")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="A copy of the store's encoder, if it moved (its identity is checked).")
@click.option("--force", is_flag=True, help="Use --model even if it is not the encoder that built the store.")
@click.option("--device", default=None, help="auto, cpu, cuda (default: auto).")
@click.option("--json", "as_json", is_flag=True, help="Print hits as JSON lines.")
@recipe_options
def index_search_cmd(store_dir, queries, k, model, force, device, as_json, recipe, overrides):
    """Embed queries with the store's encoder (the settings it was built with) and print the top-k documents."""
    import json

    from .config import SearchConfig, load_config
    from .index.store import VectorStore

    cfg = load_config(SearchConfig, recipe, overrides, store=_path(store_dir), k=k, model=_path(model),
                      force=_flag(force), device=device)
    store = VectorStore(cfg.store)
    encoder = store.encoder(cfg.model, force=cfg.force, device=cfg.device)
    for query, hits in zip(queries, store.search_texts(list(queries), k=cfg.k, encoder=encoder), strict=True):
        if as_json:
            click.echo(json.dumps({"query": query, "hits": [h.__dict__ for h in hits]}, ensure_ascii=False))
            continue
        click.echo(f"query: {query}")
        for rank, h in enumerate(hits, 1):
            snippet = (h.text or "").replace("\n", " ")[:100]
            click.echo(f"  {rank}. {h.score:.3f}  {h.id}  {snippet}")


if __name__ == "__main__":
    main()
