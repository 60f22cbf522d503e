"""WordPiece tokenizers: the bundled bert-base-uncased one, saved ones, and training a domain one.

All tokenizers here are HF ``tokenizers`` pipelines wrapped as ``transformers.PreTrainedTokenizerFast``, so
they save with ``save_pretrained`` and load with ``AutoTokenizer.from_pretrained`` like any HF tokenizer.
The pipeline is BERT's (Devlin et al., 2019): clean control characters, put spaces around CJK characters,
lowercase and strip accents (uncased), split on whitespace and punctuation, then greedy longest-match
WordPiece with ``##`` continuation pieces; single inputs become ``[CLS] A [SEP]``, pairs
``[CLS] A [SEP] B [SEP]`` with token types 0/1.

Vocabulary padding: MosaicBERT pads the vocabulary to a multiple of 64 (30,522 -> 30,528) so the embedding
and the MLM decoder matrices have GPU-friendly shapes. Models take :func:`padded_vocab_size` as their
``vocab_size``; the bundled tokenizer itself keeps its 30,522 entries (ids 30,522..30,527 are rows of the
embedding that no text maps to). A tokenizer trained by :func:`train_tokenizer` is padded in the tokenizer
itself: ``[unused0]``, ``[unused1]``, ... are appended to the WordPiece vocabulary until ``len(tokenizer)``
is a multiple of 64 (BERT's own vocabulary reserves ``[unusedN]`` entries the same way). Their brackets
make them unreachable from text, since the pre-tokenizer splits ``[`` off as punctuation.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..artifacts import atomic_directory, write_manifest
from .corpus import MAX_DOCUMENT_CHARS, CorpusStats, corpus_files, iter_documents

#: The bert-base-uncased WordPiece vocabulary (Apache-2.0; see resources/README.md).
BUNDLED_VOCAB = Path(__file__).resolve().parent.parent / "resources" / "bert-base-uncased-vocab.txt"
#: The name under which :func:`load_tokenizer` also accepts the bundled tokenizer.
BUNDLED_NAME = "bert-base-uncased"

#: Special tokens of every tokenizer made here (bert-base-uncased's names).
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
#: Their order at the start of a trained vocabulary: [PAD] = 0 as the models' ``pad_token_id`` expects.
TRAINED_SPECIAL_ORDER = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

MODEL_MAX_LENGTH = 512
#: Longer "words" (no whitespace or punctuation) become [UNK], as in BERT: it bounds WordPiece's cost.
MAX_INPUT_CHARS_PER_WORD = 100
_TRAIN_BATCH = 256  # documents handed to the Rust trainer per call


def padded_vocab_size(tok_or_n: Any, multiple: int = 64) -> int:
    """The vocabulary size rounded up to a multiple of ``multiple`` (30,522 -> 30,528 for 64).

    ``tok_or_n`` is a vocabulary size or a tokenizer (``len(tokenizer)``, which counts added tokens).
    """
    n = tok_or_n if isinstance(tok_or_n, int) and not isinstance(tok_or_n, bool) else len(tok_or_n)
    if n <= 0:
        raise ValueError(f"vocab size must be positive, got {n}")
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    return -(-n // multiple) * multiple


def _bert_pipeline(tokenizer, lowercase: bool = True, strip_accents: bool | None = None):
    """Give a ``tokenizers.Tokenizer`` with a WordPiece model BERT's normalizer, splitter, template, decoder.

    ``strip_accents=None`` strips accents exactly when lowercasing (BERT's uncased behaviour).
    """
    from tokenizers import decoders, normalizers, pre_tokenizers, processors

    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _wrap(backend, name: str):
    """A ``tokenizers.Tokenizer`` as a transformers fast tokenizer with BERT's special tokens and inputs."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=MODEL_MAX_LENGTH,
        # token_type_ids: sentence-pair tasks (GLUE) feed segment ids to BERT-style models.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        name_or_path=name,
        **SPECIAL_TOKENS,
    )


def _bundled_backend():
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    with open(BUNDLED_VOCAB, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    backend = Tokenizer(
        WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
    )
    return _bert_pipeline(backend, lowercase=True, strip_accents=None)


def load_tokenizer(name_or_path: str | Path | None = None):
    """The tokenizer for a name or folder, as a ``transformers.PreTrainedTokenizerFast``.

    Args:
        name_or_path: None or ``"bert-base-uncased"`` -> the bundled bert-base-uncased WordPiece
            (lowercasing; [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103; 30,522 entries).
            A folder -> the tokenizer saved there (``save_pretrained``, ``mosaic-embed tokenizer train``,
            or a model/run folder that holds tokenizer files); loaded offline.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the folder holds no tokenizer, or one that is not a fast (Rust) tokenizer.
    """
    if name_or_path is None or str(name_or_path) == BUNDLED_NAME:
        return _wrap(_bundled_backend(), BUNDLED_NAME)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer not found: {path} (give a folder written by save_pretrained or "
            f"'mosaic-embed tokenizer train', or leave it unset for the bundled {BUNDLED_NAME})"
        )
    if not path.is_dir():
        raise ValueError(f"{path}: a tokenizer is a folder (with tokenizer.json), not a file")
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise ValueError(f"{path}: not a tokenizer folder (no tokenizer.json, vocab.txt or tokenizer_config.json)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, JSON errors...: one message
        raise ValueError(f"{path}: cannot load the tokenizer ({type(err).__name__}: {err})") from err
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"{path}: loads as {type(tok).__name__}, not a fast (tokenizers-backed) tokenizer")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """SHA-256 of the tokenizer's full pipeline (vocabulary, normalizer, template, added tokens): a cache key."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def _pad_vocabulary(backend, multiple: int) -> int:
    """Append ``[unusedN]`` entries to a trained WordPiece vocabulary until its size is a multiple; returns N added."""
    from tokenizers.models import WordPiece

    vocab = backend.get_vocab(with_added_tokens=True)
    target = padded_vocab_size(len(vocab), multiple)
    extra, i = [], 0
    while len(vocab) + len(extra) < target:
        token = f"[unused{i}]"
        if token not in vocab:
            extra.append(token)
        i += 1
    if extra:
        merged = dict(vocab)
        for token in extra:
            merged[token] = len(merged)
        backend.model = WordPiece(
            vocab=merged, unk_token="[UNK]", max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD
        )
    return len(extra)


def _batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(
    corpus: str | Path,
    vocab_size: int,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    min_frequency: int = 2,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    limit_alphabet: int = 1000,
    pad_multiple: int = 64,
    dedup: bool = True,
    max_document_chars: int = MAX_DOCUMENT_CHARS,
    stats: CorpusStats | None = None,
) -> Path:
    """Train a BERT-style WordPiece tokenizer on a corpus and save it (atomically) as an HF tokenizer folder.

    The corpus is streamed (:func:`~mosaic_embed.data.corpus.iter_documents`, documents longer than
    ``max_document_chars`` in pieces) into the Rust trainer.
    The learned vocabulary has at most ``vocab_size`` entries, the five special tokens first
    ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4); ``[unusedN]`` entries then pad it so that
    ``len(tokenizer)`` is a multiple of ``pad_multiple`` (module docstring).

    Writes ``out_dir/`` = ``tokenizer.json``, ``tokenizer_config.json`` and ``manifest.json`` (settings,
    corpus summary, learned and padded sizes, the pipeline's fingerprint). Returns ``out_dir``.

    Reruns are not bit-identical: the Rust trainer breaks ties between equally frequent merges in hash
    order, so token ids and a few rare pieces can differ. Keep the trained folder; do not expect to
    regenerate it (the shards' cache key follows the tokenizer's fingerprint, so either way stays consistent).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer

    if vocab_size < len(TRAINED_SPECIAL_ORDER) + 1:
        raise ValueError(f"vocab_size must be > {len(TRAINED_SPECIAL_ORDER)}, got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    out_dir = Path(out_dir)
    corpus = Path(corpus).expanduser().resolve()  # the summary and manifest name it from any directory
    stats = stats if stats is not None else CorpusStats()
    files = corpus_files(corpus)  # raises FileNotFoundError naming the corpus before any work
    start = time.perf_counter()

    backend = Tokenizer(
        WordPiece(unk_token="[UNK]", max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
    )
    # The trainer sees normalized, pre-tokenized words: set the pipeline's front half before training.
    from tokenizers import normalizers, pre_tokenizers

    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=TRAINED_SPECIAL_ORDER,
        limit_alphabet=limit_alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    docs = iter_documents(corpus, text_field=text_field, stats=stats, dedup=dedup,
                          max_document_chars=max_document_chars)
    backend.train_from_iterator(_batches(docs, _TRAIN_BATCH), trainer=trainer)
    learned = backend.get_vocab_size(with_added_tokens=True)
    added = _pad_vocabulary(backend, pad_multiple)
    _bert_pipeline(backend, lowercase=lowercase, strip_accents=strip_accents)
    tok = _wrap(backend, str(out_dir))
    train_s = time.perf_counter() - start

    settings = {
        "vocab_size": vocab_size,
        "text_field": text_field,
        "min_frequency": min_frequency,
        "lowercase": lowercase,
        "strip_accents": strip_accents,
        "limit_alphabet": limit_alphabet,
        "pad_multiple": pad_multiple,
        "dedup": dedup,
        "max_document_chars": max_document_chars,
    }
    with atomic_directory(out_dir) as tmp:
        tok.save_pretrained(tmp)
        write_manifest(
            tmp,
            "tokenizer",
            config=settings,
            inputs={"corpus": str(corpus), "corpus_files": len(files)},
            outputs={
                "vocab_size": len(tok),
                "learned_vocab_size": learned,
                "unused_tokens_added": added,
                "special_token_ids": {name: tok.convert_tokens_to_ids(t) for name, t in SPECIAL_TOKENS.items()},
                "fingerprint": tokenizer_fingerprint(tok),
            },
            timings={"train_s": round(train_s, 3)},
            corpus_summary=stats.to_dict(),
        )
    return out_dir
