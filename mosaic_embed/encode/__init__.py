"""Everything about a sentence encoder, in one package.

- ``st.py``: the sentence-transformers folder: :func:`build_encoder`, :func:`save_encoder` (with the
  remote-code export), :func:`load_sentence_transformer`, :func:`encoder_identity`;
- ``packed.py``: :class:`Encoder`, the one object that embeds documents and queries alike (packed bf16
  batches on GPU through MosaicBERT's unpadded path; sentence-transformers for other backbones);
- ``files.py``: :func:`embed_file` (a JSON-lines file -> memory-mapped ``.npy``, resumable, multi-GPU) and
  its readers.

Training modules import this package to build and save encoders; nothing imports a trainer to get one.
"""

from .files import embed_file, iter_texts, load_embeddings
from .packed import FALLBACK, PACKED, Encoder, PackedWindow, plan_window
from .st import build_encoder, encoder_identity, export_remote_code, load_sentence_transformer, save_encoder

__all__ = [
    "FALLBACK",
    "PACKED",
    "Encoder",
    "PackedWindow",
    "build_encoder",
    "embed_file",
    "encoder_identity",
    "export_remote_code",
    "iter_texts",
    "load_embeddings",
    "load_sentence_transformer",
    "plan_window",
    "save_encoder",
]
