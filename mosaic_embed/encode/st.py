"""Sentence-transformers encoder folders: build, save (with remote code), load, identify.

An encoder is a plain sentence-transformers model: ``Transformer`` (a MosaicBERT or any ``AutoModel``
backbone) -> ``Pooling`` (mean or CLS) [-> ``Normalize``]. :func:`build_encoder` assembles one from a
backbone folder, :func:`save_encoder` writes it (with MosaicBERT's modeling code beside ``config.json``, so
``SentenceTransformer(folder, trust_remote_code=True)`` works where mosaic_embed is not installed),
:func:`load_sentence_transformer` opens a folder with clear errors, and :func:`encoder_identity` names what
is in it (a hash of weights and configuration) so that stores and embedding runs can refuse another model.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import folder_fingerprint, read_json

PACKAGE = "mosaic_embed"


def build_encoder(backbone: str | Path, pooling: str = "mean", normalize: bool = True, max_seq_len: int = 128,
                  device: str | None = None):
    """A ``SentenceTransformer`` = Transformer(backbone) -> Pooling(``pooling``) [-> Normalize].

    A sentence-transformers folder (``modules.json``: an encoder to train further, e.g. a converted
    all-MiniLM-L6-v2 or a distilled student) is opened as it is, with its own pooling, projection,
    normalisation and prompts (``pooling`` and ``normalize`` apply to bare backbones only); ``max_seq_len``
    applies to both. The weights are fp32 (the master copy for training) whatever the folder stores.
    """
    from sentence_transformers import SentenceTransformer, models

    from ..model.loading import switching_heads  # (also registers MosaicBERT with the Auto classes)

    backbone = Path(backbone)
    if (backbone / "modules.json").is_file():
        model = load_sentence_transformer(backbone, device or "cpu")
        model.max_seq_length = max_seq_len
        return model.float()  # fp32 master weights (a folder saved in fp16, e.g. a teacher, loads as fp16)
    if not (backbone / "config.json").is_file():
        raise FileNotFoundError(f"{backbone}: no config.json (expected a saved model folder such as runs/NAME/final)")
    with switching_heads():  # a pretraining run's MLM head (or a classifier's) is left behind: expected
        transformer = models.Transformer(str(backbone), max_seq_length=max_seq_len)
    get_dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    modules = [transformer, models.Pooling(get_dim(), pooling_mode=pooling)]
    if normalize:
        modules.append(models.Normalize())
    return SentenceTransformer(modules=modules, device=device).float()


def load_sentence_transformer(path: str | Path, device: torch.device | str = "cpu"):
    """Open an encoder folder (a sentence-transformers folder, or a bare model folder ST wraps with mean
    pooling). A missing folder, or one that holds no model, is an error naming it."""
    from sentence_transformers import SentenceTransformer

    from ..model.loading import switching_heads  # (also registers MosaicBERT with the Auto classes)

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"encoder folder not found: {path}")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        # else transformers says "Unrecognized model ... should have a `model_type` key", about a missing file
        raise FileNotFoundError(f"{path}: not an encoder folder (no modules.json or config.json); give a "
                                "train-encoder output or a saved model folder")
    with switching_heads():  # a bare pretraining or classifier folder leaves its head behind: expected
        return SentenceTransformer(str(path), device=str(device))


# ----------------------------------------------------------------------------------------------------------
# what the packed path needs from a folder: [Transformer(MosaicBERT), Pooling(mean|cls), Dense/Normalize...]
# ----------------------------------------------------------------------------------------------------------


class L2Normalize(torch.nn.Module):
    """sentence-transformers' ``Normalize`` module, without importing sentence-transformers: L2-normalises
    ``features["sentence_embedding"]``."""

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**features, "sentence_embedding": torch.nn.functional.normalize(features["sentence_embedding"], dim=-1)}


@dataclass
class PackedParts:
    """The pieces of an encoder the packed path runs: backbone (a MosaicBertModel or its inference twin), its
    tokenizer (transformers' wrapper, or None where the folder was read without transformers: the Encoder
    loads it on first use), the tokenizer's Rust ``tokenizers.Tokenizer`` (``backend``, None for a slow
    tokenizer) and truncation side, the pooling ("mean" | "cls"), the modules after pooling (``tail``: Dense /
    Normalize on the pooled vector), whether the output is L2-normalised, the truncation length, the output
    dimension, and the prompts."""

    backbone: Any
    tokenizer: Any
    backend: Any
    truncation_side: str
    pooling: str
    tail: list[Any]
    normalize: bool
    max_seq_len: int
    dim: int
    prompts: dict[str, str]
    default_prompt_name: str | None


def pooling_mode(cfg: dict[str, Any]) -> str | None:
    """The single pooling mode of a ``Pooling`` config ('mean', 'cls', ...) across ST 6.x layouts, or None
    when it combines modes or excludes the prompt (which needs the prompt length: ST handles those)."""
    mode = cfg.get("pooling_mode")
    if isinstance(mode, list | tuple):
        mode = mode[0] if len(mode) == 1 else None
    if mode is None:  # older ST: one boolean key per mode
        active = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
        mode = active[0] if len(active) == 1 else None
        mode = {"cls_token": "cls", "mean_tokens": "mean"}.get(mode, mode)
    if cfg.get("include_prompt", True) is False:
        return None
    return mode


def st_prompts(st_model: Any) -> tuple[dict[str, str], str | None]:
    """A folder's prompts as sentence-transformers keeps them (a name whose prompt is None means no prompt),
    and its default prompt name."""
    prompts = {k: v or "" for k, v in (getattr(st_model, "prompts", None) or {}).items()}
    return prompts, getattr(st_model, "default_prompt_name", None)


def _on_sentence_embedding(module: Any) -> bool:
    """A module after pooling that only maps ``sentence_embedding`` to itself (``Dense``, ``Normalize``)."""
    if type(module).__name__ not in ("Dense", "Normalize"):
        return False
    return all(getattr(module, name, "sentence_embedding") == "sentence_embedding"
               for name in ("module_input_name", "module_output_name"))


def packed_parts(st_model: Any) -> PackedParts | None:
    """The :class:`PackedParts` of a loaded SentenceTransformer, or None when the packed path cannot mirror
    its modules exactly: [Transformer(MosaicBERT), Pooling(mean|cls), then Dense / Normalize modules]."""
    modules = list(st_model)
    names = [type(m).__name__ for m in modules]
    backbone = getattr(modules[0], "auto_model", None) if modules else None
    if (names[:2] != ["Transformer", "Pooling"] or backbone is None
            or getattr(backbone.config, "model_type", None) != "mosaic_bert"
            or not all(_on_sentence_embedding(m) for m in modules[2:])):
        return None
    mode = pooling_mode(modules[1].get_config_dict())
    if mode not in ("mean", "cls"):
        return None
    get_dim = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
    tokenizer = modules[0].tokenizer
    return PackedParts(backbone, tokenizer, getattr(tokenizer, "backend_tokenizer", None),
                       getattr(tokenizer, "truncation_side", "right"), mode, modules[2:], names[-1] == "Normalize",
                       int(st_model.max_seq_length or 512), int(get_dim()), *st_prompts(st_model))


def _json_or_none(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


#: sentence_bert_config.json keys whose values the packed path reproduces; any other key, or another value
#: of these, sends the folder to sentence-transformers.
_PLAIN_TRANSFORMER = {"max_seq_length": None, "do_lower_case": False, "transformer_task": "feature-extraction",
                      "module_output_name": "token_embeddings",
                      "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}}


def read_packed_folder(path: str | Path) -> PackedParts | None:
    """Read an encoder folder for the packed path without sentence-transformers (seconds of imports saved).

    Only a folder that is plainly [Transformer(MosaicBERT) at the root, Pooling(mean|cls), Normalize?] is read
    here (its prompts included); for anything else (a Dense projection, lower-casing, an unfamiliar setting)
    this returns None and the caller opens the folder with sentence-transformers itself. The truncation
    length follows sentence-transformers: ``max_seq_length`` of sentence_bert_config.json when present, else
    the tokenizer's ``model_max_length``. Tests check the result against ``SentenceTransformer`` itself.
    """
    path = Path(path)
    modules = _json_or_none(path / "modules.json")
    config = _json_or_none(path / "config.json")
    if not isinstance(modules, list) or not isinstance(config, dict) or config.get("model_type") != "mosaic_bert":
        return None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in ([], ["Normalize"]) or modules[0].get("path"):
        return None
    sbert = _json_or_none(path / "sentence_bert_config.json") or {}
    if any(k not in _PLAIN_TRANSFORMER or (_PLAIN_TRANSFORMER[k] is not None and v != _PLAIN_TRANSFORMER[k])
           for k, v in sbert.items()):
        return None
    st_config = _json_or_none(path / "config_sentence_transformers.json") or {}
    prompts = {k: v or "" for k, v in (st_config.get("prompts") or {}).items()}
    mode = pooling_mode(_json_or_none(path / modules[1].get("path", "") / "config.json") or {})
    if mode not in ("mean", "cls"):
        return None
    # Neither transformers' tokenizer classes nor MosaicBertModel.from_pretrained: the Rust tokenizer and the
    # inference model load the same files without importing transformers, about a second before the first
    # vector (several on hosts where importing transformers scans every installed distribution).
    from ..model.blocks import load_inference_model

    tokenizer, backend, tok_config = None, None, _json_or_none(path / "tokenizer_config.json") or {}
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust library raises a bare Exception naming no file
            raise ValueError(f"{path / 'tokenizer.json'}: not a readable tokenizers file ({e})") from None
    else:  # a slow (vocab.txt) tokenizer: transformers builds it
        tokenizer = folder_tokenizer(path)
        backend = getattr(tokenizer, "backend_tokenizer", None)
    backbone = load_inference_model(path)
    if backbone is None:  # sharded or .bin weights: transformers' loader
        from ..model import MosaicBertModel

        backbone = MosaicBertModel.from_pretrained(str(path))
    max_len = sbert.get("max_seq_length") or (tok_config.get("model_max_length") if tokenizer is None
                                              else tokenizer.model_max_length)
    if not isinstance(max_len, int) or max_len > 1_000_000:  # absent, or transformers' "no limit" sentinel
        max_len = backbone.config.max_position_embeddings
    normalize = kinds[-1] == "Normalize"
    side = getattr(tokenizer, "truncation_side", None) or tok_config.get("truncation_side") or "right"
    return PackedParts(backbone, tokenizer, backend, side, mode,
                       [L2Normalize()] if normalize else [], normalize, int(max_len),
                       int(backbone.config.hidden_size), prompts, st_config.get("default_prompt_name"))


def folder_tokenizer(path: str | Path) -> Any:
    """transformers' tokenizer of an encoder folder: the fast one from tokenizer.json, else AutoTokenizer's."""
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encoder_identity(path: str | Path) -> str:
    """A hash of what makes an encoder folder compute what it computes: its weights and configuration files
    (``manifest.json`` and READMEs left out). Two folders with the same identity give the same vectors."""
    return folder_fingerprint(path, exclude=("manifest.json", "README.md"))


def transformer_dir(st_dir: Path) -> Path:
    """The sub-folder of a saved SentenceTransformer that holds the Transformer module (often the root)."""
    modules = read_json(st_dir / "modules.json", "a sentence-transformers modules.json")
    if not isinstance(modules, list):
        raise ValueError(f"{st_dir}/modules.json: not a sentence-transformers modules.json (expected a list)")
    for m in modules:
        if isinstance(m, dict) and str(m.get("type", "")).endswith("Transformer"):
            return st_dir / m.get("path", "")
    raise ValueError(f"{st_dir}/modules.json: no Transformer module")


def save_encoder(model: Any, out: Path) -> None:
    """``model.save(out)`` plus, for a mosaic_embed backbone, the modeling code for remote loading."""
    model.save(str(out))
    backbone = model[0].auto_model
    if type(backbone).__module__.split(".")[0] == PACKAGE:
        export_remote_code(transformer_dir(Path(out)), {"AutoConfig": type(backbone.config), "AutoModel": type(backbone)})


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

    Why not transformers' ``register_for_auto_class`` + ``save_pretrained``: its ``custom_object_save`` copies
    the class's own file plus files reached through single-dot ``from .name import`` lines of the *same*
    folder, and names the module by its last component. MosaicBERT's code spans ``model/`` and ``kernels/``
    (``from ..kernels.dispatch import ...``), which that copy cannot follow, so the files are flattened here
    (``model/modeling.py`` -> ``model_modeling.py``, imports rewritten) and checked afterwards with
    transformers' own ``get_relative_import_files``, the function its loader uses.

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
