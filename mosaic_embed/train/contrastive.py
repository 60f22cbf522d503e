"""Contrastive training of a sentence encoder on top of a pretrained backbone, and its export.

``train_encoder(cfg)``: backbone folder (``runs/NAME/final``, or any ``AutoModel`` folder) + pairs ->
a sentence-transformers folder: ``Transformer`` (the backbone) -> ``Pooling`` (mean or CLS) ->
``Normalize``. Training is sentence-transformers' own ``SentenceTransformerTrainer`` with its
``MultipleNegativesRankingLoss`` (InfoNCE with in-batch negatives, hard negatives when the pairs carry
a third column; ``gather_across_devices`` turns the in-batch negatives of every DDP rank into negatives
for all ranks) or ``CachedMultipleNegativesRankingLoss`` (GradCache, Gao et al. 2021, arXiv 2101.06983:
same loss and gradients, activations for only ``mini_batch_size`` texts at a time). We do not write
these again; ``tests/test_contrastive.py`` checks their gradients against a naive loss.

The encoder is built and saved by ``mosaic_embed.encode`` (``build_encoder``, ``save_encoder``: the folder
also carries MosaicBERT's modeling code, so that ``SentenceTransformer(folder, trust_remote_code=True)``
works where mosaic_embed is not installed).
"""

from __future__ import annotations

import contextlib
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
from .callbacks import ProgressCallback

# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------


class NothingLearnedError(RuntimeError):
    """Training ran but could not learn (loss exactly 0 at every step): no encoder is written."""


def make_loss(model: Any, cfg: ContrastiveConfig, world: int = 1):
    """The ranking loss of ``cfg``; in-batch negatives are gathered across ranks only when there are several
    (``world`` from ``runtime.dist_state``), so a single process neither gathers nor warns that it cannot."""
    from sentence_transformers import losses

    gather = cfg.gather_across_devices and world > 1
    if cfg.loss == "cached_mnrl":
        return losses.CachedMultipleNegativesRankingLoss(
            model, scale=cfg.scale, mini_batch_size=cfg.mini_batch_size, gather_across_devices=gather,
        )
    return losses.MultipleNegativesRankingLoss(model, scale=cfg.scale, gather_across_devices=gather)


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


def _ir_evaluator_from_pairs(dataset, name: str):
    """An InformationRetrievalEvaluator over held-out pairs: each anchor must find its own positive."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    queries, corpus, relevant = {}, {}, {}
    doc_ids: dict[str, str] = {}
    for i, (anchor, positive) in enumerate(zip(dataset["anchor"], dataset["positive"], strict=True)):
        did = doc_ids.setdefault(positive, f"d{len(doc_ids)}")
        corpus[did] = positive
        queries[f"q{i}"] = anchor
        relevant[f"q{i}"] = {did}
    return InformationRetrievalEvaluator(queries, corpus, relevant, name=name, ndcg_at_k=[10],
                                         mrr_at_k=[10], precision_recall_at_k=[10, 100], map_at_k=[100],
                                         accuracy_at_k=[1, 10], write_csv=False)


def _ir_evaluator_from_beir(folder: str, split: str):
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from ..data.beir import doc_text, load_beir

    data = load_beir(folder, split)
    relevant = {q: {d for d, s in docs.items() if s > 0} for q, docs in data.qrels.items()}
    corpus = {d: doc_text(doc) for d, doc in data.corpus.items()}
    return InformationRetrievalEvaluator(data.queries, corpus, relevant, name=f"beir-{split}", ndcg_at_k=[10],
                                         mrr_at_k=[10], precision_recall_at_k=[10, 100], map_at_k=[100],
                                         accuracy_at_k=[1, 10], write_csv=False)


def train_encoder(cfg: ContrastiveConfig, log: Callable[[str], None] | None = None) -> Path:
    """Train and save the encoder; returns ``cfg.out``. Writes ``manifest.json`` with the final metrics.

    Pairs that cannot teach are refused before training (``data.pairs.check_teachable``), a run whose loss
    stayed exactly 0 is refused before saving (:class:`NothingLearnedError`). ``log`` (the main process
    only) receives warnings about the pairs and the run's summary; the progress is one bar.
    """
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgressCallback
    try:
        from sentence_transformers.base.sampler import BatchSamplers
    except ImportError:  # older ST layouts
        from sentence_transformers.training_args import BatchSamplers

    from ..data.pairs import check_teachable, load_pairs

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
    dataset = load_pairs(cfg.pairs, corpus=cfg.corpus, strategy=cfg.mining, max_pairs=cfg.max_pairs,
                         seed=cfg.seed, beir_split=cfg.beir_split, text_field=cfg.text_field)
    evaluator = None
    if cfg.eval_fraction > 0:
        split = dataset.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        dataset = split["train"]
        evaluator = _ir_evaluator_from_pairs(split["test"], "held-out")
    elif cfg.eval_beir:
        evaluator = _ir_evaluator_from_beir(cfg.eval_beir, cfg.eval_split)
    source = f"pairs mined from {cfg.corpus}" if str(cfg.pairs) == "auto" else str(cfg.pairs)
    for warning in check_teachable(dataset, source, cfg.batch_size * world):
        say(f"warning: {warning}")
    t_data = time.perf_counter() - t0

    model = build_encoder(cfg.model, cfg.pooling, cfg.normalize, cfg.max_seq_len)
    loss = make_loss(model, cfg, world)
    device = resolve_device("auto")
    cuda = device.type == "cuda"
    bf16 = resolve_precision(cfg.precision, device) == torch.bfloat16
    out = Path(cfg.out)
    work = out.parent / f".{out.name}.trainer"  # the trainer's scratch folder, and the lock of this output
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
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,  # our one bar (ProgressCallback) instead of tqdm plus printed log dicts
        )
        losses = _LossLog()
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                             evaluator=evaluator, callbacks=[ProgressCallback("train-encoder"),
                                                                             losses])
        for cb in (PrinterCallback, HFProgressCallback):
            trainer.remove_callback(cb)
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
                            "eval_beir": str(Path(cfg.eval_beir).resolve()) if cfg.eval_beir else None},
                    outputs={"n_pairs": len(dataset), "columns": dataset.column_names,
                             "train_loss": float(train_out.training_loss), "steps": steps,
                             "logged_losses": losses.losses},
                    timings={"data_s": t_data, "train_s": t_train, "total_s": time.perf_counter() - t0},
                    metrics=metrics, world_size=trainer.args.world_size,
                    gathered_negatives=bool(getattr(loss, "gather_across_devices", False)),
                    gpu_minutes=(t_train / 60 * trainer.args.world_size) if cuda else 0.0,
                )
    return out
