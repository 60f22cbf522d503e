"""MosaicBERT's fields, defaults, validation and kernel choices, without transformers (arXiv 2312.17482).

:class:`MosaicBertArchitecture` is what the layers in ``blocks.py`` read. ``MosaicBertConfig``
(``configuration.py``) is this class under transformers' ``PretrainedConfig``, for training, saving and the
Auto classes; the Encoder builds a saved backbone from :meth:`MosaicBertArchitecture.from_folder` instead, so
``embed``, ``eval-retrieval``, ``index search`` and ``serve`` never import transformers (about a second of
start-up per process, more on hosts where transformers scans the installed distributions at import).

The defaults are MosaicBERT-Base (transformers' convention: ``MosaicBertConfig()`` is the base model):
hidden 768, 12 layers, 12 heads, GeGLU intermediate 3072, ALiBi, unpadding, vocab 30,528 (BERT's 30,522
padded to a multiple of 64). With ``position="learned"``, ``mlp="gelu"``, ``unpad=False``,
``low_precision_layernorm=False`` the model is architecturally BERT.

This file imports only the standard library, so it travels as-is into a remote-code model folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

MODEL_TYPE = "mosaic_bert"
POSITIONS = ("alibi", "learned")
MLPS = ("geglu", "gelu")
ATTN_IMPLS = ("auto", "torch", "triton")
VOCAB_MULTIPLE = 64


# kw_only: transformers' configs are keyword-only dataclasses; repr/eq off: PretrainedConfig's own serve the
# subclass (a generated __repr__ here would come first in its method order).
@dataclass(kw_only=True, repr=False, eq=False)
class MosaicBertArchitecture:
    """The fields of a MosaicBERT network; validated on construction.

    Fields beyond BERT's:
        position: ``"alibi"`` (no position embeddings; per-head linear distance bias in attention, so the
            model runs at lengths beyond ``max_position_embeddings``) or ``"learned"`` (BERT's absolute
            position embeddings, limited to ``max_position_embeddings`` tokens).
        mlp: ``"geglu"`` (``(GELU(x W1) * (x V)) W2``, W1|V fused in one bias-free Linear of width
            ``2 * intermediate_size``) or ``"gelu"`` (BERT's ``GELU(x W1 + b1) W2 + b2``).
        unpad: drop padding tokens before the encoder and run it on ``(total_tokens, hidden)`` with
            ``cu_seqlens``; ``False`` is the padded ablation (attention with a key-padding mask).
        low_precision_layernorm: under a bf16/fp16 autocast, run LayerNorm in the autocast dtype
            instead of the fp32 that autocast picks for ``layer_norm``.
        attn_impl: ``"torch"`` (exact reference: SDPA with an additive ALiBi bias, CPU and GPU),
            ``"triton"`` (the fused varlen ALiBi kernel; CUDA only, fp16/bf16, no attention dropout) or
            ``"auto"`` (triton for fp16/bf16 CUDA inputs when Triton is installed, otherwise torch).
            The path that runs is logged once; asking for triton where it cannot run is an error.
        geglu_impl: the same choice for the fused GeGLU kernel; ``None`` (default) follows ``attn_impl``,
            so ``attn_impl="torch"`` is the exact reference path end to end. Both are resolved by
            ``kernels/dispatch.py``.
        mlm_loss_impl: the same choice for the masked-LM loss in training: ``"triton"`` fuses the decoder
            matmul with the cross-entropy in chunks (``kernels/linear_cross_entropy.py``: the (n, V) logits
            are never kept whole, so the training forward returns no logits), ``"torch"`` forms the logits
            and calls ``F.cross_entropy``; ``None`` (default) is ``"torch"``: a whole compiled MosaicBERT-Base
            pretraining step ran 0.88x as fast with the fused loss, at the same peak memory (H200,
            ``benchmarks/results/pretrain_kernels.json``), so it is opt-in. Evaluation (or
            ``return_logits=True``) always forms the logits.
        layernorm_impl: the same choice for the fused residual add + LayerNorm that ends each sublayer
            (``kernels/layernorm.py``). Its ``"auto"`` is the kernel on CUDA in eager mode and the torch
            expression under torch.compile, which Inductor already fuses (with the dropout before it); the
            kernel runs only where it matches the module exactly (``low_precision_layernorm`` under autocast,
            or outside autocast). ``None`` (default) is ``"torch"`` when ``attn_impl="torch"`` (the reference
            end to end) and ``"auto"`` otherwise: forcing the attention kernel says nothing about replacing
            Inductor's fusion. See :meth:`impl_for`.
    """

    model_type: ClassVar[str] = MODEL_TYPE

    vocab_size: int = 30528
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True
    position: str = "alibi"
    mlp: str = "geglu"
    unpad: bool = True
    low_precision_layernorm: bool = True
    attn_impl: str = "auto"
    geglu_impl: str | None = None
    mlm_loss_impl: str | None = None
    layernorm_impl: str | None = None

    def __post_init__(self, **kwargs):
        self._validate()
        parent = getattr(super(), "__post_init__", None)  # PretrainedConfig's, under MosaicBertConfig
        if parent is not None:
            parent(**kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path) -> MosaicBertArchitecture:
        """The architecture saved in ``folder/config.json`` by ``MosaicBertConfig.save_pretrained``: its fields,
        the keys transformers adds (``architectures``, ``dtype``, ...) ignored, as ``from_pretrained`` keeps
        them aside. A config of another model type is an error naming the file."""
        path = Path(folder) / "config.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file (a saved MosaicBERT model folder has one)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a JSON model configuration ({e})") from None
        if not isinstance(saved, dict) or saved.get("model_type") != MODEL_TYPE:
            found = saved.get("model_type") if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"{path}: model_type {found!r} is not {MODEL_TYPE!r}: not a MosaicBERT checkpoint")
        names = {f.name for f in fields(MosaicBertArchitecture)}
        try:
            return MosaicBertArchitecture(**{k: v for k, v in saved.items() if k in names})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def _validate(self) -> None:
        def fail(field: str, msg: str):
            raise ValueError(f"{type(self).__name__}.{field}: {msg} (got {getattr(self, field)!r})")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(field, "must be a positive integer")
        if self.vocab_size % VOCAB_MULTIPLE:
            fail("vocab_size", f"must be a multiple of {VOCAB_MULTIPLE} (pad the tokenizer's size up, "
                 "e.g. 30522 -> 30528, with mosaic_embed.data.tokenizer.padded_vocab_size)")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                fail(field, "must be a probability in [0, 1)")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            fail("classifier_dropout", "must be None or a probability in [0, 1)")
        if not self.layer_norm_eps > 0:
            fail("layer_norm_eps", "must be > 0")
        if self.position not in POSITIONS:
            fail("position", f"must be one of {POSITIONS}")
        if self.mlp not in MLPS:
            fail("mlp", f"must be one of {MLPS}")
        if self.attn_impl not in ATTN_IMPLS:
            fail("attn_impl", f"must be one of {ATTN_IMPLS}")
        if self.geglu_impl is not None and self.geglu_impl not in ATTN_IMPLS:
            fail("geglu_impl", f"must be None (follow attn_impl) or one of {ATTN_IMPLS}")
        if self.mlm_loss_impl is not None and self.mlm_loss_impl not in ATTN_IMPLS:
            fail("mlm_loss_impl", f"must be None (torch) or one of {ATTN_IMPLS}")
        if self.layernorm_impl is not None and self.layernorm_impl not in ATTN_IMPLS:
            fail("layernorm_impl", f"must be None (torch with attn_impl='torch', else auto) or one of {ATTN_IMPLS}")
        for field in ("unpad", "low_precision_layernorm"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "must be true or false")
        if not self.unpad and self.attn_impl == "triton":
            fail("attn_impl", "'triton' needs unpad=True (the padded ablation runs the torch path)")
        if self.attn_impl == "triton" and self.attention_probs_dropout_prob > 0:
            fail("attn_impl", "'triton' has no attention dropout; set attention_probs_dropout_prob=0 "
                 "or attn_impl='torch'")

    def impl_for(self, kernel: str) -> str:
        """The implementation asked of ``kernel`` ("attention" | "geglu" | "mlm_loss" | "layernorm"), the unset
        fields filled in (``geglu_impl`` follows ``attn_impl``; ``mlm_loss_impl`` is "torch"; ``layernorm_impl``
        is "torch" with ``attn_impl="torch"``, else "auto"); ``kernels/dispatch.py`` turns it into the path that
        runs."""
        if kernel == "attention":
            return self.attn_impl
        if kernel == "geglu":
            return self.geglu_impl or self.attn_impl
        if kernel == "mlm_loss":
            return self.mlm_loss_impl or "torch"  # the fused loss measured slower in a whole step: opt-in
        if kernel == "layernorm":
            if self.layernorm_impl is not None:
                return self.layernorm_impl
            return "torch" if self.attn_impl == "torch" else "auto"
        raise ValueError(f"unknown kernel {kernel!r}")


__all__ = ["MODEL_TYPE", "MosaicBertArchitecture"]
