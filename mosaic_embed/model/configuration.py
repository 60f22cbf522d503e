"""MosaicBERT configuration for transformers: :class:`MosaicBertArchitecture` as a ``PretrainedConfig``.

The fields, their defaults and validation, and the kernel choices live in ``architecture.py`` (no
transformers), which the Encoder reads saved backbones with; this class adds what transformers needs:
``save_pretrained`` / ``from_pretrained``, the Auto classes (``model_type="mosaic_bert"``), the generic
fields every transformers config has. ``MosaicBertConfig()`` is MosaicBERT-Base.

This file imports only transformers and ``architecture.py``, so both travel into a remote-code model folder.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .architecture import MODEL_TYPE, MosaicBertArchitecture


class MosaicBertConfig(MosaicBertArchitecture, PretrainedConfig):
    """Configuration of :class:`MosaicBertModel` and its heads: the fields of
    :class:`~mosaic_embed.model.architecture.MosaicBertArchitecture` (documented there), validated on
    construction, plus transformers' own. The architecture comes first in the method order, so its defaults
    (``tie_word_embeddings=True``, ``pad_token_id=0``) override transformers' for the fields both declare."""

    model_type = MODEL_TYPE


__all__ = ["MosaicBertConfig"]
