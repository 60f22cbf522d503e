"""Contrastive training of a sentence encoder on top of a pretrained backbone, and its export.

``train_encoder(cfg)``: backbone folder (``runs/NAME/final``, or any ``AutoModel`` folder) or an existing
sentence-transformers folder + pairs -> a sentence-transformers folder: ``Transformer`` (the backbone) ->
``Pooling`` (mean or CLS) -> ``Normalize``. Options (``ContrastiveConfig``): Matryoshka dimensions
(``MatryoshkaLoss``, Kusupati et al. 2022), query/document prompts stored in the folder, an IR evaluation
during training on a held-back slice, hard negatives from the pairs file or mined by a teacher, and a
teacher's consistency filter for pairs mined without labels (``data/pairs.py``). Training is sentence-transformers' own ``SentenceTransformerTrainer`` with its
``MultipleNegativesRankingLoss`` (InfoNCE with in-batch negatives, hard negatives when the pairs carry
a third column; ``gather_across_devices`` turns the in-batch negatives of every DDP rank into negatives
for all ranks) or ``CachedMultipleNegativesRankingLoss`` (GradCache, Gao et al. 2021, arXiv 2101.06983:
same loss and gradients, activations for only ``mini_batch_size`` texts at a time). We do not write
these again; ``tests/train/test_contrastive.py`` checks their gradients against a naive loss.

The encoder is built and saved by ``mosaic_embed.encode`` (``build_encoder``, ``save_encoder``: the folder
also carries MosaicBERT's modeling code, so that ``SentenceTransformer(folder, trust_remote_code=True)``
works where mosaic_embed is not installed).
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..artifacts import atomic_directory, remove_temporaries, write_manifest, writer_lock
from ..config import ContrastiveConfig
from ..encode import build_encoder, save_encoder
from ..runtime import dist_state, resolve_device, resolve_precision
from .callbacks import ProgressCallback, card_widget_from_first_rows, one_bar

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------


class NothingLearnedError(RuntimeError):
    """Training ran but could not learn (loss exactly 0 at every step): no encoder is written."""


def make_loss(model: Any, cfg: ContrastiveConfig, world: int = 1):
    """The ranking loss of ``cfg.loss``, wrapped in MatryoshkaLoss when ``cfg.matryoshka_dims`` is set. In-batch
    negatives are gathered across ranks only when there are several (``world`` from ``runtime.dist_state``),
    so a single process neither gathers nor warns that it cannot."""
    from sentence_transformers import losses

    gather = cfg.gather_across_devices and world > 1
    if cfg.loss == "cached_mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(
            model, scale=cfg.scale, mini_batch_size=cfg.mini_batch_size, gather_across_devices=gather,
        )
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=cfg.scale, gather_across_devices=gather)
    if cfg.matryoshka_dims:
        return losses.MatryoshkaLoss(model, loss, matryoshka_dims=matryoshka_dims(model, cfg.matryoshka_dims))
    return loss


def matryoshka_dims(model: Any, dims: list[int]) -> list[int]:
    """The model's full dimension and ``dims``, largest first; a dimension beyond the model's is an error."""
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    full = int(get_dim())
    too_big = [d for d in dims if d > full]
    if too_big:
        raise ValueError(f"matryoshka_dims {too_big}: the encoder makes {full}-d vectors")
    return sorted({full, *dims}, reverse=True)


def _ir_evaluator(queries: dict, corpus: dict, relevant: dict, name: str, prompts: tuple[str, str]):
    """sentence-transformers' InformationRetrievalEvaluator with the run's (query, document) prompts."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    return InformationRetrievalEvaluator(queries, corpus, relevant, name=name, ndcg_at_k=[10], mrr_at_k=[10],
                                         precision_recall_at_k=[10, 100], map_at_k=[100], accuracy_at_k=[1, 10],
                                         write_csv=False, query_prompt=prompts[0], corpus_prompt=prompts[1])


def _ir_evaluator_from_pairs(dataset, name: str, prompts: tuple[str, str]):
    """An IR evaluation over held-out pairs: each anchor must find its own positive among all of them."""
    queries, corpus, relevant = {}, {}, {}
    doc_ids: dict[str, str] = {}
    for i, (anchor, positive) in enumerate(zip(dataset["anchor"], dataset["positive"], strict=True)):
        did = doc_ids.setdefault(positive, f"d{len(doc_ids)}")
        corpus[did] = positive
        queries[f"q{i}"] = anchor
        relevant[f"q{i}"] = {did}
    return _ir_evaluator(queries, corpus, relevant, name, prompts)


def _ir_evaluator_from_beir(folder: str, split: str, prompts: tuple[str, str]):
    from ..data.beir import doc_text, load_beir

    data = load_beir(folder, split)
    relevant = {q: {d for d, s in docs.items() if s > 0} for q, docs in data.qrels.items()}
    corpus = {d: doc_text(doc) for d, doc in data.corpus.items()}
    return _ir_evaluator(data.queries, corpus, relevant, f"beir-{split}", prompts)


def teacher_folder(cfg: ContrastiveConfig) -> str:
    """``cfg.teacher``, or the encoder training starts from when it is a sentence-transformers folder."""
    if cfg.teacher:
        return cfg.teacher
    if (Path(cfg.model) / "modules.json").is_file():
        return cfg.model
    raise ValueError(f"teacher_filter / hard_negatives need a teacher: {cfg.model} is a bare backbone, not an "
                     "encoder; give --teacher (a sentence-transformers folder)")


def training_prompts(model: Any, cfg: ContrastiveConfig) -> tuple[str, str]:
    """The (query, document) prompts of the run: ``cfg``'s, stored into ``model.prompts``; else those the
    encoder already applies (a folder trained with prompts keeps training and serving alike)."""
    from ..encode.packed import resolve_prompt

    if cfg.query_prompt or cfg.document_prompt:
        model.prompts = {**model.prompts, "query": cfg.query_prompt, "document": cfg.document_prompt}
    default = getattr(model, "default_prompt_name", None)
    return (resolve_prompt(model.prompts, default, "query", str(cfg.model)),
            resolve_prompt(model.prompts, default, "document", str(cfg.model)))


def _prepare_pairs(cfg: ContrastiveConfig, prompts: tuple[str, str], world: int = 1,
                   say: Callable[[str], None] = lambda _msg: None) -> tuple[Any, Any, dict[str, Any]]:
    """(training pairs, evaluator or None, what was done to them) for ``cfg``: read or mine the pairs, hold out
    the evaluation slice, refuse pairs that cannot teach (``data.pairs.check_teachable``; its warnings go to
    ``say``), then apply the teacher (consistency filter, hard negatives)."""
    from ..data.pairs import add_hard_negatives, check_teachable, load_pairs, teacher_filter

    dataset = load_pairs(cfg.pairs, corpus=cfg.corpus, strategy=cfg.mining, max_pairs=cfg.max_pairs,
                         seed=cfg.seed, beir_split=cfg.beir_split, text_field=cfg.text_field)
    info: dict[str, Any] = {"n_pairs_read": len(dataset)}
    evaluator = None
    if cfg.eval_fraction > 0:
        split = dataset.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        dataset = split["train"]
        evaluator = _ir_evaluator_from_pairs(split["test"], "held-out", prompts)
        info["n_pairs_held_out"] = len(split["test"])
    elif cfg.eval_beir:
        evaluator = _ir_evaluator_from_beir(cfg.eval_beir, cfg.eval_split, prompts)
    source = f"pairs mined from {cfg.corpus}" if str(cfg.pairs) == "auto" else str(cfg.pairs)
    simcse = str(cfg.pairs) == "auto" and cfg.mining == "simcse"
    for warning in check_teachable(dataset, source, cfg.batch_size * world, dropout_views=simcse):
        say(f"warning: {warning}")
    if cfg.teacher_filter or cfg.hard_negatives:
        from ..config import EncodeConfig
        from ..encode import Encoder

        teacher = Encoder.load(teacher_folder(cfg), EncodeConfig(max_seq_len=None))
        info["teacher"] = teacher.describe()
        if cfg.teacher_filter:
            dataset, info["teacher_filter"] = teacher_filter(dataset, teacher, cfg.teacher_filter)
            if len(dataset) < 2:
                raise ValueError(f"teacher_filter={cfg.teacher_filter} kept {len(dataset)} of "
                                 f"{info['teacher_filter']['mined']} pairs; raise it or check the teacher")
        if cfg.hard_negatives:
            dataset, info["hard_negatives"] = add_hard_negatives(dataset, teacher, cfg.hard_negatives,
                                                                 cfg.negative_margin)
            if len(dataset) < 2:
                raise ValueError("hard negative mining left fewer than 2 pairs; lower negative_margin or "
                                 "hard_negatives")
        del teacher
    return dataset, evaluator, info


class _LossLog(TrainerCallback):
    """Keeps the logged training losses and gradient norms: the run's summary, and the proof it learned."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            if logs.get("grad_norm") is not None:
                self.grad_norms.append(float(logs["grad_norm"]))


def check_learned(training_loss: float, grad_norms: list[float], steps: int) -> None:
    """A ranking loss is exactly 0 only when no batch held a negative (a batch of one pair): the gradient is
    zero and the weights never moved. Raise :class:`NothingLearnedError` instead of saving that encoder."""
    if steps > 0 and training_loss == 0.0 and all(g == 0.0 for g in grad_norms):
        raise NothingLearnedError(
            f"train-encoder: the loss was exactly 0 at every one of {steps} steps"
            + (" with a zero gradient norm" if grad_norms else "")
            + ": no batch held two pairs that share no text, so there were no negatives to learn from and "
            "the weights did not change. No encoder was written; give pairs with more distinct texts."
        )


def _eval_history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The evaluations run during training (step and the evaluator's nDCG@10 / recall@100 / MRR@10)."""
    rows = []
    for entry in log_history:
        scores = {k.split("_", 1)[1]: float(v) for k, v in entry.items()
                  if k.startswith("eval_") and any(m in k for m in ("ndcg@10", "recall@100", "mrr@10"))}
        if scores:
            rows.append({"step": int(entry.get("step", 0)), **scores})
    return rows


def train_encoder(cfg: ContrastiveConfig, log: Callable[[str], None] | None = None) -> Path:
    """Train and save the encoder; returns ``cfg.out``. Writes ``manifest.json`` with the final metrics.

    Pairs that cannot teach are refused before training (``data.pairs.check_teachable``), a run whose loss
    stayed exactly 0 is refused before saving (:class:`NothingLearnedError`). ``log`` (the main process
    only) receives warnings about the pairs and the run's summary; the progress is one bar.
    """
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    try:
        from sentence_transformers.base.sampler import BatchSamplers
    except ImportError:  # older ST layouts
        from sentence_transformers.training_args import BatchSamplers

    if not cfg.model:
        raise ValueError("train-encoder: no backbone given (--model runs/NAME/final)")
    if not cfg.pairs:
        raise ValueError("train-encoder: no pairs given (--pairs PATH|auto)")
    state = dist_state()
    world = state.num_processes
    say = log if (log is not None and state.is_main_process) else (lambda _msg: None)
    t0 = time.perf_counter()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_encoder(cfg.model, cfg.pooling, cfg.normalize, cfg.max_seq_len)
    query_prompt, document_prompt = training_prompts(model, cfg)
    dataset, evaluator, pair_info = _prepare_pairs(cfg, (query_prompt, document_prompt), world, say)
    t_data = time.perf_counter() - t0
    # column -> prompt for the trainer: the anchor is the query, every other column a document
    prompts = {c: (query_prompt if c == "anchor" else document_prompt) for c in dataset.column_names} \
        if query_prompt or document_prompt else None
    loss = make_loss(model, cfg, world)
    device = resolve_device("auto")
    cuda = device.type == "cuda"
    bf16 = resolve_precision(cfg.precision, device) == torch.bfloat16
    out = Path(cfg.out)
    work = out.parent / f".{out.name}.trainer"  # the trainer's scratch folder, and the lock of this output
    evaluate_during = evaluator is not None and cfg.eval_steps > 0
    with contextlib.ExitStack() as stack:
        if state.is_main_process:  # one writer of this output at a time
            stack.enter_context(writer_lock(work, "mosaic-embed train-encoder", remove_empty=True))
            stack.callback(shutil.rmtree, work / "trainer", ignore_errors=True)  # success or not, before unlocking
            remove_temporaries(out.parent, out.name)  # a killed run's half-written output folder
        args = SentenceTransformerTrainingArguments(
            output_dir=str(work / "trainer"),
            per_device_train_batch_size=cfg.batch_size,
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            learning_rate=cfg.lr,
            warmup_steps=cfg.warmup_fraction,  # a float < 1 is a fraction of the total steps (transformers 5)
            weight_decay=cfg.weight_decay,
            bf16=bf16,
            seed=cfg.seed,
            # duplicates in a batch would be false negatives for the in-batch ranking loss
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            # gathered negatives need equal batch sizes on every rank
            dataloader_drop_last=world > 1,
            dataloader_num_workers=cfg.dataloader_workers,
            use_cpu=not cuda,  # torchrun on CPU then runs a gloo DDP job (tests, smoke checks)
            logging_steps=cfg.logging_steps,
            save_strategy="no",
            eval_strategy="steps" if evaluate_during else "no",
            eval_steps=cfg.eval_steps if evaluate_during else None,
            prompts=prompts,
            report_to="none",
            disable_tqdm=True,  # our one bar (ProgressCallback) instead of tqdm plus printed log dicts
        )
        losses = _LossLog()
        card_widget_from_first_rows(model, dataset)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                             evaluator=evaluator, callbacks=[ProgressCallback("train-encoder"),
                                                                             losses])
        one_bar(trainer)
        t1 = time.perf_counter()
        train_out = trainer.train()
        t_train = time.perf_counter() - t1
        steps = int(train_out.global_step)
        check_learned(float(train_out.training_loss), losses.grad_norms, steps)
        metrics: dict[str, float] = {}
        main_process = trainer.is_world_process_zero()
        if evaluator is not None and main_process:
            metrics = {k: float(v) for k, v in evaluator(model).items()}
        curve = f"loss {losses.losses[0]:.4f} -> {losses.losses[-1]:.4f}" if losses.losses else \
            f"mean loss {train_out.training_loss:.4f}"
        say(f"train-encoder: {steps} steps on {len(dataset):,} pairs in {t_train:.1f} s, {curve}"
            + "".join(f", {k} {v:.4f}" for k, v in metrics.items() if "ndcg@10" in k))
        if main_process:
            with atomic_directory(out) as tmp:
                save_encoder(model, tmp)
                write_manifest(
                    tmp, "train-encoder", cfg,
                    inputs={"model": str(Path(cfg.model).resolve()),
                            "pairs": "auto" if str(cfg.pairs) == "auto" else str(Path(cfg.pairs).resolve()),
                            "corpus": str(Path(cfg.corpus).resolve()) if cfg.corpus else None,
                            "eval_beir": str(Path(cfg.eval_beir).resolve()) if cfg.eval_beir else None,
                            "teacher": pair_info.get("teacher", {}).get("path")},
                    outputs={"n_pairs": len(dataset), "columns": dataset.column_names,
                             "train_loss": float(train_out.training_loss), "steps": steps,
                             "logged_losses": losses.losses, "prompts": dict(model.prompts), "pairs": pair_info,
                             "matryoshka_dims": matryoshka_dims(model, cfg.matryoshka_dims)
                             if cfg.matryoshka_dims else None},
                    timings={"data_s": t_data, "train_s": t_train, "total_s": time.perf_counter() - t0},
                    metrics=metrics, eval_history=_eval_history(trainer.state.log_history),
                    world_size=trainer.args.world_size,
                    gathered_negatives=bool(cfg.gather_across_devices and world > 1),
                    gpu_minutes=((t_train + t_data) / 60 * trainer.args.world_size) if cuda else 0.0,
                )
    return out
