"""Distillation: a teacher encoder's embeddings on the user's own text -> a MosaicBERT student encoder.

``distill(cfg)`` (``mosaic-embed distill``), in three steps:

1. passages: the corpus (any format ``data/corpus.py`` reads) cut into passages of ``passage_words`` words,
   written once as JSON lines under the cache folder;
2. teacher embeddings: ``encode.files.embed_file`` with the teacher on those passages (its "document"
   prompt): computed once, kept on disk, resumable window by window, and refused if the teacher or the
   passages changed (the cache key holds the corpus fingerprint, the teacher's identity and the passage
   settings, so another teacher or corpus gets its own folder);
3. the student (a MosaicBERT: a pretrained run, a converted BERT, or a preset with random weights and the
   teacher's tokenizer) learns those vectors: sentence-transformers' ``EmbedDistillLoss`` (cosine or MSE;
   EmbedDistill, Kim et al. 2023, arXiv 2301.12005; MSE as in Reimers & Gurevych 2020, arXiv 2004.09813)
   on its pooled output, through a trained ``Dense`` projection when its width differs from the teacher's
   dimension. The saved encoder is Transformer -> Pooling [-> Dense] [-> Normalize when the teacher
   normalises]: a plain sentence-transformers folder that :class:`~mosaic_embed.encode.Encoder` runs on
   its packed path (it calls the Dense and Normalize modules itself).

Each model tokenizes with its own tokenizer: a teacher and a student with different vocabularies are fine,
they only share text. With ``finetune.pairs`` the distilled student then goes through ``train-encoder``
(``OUT.distilled`` keeps the student before that step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..artifacts import (
    atomic_directory,
    atomic_write_text,
    folder_fingerprint,
    read_json,
    read_manifest,
    sha256_file,
    sha256_json,
    write_manifest,
    writer_lock,
)
from ..config import DistillConfig, EmbedConfig
from ..encode import build_encoder, encoder_identity, load_sentence_transformer, save_encoder
from ..runtime import dist_state, resolve_device, resolve_precision
from .callbacks import ProgressCallback, card_widget_from_first_rows, one_bar

logger = logging.getLogger(__name__)

PASSAGES = "passages.jsonl"
TEACHER = "teacher"


# ----------------------------------------------------------------------------------------------------------
# the teacher and its embeddings
# ----------------------------------------------------------------------------------------------------------


def load_teacher(path: Path) -> Any:
    """The teacher as a ``SentenceTransformer`` (on the CPU, for its dimension, tokenizer and modules).

    A folder that is not a sentence-transformers model is an error naming it (a bare transformers model
    has no defined sentence embedding to learn)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"teacher {path}: not a folder")
    if not (path / "modules.json").is_file():
        raise ValueError(f"teacher {path}: not a sentence-transformers model (no modules.json); give an encoder "
                         "folder such as all-MiniLM-L6-v2 or a train-encoder output")
    try:
        return load_sentence_transformer(path, "cpu")
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"teacher {path}: cannot be loaded as a sentence-transformers model "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def _dim(model: Any) -> int:
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get_dim())


def cut_passages(text: str, words: int, min_words: int = 8) -> list[str]:
    """Consecutive passages of ``words`` words (the last one kept when it has at least ``min_words``)."""
    tokens = text.split()
    out = [" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
    if out and len(tokens) % words and len(tokens) % words < min_words and len(out) > 1:
        out.pop()
    return [p for p in out if len(p.split()) >= min(min_words, words)]


def _corpus_fingerprint(path: Path) -> str:
    return sha256_file(path) if path.is_file() else folder_fingerprint(path)


def write_passages(cfg: DistillConfig, path: Path) -> int:
    """The corpus cut into passages, as JSON lines ``{"_id", "text"}`` (atomically); returns their count.

    With ``max_passages`` a seeded uniform sample (reservoir sampling, corpus order kept)."""
    import json

    from ..data.corpus import iter_documents

    def passages():
        for text in iter_documents(cfg.corpus, text_field=cfg.text_field):
            yield from cut_passages(text, cfg.passage_words)

    if cfg.max_passages is None:
        chosen = list(passages())
    else:
        rng = random.Random(cfg.seed)
        reservoir: list[tuple[int, str]] = []
        for i, p in enumerate(passages()):
            if len(reservoir) < cfg.max_passages:
                reservoir.append((i, p))
            else:
                j = rng.randint(0, i)
                if j < cfg.max_passages:
                    reservoir[j] = (i, p)
        chosen = [p for _, p in sorted(reservoir)]
    if len(chosen) < 2:
        raise ValueError(f"{cfg.corpus}: {len(chosen)} passage(s) of >= 8 words; distillation needs more text")
    atomic_write_text(path, "".join(json.dumps({"_id": f"p{i}", "text": p}, ensure_ascii=False) + "\n"
                                    for i, p in enumerate(chosen)))
    return len(chosen)


def teacher_embeddings(cfg: DistillConfig) -> dict[str, Any]:
    """Passages and the teacher's vectors for them, from the cache or computed now (resumably).

    Returns {"folder", "passages", "embeddings" (the embed run folder), "seconds" (spent embedding now),
    "cached" (nothing was left to embed), "n"}."""
    from ..encode import embed_file
    from ..encode.files import STATE

    out = Path(cfg.out)
    root = Path(cfg.cache_dir) if cfg.cache_dir is not None else out.parent / ".distill-cache"
    key = sha256_json({
        "corpus": str(Path(cfg.corpus).resolve()), "corpus_fingerprint": _corpus_fingerprint(Path(cfg.corpus)),
        "text_field": cfg.text_field, "passage_words": cfg.passage_words, "max_passages": cfg.max_passages,
        "seed": cfg.seed if cfg.max_passages is not None else None, "teacher": encoder_identity(cfg.teacher),
        "teacher_encode": {"max_seq_len": cfg.encode.max_seq_len, "precision": cfg.encode.precision,
                           "truncate_dim": cfg.encode.truncate_dim},
    })
    folder = root / key[:16]
    folder.mkdir(parents=True, exist_ok=True)
    passages = folder / PASSAGES
    if not passages.is_file():
        write_passages(cfg, passages)
    embeddings = folder / TEACHER
    state = embeddings / STATE
    cached = state.is_file() and bool(read_json(state).get("complete"))
    t0 = time.perf_counter()
    if not cached:
        embed_file(EmbedConfig(model=cfg.teacher, input=passages, out=embeddings, text_field="text",
                               title_field=None, dtype="float32", prompt_name="document", encode=cfg.encode))
    seconds = 0.0 if cached else time.perf_counter() - t0
    n = read_manifest(embeddings, "embed")["outputs"]["shape"][0]
    return {"folder": str(folder), "passages": str(passages), "embeddings": str(embeddings), "seconds": seconds,
            "cached": cached, "n": n}


# ----------------------------------------------------------------------------------------------------------
# the student
# ----------------------------------------------------------------------------------------------------------


def _require_mosaic(model_type: str | None, where: Path) -> None:
    if model_type != "mosaic_bert":
        hint = " (convert it first: mosaic-embed convert --from-hf)" if model_type == "bert" else ""
        raise ValueError(f"student {where}: a {model_type!r} model; distill trains MosaicBERT students{hint}")


def build_student(cfg: DistillConfig, teacher: Any, work: Path) -> tuple[Any, dict[str, Any]]:
    """The student as a ``SentenceTransformer`` [Transformer, Pooling, (Dense to the teacher's dimension)].

    Returns (model, {"kind", "width", "projection"}). A preset starts from random weights (seeded) with the
    teacher's tokenizer, saved under ``work``."""
    from sentence_transformers import SentenceTransformer, models
    from torch import nn

    from ..data.tokenizer import load_tokenizer, padded_vocab_size
    from ..model import PRESETS, MosaicBertConfig, MosaicBertModel, preset_config

    spec = Path(cfg.student)
    if spec.exists() and cfg.student_overrides:
        raise ValueError("student_overrides apply to a preset student; a folder keeps its own config")
    if spec.is_dir() and (spec / "modules.json").is_file():
        st = load_sentence_transformer(spec, "cpu").float()
        backbone = getattr(st[0], "auto_model", None)
        _require_mosaic(getattr(getattr(backbone, "config", None), "model_type", None), spec)
        st[0].max_seq_length = cfg.max_seq_len
        modules = [st[0]]
        if len(st) > 1 and isinstance(st[1], models.Pooling):
            modules.append(st[1])
        kind = "sentence-transformers folder"
    elif spec.is_dir():
        config_path = spec / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"student {spec}: no config.json (expected a model folder such as runs/NAME/final)")
        data = read_json(config_path, "a JSON config file")
        _require_mosaic(data.get("model_type") if isinstance(data, dict) else None, spec)
        try:
            load_tokenizer(spec)
        except ValueError as err:
            raise ValueError(f"student {spec}: no usable tokenizer in the folder ({err})") from None
        modules = [build_encoder(spec, cfg.pooling, normalize=False, max_seq_len=cfg.max_seq_len)[0]]
        kind = "model folder"
    elif cfg.student in PRESETS:
        tokenizer = teacher[0].tokenizer
        known = set(MosaicBertConfig().to_dict())
        unknown = sorted(set(cfg.student_overrides) - known)
        if unknown:
            raise ValueError(f"student_overrides.{unknown[0]}: not a field of MosaicBertConfig")
        config = preset_config(cfg.student, vocab_size=padded_vocab_size(len(tokenizer)),
                               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                               **cfg.student_overrides)
        torch.manual_seed(cfg.seed)
        init = work / "student-init"
        MosaicBertModel(config).save_pretrained(init)
        tokenizer.save_pretrained(init)
        modules = [build_encoder(init, cfg.pooling, normalize=False, max_seq_len=cfg.max_seq_len)[0]]
        kind = f"preset {cfg.student} (random weights, the teacher's tokenizer)"
    else:
        raise ValueError(f"student {cfg.student!r}: not a folder and not a preset ({', '.join(sorted(PRESETS))})")
    backbone_cfg = modules[0].auto_model.config
    if backbone_cfg.position == "learned" and cfg.max_seq_len > backbone_cfg.max_position_embeddings:
        raise ValueError(f"max_seq_len {cfg.max_seq_len}: the student has learned positions for "
                         f"{backbone_cfg.max_position_embeddings} tokens")
    width = backbone_cfg.hidden_size
    if len(modules) == 1:
        modules.append(models.Pooling(width, pooling_mode=cfg.pooling))
    target = _dim(teacher)
    projection = width != target
    if projection:  # learned with the student; saved as a plain ST Dense module (identity activation)
        torch.manual_seed(cfg.seed)
        modules.append(models.Dense(width, target, bias=True, activation_function=nn.Identity()))
    model = SentenceTransformer(modules=modules, device="cpu")
    return model, {"kind": kind, "width": width, "projection": [width, target] if projection else None}


def _training_set(info: dict[str, Any]):
    """(text, label) rows: each passage and its teacher vector (an Arrow fixed-size list, no Python floats)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    from ..encode import iter_texts, load_embeddings

    vectors, _ = load_embeddings(info["embeddings"])
    texts = list(iter_texts(info["passages"], "text", None))
    if len(texts) != vectors.shape[0]:
        raise ValueError(f"{info['folder']}: {len(texts)} passages but {vectors.shape[0]} teacher vectors")
    flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
    labels = pa.FixedSizeListArray.from_arrays(pa.array(flat), vectors.shape[1])
    return datasets.Dataset(pa.table({"text": texts, "label": labels}))


# ----------------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------------


def distill(cfg: DistillConfig) -> Path:
    """Teacher embeddings (cached) -> student training -> ``cfg.out`` (a sentence-transformers folder), then
    ``train-encoder`` on ``cfg.finetune.pairs`` when given. Returns ``cfg.out``."""
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, models
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.losses import EmbedDistillLoss

    t_start = time.perf_counter()
    out = Path(cfg.out)
    if not Path(cfg.corpus).exists():
        raise FileNotFoundError(f"corpus not found: {cfg.corpus}")
    device = resolve_device("auto")
    bf16 = resolve_precision(cfg.precision, device) == torch.bfloat16  # before any work: bf16 on a CPU fails
    teacher = load_teacher(cfg.teacher)
    teacher_normalizes = isinstance(list(teacher)[-1], models.Normalize)
    finetune = bool(cfg.finetune.pairs)
    student_dir = out.with_name(out.name + ".distilled") if finetune else out
    work = out.parent / f".{out.name}.distill"
    if dist_state().num_processes > 1:
        raise ValueError("distill runs in one process on one GPU (its teacher embeddings may be made under "
                         "torchrun with `mosaic-embed embed`); start it without torchrun")
    with writer_lock(work, "mosaic-embed distill"):
        student, student_info = build_student(cfg, teacher, work)  # fails before the teacher's GPU time
        info = teacher_embeddings(cfg)
        dataset = _training_set(info)
        del teacher
        args = Args(
            output_dir=str(work / "trainer"), per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps, learning_rate=cfg.lr, warmup_steps=cfg.warmup_fraction,
            weight_decay=cfg.weight_decay, bf16=bf16, seed=cfg.seed, use_cpu=device.type != "cuda",
            logging_steps=cfg.logging_steps, save_strategy="no", eval_strategy="no", report_to="none",
            disable_tqdm=True,
        )
        card_widget_from_first_rows(student, dataset)
        trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=dataset,
                                             loss=EmbedDistillLoss(student, distance_metric=cfg.loss),
                                             callbacks=[ProgressCallback("distill")])
        one_bar(trainer)
        t1 = time.perf_counter()
        result = trainer.train()
        t_train = time.perf_counter() - t1
        modules = list(student) + ([models.Normalize()] if teacher_normalizes else [])
        final = SentenceTransformer(modules=modules, device="cpu")
        gpu_minutes = (info["seconds"] + t_train) / 60 if device.type == "cuda" else 0.0
        record = dict(
            inputs={"teacher": str(Path(cfg.teacher).resolve()), "teacher_identity": encoder_identity(cfg.teacher),
                    "student": cfg.student, "corpus": str(Path(cfg.corpus).resolve()), "cache": info["folder"]},
            outputs={"passages": info["n"], "student": student_info, "teacher_dim": _dim(final),
                     "normalize": teacher_normalizes, "train_loss": float(result.training_loss),
                     "steps": int(result.global_step)},
            timings={"teacher_s": info["seconds"], "teacher_cached": info["cached"], "train_s": t_train,
                     "total_s": time.perf_counter() - t_start},
        )
        with atomic_directory(student_dir) as tmp:
            save_encoder(final, tmp)
            write_manifest(tmp, "distill", cfg, **record, gpu_minutes=gpu_minutes)
        if cfg.eval_beir is not None:
            write_manifest(student_dir, "distill", cfg, **record, gpu_minutes=gpu_minutes,
                           metrics=_evaluate(cfg, student_dir))
        if finetune:
            from .contrastive import train_encoder

            ft_cfg = dataclasses.replace(cfg.finetune, model=str(student_dir), out=out)
            train_encoder(ft_cfg)
            ft = read_manifest(out, "train-encoder")
            record["timings"]["finetune_s"] = ft["timings"]["total_s"]
            record["timings"]["total_s"] = time.perf_counter() - t_start
            gpu_minutes += float(ft.get("gpu_minutes", 0.0))
            # the final folder's manifest says how all of it was made
            write_manifest(out, "distill", cfg, **record, gpu_minutes=gpu_minutes, distilled=str(student_dir),
                           finetune={k: ft.get(k) for k in ("config", "outputs", "metrics", "gpu_minutes")},
                           metrics=_evaluate(cfg, out))
        shutil.rmtree(work / "trainer", ignore_errors=True)
        shutil.rmtree(work / "student-init", ignore_errors=True)
    with contextlib.suppress(OSError):
        work.rmdir()
    return out


def _evaluate(cfg: DistillConfig, folder: Path) -> dict[str, Any]:
    """nDCG@10 and friends of the encoder in ``folder`` on ``cfg.eval_beir`` (empty without it)."""
    if cfg.eval_beir is None:
        return {}
    from ..index.evaluate import evaluate_encoder

    result = evaluate_encoder(folder, cfg.eval_beir, split=cfg.eval_split,
                              settings=dataclasses.replace(cfg.encode, truncate_dim=None))
    logger.warning("distill: %s on %s: nDCG@10 %.4f", folder, cfg.eval_beir, result["ndcg@10"])
    return {k: result[k] for k in ("ndcg@10", "recall@10", "recall@100", "mrr@10")}


__all__ = ["build_student", "cut_passages", "distill", "load_teacher", "teacher_embeddings", "write_passages"]
