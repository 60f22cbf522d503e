"""MosaicBERT (Portes et al., NeurIPS 2023, arXiv 2312.17482) as transformers models: the encoder, then the
heads: masked-LM (runs only on labelled positions; in training its decoder and loss go through the dispatch's
``mlm_loss``, fused on the triton path) and sequence classification / regression.

The layers and the one forward body live in ``blocks.py`` (plain torch); here they become ``PreTrainedModel``
classes (weight init, saving, the Auto classes, gradient checkpointing).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from ..kernels.dispatch import mlm_loss
from .blocks import (
    MosaicBertBlock,
    MosaicBertEmbeddings,
    MosaicBertEncoder,
    _Encoded,
    _layer_norm,
    activation,
    encode_tokens,
)
from .configuration import MosaicBertConfig


class MosaicBertLayer(GradientCheckpointingLayer, MosaicBertBlock):
    """:class:`~.blocks.MosaicBertBlock` with transformers' gradient checkpointing (``gradient_checkpointing_enable``)."""



class MosaicBertPreTrainedModel(PreTrainedModel):
    """Weight init (BERT's: normal(0, initializer_range), zero biases, unit LayerNorms) and HF plumbing."""

    config_class = MosaicBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MosaicBertLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear, Embedding (zero padding row), *LayerNorm*


class MosaicBertModel(MosaicBertPreTrainedModel):
    """The MosaicBERT encoder: embeddings + layers, no pooler (the classification head owns it)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.embeddings = MosaicBertEmbeddings(config)
        self.encoder = MosaicBertEncoder(config, MosaicBertLayer)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def _encode(
        self, input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen, output_hidden_states
    ) -> _Encoded:
        return encode_tokens(self, input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen,
                             output_hidden_states)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        """Encode a padded batch or a packed one.

        Padded: input_ids, attention_mask, token_type_ids (B, S) -> last_hidden_state (B, S, H), zeros at
        padding. Packed: input_ids (T,), cu_seqlens (B+1,) int32, max_seqlen int -> (T, H).
        ``position_ids`` matter only with ``position="learned"`` (default: 0.. within each sequence).
        ``hidden_states`` (when asked) are the embeddings and every layer's output, in the caller's layout.
        """
        if output_attentions:
            raise ValueError("MosaicBERT does not return attention probabilities (fused attention never forms them)")
        enc = self._encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen,
                           bool(output_hidden_states))
        out = BaseModelOutput(
            last_hidden_state=enc.to_caller(enc.hidden),
            hidden_states=tuple(enc.to_caller(s) for s in enc.all_hidden) if enc.all_hidden is not None else None,
        )
        return out if return_dict is not False else out.to_tuple()


class MosaicBertMLMHead(nn.Module):
    """BERT's MLM head: dense + activation + LayerNorm (:meth:`transform`), then the decoder tied to the word
    embeddings. The two halves are apart so that training can fuse the decoder with the loss."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.norm = _layer_norm(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, H): dense + activation + LayerNorm, the decoder's input."""
        return self.norm(self.act(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, V)."""
        return self.decoder(self.transform(hidden))


class MosaicBertForMaskedLM(MosaicBertPreTrainedModel):
    """Encoder + MLM head. With labels the head runs only on labelled positions (labels != -100)."""

    _tied_weights_keys = {"mlm_head.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.bert = MosaicBertModel(config)
        self.mlm_head = MosaicBertMLMHead(config)
        self.mlm_loss_impl = config.impl_for("mlm_loss")
        self.post_init()

    def get_output_embeddings(self):
        return self.mlm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.mlm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        return_logits: bool | None = None,
        masked_rows: torch.Tensor | None = None,
    ) -> MaskedLMOutput | tuple:
        """Masked-LM logits and loss.

        labels: same shape as input_ids, -100 = not a prediction target. With labels, ``loss`` is the mean
        cross-entropy over the labelled positions (0 when there are none) and ``logits``, when formed, is
        (n_labelled, V) in row-major order of the labelled positions. Without: ``logits`` (B, S, V) or (T, V)
        for packed input.

        return_logits (with labels): whether ``logits`` is formed and returned. None (default): in eval mode
        only (validation reads them for its accuracy). Otherwise the loss goes through the dispatch's
        ``mlm_loss`` (``config.mlm_loss_impl``; on the triton path the decoder matmul and the cross-entropy
        run fused in chunks and the (n, V) logits never exist) and ``logits`` is None, whichever path runs,
        so that a caller's code does not depend on the kernel choice. True: the decoder, then
        ``F.cross_entropy`` (the reference computation), in training too.

        masked_rows (packed input with labels): the (n,) int64 indices where ``labels.flatten() != -100``, as
        the packed collator computes them on the host. Without them the forward finds the rows on the device
        (``nonzero``), whose count the host must read back: a sync in the middle of every step, after which the
        GPU idles until the host has queued work again. With them nothing in the step waits on the GPU.
        """
        enc = self.bert._encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen,
                                bool(output_hidden_states))
        loss = None
        if labels is not None:
            targets = enc.gather(labels)  # (N,)
            if masked_rows is not None:
                if enc.indices is not None:  # the rows are a subset of the caller's tokens: indices differ
                    raise ValueError("masked_rows: only for packed input (input_ids (T,) with cu_seqlens) or "
                                     "unpad=False; the padded batch of an unpadding model has other row indices")
                rows = masked_rows  # (n,) from the host: its size is known without asking the GPU
            else:
                rows = torch.nonzero(targets != -100, as_tuple=False).flatten()  # (n,)
            hidden = self.mlm_head.transform(enc.hidden.index_select(0, rows))  # (n, H)
            targets = targets.index_select(0, rows)  # (n,)
            n = (targets != -100).sum().clamp(min=1)
            # The mean over labelled rows written as sum / max(n, 1) with n a tensor: no Python branch on
            # the data-dependent n, so torch.compile (capture_dynamic_output_shape_ops, see
            # train/pretrain.py:compile_in_place) traces the row selection and the loss into the graph (the
            # fused loss is one custom op taking the (n, H) rows with n unbacked). n = 0 gives 0 (a sum over
            # no rows), with a zero gradient. The branch below is on the module's mode and an argument,
            # static facts that torch.compile guards on, never on data.
            if return_logits if return_logits is not None else not self.training:
                logits = self.mlm_head.decoder(hidden)  # (n, V)
                loss = F.cross_entropy(logits, targets, reduction="sum") / n
            else:
                logits = None
                decoder = self.mlm_head.decoder
                loss = mlm_loss(hidden, decoder.weight, decoder.bias, targets, self.mlm_loss_impl) / n
        else:
            logits = enc.to_caller(self.mlm_head(enc.hidden))  # (B, S, V) | (T, V)
        hidden_states = tuple(enc.to_caller(s) for s in enc.all_hidden) if enc.all_hidden is not None else None
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states)
        return out if return_dict is not False else out.to_tuple()


class MosaicBertForSequenceClassification(MosaicBertPreTrainedModel):
    """Encoder + [CLS] pooler (dense + tanh) + dropout + linear classifier.

    ``num_labels == 1``: regression (MSE); else single-label cross-entropy, or multi-label BCE when
    ``config.problem_type == "multi_label_classification"``. Loading an MLM checkpoint with
    ``from_pretrained(dir, num_labels=N)`` takes the encoder and initializes pooler and classifier fresh.
    """

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        drop = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput | tuple:
        """logits (B, num_labels) from each sequence's first token; loss when labels (B,) are given."""
        enc = self.bert._encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen,
                                bool(output_hidden_states))
        cls_rows = enc.hidden.index_select(0, enc.first_rows)  # (B, H)
        pooled = torch.tanh(self.pooler(cls_rows))  # (B, H)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1)) if self.num_labels == 1 \
                    else F.mse_loss(logits, labels.to(logits.dtype))
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        hidden_states = tuple(enc.to_caller(s) for s in enc.all_hidden) if enc.all_hidden is not None else None
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)
        return out if return_dict is not False else out.to_tuple()


# transformers.modeling_layers (imported above) imports the AutoModel module, whose import hook
# (mosaic_embed/__init__.py) ran while this module was half-built and left the registration to here. Looked up
# on the package rather than imported: a copy of this file in a model folder (remote code) has no such hook.
LOADED = True
_register = getattr(sys.modules.get(__name__.rpartition(".")[0]), "register_models", None)
if _register is not None and "transformers.models.auto.modeling_auto" in sys.modules:
    _register()

__all__ = [
    "MosaicBertLayer",
    "MosaicBertPreTrainedModel",
    "MosaicBertModel",
    "MosaicBertForMaskedLM",
    "MosaicBertForSequenceClassification",
]
