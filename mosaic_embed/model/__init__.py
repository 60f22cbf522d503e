"""MosaicBERT: configuration, padding helpers, the model and its heads, presets, checkpoint conversion.

Importing this package registers ``model_type="mosaic_bert"`` with transformers' ``AutoConfig``,
``AutoModel``, ``AutoModelForMaskedLM`` and ``AutoModelForSequenceClassification``, so saved checkpoints
load with the Auto classes and no ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .configuration import MosaicBertConfig
from .modeling import (
    MosaicBertForMaskedLM,
    MosaicBertForSequenceClassification,
    MosaicBertModel,
    MosaicBertPreTrainedModel,
)
from .presets import PRESETS, preset_config

AutoConfig.register(MosaicBertConfig.model_type, MosaicBertConfig, exist_ok=True)
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
]
