"""Masked-language-model inputs: reproducible masking and collation into unpadded (packed) batches.

Masking follows BERT: a fraction ``mask_prob`` of the maskable tokens is chosen (30 % for MosaicBERT,
15 % for the BERT baseline; validation always uses 15 % so runs with different ratios compare); of
those, 80 % become ``[MASK]``, 10 % a random token, 10 % stay as they are. Special tokens
(``[CLS]``, ``[SEP]``, ``[PAD]``, ...) are never chosen.

Reproducible and resumable without any generator state: every random draw is a counter-based hash of
``(seed, sample key, position, stream)`` (splitmix64). The sample key is a number the data pipeline
attaches to each example (``mask_key``, see :class:`KeyedDataset`), unique per (epoch, example), so the
same example in the same epoch gets the same mask on any rank, in any worker, after any resume, and a new
mask in the next epoch (dynamic masking as in RoBERTa).

Collation builds what MosaicBERT consumes in packed mode: the sequences of a batch concatenated,
``input_ids`` (T,), ``labels`` (T,) (-100 where nothing is predicted), ``cu_seqlens`` (B+1,) int32 and
``max_seqlen``; no padding is created, moved or computed. :class:`PaddedMLMCollator` gives the (B, S)
layout with ``attention_mask`` for models that need it (transformers' ``BertForMaskedLM``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import packing

IGNORE_INDEX = -100
#: Validation masking ratio, fixed so that runs pretrained with different ratios are compared alike.
VALIDATION_MASK_PROB = 0.15

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic): a fast, well-mixed hash."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _uniform(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniforms in [0, 1) (top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class MLMMasker:
    """Chooses and corrupts the masked positions of token sequences, deterministically per sample key.

    Args:
        mask_token_id: id of ``[MASK]``.
        vocab_size: size of the tokenizer's vocabulary; random replacements are drawn from its non-special ids.
        special_ids: ids never masked (and never drawn as random replacements).
        mask_prob: probability that a maskable token is selected for prediction.
        seed: masking seed; with the sample key it fixes every draw.
    """

    mask_token_id: int
    vocab_size: int
    special_ids: Sequence[int]
    mask_prob: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        self._special = np.array(sorted(set(int(i) for i in self.special_ids)), dtype=np.int64)
        candidates = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), self._special)
        if candidates.size == 0:
            raise ValueError("no non-special token ids to draw random replacements from")
        self._replacements = candidates
        self._seed_hash = _splitmix64(np.array([self.seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, mask_prob: float, seed: int = 0) -> MLMMasker:
        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no [MASK] token")
        return cls(
            mask_token_id=int(tokenizer.mask_token_id),
            vocab_size=len(tokenizer),
            special_ids=list(tokenizer.all_special_ids),
            mask_prob=mask_prob,
            seed=seed,
        )

    def mask(self, input_ids: np.ndarray, keys: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask a flat run of tokens.

        Args:
            input_ids: (T,) int64 token ids (one or many sequences concatenated).
            keys: (T,) the sample key of the sequence each token belongs to.
            positions: (T,) each token's position inside its sequence.

        Returns:
            (corrupted input_ids (T,) int64, labels (T,) int64 with ``IGNORE_INDEX`` where not selected).
        """
        with np.errstate(over="ignore"):
            base = _splitmix64(keys.astype(np.uint64) ^ self._seed_hash)
            h = _splitmix64(base + positions.astype(np.uint64) * _GOLDEN)
            u_select = _uniform(_splitmix64(h ^ np.uint64(1)))
            u_action = _uniform(_splitmix64(h ^ np.uint64(2)))
            r_token = _splitmix64(h ^ np.uint64(3))
        maskable = ~np.isin(input_ids, self._special)
        selected = maskable & (u_select < self.mask_prob)
        labels = np.where(selected, input_ids, IGNORE_INDEX)
        out = input_ids.copy()
        to_mask = selected & (u_action < 0.8)
        to_random = selected & (u_action >= 0.8) & (u_action < 0.9)
        out[to_mask] = self.mask_token_id
        n_rand = int(to_random.sum())
        if n_rand:
            idx = (r_token[to_random] % np.uint64(self._replacements.size)).astype(np.int64)
            out[to_random] = self._replacements[idx]
        return out, labels


def _flatten(features: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features -> (ids (T,), mask keys (T,), positions (T,), lengths (B,)); every example is checked."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    seqs, keys = [], []
    for i, f in enumerate(features):
        if "input_ids" not in f:
            raise ValueError(f"batch example {i} has no 'input_ids' (keys: {sorted(f)})")
        if "mask_key" not in f:
            raise ValueError(
                f"batch example {i} has no 'mask_key'; wrap the dataset in KeyedDataset so masks are reproducible"
            )
        ids = f["input_ids"]
        if np.ndim(ids) != 1 or len(ids) == 0:
            raise ValueError(f"batch example {i}: input_ids must be a non-empty 1-D sequence, got shape {np.shape(ids)}")
        seqs.append(ids)
        keys.append(int(f["mask_key"]))
    flat, lengths = packing.flatten(seqs)
    token_keys = np.repeat(np.array(keys, dtype=np.int64), lengths)
    return flat, token_keys, packing.positions(lengths), lengths


@dataclass
class UnpaddedMLMCollator:
    """Examples ``{"input_ids": [...], "mask_key": k}`` -> one packed MLM batch.

    Returns a dict: ``input_ids`` (T,) int64, ``labels`` (T,) int64, ``cu_seqlens`` (B+1,) int32,
    ``max_seqlen`` int (longest sequence in the batch), ``num_tokens`` int (= T, real tokens) where T is
    the sum of the B sequence lengths, ``masked_rows`` (n,) int64 (the labelled positions,
    :func:`masked_rows`). ``num_tokens`` is bookkeeping for throughput and is removed by the trainer before
    the model is called.
    """

    masker: MLMMasker

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        flat, keys, positions, lengths = _flatten(features)
        ids, labels = self.masker.mask(flat, keys, positions)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "cu_seqlens": torch.from_numpy(packing.cu_seqlens(lengths)),
            "max_seqlen": int(lengths.max()),
            "num_tokens": int(flat.size),
            "masked_rows": masked_rows(labels),
        }


def masked_rows(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n,) int64 indices of the labelled tokens (``labels != IGNORE_INDEX``) of a packed batch, found on the
    host, so that the model's forward need not ask the GPU how many there are (see
    ``MosaicBertForMaskedLM.forward``)."""
    labels = labels.numpy() if torch.is_tensor(labels) else labels
    return torch.from_numpy(np.flatnonzero(labels.reshape(-1) != IGNORE_INDEX).astype(np.int64))


@dataclass
class PaddedMLMCollator:
    """Examples -> a (B, S) MLM batch for models that need padding (transformers' ``BertForMaskedLM``).

    Masks exactly as :class:`UnpaddedMLMCollator` (same keys give the same masks), then pads to the longest
    sequence (rounded up to ``pad_to_multiple_of``). Returns ``input_ids`` (B, S), ``attention_mask`` (B, S),
    ``labels`` (B, S) (-100 on padding) and ``num_tokens`` (real tokens, for throughput).
    """

    masker: MLMMasker
    pad_token_id: int = 0
    pad_to_multiple_of: int | None = 8

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        flat, keys, positions, lengths = _flatten(features)
        ids, labels = self.masker.mask(flat, keys, positions)
        out_ids, valid = packing.pad(ids, lengths, self.pad_token_id, self.pad_to_multiple_of)
        out_labels, _ = packing.pad(labels, lengths, IGNORE_INDEX, self.pad_to_multiple_of)
        return {
            "input_ids": torch.from_numpy(out_ids),
            "attention_mask": torch.from_numpy(valid.astype(np.int64)),
            "labels": torch.from_numpy(out_labels),
            "num_tokens": int(flat.size),
        }


class KeyedDataset(torch.utils.data.Dataset):
    """A token dataset seen for ``epochs`` passes, as one long map-style dataset whose items carry a mask key.

    Index ``k`` is example ``k % len(base)`` of pass ``k // len(base)``; its ``mask_key`` is ``k`` itself,
    so a sample's mask depends only on the masking seed and which pass it belongs to. Used with
    :class:`EpochShuffleSampler`, the whole data order is a pure function of the seed: resuming needs only
    the number of batches already consumed, and ranks that take disjoint batches never overlap.
    """

    def __init__(self, base: Any, epochs: int = 1, column: str = "input_ids"):
        if len(base) == 0:
            raise ValueError("the token dataset is empty")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.base, self.epochs, self.column = base, epochs, column
        self.n = len(base)

    def __len__(self) -> int:
        return self.n * self.epochs

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        return {"input_ids": self.base[int(k % self.n)][self.column], "mask_key": int(k)}


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """Yields the indices of a :class:`KeyedDataset`: pass ``e`` is a permutation of its examples drawn from
    ``torch.Generator().manual_seed(seed + e)``, offset by ``e * n``. Stateless: iterating twice gives the
    same order, so a resumed run skips batches and continues exactly where it stopped."""

    def __init__(self, n: int, epochs: int, seed: int = 0, shuffle: bool = True):
        self.n, self.epochs, self.seed, self.shuffle = n, epochs, seed, shuffle

    def __len__(self) -> int:
        return self.n * self.epochs

    def __iter__(self):
        for e in range(self.epochs):
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + e)
                order = torch.randperm(self.n, generator=g)
            else:
                order = torch.arange(self.n)
            yield from (order + e * self.n).tolist()
