"""Typed configs: dataclasses validated on construction, written as YAML recipes, overridden by dotted keys.

Every stage's knobs are a dataclass here (one place to see them all). A recipe is one of these written
out as YAML; ``--set train.lr=3e-4`` overrides a leaf. An unknown key or a value of the wrong type is a
``ConfigError`` that names the key and the file it came from: a typo never silently falls back to a
default (torchtitan's job-config rule).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .artifacts import atomic_write_text

T = TypeVar("T")

#: Where the YAML recipes live (``recipes/<stage>/<name>.yaml`` at the repository root).
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


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
        node, node_cls = out, cls
        for i, part in enumerate(path):
            if node_cls is not None:
                names = {f.name for f in dataclasses.fields(node_cls)}
                if part not in names:
                    raise ConfigError(
                        f"--set {item!r}: unknown key '{'.'.join(path[: i + 1])}'; "
                        f"{node_cls.__name__} takes: {', '.join(sorted(names))}"
                    )
                hint = typing.get_type_hints(node_cls)[part]
                node_cls = _dataclass_in(hint)
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


def resolve_recipe(recipe: str | Path, stage: str) -> Path:
    """A recipe given as a path, or as a name under ``recipes/<stage>/`` (``tiny`` -> recipes/pretrain/tiny.yaml)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    candidate = RECIPES_DIR / stage / f"{recipe}.yaml"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in (RECIPES_DIR / stage).glob("*.yaml"))
    raise ConfigError(f"no recipe '{recipe}' for stage '{stage}' (looked for {candidate}); available: {available}")


def load_yaml(path: str | Path) -> dict[str, Any]:
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


def load_config(
    cls: type[T],
    recipe: str | Path | None = None,
    overrides: Iterable[str] = (),
    stage: str | None = None,
    base: Mapping[str, Any] | None = None,
) -> T:
    """Recipe (name or path) -> ``--set`` overrides -> validated dataclass. Errors name the key and the file."""
    data: dict[str, Any] = dict(base or {})
    source = "<defaults>"
    if recipe is not None:
        path = resolve_recipe(recipe, stage) if stage else Path(recipe)
        data.update(load_yaml(path))
        source = str(path)
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides, cls)
        source += " with --set " + " ".join(overrides)
    return from_dict(cls, data, source=source)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config as a YAML recipe (atomically): re-loading it gives the same dataclass."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# stage configs. Each stage adds its dataclasses in its own section below.
# ----------------------------------------------------------------------------------------------------------

# --- index: embeddings -> FAISS vector store (index/store.py) ---------------------------------------------


@dataclasses.dataclass
class IndexConfig:
    """How a vector store indexes its embeddings (``mosaic-embed index build``)."""

    factory: str = "Flat"  # FAISS index_factory string: Flat (exact), HNSW32,Flat, IVF1024,Flat, IVF1024,PQ32
    metric: Literal["ip", "l2"] = "ip"
    normalize: bool = True  # L2-normalise vectors (and queries): inner product becomes cosine similarity
    train_size: int = 100_000  # vectors sampled (seeded) to train IVF / PQ quantizers
    add_batch_size: int = 65_536  # rows read from the (memory-mapped) embeddings at a time
    search_params: str = ""  # FAISS ParameterSpace string applied at load, e.g. "nprobe=16" or "efSearch=128"
    seed: int = 0

    def __post_init__(self):
        if not self.factory.strip():
            raise ValueError("factory must be a FAISS index_factory string, e.g. 'Flat' or 'HNSW32,Flat'")
        if self.train_size < 1 or self.add_batch_size < 1:
            raise ValueError("train_size and add_batch_size must be positive")


# --- data: corpus -> tokenizer -> shards (data/corpus.py, data/tokenizer.py, data/shards.py) ---------------
