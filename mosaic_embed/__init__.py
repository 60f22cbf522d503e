"""mosaic_embed: pretrain a MosaicBERT encoder on your own text; finetune it into classifiers and embedders.

``import mosaic_embed`` registers the MosaicBERT model type with transformers' Auto classes, so
``AutoModel.from_pretrained(dir)`` and ``SentenceTransformer(dir)`` load our checkpoints without
``trust_remote_code``.
"""

__version__ = "0.1.0"

from . import model as _model  # noqa: E402,F401  (registers the Auto classes)
