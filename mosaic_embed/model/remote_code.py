"""Make a saved MosaicBERT folder loadable without mosaic_embed installed (transformers remote code).

``export_remote_code(folder)`` copies the model's source files next to its ``config.json``, rewrites the
two cross-package imports into sibling imports, and adds an ``auto_map`` so that
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` (and therefore
``SentenceTransformer(folder, trust_remote_code=True)``) builds the same classes from those copies.

Files copied (flat, into the folder):
    configuration.py, padding.py, modeling.py   from mosaic_embed/model/
    attention.py, flash_attn_alibi.py           from mosaic_embed/kernels/ (the kernel only runs on CUDA)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..artifacts import atomic_write_json, atomic_write_text

_PACKAGE = Path(__file__).resolve().parent.parent
SOURCES = {
    "configuration.py": _PACKAGE / "model" / "configuration.py",
    "padding.py": _PACKAGE / "model" / "padding.py",
    "modeling.py": _PACKAGE / "model" / "modeling.py",
    "attention.py": _PACKAGE / "kernels" / "attention.py",
    "flash_attn_alibi.py": _PACKAGE / "kernels" / "flash_attn_alibi.py",
}
_REWRITES = {
    "from ..kernels.attention import": "from .attention import",
    "from ..model.padding import": "from .padding import",
}
AUTO_MAP = {
    "AutoConfig": "configuration.MosaicBertConfig",
    "AutoModel": "modeling.MosaicBertModel",
    "AutoModelForMaskedLM": "modeling.MosaicBertForMaskedLM",
    "AutoModelForSequenceClassification": "modeling.MosaicBertForSequenceClassification",
}


def export_remote_code(folder: str | Path) -> list[Path]:
    """Add the model's source files and an ``auto_map`` to a saved model folder; returns the files written.

    Raises:
        FileNotFoundError if ``folder/config.json`` is missing; ValueError if a source file still imports
        outside the flat folder after the rewrite (a new cross-package import that needs a rule here).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (save the model with save_pretrained first)")
    written = []
    for name, source in SOURCES.items():
        if not source.is_file():
            raise FileNotFoundError(f"{source}: model source file missing")
        text = source.read_text(encoding="utf-8")
        for old, new in _REWRITES.items():
            text = text.replace(old, new)
        leftover = re.findall(r"^\s*(?:from\s+\.\.|from\s+mosaic_embed|import\s+mosaic_embed)\S*", text, re.M)
        if leftover:
            raise ValueError(f"{source}: imports outside the model folder remain after rewriting: {leftover}")
        written.append(atomic_write_text(folder / name, text))
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "mosaic_bert":
        raise ValueError(f"{config_path}: model_type is {config.get('model_type')!r}, not 'mosaic_bert'")
    config["auto_map"] = AUTO_MAP
    written.append(atomic_write_json(config_path, config))
    return written


__all__ = ["export_remote_code", "SOURCES", "AUTO_MAP"]
