"""MosaicBERT's layers in plain torch, leaf to root, and the one forward body of every model built on them.

Embeddings -> Attention -> MLP (GeGLU or GELU) -> Block (post-LN BERT block) -> Encoder, then
:func:`encode_tokens` (packed or padded input, unpadding) and :class:`MosaicBertInferenceModel`.

Nothing here imports transformers (seconds of imports; the layers read a
:class:`~mosaic_embed.model.architecture.MosaicBertArchitecture`): ``modeling.py`` wraps these layers in
``PreTrainedModel`` classes for training and the Auto classes, while the Encoder loads a saved backbone into
:class:`MosaicBertInferenceModel` (the same submodules and parameter names) with :func:`load_inference_model`,
so ``embed``, ``eval-retrieval``, ``index search`` and ``serve`` start seconds sooner.

Shapes: B batch, S padded length, T real tokens in the batch, H hidden, nh heads, hd head dim, I
intermediate, V vocab, N rows the encoder computes (T when unpadded, B*S on the padded ablation).

Unpadding: padding tokens are dropped before the embedding lookup (equivalent to dropping them right after
it, and cheaper); the whole encoder runs on (T, H) with ``cu_seqlens``; the output is re-padded to
(B, S, H) only where the caller passed a padded batch and needs that shape. Packed callers pass
``input_ids`` (T,) with ``cu_seqlens`` and ``max_seqlen`` and get (T, H) back.

Every attention, GeGLU and residual add + LayerNorm call goes through ``kernels/dispatch.py``, the one
dispatch point (``attn_impl``, ``geglu_impl``, ``layernorm_impl``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packing import cu_seqlens_to_indices, pad_input, unpad_input
from ..kernels.attention import alibi_slopes
from ..kernels.dispatch import add_layer_norm, geglu, padded_attention, varlen_attention
from .architecture import MosaicBertArchitecture


def activation(name: str) -> nn.Module:
    """The activation ``hidden_act`` names: exact GELU (every MosaicBERT and BERT preset) without importing
    transformers' activations module; any other name from it (``ACT2FN``, the mapping transformers' BERT uses)."""
    if name == "gelu":
        return nn.GELU()  # transformers' "gelu" is torch's exact (erf) gelu
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class MosaicBertLayerNorm(nn.LayerNorm):
    """LayerNorm that, with ``low_precision=True`` under an fp16/bf16 autocast, runs in the autocast dtype.

    Autocast computes ``layer_norm`` in fp32 (on CUDA); MosaicBERT runs it in bf16 for speed. Outside
    autocast, or with ``low_precision=False``, this is exactly ``nn.LayerNorm``. :meth:`add_and_norm` is
    ``self(residual + x)`` through the dispatch, which may fuse the add and the norm in one kernel.
    """

    def __init__(self, hidden_size: int, eps: float, low_precision: bool):
        super().__init__(hidden_size, eps=eps)
        self.low_precision = low_precision

    def low_precision_dtype(self, device_type: str) -> torch.dtype | None:
        """The autocast dtype when this norm runs in it now (``low_precision`` under an autocast), else None."""
        if self.low_precision and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = self.low_precision_dtype(device_type)
        if dtype is not None:
            with torch.autocast(device_type, enabled=False):
                return F.layer_norm(
                    x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype), self.eps
                )
        return super().forward(x)

    def fused_dtype(self, x: torch.Tensor, residual: torch.Tensor) -> torch.dtype | None:
        """The dtype ``self(residual + x)`` returns where the fused kernel computes exactly this norm: the
        low-precision dtype, or outside autocast the sum's dtype; None under autocast otherwise (autocast's own
        ``layer_norm`` rule, fp32 on CUDA, is left to autocast: the torch path runs)."""
        device_type = x.device.type
        dtype = self.low_precision_dtype(device_type)
        if dtype is not None:
            return dtype
        if torch.is_autocast_enabled(device_type):
            return None
        return torch.promote_types(x.dtype, residual.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor, impl: str) -> torch.Tensor:
        """``self(residual + x)``, x and residual (..., H); ``impl`` as ``layernorm_impl`` (kernels/dispatch.py)."""
        return add_layer_norm(x, residual, self, impl)


def _layer_norm(config: MosaicBertArchitecture) -> MosaicBertLayerNorm:
    return MosaicBertLayerNorm(config.hidden_size, config.layer_norm_eps, config.low_precision_layernorm)


class MosaicBertEmbeddings(nn.Module):
    """Word + token-type (+ learned position when ``position="learned"``) embeddings, LayerNorm, dropout.

    With ALiBi there are no position embeddings: position enters as an attention bias.
    """

    def __init__(self, config: MosaicBertArchitecture):
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

    def __init__(self, config: MosaicBertArchitecture):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attn_impl = config.impl_for("attention")
        self.layernorm_impl = config.impl_for("layernorm")
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
        return self.norm.add_and_norm(self.dropout(self.out(context)), hidden, self.layernorm_impl)


class MosaicBertMLP(nn.Module):
    """Feed-forward block with residual and post-LN.

    ``mlp="geglu"``: ``(GELU(x W1) * (x V)) W2``; W1 and V are fused in one bias-free Linear ``wi``
    (H -> 2I, first half W1, second half V), as in the original MosaicBERT checkpoints. With exact GELU
    (``hidden_act="gelu"``) the gating goes through the dispatch (``geglu_impl``, which follows ``attn_impl``
    unless set): a fused Triton kernel that reads each byte once in both directions, or the torch expression.
    ``mlp="gelu"``: BERT's ``GELU(x W1 + b1) W2 + b2`` with ``wi`` H -> I. Both end with the residual add +
    LayerNorm of the dispatch (``layernorm_impl``), as the attention does.
    """

    def __init__(self, config: MosaicBertArchitecture):
        super().__init__()
        self.gated = config.mlp == "geglu"
        self.fused_geglu = self.gated and config.hidden_act == "gelu"
        self.geglu_impl = config.impl_for("geglu")
        self.layernorm_impl = config.impl_for("layernorm")
        width = 2 * config.intermediate_size if self.gated else config.intermediate_size
        self.wi = nn.Linear(config.hidden_size, width, bias=not self.gated)
        self.act = activation(config.hidden_act)
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
        return self.norm.add_and_norm(self.dropout(self.wo(inner)), hidden, self.layernorm_impl)


class MosaicBertBlock(nn.Module):
    """One post-LN BERT block: attention then MLP, each with residual and LayerNorm (``modeling.MosaicBertLayer``
    adds transformers' gradient checkpointing to it for training)."""

    def __init__(self, config: MosaicBertArchitecture):
        super().__init__()
        self.attention = MosaicBertAttention(config)
        self.mlp = MosaicBertMLP(config)

    def forward(self, hidden, slopes, cu_seqlens=None, max_seqlen=None, key_padding_mask=None):
        return self.mlp(self.attention(hidden, slopes, cu_seqlens, max_seqlen, key_padding_mask))


class MosaicBertEncoder(nn.Module):
    """The stack of layers; the ALiBi slopes (fp32) are shared by every layer."""

    def __init__(self, config: MosaicBertArchitecture, layer_cls: type[nn.Module] | None = None):
        super().__init__()
        self.use_alibi = config.position == "alibi"
        self.n_heads = config.num_attention_heads
        layer_cls = layer_cls or MosaicBertBlock
        self.layers = nn.ModuleList(layer_cls(config) for _ in range(config.num_hidden_layers))
        # per device, made once: copying them from host memory at every forward is a pageable copy, which
        # waits for the GPU to drain, so the host could never queue the next batch ahead. Not a buffer: a
        # model cast to bf16 would cast it too, and the kernels take fp32 slopes.
        self._slopes: dict[torch.device, torch.Tensor] = {}

    def slopes_on(self, device: torch.device) -> torch.Tensor:
        """(nh,) fp32 ALiBi slopes on ``device``. Inside a torch.compile trace they are made in the graph
        (a constant there), so the cache is neither read nor written while tracing."""
        if torch.compiler.is_compiling():
            return alibi_slopes(self.n_heads).to(device)
        slopes = self._slopes.get(device)
        if slopes is None:
            with torch.inference_mode(False):  # a normal tensor even if first made for inference: training saves it
                slopes = self._slopes[device] = alibi_slopes(self.n_heads).to(device)
        return slopes

    def forward(self, hidden, cu_seqlens=None, max_seqlen=None, key_padding_mask=None, output_hidden_states=False):
        """hidden (T, H) packed or (B, S, H) padded -> (last, tuple of every layer's input and output or None)."""
        slopes = self.slopes_on(hidden.device) if self.use_alibi else None  # (nh,) fp32
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


def encode_tokens(
    model: nn.Module, input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen, output_hidden_states
) -> _Encoded:
    """Run ``model``'s embeddings + encoder in the layout its config asks for (see :class:`_Encoded`).

    ``model``: anything with ``config``, ``embeddings`` and ``encoder`` (:class:`~.modeling.MosaicBertModel`,
    :class:`MosaicBertInferenceModel`): the one body of their forward."""
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
        model.embeddings.check_length(max_seqlen, position_ids)
        total, batch = input_ids.shape[0], cu_seqlens.numel() - 1
        flat_index, positions = cu_seqlens_to_indices(cu_seqlens, max_seqlen, total)  # (T,), (T,)
        if position_ids is None:
            position_ids = positions
        hidden = model.embeddings(input_ids, token_type_ids, position_ids)  # (T, H)
        first_rows = cu_seqlens[:-1].long()  # (B,)
        if model.config.unpad:
            hidden, states = model.encoder(hidden, cu_seqlens, max_seqlen, None, output_hidden_states)
        else:  # padded ablation: pad, run padded, gather the real rows back
            mask = torch.zeros(batch * max_seqlen, dtype=torch.bool, device=input_ids.device)
            mask[flat_index] = True
            padded = pad_input(hidden, flat_index, batch, max_seqlen)  # (B, S, H)
            padded, states = model.encoder(padded, None, None, mask.view(batch, max_seqlen), output_hidden_states)
            hidden = padded.reshape(batch * max_seqlen, -1)[flat_index]  # (T, H)
            if states is not None:
                states = tuple(s.reshape(batch * max_seqlen, -1)[flat_index] for s in states)
        return _Encoded(hidden, None, (total,), first_rows, states)

    if input_ids.dim() != 2:
        raise ValueError(f"padded input: input_ids must be (B, S), got {tuple(input_ids.shape)}")
    batch, seqlen = input_ids.shape
    model.embeddings.check_length(seqlen, position_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if position_ids is None:
        position_ids = torch.arange(seqlen, device=input_ids.device).expand(batch, seqlen)  # (B, S)
    if model.config.unpad:
        ids, indices, cu_seqlens, max_seqlen = unpad_input(input_ids, attention_mask)  # (T,), (T,), (B+1,), int
        types = token_type_ids.reshape(-1)[indices]  # (T,)
        positions = position_ids.reshape(-1)[indices]  # (T,)
        hidden = model.embeddings(ids, types, positions)  # (T, H)
        hidden, states = model.encoder(hidden, cu_seqlens, max_seqlen, None, output_hidden_states)
        return _Encoded(hidden, indices, (batch, seqlen), cu_seqlens[:-1].long(), states)
    mask = attention_mask.bool()
    hidden = model.embeddings(input_ids, token_type_ids, position_ids)  # (B, S, H)
    hidden, states = model.encoder(hidden, None, None, mask, output_hidden_states)
    first_rows = torch.arange(batch, device=hidden.device) * seqlen + mask.int().argmax(dim=1)  # (B,)
    flat = lambda x: x.reshape(batch * seqlen, -1)  # (B, S, H) -> (B*S, H)
    return _Encoded(flat(hidden), None, (batch, seqlen), first_rows,
                    tuple(flat(s) for s in states) if states is not None else None)


@dataclass
class InferenceOutput:
    """What :class:`MosaicBertInferenceModel` returns: the field of ``BaseModelOutput`` the Encoder reads."""

    last_hidden_state: torch.Tensor


class MosaicBertInferenceModel(nn.Module):
    """``MosaicBertModel`` for inference without transformers' ``PreTrainedModel``: the same ``embeddings`` and
    ``encoder`` submodules (so the same saved parameter names) and the same forward body
    (:func:`encode_tokens`); returns only ``last_hidden_state``. Built by :func:`load_inference_model`."""

    def __init__(self, config: MosaicBertArchitecture):
        super().__init__()
        self.config = config
        self.embeddings = MosaicBertEmbeddings(config)
        self.encoder = MosaicBertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> InferenceOutput:
        """As ``MosaicBertModel.forward``: padded (B, S) -> (B, S, H), packed (T,) + cu_seqlens -> (T, H)."""
        enc = encode_tokens(self, input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen,
                            False)
        return InferenceOutput(enc.to_caller(enc.hidden))


@contextlib.contextmanager
def _uninitialized():
    """Build modules without filling their weights, each replaced by a saved tensor right after: the random
    init of a Base model costs about a second on a CPU, and on the meta device it imports torch._dynamo
    (seconds more). torch's modules draw their init from ``torch.nn.init`` at call time."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def load_inference_model(folder: str | Path) -> MosaicBertInferenceModel | None:
    """A saved ``MosaicBertModel`` (config.json + one model.safetensors) as :class:`MosaicBertInferenceModel`,
    its weights in their saved dtype; None when the folder holds anything else (sharded or .bin weights,
    another parameter layout), for the caller to load with ``from_pretrained`` instead."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return None
    config = MosaicBertArchitecture.from_folder(folder)
    with _uninitialized():
        model = MosaicBertInferenceModel(config)
    state = load_file(str(weights))
    expected = set(model.state_dict())
    if set(state) != expected:
        return None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
