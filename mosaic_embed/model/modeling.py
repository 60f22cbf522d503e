"""MosaicBERT (Portes et al., NeurIPS 2023, arXiv 2312.17482) as a transformers model, leaf to root.

Embeddings -> Attention -> MLP (GeGLU or GELU) -> Layer (post-LN BERT block) -> Encoder -> Model,
then the heads: masked-LM (runs only on labelled positions) and sequence classification / regression.

Shapes: B batch, S padded length, T real tokens in the batch, H hidden, nh heads, hd head dim, I
intermediate, V vocab, N rows the encoder computes (T when unpadded, B*S on the padded ablation).

Unpadding: padding tokens are dropped before the embedding lookup (equivalent to dropping them right after
it, and cheaper); the whole encoder runs on (T, H) with ``cu_seqlens``; the output is re-padded to
(B, S, H) only where the caller passed a padded batch and needs that shape. Packed callers pass
``input_ids`` (T,) with ``cu_seqlens`` and ``max_seqlen`` and get (T, H) back.

Every attention and GeGLU call goes through ``kernels/dispatch.py``, the one dispatch point (``attn_impl``,
``geglu_impl``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from ..data.packing import cu_seqlens_to_indices, pad_input, unpad_input
from ..kernels.attention import alibi_slopes
from ..kernels.dispatch import geglu, padded_attention, varlen_attention
from .configuration import MosaicBertConfig


class MosaicBertLayerNorm(nn.LayerNorm):
    """LayerNorm that, with ``low_precision=True`` under an fp16/bf16 autocast, runs in the autocast dtype.

    Autocast computes ``layer_norm`` in fp32; MosaicBERT runs it in bf16 for speed. Outside autocast, or
    with ``low_precision=False``, this is exactly ``nn.LayerNorm``.
    """

    def __init__(self, hidden_size: int, eps: float, low_precision: bool):
        super().__init__(hidden_size, eps=eps)
        self.low_precision = low_precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if self.low_precision and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return F.layer_norm(
                    x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype), self.eps
                )
        return super().forward(x)


def _layer_norm(config: MosaicBertConfig) -> MosaicBertLayerNorm:
    return MosaicBertLayerNorm(config.hidden_size, config.layer_norm_eps, config.low_precision_layernorm)


class MosaicBertEmbeddings(nn.Module):
    """Word + token-type (+ learned position when ``position="learned"``) embeddings, LayerNorm, dropout.

    With ALiBi there are no position embeddings: position enters as an attention bias.
    """

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if config.position == "learned" else None
        )
        self.norm = _layer_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids, token_type_ids, position_ids: (...) of one shape -> (..., H)."""
        hidden = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            hidden = hidden + self.position_embeddings(position_ids)
        return self.dropout(self.norm(hidden))

    def check_length(self, longest: int | None, position_ids: torch.Tensor | None) -> None:
        """Learned positions embed at most ``max_position_embeddings`` positions: an error naming the limit.

        Checked on the host int the caller already has (the longest sequence) when the positions are the
        implicit 0..n-1, so the hot path has no ``.item()``: no device sync, no torch.compile graph break.
        Only positions the caller passed explicitly are read back from the device."""
        if self.position_embeddings is None:
            return
        limit = self.position_embeddings.num_embeddings
        if position_ids is not None:
            longest = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if longest is not None and longest > limit:
            raise ValueError(
                f"position='learned' embeds at most max_position_embeddings={limit} positions; got a "
                f"sequence of {longest} tokens (ALiBi models have no such limit)"
            )


class MosaicBertAttention(nn.Module):
    """Self-attention with one fused Wqkv projection, output projection, dropout, residual, post-LN.

    Runs on packed (T, H) rows with ``cu_seqlens`` (the unpadded model) or on (B, S, H) with a key-padding
    mask (the ``unpad=False`` ablation); both go through kernels/dispatch.py.
    """

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attn_impl = config.attn_impl
        self.attn_dropout = config.attention_probs_dropout_prob
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # rows: [q | k | v], heads inside
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.norm = _layer_norm(config)

    def forward(
        self,
        hidden: torch.Tensor,
        slopes: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (T, H) with cu_seqlens/max_seqlen, or (B, S, H) with key_padding_mask (B, S) -> same shape."""
        dropout_p = self.attn_dropout if self.training else 0.0
        qkv = self.Wqkv(hidden)  # (..., 3H)
        if cu_seqlens is not None:
            qkv = qkv.view(-1, 3, self.n_heads, self.head_dim)  # (T, 3, nh, hd)
            q, k, v = qkv.unbind(dim=1)  # each (T, nh, hd)
            context = varlen_attention(
                q, k, v, cu_seqlens, max_seqlen, slopes, impl=self.attn_impl, dropout_p=dropout_p
            )  # (T, nh, hd)
            context = context.reshape(hidden.shape)  # (T, H)
        else:
            batch, seqlen, _ = hidden.shape
            qkv = qkv.view(batch, seqlen, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, nh, S, hd)
            context = padded_attention(qkv[0], qkv[1], qkv[2], key_padding_mask, slopes, dropout_p)  # (B, nh, S, hd)
            context = context.transpose(1, 2).reshape(hidden.shape)  # (B, S, H)
        return self.norm(hidden + self.dropout(self.out(context)))


class MosaicBertMLP(nn.Module):
    """Feed-forward block with residual and post-LN.

    ``mlp="geglu"``: ``(GELU(x W1) * (x V)) W2``; W1 and V are fused in one bias-free Linear ``wi``
    (H -> 2I, first half W1, second half V), as in the original MosaicBERT checkpoints. With exact GELU
    (``hidden_act="gelu"``) the gating goes through the dispatch (``geglu_impl``, which follows ``attn_impl``
    unless set): a fused Triton kernel that reads each byte once in both directions, or the torch expression.
    ``mlp="gelu"``: BERT's ``GELU(x W1 + b1) W2 + b2`` with ``wi`` H -> I.
    """

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.gated = config.mlp == "geglu"
        self.fused_geglu = self.gated and config.hidden_act == "gelu"
        self.geglu_impl = config.geglu_impl or config.attn_impl
        width = 2 * config.intermediate_size if self.gated else config.intermediate_size
        self.wi = nn.Linear(config.hidden_size, width, bias=not self.gated)
        self.act = ACT2FN[config.hidden_act]
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.norm = _layer_norm(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> (..., H)."""
        inner = self.wi(hidden)  # (..., 2I) or (..., I)
        if self.fused_geglu:
            inner = geglu(inner, self.geglu_impl)  # (..., I)
        elif self.gated:
            gate, value = inner.chunk(2, dim=-1)  # each (..., I)
            inner = self.act(gate) * value
        else:
            inner = self.act(inner)
        return self.norm(hidden + self.dropout(self.wo(inner)))


class MosaicBertLayer(GradientCheckpointingLayer):
    """One post-LN BERT block: attention then MLP, each with residual and LayerNorm."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.attention = MosaicBertAttention(config)
        self.mlp = MosaicBertMLP(config)

    def forward(self, hidden, slopes, cu_seqlens=None, max_seqlen=None, key_padding_mask=None):
        return self.mlp(self.attention(hidden, slopes, cu_seqlens, max_seqlen, key_padding_mask))


class MosaicBertEncoder(nn.Module):
    """The stack of layers; builds the ALiBi slopes once per forward (fp32, on the input's device)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.use_alibi = config.position == "alibi"
        self.n_heads = config.num_attention_heads
        self.layers = nn.ModuleList(MosaicBertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden, cu_seqlens=None, max_seqlen=None, key_padding_mask=None, output_hidden_states=False):
        """hidden (T, H) packed or (B, S, H) padded -> (last, tuple of every layer's input and output or None)."""
        slopes = alibi_slopes(self.n_heads).to(hidden.device) if self.use_alibi else None  # (nh,) fp32
        states = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, slopes, cu_seqlens, max_seqlen, key_padding_mask)
            if states is not None:
                states.append(hidden)
        return hidden, (tuple(states) if states is not None else None)


@dataclass
class _Encoded:
    """The encoder's rows and how to map them back to the caller's layout.

    hidden: (N, H), one row per computed token.
    indices: (N,) positions of the rows in the caller's flattened (B*S) layout, or None when the rows
        already are the caller's layout, flattened.
    shape: the caller's token shape, (B, S) or (T,).
    first_rows: (B,) the row of each sequence's first real token (the [CLS] the pooler reads).
    """

    hidden: torch.Tensor
    indices: torch.Tensor | None
    shape: tuple[int, ...]
    first_rows: torch.Tensor
    all_hidden: tuple[torch.Tensor, ...] | None

    def to_caller(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (*shape, ...), zeros at padding."""
        if self.indices is not None:
            return pad_input(rows, self.indices, *self.shape)
        return rows.reshape(*self.shape, *rows.shape[1:])

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        """A per-token tensor of the caller's shape (e.g. labels) -> (N,) aligned with ``hidden``."""
        if tuple(per_token.shape) != tuple(self.shape):
            raise ValueError(f"expected a per-token tensor of shape {tuple(self.shape)}, got {tuple(per_token.shape)}")
        flat = per_token.reshape(-1)
        return flat[self.indices] if self.indices is not None else flat


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
        self.encoder = MosaicBertEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def _encode(
        self, input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen, output_hidden_states
    ) -> _Encoded:
        """Run embeddings + encoder in the layout the config asks for (see :class:`_Encoded`)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if cu_seqlens is not None:  # packed caller: input_ids (T,)
            if input_ids.dim() != 1 or attention_mask is not None:
                raise ValueError("packed input: pass input_ids (T,) with cu_seqlens and max_seqlen, no attention_mask")
            if max_seqlen is None:
                raise ValueError("packed input: max_seqlen is required with cu_seqlens")
            if cu_seqlens.dtype != torch.int32:
                raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
            max_seqlen = int(max_seqlen)  # a 0-d tensor from a collator works too
            self.embeddings.check_length(max_seqlen, position_ids)
            total, batch = input_ids.shape[0], cu_seqlens.numel() - 1
            flat_index, positions = cu_seqlens_to_indices(cu_seqlens, max_seqlen, total)  # (T,), (T,)
            if position_ids is None:
                position_ids = positions
            hidden = self.embeddings(input_ids, token_type_ids, position_ids)  # (T, H)
            first_rows = cu_seqlens[:-1].long()  # (B,)
            if self.config.unpad:
                hidden, states = self.encoder(hidden, cu_seqlens, max_seqlen, None, output_hidden_states)
            else:  # padded ablation: pad, run padded, gather the real rows back
                mask = torch.zeros(batch * max_seqlen, dtype=torch.bool, device=input_ids.device)
                mask[flat_index] = True
                padded = pad_input(hidden, flat_index, batch, max_seqlen)  # (B, S, H)
                padded, states = self.encoder(padded, None, None, mask.view(batch, max_seqlen), output_hidden_states)
                hidden = padded.reshape(batch * max_seqlen, -1)[flat_index]  # (T, H)
                if states is not None:
                    states = tuple(s.reshape(batch * max_seqlen, -1)[flat_index] for s in states)
            return _Encoded(hidden, None, (total,), first_rows, states)

        if input_ids.dim() != 2:
            raise ValueError(f"padded input: input_ids must be (B, S), got {tuple(input_ids.shape)}")
        batch, seqlen = input_ids.shape
        self.embeddings.check_length(seqlen, position_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=input_ids.device).expand(batch, seqlen)  # (B, S)
        if self.config.unpad:
            ids, indices, cu_seqlens, max_seqlen = unpad_input(input_ids, attention_mask)  # (T,), (T,), (B+1,), int
            types = token_type_ids.reshape(-1)[indices]  # (T,)
            positions = position_ids.reshape(-1)[indices]  # (T,)
            hidden = self.embeddings(ids, types, positions)  # (T, H)
            hidden, states = self.encoder(hidden, cu_seqlens, max_seqlen, None, output_hidden_states)
            return _Encoded(hidden, indices, (batch, seqlen), cu_seqlens[:-1].long(), states)
        mask = attention_mask.bool()
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, S, H)
        hidden, states = self.encoder(hidden, None, None, mask, output_hidden_states)
        first_rows = torch.arange(batch, device=hidden.device) * seqlen + mask.int().argmax(dim=1)  # (B,)
        flat = lambda x: x.reshape(batch * seqlen, -1)  # (B, S, H) -> (B*S, H)
        return _Encoded(flat(hidden), None, (batch, seqlen), first_rows,
                        tuple(flat(s) for s in states) if states is not None else None)

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
    """BERT's MLM head: dense + activation + LayerNorm, then the decoder tied to the word embeddings."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = _layer_norm(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, V)."""
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class MosaicBertForMaskedLM(MosaicBertPreTrainedModel):
    """Encoder + MLM head. With labels the head runs only on labelled positions (labels != -100)."""

    _tied_weights_keys = {"mlm_head.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.bert = MosaicBertModel(config)
        self.mlm_head = MosaicBertMLMHead(config)
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
    ) -> MaskedLMOutput | tuple:
        """Masked-LM logits and loss.

        labels: same shape as input_ids, -100 = not a prediction target. With labels: ``logits`` is
        (n_labelled, V) in row-major order of the labelled positions and ``loss`` the mean cross-entropy
        over them (0 when there are none). Without: ``logits`` (B, S, V) or (T, V) for packed input.
        """
        enc = self.bert._encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen,
                                bool(output_hidden_states))
        loss = None
        if labels is not None:
            targets = enc.gather(labels)  # (N,)
            labelled = targets != -100  # (N,)
            rows = torch.nonzero(labelled, as_tuple=False).flatten()  # (n,)
            logits = self.mlm_head(enc.hidden.index_select(0, rows))  # (n, V)
            targets = targets.index_select(0, rows)
            # The mean over labelled rows written as sum / max(n, 1) with n a tensor: no Python branch on
            # the data-dependent n, so torch.compile (capture_dynamic_output_shape_ops, see
            # train/pretrain.py:compile_in_place) traces the row selection and the loss into the graph.
            # n = 0 gives 0 (a sum over no rows), with a zero gradient, as before.
            n = labelled.sum().clamp(min=1)
            loss = F.cross_entropy(logits, targets, reduction="sum") / n
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


__all__ = [
    "MosaicBertLayerNorm",
    "MosaicBertPreTrainedModel",
    "MosaicBertModel",
    "MosaicBertForMaskedLM",
    "MosaicBertForSequenceClassification",
]
