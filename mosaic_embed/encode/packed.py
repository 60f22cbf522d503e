"""The fast Encoder: a sentence-transformers encoder folder -> (N, D) embeddings, packed and bf16 on GPU.

Why not just ``SentenceTransformer.encode``: for a BERT-Base-sized model on a modern GPU it spends most of
its time on the host (tokenizing in the loop, padding every batch to its longest member, one small
batch at a time), so the GPU idles. Here, for a MosaicBERT backbone (ALiBi or BERT mode):

1. a background thread tokenizes the next window of texts (the Rust tokenizer releases the GIL and
   runs its own thread pool) while the GPU embeds the current one;
2. inside a window (thousands of texts) texts are sorted by length and cut into batches by a token
   budget (32k real tokens on GPU: thousands of short texts or ~128 long ones per forward, so every
   forward is large), and each batch is fed *packed*: all its tokens concatenated (T,) with
   ``cu_seqlens`` (B+1,), so no padding token is ever computed (MosaicBERT's unpadded path, the same one
   used in pretraining). The window is laid out in numpy by the tokenizer thread and goes to the device
   in a few copies; the batch loop then only launches device work (no per-batch copy or readback);
3. pooling (mean / CLS) runs on the packed (T, H) output with segment sums, matching sentence-transformers'
   ``Pooling`` exactly; the modules after it (``Dense`` projections, ``Normalize``) are the folder's own
   modules, called on the pooled vectors;
4. the model runs in bf16 on GPU (``runtime.resolve_precision``), and the results of a whole window come
   back to the host at once.

Any other backbone (or a folder with modules we do not mirror) falls back to plain
``SentenceTransformer.encode``; ``Encoder.path_used`` says which path runs, and a fallback is logged.
Documents and queries go through the same object with the same :class:`~mosaic_embed.config.EncodeConfig`;
``prompt_name`` ("query" / "document") prepends the prompts stored in the folder exactly as
``SentenceTransformer.encode_query`` / ``encode_document`` do, and ``truncate_dim`` keeps the first
dimensions of a Matryoshka-trained encoder (re-normalised when the encoder normalises).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, EncodeConfig
from ..data import packing
from ..runtime import resolve_device, resolve_precision
from .st import (
    PackedParts,
    encoder_identity,
    folder_tokenizer,
    load_sentence_transformer,
    packed_parts,
    read_packed_folder,
    st_prompts,
)

logger = logging.getLogger(__name__)

PACKED, FALLBACK = "packed", "sentence-transformers"


#: ST's ``encode_document`` takes the first of these prompts the folder defines.
DOCUMENT_PROMPTS = ("document", "passage", "corpus")


def resolve_prompt(prompts: dict[str, str], default_prompt_name: str | None, prompt_name: str | None,
                   where: str = "") -> str:
    """The text an encoder with ``prompts`` prepends for ``prompt_name``, as sentence-transformers resolves it:
    "query" -> ``prompts["query"]`` (``encode_query``), "document" -> the first of document/passage/corpus
    (``encode_document``), each falling back to the default prompt when the folder defines none; any other
    name must be one of ``prompts``; None -> the default prompt, or nothing. A prompt of None is "none"."""
    prompts = {k: v or "" for k, v in prompts.items()}
    if prompt_name == "query" and "query" in prompts:
        return prompts["query"]
    if prompt_name == "document":
        for name in DOCUMENT_PROMPTS:
            if name in prompts:
                return prompts[name]
    if prompt_name in (None, "query", "document"):
        return prompts.get(default_prompt_name, "") if default_prompt_name else ""
    if prompt_name not in prompts:
        raise ValueError(f"prompt_name {prompt_name!r}: the encoder {where} defines the prompts {sorted(prompts) or 'none'}")
    return prompts[prompt_name]


DEFAULT_MAX_TOKENS = 32768  # real tokens per packed batch on GPU (see Encoder)
# on CPU: batches that stay in cache. Measured on 2 cores, a MiniLM-shaped encoder, 116 tokens per text on
# average: 2,048-4,096 tokens ran 1.15-1.22x sentence-transformers on the same network, 128 texts per
# batch (~15 k tokens) 1.05-1.11x (benchmarks/encode_throughput.py --same-model)
DEFAULT_MAX_TOKENS_CPU = 4096

#: The longest input an ALiBi model is run at. ALiBi has no position table, so this is a bound on memory
#: and on what was tested, not on the model: the kernels are tested to 8192 tokens.
ALIBI_MAX_LEN = 8192


# Tokenization keeps only max_seq_len tokens, but the tokenizer works through the whole text first: a news
# article of 3,300 characters costs three times what its first 256 tokens do. Long texts are therefore cut
# to whole words within PREFIX_CHARS_PER_TOKEN characters per kept token before tokenizing (see
# Encoder.tokenize for why the ids stay exact). 8 is about twice the characters an English token covers.
PREFIX_CHARS_PER_TOKEN = 8
_WHITESPACE = " \n\t\r"
# Tokenizer parts that act on each character or split only at whitespace or inside words: with them the tokens
# of a text's leading whole words do not depend on what follows them.
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
_WORD_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits"}


def cuts_to_whole_words(backend: Any) -> bool:
    """Whether a text may be cut to its leading whole words before this Rust tokenizer runs, without changing
    the tokens of those words: a per-character normalizer (or none), a whitespace-splitting pre-tokenizer, and
    no added token holding whitespace. Anything else (byte-level BPE, SentencePiece's metaspace, regex
    replacements) is tokenized whole."""
    import json

    def parts(node: Any, key: str) -> list[str]:
        if node is None:
            return []
        if node.get("type") == "Sequence":
            return [t for child in node.get(key, []) for t in parts(child, key)]
        return [node.get("type")]

    def spec(component: Any) -> Any:  # a component's JSON (its pickled state): not the whole vocabulary's
        return json.loads(component.__getstate__()) if component is not None else None

    normalizers = parts(spec(backend.normalizer), "normalizers")
    pre = parts(spec(backend.pre_tokenizer), "pretokenizers")
    # an added token is matched in the raw text before the pre-tokenizer: one holding a space spans words
    spaced = any(any(c.isspace() for c in t.content) for t in backend.get_added_tokens_decoder().values())
    return (set(normalizers) <= _LOCAL_NORMALIZERS and bool(pre) and set(pre) <= _WORD_PRE_TOKENIZERS
            and pre[0] in ("BertPreTokenizer", "Whitespace", "WhitespaceSplit") and not spaced)


def whole_word_prefix(text: str, limit: int) -> str:
    """``text`` cut before the last whitespace within its first ``limit`` characters (the text itself when it is
    no longer, or has no whitespace there)."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(c, 0, limit) for c in _WHITESPACE)
    return text[:cut] if cut > 0 else text


def max_input_length(config: Any) -> int | None:
    """The most tokens one input may have for a backbone config (None: unknown, leave it to the model)."""
    if getattr(config, "model_type", None) == "mosaic_bert" and getattr(config, "position", "") == "alibi":
        return ALIBI_MAX_LEN
    return getattr(config, "max_position_embeddings", None)


def _limit_reason(config: Any) -> str:
    if getattr(config, "position", "") == "alibi":
        return "ALiBi needs no position table; the kernels are tested up to this length"
    return "its learned position table has max_position_embeddings entries"


@dataclass
class PackedWindow:
    """One window of tokenized texts laid out for the device: length-sorted and cut into packed batches.

    Built on the host (numpy only, so a background thread can build it while the device runs the previous
    window). S sorted sequences, T tokens, nb batches.

    tokens: (T,) int64 token ids of the sequences in sorted order, back to back.
    lens: (S,) int64 sorted sequence lengths (longest first).
    order: (S,) int64 the input row of each sorted sequence.
    bounds: (nb+1,) int64 batch b is sorted sequences ``bounds[b]:bounds[b+1]``.
    cu: (S+nb,) int32 every batch's own ``cu_seqlens`` (b+1 entries each, 0 first), back to back: batch b's
        are ``cu[bounds[b]+b : bounds[b+1]+b+1]``.
    seg: (T,) int64 each token's sequence index inside its batch (mean pooling's segment ids).
    """

    tokens: np.ndarray
    lens: np.ndarray
    order: np.ndarray
    bounds: np.ndarray
    cu: np.ndarray
    seg: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def plan_window(flat: np.ndarray, lens: np.ndarray, batch_size: int, max_tokens: int | None) -> PackedWindow:
    """Sort a window's sequences by length and cut packed batches (all vectorised numpy).

    ``flat`` (T,) token ids of N sequences back to back in input order, ``lens`` (N,) their lengths.
    With ``max_tokens`` a batch takes sorted sequences while their real tokens fit the budget (a single
    longer sequence forms a batch alone): the batch size then adapts to length, thousands of short texts
    or ~128 of 256 tokens, so every forward is large enough to keep the GPU busy. Without it, batches
    hold ``batch_size`` sequences.
    """
    lens = np.asarray(lens, dtype=np.int64)
    n = int(lens.shape[0])
    order = np.argsort(-lens, kind="stable")  # longest first: batches of similar lengths
    slens = lens[order]
    scum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(slens, out=scum[1:])
    if max_tokens is None:
        bounds = np.unique(np.append(np.arange(0, n, batch_size, dtype=np.int64), n))
    else:
        cuts, i = [0], 0
        while i < n:  # one searchsorted per batch: the largest j with scum[j] - scum[i] <= max_tokens
            j = int(np.searchsorted(scum, scum[i] + max_tokens, side="right")) - 1
            i = min(max(j, i + 1), n)
            cuts.append(i)
        bounds = np.asarray(cuts, dtype=np.int64)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])  # input-order offsets into flat
    total = int(scum[-1])
    gather = np.repeat(starts[order] - scum[:-1], slens) + np.arange(total, dtype=np.int64)  # (T,)
    first = np.repeat(bounds[:-1], np.diff(bounds))  # (S,) first sorted sequence of each one's batch
    local = np.arange(n, dtype=np.int64) - first  # (S,) index inside its batch
    # per-batch cu_seqlens: the window's cumulative lengths rebased at each batch's first token
    cu = np.concatenate([scum[a : b + 1] - scum[a] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]) if n else np.zeros(0)
    return PackedWindow(
        tokens=np.asarray(flat, dtype=np.int64)[gather], lens=slens, order=order.astype(np.int64), bounds=bounds,
        cu=cu.astype(np.int32), seg=np.repeat(local, slens),
    )


class Encoder:
    """A loaded sentence-transformers model plus the fast packed path when its backbone is MosaicBERT.

    ``encode(texts) -> (N, D) float32`` in input order. ``max_seq_len`` may exceed the length the model
    was trained at: MosaicBERT has no position table (ALiBi), so longer inputs simply extrapolate.

    ``max_tokens``: the real-token budget of one packed batch (default 32768 on GPU, where large forwards
    are what keeps it busy, and 4,096 on CPU, where batches that stay in cache are faster). ``compile`` compiles each
    MosaicBERT layer with ``torch.compile`` (dynamic shapes: one graph serves every batch size; the layers
    share it), fusing the residual adds into the LayerNorms: measured on an H100, 7 % less device time for
    seconds of compilation before the first batch, so it is off unless asked for. Should compilation fail,
    the first forward says so in a warning and the layers run eagerly.
    """

    def __init__(self, model: Any, settings: EncodeConfig | None = None, path: str | Path | None = None):
        """``model``: a loaded ``SentenceTransformer``, or the :class:`~mosaic_embed.encode.st.PackedParts` of
        a folder read without sentence-transformers (see :meth:`load`)."""
        settings = settings or EncodeConfig()
        self.path = str(path) if path is not None else None
        if isinstance(model, PackedParts):
            parts, self._st = model, None
            self.device = resolve_device(settings.device)
        else:
            parts = packed_parts(model)
            # The packed path casts the backbone it shares with ``model`` (bf16 on GPU), which leaves ``model``
            # itself of mixed dtypes: where the folder is known, ``st`` reloads a clean copy when asked for.
            self._st = model if parts is None or path is None else None
            self.device = torch.device(model.device)
        config = parts.backbone.config if parts is not None else getattr(self._st[0], "auto_model", None)
        config = getattr(config, "config", config)
        if settings.max_seq_len is not None:
            limit = max_input_length(config) if config is not None else None
            if limit is not None and settings.max_seq_len > limit:
                raise ConfigError(f"max_seq_len {settings.max_seq_len}: this encoder takes at most {limit} tokens "
                                  f"({_limit_reason(config)})")
        self.dtype = resolve_precision(settings.precision, self.device)
        self.batch_size = settings.batch_size
        self.max_tokens = settings.max_tokens
        if self.max_tokens is None:
            self.max_tokens = DEFAULT_MAX_TOKENS if self.device.type == "cuda" else DEFAULT_MAX_TOKENS_CPU
        compile = settings.compile
        if parts is not None:
            # The packed path runs [Transformer(MosaicBERT), Pooling(mean|cls)] itself, then the folder's own
            # Dense / Normalize modules (``tail``) on the pooled vectors.
            self._tokenizer, self.pooling, self.tail = parts.tokenizer, parts.pooling, parts.tail
            backend, truncation_side = parts.backend, parts.truncation_side
            self.normalize, self.full_dim = parts.normalize, parts.dim
            self.prompts, self.default_prompt_name = parts.prompts, parts.default_prompt_name
            self.max_seq_len = settings.max_seq_len or parts.max_seq_len
            self.backbone = parts.backbone.to(device=self.device, dtype=self.dtype).eval()
            for module in self.tail:
                module.to(self.device)  # fp32, as sentence-transformers runs them on the pooled vectors
            self.path_used = PACKED
            if compile:
                from ..kernels.dispatch import warm_dispatch

                warm_dispatch(self.backbone, self.device.type, self.dtype)  # resolved before any trace
                for layer in self.backbone.encoder.layers:
                    layer.compile(dynamic=True)  # in place: the module tree (and ST's view of it) is unchanged
        else:
            st_model = self._st
            if settings.max_seq_len is not None:
                st_model.max_seq_length = settings.max_seq_len
            self.max_seq_len = int(st_model.max_seq_length or 512)
            self._tokenizer = st_model[0].tokenizer
            backend = getattr(self._tokenizer, "backend_tokenizer", None)
            truncation_side = getattr(self._tokenizer, "truncation_side", "right")
            get_dim = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
            self.full_dim = int(get_dim())
            self.prompts, self.default_prompt_name = st_prompts(st_model)
            self.normalize = type(list(st_model)[-1]).__name__ == "Normalize"
            self.pooling, self.tail, self.backbone = None, [], None
            self.path_used = FALLBACK
            st_model.to(self.dtype)
        if settings.truncate_dim is not None and settings.truncate_dim > self.full_dim:
            raise ConfigError(f"truncate_dim {settings.truncate_dim}: this encoder makes {self.full_dim}-d vectors")
        self.dim = settings.truncate_dim or self.full_dim
        self._backend = self._truncating_backend(backend, truncation_side)
        # cut long texts to a prefix first: right-side truncation keeps the start, and the tokenizer allows it
        self._prefix_chars = (PREFIX_CHARS_PER_TOKEN * self.max_seq_len if self._backend is not None
                              and truncation_side == "right" and cuts_to_whole_words(self._backend) else None)
        self.compiled = bool(compile and self.backbone is not None)
        self._first_forward = True
        self._identity: str | None = None
        self.settings = dataclasses.replace(settings, max_seq_len=self.max_seq_len)
        # The fast path is the expected one; a fallback is said loudly (its speed is sentence-transformers').
        logger.log(logging.INFO if self.path_used == PACKED else logging.WARNING,
                   "Encoder(%s): %s path, %s, max_seq_len %d, pooling %s, max_tokens %s%s", path,
                   self.path_used, str(self.dtype).replace("torch.", ""), self.max_seq_len,
                   self.pooling or "ST modules", self.max_tokens, ", compiled layers" if self.compiled else "")

    @classmethod
    def load(cls, path: str | Path, settings: EncodeConfig | None = None, **changes: Any) -> Encoder:
        """Open an encoder folder with ``settings`` (an :class:`EncodeConfig`; ``changes`` replace its fields,
        e.g. ``Encoder.load(path, device="cpu", max_seq_len=256)``).

        A folder the packed path mirrors is read directly (backbone, tokenizer, pooling), without importing
        sentence-transformers, which costs seconds of start-up; any other folder is opened by it.
        """
        settings = dataclasses.replace(settings or EncodeConfig(), **changes)
        parts = read_packed_folder(path)
        if parts is not None:
            return cls(parts, settings, path=path)
        st = load_sentence_transformer(path, resolve_device(settings.device))
        return cls(st, settings, path=path)

    @property
    def st(self) -> Any:
        """The folder as a ``SentenceTransformer`` (loaded on first use when the packed path read it directly):
        the reference the packed path is tested against, and the fallback path itself."""
        if self._st is None:
            if self.path is None:
                raise ValueError("this Encoder was built from parts, not a folder: no SentenceTransformer to load")
            self._st = load_sentence_transformer(self.path, self.device)
            self._st.max_seq_length = self.max_seq_len
        return self._st

    def describe(self) -> dict[str, Any]:
        """What a run folder or store records about the encoder that made its vectors, so that queries are
        embedded alike: its identity (hash of weights and config), path, pooling, normalisation, length, dim,
        the prompts it applies and the truncation."""
        if self._identity is None and self.path:
            self._identity = encoder_identity(self.path)
        return {
            "path": str(Path(self.path).resolve()) if self.path else None,
            "identity": self._identity,
            "max_seq_len": self.max_seq_len,
            "dim": self.dim,
            "truncate_dim": self.settings.truncate_dim,
            "pooling": self.pooling or "sentence-transformers modules",
            "normalize": self.normalize,
            "prompts": dict(self.prompts),
            "default_prompt_name": self.default_prompt_name,
            "precision": self.settings.precision,
            "path_used": self.path_used,
        }

    def prompt(self, prompt_name: str | None) -> str:
        """The text prepended for ``prompt_name`` (see :func:`resolve_prompt`)."""
        return resolve_prompt(self.prompts, self.default_prompt_name, prompt_name, str(self.path))

    def _finish(self, emb: np.ndarray) -> np.ndarray:
        """Matryoshka truncation (re-normalised when the encoder normalises, so cosine stays inner product)."""
        if self.dim == self.full_dim:
            return emb
        emb = np.ascontiguousarray(emb[:, : self.dim])
        if self.normalize:
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb

    # -- tokenization ---------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """transformers' tokenizer of the encoder (for offsets, pairs, decoding). Embedding itself runs the Rust
        tokenizer alone: a folder the packed path reads directly loads this on first use, so ``embed`` and
        ``search`` never import transformers."""
        if self._tokenizer is None:
            self._tokenizer = folder_tokenizer(self.path)
        return self._tokenizer

    def _truncating_backend(self, backend: Any, truncation_side: str) -> Any:
        """A private copy of the fast tokenizer's Rust backend, truncating at ``max_seq_len``, or None (a slow
        tokenizer).

        Calling the backend directly skips the Python half of transformers' ``tokenizer(texts)`` (a
        BatchEncoding of Python lists built per text, about a third of the tokenizer's time, all of it holding
        the GIL that the thread launching GPU work needs). A copy, because transformers' wrapper re-sets the
        backend's truncation on every call and this one is used from the tokenizer thread.
        """
        if backend is None:
            return None
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.enable_truncation(self.max_seq_len, direction=truncation_side)
        return copy

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, ``[CLS] ... [SEP]``, truncated to ``max_seq_len``, no padding.

        A long text is tokenized from its leading whole words (:func:`whole_word_prefix`) where the tokenizer
        allows it (:func:`cuts_to_whole_words`): those words give the same tokens as in the whole text, so a
        prefix that still fills ``max_seq_len`` gives exactly the whole text's truncated ids; a prefix that does
        not (long words, many characters per token) is tokenized again from the whole text.
        """
        if self._backend is not None:
            texts = list(texts)
            if self._prefix_chars is None:
                return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=True)]
            prefixes = [whole_word_prefix(t, self._prefix_chars) for t in texts]
            ids = [e.ids for e in self._backend.encode_batch(prefixes, add_special_tokens=True)]
            again = [i for i, (p, t, x) in enumerate(zip(prefixes, texts, ids, strict=True))
                     if p is not t and len(x) < self.max_seq_len]
            if again:
                whole = self._backend.encode_batch([texts[i] for i in again], add_special_tokens=True)
                for i, e in zip(again, whole, strict=True):
                    ids[i] = e.ids
            return ids
        return self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.max_seq_len,
            padding=False, return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]

    def tokenize_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of :meth:`tokenize` as numpy: (T,) int32 all texts back to back and (N,) int64 lengths.

        The Rust tokenizer encodes the batch on all cores with the GIL released; only the per-text
        ``ids`` lists and two ``np.fromiter`` passes run in Python.
        """
        return packing.flatten(self.tokenize(texts), np.int32)

    # -- the packed forward -----------------------------------------------------------------------------------

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return packing.to_device(a, self.device)

    @torch.inference_mode()
    def _embed_packed(self, win: PackedWindow, progress: Any = None) -> torch.Tensor:
        """Every batch of a window -> (S, D) float32 embeddings on the device, in the window's input order.

        The window goes to the device in four copies (tokens, cu_seqlens, segment ids, order); each batch
        is then a slice of them, so the loop issues only device work: no per-batch host->device copy and
        no readback until the whole window is done.
        """
        n = int(win.lens.shape[0])
        out = torch.empty(n, self.full_dim, dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        tokens, cu, order = self._to_device(win.tokens), self._to_device(win.cu), self._to_device(win.order)
        seg = self._to_device(win.seg) if self.pooling == "mean" else None
        counts = self._to_device(win.lens.astype(np.float32)) if self.pooling == "mean" else None
        scum = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(win.lens, out=scum[1:])
        bounds = win.bounds.tolist()
        for b, (a, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            t0, t1 = int(scum[a]), int(scum[e])
            cu_b = cu[a + b : e + b + 1]  # (B+1,) this batch's cu_seqlens
            hidden = self._backbone_forward(input_ids=tokens[t0:t1], cu_seqlens=cu_b,
                                            max_seqlen=int(win.lens[a])).last_hidden_state  # (T_b, H)
            if self.pooling == "cls":
                pooled = hidden.index_select(0, cu_b[:-1].long()).float()  # (B, H): first token of each
            else:
                sums = torch.zeros(e - a, hidden.shape[-1], device=self.device, dtype=torch.float32)
                sums.index_add_(0, seg[t0:t1], hidden.float())  # (B, H) per-sequence sums
                pooled = sums / counts[a:e, None]
            for module in self.tail:  # the folder's Dense / Normalize modules, in fp32
                pooled = module({"sentence_embedding": pooled})["sentence_embedding"]
            out.index_copy_(0, order[a:e], pooled)
            if progress is not None:
                progress.update(e - a)
        return out

    def _backbone_forward(self, **inputs: Any) -> Any:
        """The backbone on one packed batch; on the first call, a failing compilation falls back to eager."""
        if not self._first_forward or not self.compiled:
            return self.backbone(**inputs)
        self._first_forward = False
        try:
            return self.backbone(**inputs)
        except Exception as err:  # inductor/dynamo errors surface at the first call, with many types
            logger.warning("Encoder: torch.compile of the layers failed (%s: %s); running them eagerly",
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            for layer in self.backbone.encoder.layers:
                layer._compiled_call_impl = None  # undoes nn.Module.compile
            self.compiled = False
            return self.backbone(**inputs)

    def embed_tokenized(self, token_ids: Sequence[Sequence[int]], batch_size: int | None = None,
                        max_tokens: int | None = None, progress: Any = None) -> np.ndarray:
        """(N,) token lists -> (N, D) float32 in the given order; batches are length-sorted internally.

        ``max_tokens`` cuts batches by real tokens instead of ``batch_size`` sequences.
        """
        win = plan_window(*packing.flatten(token_ids, np.int32), batch_size or self.batch_size, max_tokens)
        return self._finish(self._embed_packed(win, progress).cpu().numpy())

    def encode(self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False,
               window: int = 16384, prompt_name: str | None = None) -> np.ndarray:
        """(N,) strings -> (N, D) float32 embeddings, input order (tokenizing ahead, see ``iter_embed``).

        ``prompt_name``: "query" for queries, "document" for documents (see :meth:`prompt`); the same vectors
        as ``SentenceTransformer.encode_query`` / ``encode_document`` of the folder.
        The first window is an eighth of ``window``: the device starts after tokenizing that much instead
        of a whole window, and the next (full) window is tokenized while it runs.
        """
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="embed", disable=not show_progress)
        cuts = [0, min(len(texts), max(1, window // 8))]
        while cuts[-1] < len(texts):
            cuts.append(min(len(texts), cuts[-1] + window))
        windows = ((a, texts[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True))
        try:
            parts = [emb for _, emb, _ in self.iter_embed(windows, batch_size, progress=bar, prompt_name=prompt_name)]
        finally:
            bar.close()
        return np.concatenate(parts, axis=0)

    def iter_embed(self, windows: Iterable[tuple[Any, Sequence[str]]], batch_size: int | None = None,
                   progress: Any = None, prompt_name: str | None = None) -> Iterator[tuple[Any, np.ndarray, int]]:
        """Embed ``(key, texts)`` windows in order, yielding ``(key, (n, D) float32, real tokens)``.

        ``prompt_name`` as in :meth:`encode`.

        A background thread reads, tokenizes and lays out (:func:`plan_window`) window k+1 while the device
        embeds window k: the host work (JSON parsing, WordPiece, sorting) hides behind the forward passes
        instead of adding to them. The thread does little under the GIL (the Rust tokenizer and large numpy
        operations release it). Tokenizing in worker processes instead was measured slower on an H200
        (8,600 vs 9,394 sentences/s, benchmarks/NOTES_encode.md): pickling the texts to them holds the GIL too.
        """
        batch_size = batch_size or self.batch_size
        prompt = self.prompt(prompt_name)  # an unknown name fails here, before any work
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for key, texts in windows:
                    win = None
                    if self.path_used == PACKED:
                        flat, lens = self.tokenize_flat([prompt + t for t in texts] if prompt else texts)
                        win = plan_window(flat, lens, batch_size, self.max_tokens)
                    if not put((key, texts, win)):
                        return
                put(None)
            except BaseException as err:  # re-raised in the consumer, message intact
                put(err)

        thread = threading.Thread(target=produce, daemon=True, name="encoder-tokenizer")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                key, texts, win = item
                emb = self.embed_window(texts, win, batch_size, progress=progress, prompt=prompt)
                yield key, emb, (win.n_tokens if win is not None else 0)
        finally:
            stop.set()
            thread.join(timeout=5)

    def embed_window(self, texts: Sequence[str], win: PackedWindow | None, batch_size: int,
                     progress: Any = None, prompt: str = "") -> np.ndarray:
        """One window -> (n, D) float32 in input order (one device->host copy for the whole window).

        ``win`` is the window tokenized with ``prompt`` prepended (packed path); ST applies ``prompt`` itself
        (an explicit prompt, so its default prompt is not applied a second time)."""
        if self.path_used == FALLBACK:  # ST sorts by length and pads per batch itself
            emb = np.asarray(self.st.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                            show_progress_bar=False, prompt=prompt), dtype=np.float32)
            if progress is not None:
                progress.update(len(texts))
            return self._finish(emb)
        return self._finish(self._embed_packed(win, progress).cpu().numpy())
