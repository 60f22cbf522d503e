"""Named MosaicBERT sizes.

Exact parameter counts of ``MosaicBertForMaskedLM`` (tied decoder counted once, no pooler), checked in
tests/test_model.py:

================== ====== ====== ===== ======== ====== ==============
preset             hidden layers heads interm.  vocab  params (MLM)
================== ====== ====== ===== ======== ====== ==============
mosaic-bert-base   768    12     12    3072     30528  137,400,384
mosaic-bert-large  1024   24     16    4096     30528  435,221,312
mosaic-bert-small  512    8      8     2048     30528   49,517,888
mosaic-bert-mini   256    4      4     1024     30528   12,116,544
mosaic-bert-tiny   32     2      4     64       128         26,528
================== ====== ====== ===== ======== ====== ==============

Base is the paper's 137 M; Large counts 435 M (the paper rounds to 430 M). The classification model
adds a pooler (H*H + H) and a classifier (H*num_labels + num_labels) and drops the MLM head's dense,
LayerNorm and decoder bias.
"""

from __future__ import annotations

from .configuration import MosaicBertConfig

PRESETS: dict[str, dict] = {
    "mosaic-bert-base": {},  # MosaicBertConfig() defaults are Base
    "mosaic-bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "mosaic-bert-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    "mosaic-bert-mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "mosaic-bert-tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128,
        max_position_embeddings=128,
    ),
}


def preset_config(name: str, **overrides) -> MosaicBertConfig:
    """The config of preset ``name`` with ``overrides`` applied (any MosaicBertConfig field)."""
    if name not in PRESETS:
        raise ValueError(f"unknown MosaicBERT preset {name!r}; choose one of {sorted(PRESETS)}")
    return MosaicBertConfig(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "preset_config"]
