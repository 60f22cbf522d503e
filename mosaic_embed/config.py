"""Typed configs: dataclasses validated on construction, written as YAML recipes, overridden by dotted keys.

Every stage's knobs are a dataclass here (one place to see them all). A recipe is one of these written
out as YAML (package data under ``mosaic_embed/recipes/<stage>/``); ``--set train.lr=3e-4`` overrides a
leaf; typed command-line flags arrive as values. An unknown key or a value of the wrong type is a
``ConfigError`` that names the key and the file it came from: a typo never silently falls back to a
default (torchtitan's job-config rule).

This module imports no torch or transformers: the command line parses and validates configs before any
heavy import.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .artifacts import atomic_write_text
from .data.corpus import MAX_DOCUMENT_CHARS

T = TypeVar("T")


def recipes_root() -> Traversable:
    """The recipes shipped inside the package (``mosaic_embed/recipes/<stage>/<name>.yaml``), read through
    ``importlib.resources`` so an installed wheel finds them from any working directory."""
    return resources.files("mosaic_embed") / "recipes"


class ConfigError(ValueError):
    """A recipe or override that does not fit its dataclass; the message names the key and the source."""


# ----------------------------------------------------------------------------------------------------------
# generic machinery
# ----------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where it is lossless (int -> float, str -> Path)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{source}: '{key}' = {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{source}: '{key}' = {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple, Iterable) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{source}: '{key}' must be a path, got {value!r}")
    raise ConfigError(f"{source}: '{key}' has an unsupported annotation {_type_name(tp)}")


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ``ConfigError``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'" + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; {cls.__name__} takes: {known}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}", source) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # __post_init__ validation, missing required fields
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON-able data (paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads '3e-4' as a string (it wants '3.0e-4'); numbers written the Python way should still be numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], cls: type | None = None) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy). With ``cls``, a key that names no field is an error."""
    out = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node, node_cls, values_cls = out, cls, None
        for i, part in enumerate(path):
            if values_cls is not None:  # a free key of a mapping whose values are dataclasses (GLUE hparams)
                node_cls, values_cls = values_cls, None
            elif node_cls is not None:
                names = {f.name for f in dataclasses.fields(node_cls)}
                if part not in names:
                    raise ConfigError(
                        f"--set {item!r}: unknown key '{'.'.join(path[: i + 1])}'; "
                        f"{node_cls.__name__} takes: {', '.join(sorted(names))}"
                    )
                hint = typing.get_type_hints(node_cls)[part]
                node_cls = _dataclass_in(hint)
                if node_cls is not None and get_origin(hint) in (dict, Mapping):
                    node_cls, values_cls = None, node_cls
            if i == len(path) - 1:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    return out


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def resolve_recipe(recipe: str | Path, stage: str) -> Path | Traversable:
    """A recipe given as a path, or as a name under the package's ``recipes/<stage>/``
    (``tiny`` -> ``mosaic_embed/recipes/pretrain/tiny.yaml``)."""
    path = Path(recipe)
    # A bare name is a recipe name even if a folder of that name happens to sit in the working directory.
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    folder = recipes_root() / stage
    candidate = folder / f"{recipe}.yaml"
    if candidate.is_file():
        return candidate
    available = sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")) \
        if folder.is_dir() else []
    raise ConfigError(f"no recipe '{recipe}' for stage '{stage}' (looked for {candidate}); available: {available}")


def list_recipes(stage: str) -> list[str]:
    """Names of the recipes shipped for ``stage``."""
    folder = recipes_root() / stage
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")) \
        if folder.is_dir() else []


def load_yaml(path: str | Path | Traversable) -> dict[str, Any]:
    """A YAML mapping from a file (or a packaged recipe); errors name the file."""
    if isinstance(path, str):
        path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def defaults_dict(cls: type) -> dict[str, Any]:
    """The defaults of dataclass ``cls`` as plain data, without constructing ``cls`` itself (so a class whose
    ``__post_init__`` demands a field, e.g. ``GlueConfig.model``, still has defaults to merge into)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default_factory())
    return out


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mappings merged key by key (lists and scalars replaced)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _drop_unset(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line flags that were given: None (not given) is dropped, at any depth."""
    out = {}
    for k, v in flags.items():
        if isinstance(v, Mapping):
            v = _drop_unset(v)
            if not v:
                continue
        elif v is None:
            continue
        out[k] = v
    return out


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: Iterable[str] = (), **flags: Any) -> T:
    """The one way from a command line to a config: defaults <- recipe <- ``--set`` overrides <- typed flags.

    ``recipe``: a name under ``recipes/<cls.RECIPE_STAGE>/`` or a YAML path. Every layer is merged key by
    key into the one below, so a recipe that sets only ``hparams.rte.epochs`` keeps RTE's other values.
    ``flags`` are typed values from the command line (a flag not given is None and changes nothing); a
    nested field is given as a mapping (``data={"corpus": Path("2024")}``), never as a ``key=value``
    string, so a path named ``2024`` or ``null`` stays a path. Errors name the key and the source.
    """
    stage = getattr(cls, "RECIPE_STAGE", None)
    data: dict[str, Any] = defaults_dict(cls)
    source = "<defaults>"
    if recipe is not None:
        path = resolve_recipe(recipe, stage) if stage else Path(recipe)
        data = deep_merge(data, load_yaml(path))
        source = str(path)
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides, cls)
        source += " with --set " + " ".join(overrides)
    given = _drop_unset(flags)
    if given:
        _check_keys(cls, given, "command-line flag")
        data = deep_merge(data, given)
        source += " with flags " + ", ".join(sorted(given))
    return from_dict(cls, data, source=source)


def _check_keys(cls: type, data: Mapping[str, Any], what: str, prefix: str = "") -> None:
    """Every key of ``data`` names a field of dataclass ``cls`` (recursing into dataclass-typed fields)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"{what} '{prefix}{k}': {cls.__name__} takes {', '.join(sorted(names))}")
        sub = _dataclass_in(hints[k])
        if sub is not None and isinstance(v, Mapping):
            _check_keys(sub, v, what, f"{prefix}{k}.")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config as a YAML recipe (atomically): re-loading it gives the same dataclass."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# stage configs. Each stage adds its dataclasses in its own section below.
# ----------------------------------------------------------------------------------------------------------

# --- index: embeddings -> FAISS vector store (index/store.py) ---------------------------------------------


@dataclasses.dataclass
class IndexConfig:
    """How a vector store indexes its documents (``mosaic-embed index build``); recorded in its manifest.

    ``rescore`` > 0 keeps the float vectors on disk beside a compressed index (SQ8, binary) and rescores
    ``rescore * k`` candidates of every search with them. ``lexical``: keep a BM25 index for lexical and
    hybrid search. ``chunk_tokens`` (None: the encoder's ``max_seq_len``) and ``chunk_overlap``: how long
    documents are cut, in the encoder's tokens. ``exact_limit``: a filter admitting at most this many
    documents is answered exactly from their vectors. ``compact_fraction``: an index that cannot delete (HNSW)
    is rebuilt without its tombstones once they exceed this share of it. ``text_field``/``title_field``/
    ``id_field``/``metadata_fields`` read ``--input`` records (id: ``_id``, then ``id``, then the row number;
    metadata: every other field when None).
    """

    RECIPE_STAGE: ClassVar[str] = "index"

    factory: str = "Flat"  # FAISS index_factory string: Flat (exact), HNSW32,Flat, IVF1024,PQ32, SQ8, LSH
    metric: Literal["ip", "l2"] = "ip"
    normalize: bool = True  # L2-normalise vectors (and queries): inner product becomes cosine similarity
    train_size: int = 100_000  # vectors sampled (seeded) to train IVF / PQ quantizers
    add_batch_size: int = 65_536  # rows read from the (memory-mapped) embeddings at a time
    search_params: str = ""  # FAISS ParameterSpace string applied at load, e.g. "nprobe=16" or "efSearch=128"
    seed: int = 0
    rescore: int = 0
    lexical: bool = True
    chunk_tokens: int | None = None
    chunk_overlap: int = 32
    max_chunks: int | None = None  # index only a document's first N chunks (1 = truncate, as `embed` does)
    exact_limit: int = 4096
    compact_fraction: float = 0.25
    text_field: str = "text"
    title_field: str | None = "title"
    id_field: str | None = None
    metadata_fields: list[str] | None = None

    def __post_init__(self):
        if not self.factory.strip():
            raise ValueError("factory must be a FAISS index_factory string, e.g. 'Flat' or 'HNSW32,Flat'")
        if self.train_size < 1 or self.add_batch_size < 1:
            raise ValueError("train_size and add_batch_size must be positive")
        if self.rescore < 0 or self.exact_limit < 0:
            raise ValueError("rescore and exact_limit must be >= 0")
        if self.chunk_tokens is not None and self.chunk_tokens < 8:
            raise ValueError(f"chunk_tokens must be >= 8 or null, got {self.chunk_tokens}")
        if self.chunk_overlap < 0 or (self.chunk_tokens is not None and self.chunk_overlap >= self.chunk_tokens // 2):
            raise ValueError(f"chunk_overlap must be >= 0 and under half of chunk_tokens, got {self.chunk_overlap}")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1 or null, got {self.max_chunks}")
        if not 0.0 < self.compact_fraction <= 1.0:
            raise ValueError(f"compact_fraction must be in (0, 1], got {self.compact_fraction}")
        if not self.text_field:
            raise ValueError("text_field must name a JSON key")
        self.title_field = self.title_field or None


@dataclasses.dataclass
class ServeConfig:
    """``mosaic-embed index serve``: a store over HTTP (index/serve.py).

    ``batching``: queries of concurrent requests wait up to ``batch_ms`` for each other and share one encoder
    forward of at most ``max_batch`` texts. Request limits: ``max_body_bytes`` per request, ``max_texts`` per
    /search or /embed, ``max_text_chars`` per text, ``max_k`` hits, ``max_documents`` per POST /documents.
    """

    RECIPE_STAGE: ClassVar[str] = "serve"

    store: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    writable: bool = False
    device: str = "auto"  # where the encoder runs
    search_device: str | None = None  # "cuda": an exact (Flat) store is searched there with torch
    batching: bool = True
    batch_ms: float = 2.0
    max_batch: int = 64
    max_body_bytes: int = 4 * 2**20
    max_texts: int = 64
    max_text_chars: int = 20_000
    max_k: int = 1000
    max_documents: int = 256
    refresh_s: float = 1.0  # how often a read-only server looks for a newer generation

    def __post_init__(self):
        if self.store is None:
            raise ValueError("store: required")
        self.store = Path(self.store)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.batch_ms < 0 or self.refresh_s < 0:
            raise ValueError("batch_ms and refresh_s must be >= 0")
        for name in ("max_batch", "max_body_bytes", "max_texts", "max_text_chars", "max_k", "max_documents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# --- encode: an encoder folder -> embeddings (encode/), and what reads them back (eval-retrieval, index search)


@dataclasses.dataclass
class EncodeConfig:
    """How the one :class:`~mosaic_embed.encode.Encoder` runs; documents and queries share these settings.

    ``max_seq_len``: truncation length (None = the encoder folder's own). ``precision``: "auto" = bf16 on
    CUDA, fp32 elsewhere (``runtime.resolve_precision``). ``max_tokens``: real tokens per packed batch
    (None = 32768 on GPU, 4096 on CPU). ``compile``: torch.compile the layers,
    off by default: measured on an H100 it saves ~7 % of device time for ~10 s of compilation before the
    first batch, which pays only beyond a few million texts (``--compile`` for those). ``device``: "auto" =
    ``cuda:LOCAL_RANK`` when CUDA is present, else CPU. ``truncate_dim``: keep the first dimensions of each
    vector (an encoder trained with Matryoshka dimensions; re-normalised when the encoder normalises);
    None = all.
    """

    max_seq_len: int | None = None
    truncate_dim: int | None = None
    batch_size: int = 128
    max_tokens: int | None = None
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    device: str = "auto"

    def __post_init__(self):
        if self.max_seq_len is not None and self.max_seq_len < 3:
            raise ValueError(f"max_seq_len must be >= 3 ([CLS] + a token + [SEP]) or null, got {self.max_seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or null, got {self.max_tokens}")
        if self.truncate_dim is not None and self.truncate_dim < 1:
            raise ValueError(f"truncate_dim must be >= 1 or null, got {self.truncate_dim}")
        if not self.device:
            raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclasses.dataclass
class EmbedConfig:
    """``mosaic-embed embed``: every record of a JSON-lines file -> ``out/embeddings.npy`` + ``out/ids.jsonl``.

    ``title_field`` is prepended to the text when a record has one ("" or null = never). ``id_field``: None
    = ``_id``, then ``id``, then the row number. ``window``: texts sorted by length together, the unit of
    resumption. ``dtype``: how vectors are stored. ``prompt_name``: the encoder's prompt for these texts
    ("document" for a corpus, "query" for queries; see ``Encoder.prompt``).
    """

    RECIPE_STAGE: ClassVar[str] = "embed"

    model: Path | None = None
    input: Path | None = None
    out: Path | None = None
    text_field: str = "text"
    title_field: str | None = "title"
    id_field: str | None = None
    window: int = 16384
    dtype: Literal["float16", "float32"] = "float16"
    prompt_name: str | None = "document"
    encode: EncodeConfig = dataclasses.field(default_factory=EncodeConfig)

    def __post_init__(self):
        for name in ("model", "input", "out"):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required (--{name})")
            setattr(self, name, Path(getattr(self, name)))  # a str from Python callers
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not self.text_field:
            raise ValueError("text_field must name a JSON key")
        self.title_field = self.title_field or None


@dataclasses.dataclass
class RetrievalEvalConfig:
    """``mosaic-embed eval-retrieval``: an encoder on a BEIR split, exact search, nDCG@10 / recall@k / MRR@10."""

    RECIPE_STAGE: ClassVar[str] = "eval-retrieval"

    model: Path | None = None
    beir: Path | None = None
    split: str = "test"
    out: Path | None = None  # also write the metrics as JSON here
    encode: EncodeConfig = dataclasses.field(default_factory=EncodeConfig)

    def __post_init__(self):
        for name in ("model", "beir"):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required (--{name})")
            setattr(self, name, Path(getattr(self, name)))


@dataclasses.dataclass
class SearchConfig:
    """``mosaic-embed index search``: queries against a store, embedded by the store's own encoder.

    ``model`` replaces the store's encoder (it must be the same model: its identity is checked unless
    ``force``); the encoding settings always come from the store's manifest. ``mode``: dense | lexical |
    hybrid (None: the store's default, which ``index tune`` sets). ``where``: a metadata filter.
    """

    RECIPE_STAGE: ClassVar[str] = "search"

    store: Path | None = None
    k: int = 5
    mode: Literal["dense", "lexical", "hybrid"] | None = None
    where: str | None = None
    model: Path | None = None
    force: bool = False
    device: str = "auto"

    def __post_init__(self):
        if self.store is None:
            raise ValueError("store: required (--store)")
        if self.k < 1:
            raise ValueError(f"k (--top-k) must be >= 1, got {self.k}")


# --- data: corpus -> tokenizer -> shards (data/corpus.py, data/tokenizer.py, data/shards.py) ---------------


@dataclasses.dataclass
class DataConfig:
    """``mosaic-embed data prepare``: a corpus -> tokenized train/validation shards (``data/shards.py``).

    ``corpus``: a file or folder (formats in ``data/corpus.py``); None = the bundled sample corpus.
    ``tokenizer``: a tokenizer folder; None = the bundled bert-base-uncased. Documents are split into
    consecutive sequences of at most ``max_seq_len`` tokens, ``[CLS]`` and ``[SEP]`` included; a
    ``validation_fraction`` of the *documents* (chosen by ``seed``) goes to the validation split.
    ``out``: the shard folder; None = ``cache_dir/shards-<key>``, the key hashing corpus files (paths,
    sizes, mtimes), tokenizer and settings, so identical inputs reuse the shards and any change rebuilds
    them. ``num_proc``: tokenizer processes (None = all cores). ``force``: rebuild even when cached.
    ``max_document_chars``: longer documents are split into pieces of at most this many characters while
    they are read (``data/corpus.py``), so memory is bounded by the settings, not by the files: about
    ``num_proc x batch_size x max_document_chars x 40`` bytes while tokenizing.
    """

    RECIPE_STAGE: ClassVar[str] = "data"

    corpus: Path | None = None
    text_field: str = "text"
    tokenizer: str | None = None
    max_seq_len: int = 128
    validation_fraction: float = 0.05
    seed: int = 42
    dedup: bool = True
    num_proc: int | None = None
    batch_size: int = 64  # documents per tokenization batch: a worker holds one batch's encodings (~70 B/token)
    max_document_chars: int = MAX_DOCUMENT_CHARS  # longer documents are split into pieces while read
    out: Path | None = None
    cache_dir: Path = Path("~/.cache/mosaic_embed")
    force: bool = False

    def __post_init__(self):
        if not self.text_field:
            raise ValueError("text_field must name a JSON key or a column, got an empty string")
        if not 3 <= self.max_seq_len <= 65536:
            raise ValueError(f"max_seq_len must be in [3, 65536] ([CLS] + >= 1 token + [SEP]), got {self.max_seq_len}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1 (or null for all cores), got {self.num_proc}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_document_chars < 1000:
            raise ValueError(f"max_document_chars must be >= 1000, got {self.max_document_chars}")


@dataclasses.dataclass
class TokenizerTrainConfig:
    """``mosaic-embed tokenizer train``: a domain WordPiece vocabulary (``data/tokenizer.py: train_tokenizer``).

    The learned vocabulary holds at most ``vocab_size`` entries; ``[unusedN]`` tokens pad it to a multiple
    of ``pad_multiple``. ``strip_accents``: None = strip exactly when lowercasing (BERT uncased).
    """

    RECIPE_STAGE: ClassVar[str] = "tokenizer"

    corpus: Path | None = None
    out: Path | None = None
    text_field: str = "text"
    vocab_size: int = 30522
    min_frequency: int = 2
    lowercase: bool = True
    strip_accents: bool | None = None
    limit_alphabet: int = 1000
    pad_multiple: int = 64
    dedup: bool = True
    max_document_chars: int = MAX_DOCUMENT_CHARS  # longer documents reach the trainer in pieces

    def __post_init__(self):
        if not self.text_field:
            raise ValueError("text_field must name a JSON key or a column, got an empty string")
        if self.max_document_chars < 1000:
            raise ValueError(f"max_document_chars must be >= 1000, got {self.max_document_chars}")
        if self.vocab_size < 6:
            raise ValueError(f"vocab_size must be > 5 (the special tokens), got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")
        if self.limit_alphabet < 1:
            raise ValueError(f"limit_alphabet must be >= 1, got {self.limit_alphabet}")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple}")


# --- glue: finetune + evaluate a checkpoint on GLUE / custom tasks (data/glue.py, train/glue.py) -------------


@dataclasses.dataclass
class GlueTaskHParams:
    """One task's finetuning recipe (the MosaicBERT paper's appendix values are in recipes/glue/mosaicbert.yaml).

    ``weight_decay`` is *decoupled* as in Composer's DecoupledAdamW (used by the paper): each step
    multiplies the weights by ``1 - (lr_t / lr) * weight_decay``; torch's AdamW gets ``weight_decay / lr``,
    which is the same update. ``warmup_fraction`` is the share of all steps spent in linear warmup (then
    linear decay to 0). ``from_mnli``: start from the MNLI-finetuned backbone (with a new head) when MNLI
    is part of the run; ``None`` = the task's default (RTE, MRPC, STS-B).
    """

    lr: float = 3.0e-5
    epochs: float = 3.0
    batch_size: int = 32
    warmup_fraction: float = 0.06
    weight_decay: float = 3.0e-6
    seeds: list[int] = dataclasses.field(default_factory=lambda: [19])
    from_mnli: bool | None = None

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")


def _hp(lr: float, epochs: float, batch_size: int, weight_decay: float, seeds: list[int]) -> GlueTaskHParams:
    return GlueTaskHParams(lr=lr, epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, seeds=seeds)


#: The MosaicBERT reference values per task (recipes/glue/mosaicbert.yaml writes the same out). ``custom`` is
#: what a task without an entry of its own gets: a new task needs a mapping entry, not a new field.
GLUE_REFERENCE_HPARAMS: dict[str, GlueTaskHParams] = {
    "mnli": _hp(5.0e-5, 3, 48, 5.0e-6, [19]),
    "qnli": _hp(1.0e-5, 10, 16, 1.0e-6, [19]),
    "qqp": _hp(3.0e-5, 5, 16, 3.0e-6, [19]),
    "sst2": _hp(3.0e-5, 3, 16, 3.0e-6, [19, 8364, 717]),
    "cola": _hp(5.0e-5, 10, 32, 5.0e-6, [19, 8364, 717, 10536]),
    "rte": _hp(1.0e-5, 3, 16, 1.0e-5, [19, 8364, 717, 10536, 90166]),
    "mrpc": _hp(8.0e-5, 10, 32, 8.0e-6, [19, 8364, 717, 10536, 90166]),
    "stsb": _hp(3.0e-5, 10, 32, 3.0e-6, [19, 8364, 717, 10536, 90166]),
    "custom": _hp(3.0e-5, 3, 16, 3.0e-6, [19, 8364, 717]),
}


@dataclasses.dataclass
class CustomTaskConfig:
    """A task folder in the SST-2 (``sentence, label``) or pair (``sentence1, sentence2, label``) layout."""

    path: Path
    num_labels: int
    metrics: list[str] = dataclasses.field(default_factory=list)
    name: str | None = None

    def __post_init__(self):
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {self.num_labels}")


@dataclasses.dataclass
class GlueConfig:
    """``mosaic-embed glue``: finetune ``model`` (or every checkpoint matching ``checkpoints``) on tasks.

    ``tasks``: GLUE task names or ``["all"]``; empty runs only ``custom_tasks``. ``data_dir``: the original
    GLUE TSV layout (offline); without it GLUE tasks come from the HF hub. ``seeds`` overrides every task's
    recipe seeds. ``padded_batches``: false = unpadded (packed, ``cu_seqlens``) batches when the model's forward
    takes them (MosaicBERT), padded otherwise; true forces padded batches (A/B throughput).
    ``cuda_graphs``: with packed batches on CUDA, each training step (forward, backward, AdamW) is captured
    once per token bucket as a CUDA graph and replayed (``train/graphed_steps.py``); false = eager steps.
    ``max_train_examples`` / ``max_eval_examples`` cut each split (smoke runs; not for reported numbers).
    """

    RECIPE_STAGE: ClassVar[str] = "glue"

    model: Path | None = None
    checkpoints: str | None = None
    out: Path = Path("runs/glue")
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    data_dir: Path | None = None
    custom_tasks: list[CustomTaskConfig] = dataclasses.field(default_factory=list)
    seeds: list[int] | None = None
    max_seq_len: int = 256
    # task name -> its recipe; tasks without an entry use "custom" (see GLUE_REFERENCE_HPARAMS)
    hparams: dict[str, GlueTaskHParams] = dataclasses.field(
        default_factory=lambda: {k: dataclasses.replace(v, seeds=list(v.seeds)) for k, v in GLUE_REFERENCE_HPARAMS.items()}
    )
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-6
    eval_batch_size: int = 128
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: str = "auto"
    padded_batches: bool = False
    cuda_graphs: bool = True
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    save_models: bool = False
    log_every: int = 100

    def __post_init__(self):
        if self.model is None and self.checkpoints is None:
            raise ValueError("model: give a model folder (--model) or a checkpoint glob (--checkpoints)")
        if self.model is not None and self.checkpoints is not None:
            raise ValueError("model and checkpoints: give one, not both")
        if not 8 <= self.max_seq_len <= 4096:
            raise ValueError(f"max_seq_len must be in [8, 4096], got {self.max_seq_len}")
        if not self.tasks and not self.custom_tasks:
            raise ValueError("tasks: no GLUE task and no custom task to run")
        if self.seeds is not None and not self.seeds:
            raise ValueError("seeds: empty list (leave it out to use each task's recipe seeds)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for name in ("max_train_examples", "max_eval_examples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if "custom" not in self.hparams:
            raise ValueError("hparams: needs a 'custom' entry (the recipe of tasks without one of their own)")
        from .data.glue import GLUE_TASKS  # the task registry (a light module)

        known = {*GLUE_TASKS, "custom", *(ct.name or Path(ct.path).name for ct in self.custom_tasks)}
        unknown = sorted(set(self.hparams) - known)
        if unknown:  # a misspelt task would otherwise silently keep the generic recipe
            raise ValueError(f"hparams.{unknown[0]}: no GLUE or custom task of that name; tasks: {sorted(known)}")

    def task_hparams(self, task: str) -> GlueTaskHParams:
        """The recipe of ``task`` (its own entry, else ``custom``), with ``seeds`` applied when given."""
        hp = self.hparams.get(task, self.hparams["custom"])
        return dataclasses.replace(hp, seeds=list(self.seeds)) if self.seeds is not None else hp


# --- pretrain: token shards -> MLM pretraining (data/mlm.py, train/pretrain.py, train/callbacks.py) -------


@dataclasses.dataclass
class PretrainModelConfig:
    """Which encoder to pretrain.

    ``arch: mosaic_bert`` builds ``MosaicBertForMaskedLM`` from ``mosaic_embed.model.preset_config(preset)``;
    ``arch: hf_bert`` builds transformers' ``BertForMaskedLM`` (the paper's baseline: learned positions,
    padded batches, SDPA attention) from a preset in ``train/pretrain.py`` (``bert-base``, ``bert-large``,
    ``bert-small``, ``bert-mini``). ``overrides`` sets config fields of either (e.g. ``num_hidden_layers: 2``,
    ``attn_impl: torch``); the vocabulary size always comes from the tokenizer, padded to a multiple of 64.
    """

    arch: Literal["mosaic_bert", "hf_bert"] = "mosaic_bert"
    preset: str = "mosaic-bert-base"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Continue from a checkpoint instead of random weights (domain-adaptive pretraining): a pretraining run's
    # final/, a converted BERT (convert --from-hf), an encoder-only or sentence-transformers folder (a fresh
    # MLM head, with a warning). Its tokenizer and architecture are kept (recipe: continue).
    init_from: Path | None = None

    def __post_init__(self):
        if not self.preset:
            raise ValueError("preset must name a model preset, e.g. mosaic-bert-base or bert-base")
        if "vocab_size" in self.overrides:
            raise ValueError("overrides.vocab_size: the vocabulary size comes from the tokenizer (padded to 64)")


@dataclasses.dataclass
class PretrainTrainConfig:
    """Optimisation, schedule, evaluation and checkpointing of MLM pretraining (defaults: the paper's Base recipe).

    The global batch is split as microbatch x devices x accumulation steps; it must divide evenly.
    Weight decay is decoupled and scaled with the schedule (Composer's DecoupledAdamW): each step shrinks
    weights by ``weight_decay * lr / lr_peak``. The learning rate warms up linearly over
    ``warmup_fraction`` of the steps, then decays linearly to ``final_lr_fraction * lr`` at ``max_steps``.
    """

    max_steps: int = 70_000
    global_batch_size: int = 4096  # sequences per optimizer step, over all devices
    microbatch_size: int = 128  # sequences per device per forward/backward
    mask_prob: float = 0.30  # training masking ratio (validation always masks 15 %)
    lr: float = 5.0e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1.0e-6
    weight_decay: float = 1.0e-5
    warmup_fraction: float = 0.06
    final_lr_fraction: float = 0.02
    max_grad_norm: float = 1.0  # 0 disables clipping
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    # Under DDP, split the compiled graph at gradient-bucket boundaries (torch._dynamo's optimize_ddp) so each
    # bucket's all-reduce overlaps the rest of the backward. Off (default): one whole graph, the all-reduce after
    # it. Measured on 2 H200s, MosaicBERT-Base, 256 sequences per GPU: whole graph 1.86x the 1-GPU tokens/s,
    # split 1.75x (the ~22 pieces lose more to lost fusion than the overlap wins back;
    # benchmarks/results/pretrain_multi_gpu.json).
    compile_split_at_ddp_buckets: bool = False
    seed: int = 17  # model init, dropout, data order and masking
    log_every_steps: int = 10
    eval_every_steps: int = 2000  # 0: validate only at the end
    eval_samples: int = 4096  # validation sequences used (the first ones of the held-out split)
    eval_batch_size: int = 128
    save_every_steps: int = 0  # 0: no step-based checkpoints
    save_every_minutes: float = 0.0  # 0: no time-based checkpoints
    keep_last: int = 3  # checkpoints kept besides keep_steps
    keep_steps: list[int] = dataclasses.field(default_factory=list)  # checkpoints never deleted
    dataloader_workers: int = 2
    report_to: list[str] = dataclasses.field(default_factory=list)  # "tensorboard" and/or "wandb"
    fsdp: bool = False  # shard parameters/gradients/optimizer state (FSDP) instead of DDP under torchrun
    peak_tflops: float | None = None  # MFU denominator per device; None: measured (runtime.peak_flops)

    def __post_init__(self):
        for name in ("max_steps", "global_batch_size", "microbatch_size", "log_every_steps", "eval_samples",
                     "eval_batch_size", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every_steps", "save_every_steps", "dataloader_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch_size % self.microbatch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of microbatch_size ({self.microbatch_size})"
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("lr and eps must be > 0 and weight_decay >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if self.max_grad_norm < 0 or self.save_every_minutes < 0:
            raise ValueError("max_grad_norm and save_every_minutes must be >= 0")
        unknown = sorted(set(self.report_to) - {"tensorboard", "wandb"})
        if unknown:
            raise ValueError(f"report_to: unknown integration {unknown[0]!r}; choose from tensorboard, wandb")
        self.betas = tuple(self.betas)


@dataclasses.dataclass
class PretrainConfig:
    """``mosaic-embed pretrain``: corpus -> shards (``data``) -> MLM pretraining of ``model`` -> ``out/final``."""

    RECIPE_STAGE: ClassVar[str] = "pretrain"

    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig())  # noqa: F821 (defined above)
    model: PretrainModelConfig = dataclasses.field(default_factory=PretrainModelConfig)
    train: PretrainTrainConfig = dataclasses.field(default_factory=PretrainTrainConfig)
    out: Path = Path("runs/pretrain")  # the run folder (checkpoints/, final/, metrics.jsonl, manifest.json)


# --- contrastive: pairs -> sentence encoder (train/contrastive.py, data/pairs.py) ---------------------------


@dataclasses.dataclass
class EncoderOptimization:
    """How an encoder-training stage optimises (``train-encoder``, ``distill``): batch and length of training,
    AdamW's learning rate (linear warmup over ``warmup_fraction``, then linear decay) and weight decay,
    precision ("auto" = bf16 on CUDA, fp32 on CPU), seed, and a log line every ``logging_steps``.
    ``max_steps`` > 0 overrides ``epochs``. The stages subclass it and keep their own defaults."""

    batch_size: int = 64
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 5e-5
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 42
    logging_steps: int = 20

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"batch_size must be >= 1 and lr > 0, got {self.batch_size} and {self.lr}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


@dataclasses.dataclass
class ContrastiveConfig(EncoderOptimization):
    """``mosaic-embed train-encoder``: a backbone or an encoder + (query, positive[, negatives]) pairs -> an ST folder.

    ``model``: a backbone folder (``runs/NAME/final``, a converted BERT), or a sentence-transformers folder
    (its own pooling, projection, normalisation and prompts are kept). ``pairs`` is a .jsonl[.gz] / .tsv
    file (hard negatives from the file: ``negative`` or ``negatives`` per line), a BEIR folder (its
    ``beir_split`` qrels) or ``"auto"`` (mine pairs from ``corpus`` with ``mining``: the cropping miners
    ``first-sentence`` / ``spans`` / ``mixed``, or ``simcse``, a passage and itself, the views differing by
    dropout). ``loss``: "mnrl" (in-batch negatives, plus hard negatives when the pairs carry more columns)
    or "cached_mnrl" (GradCache: the same loss and gradients for batches larger than memory, in chunks of
    ``mini_batch_size``). Under DDP, ``gather_across_devices`` makes every rank's in-batch negatives include
    all ranks' documents.

    A ``teacher`` (any sentence-transformers folder; None = the encoder ``model`` when it is one) helps
    without labels: ``teacher_filter`` > 0 keeps a pair only when the teacher ranks its positive within that
    top-k among all positives (a consistency filter for mined pairs); ``hard_negatives`` > 0 mines that many
    hard negatives per pair with the teacher (``negative_margin``: a candidate must score below
    ``(1 - margin) x`` the positive's score; replaces negatives from the file).

    ``matryoshka_dims``: also train the leading dimensions (MatryoshkaLoss; the full dimension is always
    one of them). ``query_prompt`` / ``document_prompt``: text prepended to anchors / documents in training,
    stored in the folder (``prompts``) so that ``Encoder`` and ``SentenceTransformer.encode_query`` /
    ``encode_document`` apply them alike. ``eval_fraction`` holds back that share of the pairs (before any
    negative mining) for an IR evaluation, run every ``eval_steps`` steps (0: at the end only); or
    ``eval_beir`` evaluates on a BEIR folder's ``eval_split``.
    """

    RECIPE_STAGE: ClassVar[str] = "contrastive"

    model: str = ""  # backbone folder (runs/NAME/final), a sentence-transformers folder, or any AutoModel folder
    pairs: str = ""
    out: Path = Path("runs/encoder")
    corpus: str | None = None  # for pairs == "auto"
    text_field: str = "text"
    mining: Literal["mixed", "first-sentence", "spans", "simcse"] = "mixed"
    max_pairs: int | None = None
    beir_split: str = "train"
    teacher: str | None = None  # None: the starting encoder (when model is a sentence-transformers folder)
    teacher_filter: int = 0
    hard_negatives: int = 0
    negative_margin: float = 0.05
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_seq_len: int = 128
    query_prompt: str = ""
    document_prompt: str = ""
    matryoshka_dims: list[int] = dataclasses.field(default_factory=list)
    loss: Literal["mnrl", "cached_mnrl"] = "mnrl"
    mini_batch_size: int = 32
    gather_across_devices: bool = True
    scale: float = 20.0
    eval_fraction: float = 0.0  # hold out this share of the pairs for an IR evaluator
    eval_beir: str | None = None  # or evaluate on a BEIR folder's eval_split
    eval_split: str = "test"
    eval_steps: int = 0  # evaluate every N steps during training; 0: at the end only
    dataloader_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be >= 8, got {self.max_seq_len}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not 0.0 <= self.eval_fraction < 0.5:
            raise ValueError(f"eval_fraction must be in [0, 0.5), got {self.eval_fraction}")
        if self.max_pairs is not None and self.max_pairs < 2:
            raise ValueError(f"max_pairs must be >= 2, got {self.max_pairs}")
        for name in ("teacher_filter", "hard_negatives", "eval_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.negative_margin < 1.0:
            raise ValueError(f"negative_margin must be in [0, 1), got {self.negative_margin}")
        if any(d < 1 for d in self.matryoshka_dims) or len(set(self.matryoshka_dims)) != len(self.matryoshka_dims):
            raise ValueError(f"matryoshka_dims must be distinct positive integers, got {self.matryoshka_dims}")
        if self.eval_steps and not (self.eval_fraction > 0 or self.eval_beir):
            raise ValueError("eval_steps needs something to evaluate on: eval_fraction > 0 or eval_beir")


# --- distill: a teacher's embeddings on the user's text -> a MosaicBERT student (train/distill.py) -----------


@dataclasses.dataclass
class DistillConfig(EncoderOptimization):
    """``mosaic-embed distill``: a MosaicBERT student learns a teacher encoder's embeddings on ``corpus``.

    ``teacher``: a sentence-transformers folder. ``student``: a MosaicBERT folder (a pretraining run's
    ``final``, a converted checkpoint, or a sentence-transformers folder with a MosaicBERT backbone) or a
    preset name (``mosaic-bert-small``, ...: random weights with the teacher's tokenizer;
    ``student_overrides`` sets config fields). The corpus is cut into passages of ``passage_words`` words
    (at most ``max_passages``, a seeded sample); the teacher embeds them once (``encode`` settings; cached
    under ``cache_dir``, default ``OUT/../.distill-cache``, keyed by corpus, teacher and passage settings,
    and resumable: an interrupted run continues where it stopped). ``loss``: "cosine" (1 - cos) or "mse"
    (mean squared error of the vectors themselves, Reimers & Gurevych 2020). When the student's width
    differs from the teacher's dimension a linear projection (an ST ``Dense`` module) is trained with it.
    ``finetune``: with ``finetune.pairs`` set, the distilled student then goes through ``train-encoder``
    (``ContrastiveConfig``; its ``model`` and ``out`` are set here) into ``out``.
    """

    RECIPE_STAGE: ClassVar[str] = "distill"

    teacher: Path | None = None
    student: str = ""
    corpus: Path | None = None
    out: Path | None = None
    text_field: str = "text"
    passage_words: int = 160
    max_passages: int | None = None
    cache_dir: Path | None = None
    loss: Literal["cosine", "mse"] = "cosine"
    pooling: Literal["mean", "cls"] = "mean"  # for a student that has no Pooling module yet
    student_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_seq_len: int = 256
    lr: float = 1.0e-4  # a student from random weights learns faster than an encoder being adapted
    logging_steps: int = 50
    eval_beir: Path | None = None  # evaluate the result on a BEIR folder's eval_split (metrics in the manifest)
    eval_split: str = "test"
    encode: EncodeConfig = dataclasses.field(default_factory=EncodeConfig)  # how the teacher embeds
    finetune: ContrastiveConfig = dataclasses.field(default_factory=ContrastiveConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("teacher", "corpus", "out"):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required (--{name})")
            setattr(self, name, Path(getattr(self, name)))
        if not self.student:
            raise ValueError("student: required (--student MODEL_DIR or a preset name such as mosaic-bert-small)")
        if self.passage_words < 8:
            raise ValueError(f"passage_words must be >= 8, got {self.passage_words}")
        if self.max_passages is not None and self.max_passages < 2:
            raise ValueError(f"max_passages must be >= 2 or null, got {self.max_passages}")
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be >= 8, got {self.max_seq_len}")
        if not self.text_field:
            raise ValueError("text_field must name a JSON key or a column")
        if "vocab_size" in self.student_overrides:
            raise ValueError("student_overrides.vocab_size: the vocabulary comes from the teacher's tokenizer")
