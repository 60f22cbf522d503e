"""Finetuning steps captured as CUDA graphs over fixed token buckets (MosaicBERT classifiers, packed batches).

Why: a finetuning step of a small encoder on short texts is several hundred small kernels. Launching them
from Python takes longer than the GPU takes to run them (about 20 ms a step at batch 16 on an H200, most of
it host time), so the GPU idles. A CUDA graph replays the whole step, forward, backward and the fused
AdamW update, as one launch.

A graph has fixed shapes and addresses, so every batch is laid out as a packed batch of fixed size
(:func:`static_layout`):

- tokens: the examples' tokens, then filler tokens up to a bucket, a power of two;
- sequences: ``batch_size`` + ``ceil(bucket / max_seqlen)`` in all: the examples, then filler sequences
  that hold the filler tokens, each at most ``max_seqlen`` long (so the attention kernel's grid, sized by
  ``max_seqlen``, covers every query row) and at least one token long (so each has a first row for the head
  to read; a short last batch gets more fillers);
- a label mask: fillers weigh nothing in the loss.

One graph per bucket. The parameters' gradients are made once, by the first step, and zeroed in place
inside each graph, so every graph reads and writes the same gradient and optimizer-state tensors. A
bucket's first batch runs eagerly on a side stream: Triton compiles or tunes kernels for new shapes then,
which a capture cannot do. The bucket's graph is captured after that and replayed for every later batch
of that size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import packing

log = logging.getLogger(__name__)

MIN_BUCKET = 256  # tokens: smaller graphs save nothing measurable, and fewer buckets means fewer captures


@dataclasses.dataclass
class StaticBatch:
    """One batch in the fixed layout of its bucket (host arrays); see the module docstring."""

    bucket: int
    input_ids: np.ndarray  # (bucket,) int64
    token_type_ids: np.ndarray  # (bucket,) int64
    cu_seqlens: np.ndarray  # (n_seqs + 1,) int32
    labels: np.ndarray  # (n_seqs,) int64 class ids or float32 scores; 0 at fillers
    weights: np.ndarray  # (n_seqs,) float32: 1 for examples, 0 for fillers


def _fillers(bucket: int, max_seqlen: int, batch_size: int, n_examples: int) -> int:
    return batch_size - n_examples + -(-bucket // max_seqlen)


def static_layout(seqs: Sequence[Sequence[int]], types: Sequence[Sequence[int]], labels: np.ndarray,
                  batch_size: int, max_seqlen: int, pad_id: int) -> StaticBatch:
    """Lay out ``len(seqs) <= batch_size`` examples (each at most ``max_seqlen`` tokens) in their bucket."""
    n = len(seqs)
    if not 0 < n <= batch_size:
        raise ValueError(f"static_layout: {n} examples for a batch of {batch_size}")
    flat, lengths = packing.flatten(seqs)
    if lengths.max() > max_seqlen:
        raise ValueError(f"static_layout: an example of {int(lengths.max())} tokens exceeds max_seqlen={max_seqlen}")
    real = int(lengths.sum())
    bucket = MIN_BUCKET
    while bucket - real < _fillers(bucket, max_seqlen, batch_size, n):
        bucket *= 2
    n_fill = _fillers(bucket, max_seqlen, batch_size, n)
    spare = bucket - real  # >= n_fill, and <= n_fill * max_seqlen since n_fill >= ceil(bucket / max_seqlen)
    fill = np.full(n_fill, spare // n_fill, dtype=np.int64)
    fill[: spare % n_fill] += 1
    all_lengths = np.concatenate([lengths, fill])
    ids = np.full(bucket, pad_id, dtype=np.int64)
    ids[:real] = flat
    token_types = np.zeros(bucket, dtype=np.int64)
    token_types[:real] = packing.flatten(types)[0]
    padded_labels = np.zeros(n + n_fill, dtype=labels.dtype)
    padded_labels[:n] = labels
    weights = np.zeros(n + n_fill, dtype=np.float32)
    weights[:n] = 1.0
    return StaticBatch(bucket, ids, token_types, packing.cu_seqlens(all_lengths), padded_labels, weights)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, regression: bool) -> torch.Tensor:
    """The runner's loss (cross-entropy, or MSE for regression) as a mean over the rows of weight 1.

    logits (n, C) fp32, labels (n,), weights (n,) -> 0-d. Equal to ``F.cross_entropy`` / ``F.mse_loss`` of
    the examples alone: a sum over rows divided by the number of examples, with no data-dependent shape."""
    if regression:
        per_row = (logits.view(-1) - labels.float()) ** 2
    else:
        per_row = F.cross_entropy(logits, labels, reduction="none")
    return (per_row * weights).sum() / weights.sum()


class _Graph:
    """A bucket's static device inputs, its captured step and the loss tensor the step writes."""

    def __init__(self, batch: StaticBatch, device: torch.device):
        self.inputs = {name: torch.from_numpy(getattr(batch, name)).to(device)
                       for name in ("input_ids", "token_type_ids", "cu_seqlens", "labels", "weights")}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None

    def load(self, batch: StaticBatch) -> None:
        for name, static in self.inputs.items():
            static.copy_(packing.to_device(getattr(batch, name), static.device), non_blocking=True)


class GraphedSteps:
    """Training steps of a MosaicBERT classifier as CUDA graph replays; see the module docstring.

    ``opt`` must be a capturable optimizer (``torch.optim.AdamW(..., capturable=True)``, a tensor ``lr``
    on the device so that a scheduler's updates reach the graphs). :meth:`step` returns the step's loss as a
    device tensor of its own (no sync)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, regression: bool, device: torch.device,
                 dtype: torch.dtype, batch_size: int, max_seqlen: int, pad_id: int):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model, self.opt, self.regression = model, opt, regression
        self.device, self.dtype = device, dtype
        self.batch_size, self.max_seqlen, self.pad_id = batch_size, max_seqlen, pad_id
        self.graphs: dict[int, _Graph] = {}
        self.side = torch.cuda.Stream(device)
        self.failed: str | None = None  # why a capture failed: every later step then runs eagerly

    @property
    def buckets(self) -> list[int]:
        return sorted(self.graphs)

    def _forward_backward_update(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=False)  # in place: every graph shares the gradient tensors
        # The autocast cache holds bf16 copies of the weights made inside a region; a capture must not keep
        # (or later read) tensors made outside its pool, so the cache is off.
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=False):
            out = self.model(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"],
                             cu_seqlens=inputs["cu_seqlens"], max_seqlen=self.max_seqlen)
        logits = (out.logits if hasattr(out, "logits") else out[0]).float()
        loss = weighted_loss(logits, inputs["labels"], inputs["weights"], self.regression)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def step(self, seqs: Sequence[Sequence[int]], types: Sequence[Sequence[int]], labels: np.ndarray) -> torch.Tensor:
        batch = static_layout(seqs, types, labels, self.batch_size, self.max_seqlen, self.pad_id)
        graph = self.graphs.get(batch.bucket)
        if self.failed is not None:
            if graph is None:
                graph = self.graphs[batch.bucket] = _Graph(batch, self.device)
            graph.load(batch)
            return self._forward_backward_update(graph.inputs).clone()
        if graph is not None:
            graph.load(batch)
            graph.graph.replay()
            return graph.loss.clone()  # the next replay overwrites graph.loss
        graph = _Graph(batch, self.device)
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):  # this batch's real step, eagerly: kernels compile/tune for the shape
            loss = self._forward_backward_update(graph.inputs).clone()
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        self.graphs[batch.bucket] = graph
        try:
            graph.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph.graph):  # recorded, not run: the step above already trained on the batch
                graph.loss = self._forward_backward_update(graph.inputs)
        except RuntimeError as e:  # nothing recorded has run: the model and optimizer are as the eager step left them
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log.warning("CUDA graph capture failed (%s); the remaining steps run eagerly", self.failed)
            for g in self.graphs.values():
                g.graph, g.loss = None, None
            return loss
        log.info("captured a finetuning step for %d-token batches (%d graphs)", batch.bucket, len(self.graphs))
        return loss

    def summary(self) -> dict:
        """What ran: the buckets (tokens per captured batch) and, if a capture failed, why."""
        return {"buckets": self.buckets, "failed": self.failed}


__all__ = ["GraphedSteps", "StaticBatch", "static_layout", "weighted_loss"]
