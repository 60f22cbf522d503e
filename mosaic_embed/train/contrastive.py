"""Contrastive training of a sentence encoder on top of a pretrained backbone, and its export.

``train_encoder(cfg)``: backbone folder (``runs/NAME/final``, or any ``AutoModel`` folder) + pairs ->
a sentence-transformers folder: ``Transformer`` (the backbone) -> ``Pooling`` (mean or CLS) ->
``Normalize``. Training is sentence-transformers' own ``SentenceTransformerTrainer`` with its
``MultipleNegativesRankingLoss`` (InfoNCE with in-batch negatives, hard negatives when the pairs carry
a third column; ``gather_across_devices`` turns the in-batch negatives of every DDP rank into negatives
for all ranks) or ``CachedMultipleNegativesRankingLoss`` (GradCache, Gao et al. 2021, arXiv 2101.06983:
same loss and gradients, activations for only ``mini_batch_size`` texts at a time). We do not write
these again; ``tests/test_contrastive.py`` checks their gradients against a naive loss.

The exported folder also carries MosaicBERT's modeling code (``export_remote_code``), so that
``SentenceTransformer(folder, trust_remote_code=True)`` works where mosaic_embed is not installed.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_directory, write_manifest
from ..config import ContrastiveConfig

logger = logging.getLogger(__name__)

PACKAGE = "mosaic_embed"


# ----------------------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------------------


def build_encoder(backbone: str | Path, pooling: str = "mean", normalize: bool = True, max_seq_len: int = 128,
                  device: str | None = None):
    """A ``SentenceTransformer`` = Transformer(backbone) -> Pooling(``pooling``) [-> Normalize]."""
    from sentence_transformers import SentenceTransformer, models

    backbone = Path(backbone)
    if not (backbone / "config.json").is_file():
        raise FileNotFoundError(f"{backbone}: no config.json (expected a saved model folder such as runs/NAME/final)")
    transformer = models.Transformer(str(backbone), max_seq_length=max_seq_len)
    get_dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    dim = get_dim()
    modules = [transformer, models.Pooling(dim, pooling_mode=pooling)]
    if normalize:
        modules.append(models.Normalize())
    return SentenceTransformer(modules=modules, device=device)


# ----------------------------------------------------------------------------------------------------------
# remote code: make the folder loadable without mosaic_embed installed
# ----------------------------------------------------------------------------------------------------------


class RemoteCodeError(RuntimeError):
    """The modeling code imports something that cannot travel inside a model folder."""


def _flat_name(module: str) -> str:
    """``mosaic_embed.model.modeling`` -> ``model_modeling`` (the copied file's module name)."""
    return "_".join(module.split(".")[1:])


def _module_file(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or spec.submodule_search_locations is not None:
        return None  # not found, or a package (its __init__ re-exports; resolved separately)
    return Path(spec.origin)


def _resolve_from(node: ast.ImportFrom, module: str) -> str:
    """Absolute module named by ``from <level dots><node.module> import ...`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")[:-1]  # the package the module lives in
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _rewrite_module(module: str) -> tuple[str, set[str]]:
    """Source of ``module`` with every import of a mosaic_embed module rewritten to a flat relative import.

    Returns (new source, absolute names of the mosaic_embed modules it needs). transformers' dynamic
    module loader copies only files reached through ``from .name import ...`` lines
    (``dynamic_module_utils.get_relative_imports``), so every package-internal import becomes exactly
    that form: ``from ..kernels.attention import f`` -> ``from .kernels_attention import f``.
    """
    path = _module_file(module)
    if path is None:
        raise RemoteCodeError(f"cannot find the source file of {module}")
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    lines = source.splitlines(keepends=True)
    needs: set[str] = set()
    edits: list[tuple[ast.ImportFrom, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    raise RemoteCodeError(
                        f"{path}:{node.lineno}: 'import {alias.name}' cannot travel with the model; "
                        "use 'from .module import name'"
                    )
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _resolve_from(node, module)
        if target.split(".")[0] != PACKAGE:
            continue
        # Group the imported names by the module file that defines them (a package __init__ may re-export).
        by_module: dict[str, list[str]] = {}
        submodules: list[str] = []  # 'from pkg import submodule' -> 'from . import flat as submodule'
        for alias in node.names:
            name = alias.name
            as_ = f" as {alias.asname}" if alias.asname else ""
            if _module_file(target) is not None:
                src_mod = target
            else:
                if _module_file(f"{target}.{name}") is not None:
                    needs.add(f"{target}.{name}")
                    submodules.append(f"{_flat_name(f'{target}.{name}')} as {alias.asname or name}")
                    continue
                obj = getattr(importlib.import_module(target), name, None)
                src_mod = getattr(obj, "__module__", None)
                if src_mod is None or src_mod.split(".")[0] != PACKAGE or _module_file(src_mod) is None:
                    raise RemoteCodeError(f"{path}:{node.lineno}: cannot tell which file defines {target}.{name}")
            by_module.setdefault(src_mod, []).append(name + as_)
        if any(n.startswith("*") for names in by_module.values() for n in names):
            raise RemoteCodeError(f"{path}:{node.lineno}: star imports cannot be rewritten")
        needs.update(by_module)
        stmts = [f"from .{_flat_name(m)} import {', '.join(names)}" for m, names in by_module.items()]
        stmts += [f"from . import {sub}" for sub in submodules]
        text = "; ".join(stmts)
        edits.append((node, text))
    # Apply edits bottom-up so earlier line numbers stay valid.
    for node, text in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        first, last = node.lineno - 1, node.end_lineno - 1
        head = lines[first][: node.col_offset]
        tail = lines[last][node.end_col_offset:]
        lines[first : last + 1] = [head + text + tail]
    return "".join(lines), needs


def _private_op_namespace(source: str) -> str:
    """Give each copied module its own ``torch.library`` namespace for the custom ops it registers.

    ``torch.library.custom_op("mosaic_embed::name")`` may be registered once per process; two encoder
    folders loaded with remote code (each a separate ``transformers_modules`` package), or one beside an
    installed mosaic_embed, would register it twice and fail. The copy derives its namespace from its
    own ``__name__`` (unique per loaded folder; a folder's module is imported once).
    """
    ns_literal, ns_attr = f'"{PACKAGE}::', f"torch.ops.{PACKAGE}."
    if ns_literal not in source and ns_attr not in source:
        return source
    source = source.replace(ns_literal, 'f"{_REMOTE_OP_NAMESPACE}::').replace(
        ns_attr, "getattr(torch.ops, _REMOTE_OP_NAMESPACE).")
    tree = ast.parse(source)
    after = 0  # insert after 'from __future__' (must stay first) or the module docstring
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            after = node.end_lineno
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and after == 0:
            after = node.end_lineno
        else:
            break
    lines = source.splitlines(keepends=True)
    define = ("import hashlib as _hashlib\n"
              f"_REMOTE_OP_NAMESPACE = \"{PACKAGE}_\" + _hashlib.sha1(__name__.encode()).hexdigest()[:12]\n")
    return "".join(lines[:after] + [define] + lines[after:])


def export_remote_code(model_dir: str | Path, auto_classes: dict[str, type] | None = None) -> dict[str, str]:
    """Copy the modeling code of the model saved in ``model_dir`` next to its config.json and set ``auto_map``.

    ``auto_classes`` defaults to {"AutoConfig": config class, "AutoModel": model class} read from the saved
    config's ``model_type`` as registered by ``import mosaic_embed``. Every mosaic_embed module those classes
    need (transitively) is copied as one flat file, its package-internal imports rewritten to
    ``from .flat_name import ...``. Returns the ``auto_map`` written.
    """
    from transformers import AutoConfig, AutoModel

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if auto_classes is None:
        config = AutoConfig.for_model(cfg["model_type"])
        config_cls = type(config)
        model_cls = AutoModel._model_mapping[config_cls]
        auto_classes = {"AutoConfig": config_cls, "AutoModel": model_cls}
    for auto, cls in auto_classes.items():
        if cls.__module__.split(".")[0] != PACKAGE:
            raise RemoteCodeError(f"{auto} -> {cls.__module__}.{cls.__name__} is not part of {PACKAGE}")

    todo = [cls.__module__ for cls in auto_classes.values()]
    done: dict[str, str] = {}
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done[module], needs = _rewrite_module(module)
        todo.extend(needs - set(done))
    for module, source in done.items():
        source = _private_op_namespace(source)
        header = f"# Copied from {module} ({PACKAGE}) by export_remote_code; package imports made flat.\n"
        (model_dir / f"{_flat_name(module)}.py").write_text(header + source, encoding="utf-8")
    # transformers copies only the files reachable through 'from .name import' lines (a bare
    # 'from . import name' is not followed): every copied file must be reachable that way.
    from transformers.dynamic_module_utils import get_relative_import_files

    reachable = {Path(f).name for cls in auto_classes.values()
                 for f in get_relative_import_files(model_dir / f"{_flat_name(cls.__module__)}.py")}
    reachable |= {f"{_flat_name(cls.__module__)}.py" for cls in auto_classes.values()}
    missing = sorted({f"{_flat_name(m)}.py" for m in done} - reachable)
    if missing:
        raise RemoteCodeError(
            f"{missing} would not be copied by transformers' remote-code loader: import them somewhere as "
            "'from .module import name', not only 'from . import module'"
        )
    auto_map = {auto: f"{_flat_name(cls.__module__)}.{cls.__name__}" for auto, cls in auto_classes.items()}
    cfg["auto_map"] = auto_map
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return auto_map


def _transformer_dir(st_dir: Path) -> Path:
    """The sub-folder of a saved SentenceTransformer that holds the Transformer module (often the root)."""
    modules = json.loads((st_dir / "modules.json").read_text(encoding="utf-8"))
    for m in modules:
        if m.get("type", "").endswith("Transformer"):
            return st_dir / m.get("path", "")
    raise ValueError(f"{st_dir}/modules.json: no Transformer module")


def save_encoder(model: Any, out: Path) -> None:
    """``model.save(out)`` plus, for a mosaic_embed backbone, the modeling code for remote loading."""
    model.save(str(out))
    tdir = _transformer_dir(out)
    backbone = model[0].auto_model
    if type(backbone).__module__.split(".")[0] == PACKAGE:
        export_remote_code(tdir, {"AutoConfig": type(backbone.config), "AutoModel": type(backbone)})


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------


def make_loss(model: Any, cfg: ContrastiveConfig):
    from sentence_transformers import losses

    if cfg.loss == "cached_mnrl":
        return losses.CachedMultipleNegativesRankingLoss(
            model, scale=cfg.scale, mini_batch_size=cfg.mini_batch_size,
            gather_across_devices=cfg.gather_across_devices,
        )
    return losses.MultipleNegativesRankingLoss(model, scale=cfg.scale, gather_across_devices=cfg.gather_across_devices)


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


def train_encoder(cfg: ContrastiveConfig) -> Path:
    """Train and save the encoder; returns ``cfg.out``. Writes ``manifest.json`` with the final metrics."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    try:
        from sentence_transformers.base.sampler import BatchSamplers
    except ImportError:  # older ST layouts
        from sentence_transformers.training_args import BatchSamplers

    from ..data.pairs import load_pairs

    if not cfg.model:
        raise ValueError("train-encoder: no backbone given (--model runs/NAME/final)")
    if not cfg.pairs:
        raise ValueError("train-encoder: no pairs given (--pairs PATH|auto)")
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
    t_data = time.perf_counter() - t0

    model = build_encoder(cfg.model, cfg.pooling, cfg.normalize, cfg.max_seq_len)
    loss = make_loss(model, cfg)
    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    if bf16 and not cuda and cfg.precision == "bf16":
        logger.warning("precision bf16 without CUDA: training in bf16 autocast on CPU")
    out = Path(cfg.out)
    work = out.parent / f".{out.name}.trainer"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work),
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
        disable_tqdm=False,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                         evaluator=evaluator)
    t1 = time.perf_counter()
    train_out = trainer.train()
    t_train = time.perf_counter() - t1
    metrics: dict[str, float] = {}
    main_process = trainer.is_world_process_zero() and int(os.environ.get("RANK", "0")) == 0
    if evaluator is not None and main_process:
        metrics = {k: float(v) for k, v in evaluator(model).items()}
        logger.warning("train-encoder: %s", {k: round(v, 4) for k, v in metrics.items() if "ndcg" in k})
    if main_process:
        with atomic_directory(out) as tmp:
            save_encoder(model, tmp)
            write_manifest(
                tmp, "train-encoder", cfg,
                inputs={"model": str(cfg.model), "pairs": str(cfg.pairs), "corpus": cfg.corpus},
                outputs={"n_pairs": len(dataset), "columns": dataset.column_names,
                         "train_loss": float(train_out.training_loss), "steps": int(train_out.global_step)},
                timings={"data_s": t_data, "train_s": t_train, "total_s": time.perf_counter() - t0},
                metrics=metrics, world_size=trainer.args.world_size,
                gathered_negatives=bool(cfg.gather_across_devices and trainer.args.world_size > 1),
                gpu_minutes=(t_train / 60 * trainer.args.world_size) if cuda else 0.0,
            )
        shutil.rmtree(work, ignore_errors=True)
    return out
