"""MosaicBERT: configuration, layers, the model and its heads, presets, checkpoint conversion.

Light to import: nothing here imports transformers until it is asked for. ``MosaicBertConfig`` and the
presets (transformers' ``PretrainedConfig``) and the models (``MosaicBertModel`` and its heads,
``modeling.py``, which imports transformers' ``modeling_utils``: seconds) load on first use;
``architecture.py`` and ``blocks.py``, which the Encoder runs saved backbones with, import no transformers.

``register_config`` / ``register_models`` make transformers' Auto classes know ``model_type="mosaic_bert"``;
``import mosaic_embed`` calls each when transformers imports the Auto module it extends, so saved checkpoints
load with the Auto classes (and ``SentenceTransformer(dir)``) without ``trust_remote_code``.
"""

from __future__ import annotations

import sys
from typing import Any

# name -> the submodule that defines it, imported on first access
_LAZY = {"MosaicBertConfig": "configuration", "PRESETS": "presets", "preset_config": "presets",
         **dict.fromkeys(("MosaicBertModel", "MosaicBertPreTrainedModel", "MosaicBertForMaskedLM",
                          "MosaicBertForSequenceClassification"), "modeling")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_config() -> None:
    """``AutoConfig`` (and through it ``AutoTokenizer``) learns ``model_type="mosaic_bert"``."""
    from transformers.models.auto.configuration_auto import AutoConfig

    from .configuration import MosaicBertConfig

    AutoConfig.register(MosaicBertConfig.model_type, MosaicBertConfig, exist_ok=True)


def register_models() -> None:
    """``AutoModel``, ``AutoModelForMaskedLM`` and ``AutoModelForSequenceClassification`` learn MosaicBERT."""
    modeling = sys.modules.get(f"{__name__}.modeling")
    if modeling is not None and not getattr(modeling, "LOADED", False):
        return  # modeling.py is importing transformers' AutoModel module right now: it registers at its end
    from transformers.models.auto.modeling_auto import (
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    from .configuration import MosaicBertConfig
    from .modeling import MosaicBertForMaskedLM, MosaicBertForSequenceClassification, MosaicBertModel

    register_config()
    AutoModel.register(MosaicBertConfig, MosaicBertModel, exist_ok=True)
    AutoModelForMaskedLM.register(MosaicBertConfig, MosaicBertForMaskedLM, exist_ok=True)
    AutoModelForSequenceClassification.register(MosaicBertConfig, MosaicBertForSequenceClassification, exist_ok=True)


__all__ = [
    "MosaicBertConfig",
    "MosaicBertModel",
    "MosaicBertPreTrainedModel",
    "MosaicBertForMaskedLM",
    "MosaicBertForSequenceClassification",
    "PRESETS",
    "preset_config",
    "register_config",
    "register_models",
]
