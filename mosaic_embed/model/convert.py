"""Load original MosaicBERT checkpoints (mosaicml/examples ``bert_layers.py``), and transformers BERT
checkpoints, into this package's model.

Two converters:

- :func:`convert_checkpoint` (``mosaic-embed convert --checkpoint``): an original MosaicBERT weight file;
- :func:`convert_hf` (``mosaic-embed convert --from-hf``): a transformers BERT-family folder (``BertModel``,
  ``BertForMaskedLM``, ``BertForPreTraining``) or a sentence-transformers folder around one (e.g.
  all-MiniLM-L6-v2) becomes a MosaicBERT in BERT mode (learned positions, GELU MLP, fp32 LayerNorm),
  unpadded, so it runs the packed varlen path; see :func:`convert_hf` for the mapping.

Original MosaicBERT checkpoints:

The original parameter names map one to one onto ours; shapes are identical (fused ``Wqkv`` with rows
[q | k | v]; bias-free ``gated_layers`` with rows [W1 | V], the GeGLU of ``mlp="geglu"``):

==========================================================  ==========================================
original (``bert_layers.py``)                               ours (``modeling.py``)
==========================================================  ==========================================
bert.embeddings.word_embeddings.weight                      bert.embeddings.word_embeddings.weight
bert.embeddings.token_type_embeddings.weight                bert.embeddings.token_type_embeddings.weight
bert.embeddings.LayerNorm.{weight,bias}                     bert.embeddings.norm.*
bert.encoder.layer.N.attention.self.Wqkv.{weight,bias}      bert.encoder.layers.N.attention.Wqkv.*
bert.encoder.layer.N.attention.output.dense.*               bert.encoder.layers.N.attention.out.*
bert.encoder.layer.N.attention.output.LayerNorm.*           bert.encoder.layers.N.attention.norm.*
bert.encoder.layer.N.mlp.gated_layers.weight                bert.encoder.layers.N.mlp.wi.weight
bert.encoder.layer.N.mlp.wo.*                               bert.encoder.layers.N.mlp.wo.*
bert.encoder.layer.N.mlp.layernorm.*                        bert.encoder.layers.N.mlp.norm.*
cls.predictions.transform.dense.*                           mlm_head.dense.*
cls.predictions.transform.LayerNorm.*                       mlm_head.norm.*
cls.predictions.decoder.weight                              (tied to the word embeddings; checked equal)
cls.predictions.decoder.bias                                mlm_head.decoder.bias
bert.pooler.dense.*                                         pooler.*
classifier.*                                                classifier.*
==========================================================  ==========================================

The head follows the keys: ``classifier.*`` -> :class:`MosaicBertForSequenceClassification` (num_labels
from its shape), ``cls.*`` -> :class:`MosaicBertForMaskedLM`, otherwise :class:`MosaicBertModel`.
A Composer checkpoint nests the state dict under ``["state"]["model"]`` with a ``model.`` prefix; both are
removed. Keys of any other architecture are an error that lists the missing and unexpected keys.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..artifacts import read_json
from .configuration import MosaicBertConfig
from .modeling import MosaicBertForMaskedLM, MosaicBertForSequenceClassification, MosaicBertModel

_LAYER = r"bert\.encoder\.layer\.(\d+)\."
_OURS = r"bert.encoder.layers.\1."
_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"bert\.embeddings\.(word_embeddings|token_type_embeddings)\.weight", r"bert.embeddings.\1.weight"),
        (r"bert\.embeddings\.LayerNorm\.(weight|bias)", r"bert.embeddings.norm.\1"),
        (_LAYER + r"attention\.self\.Wqkv\.(weight|bias)", _OURS + r"attention.Wqkv.\2"),
        (_LAYER + r"attention\.output\.dense\.(weight|bias)", _OURS + r"attention.out.\2"),
        (_LAYER + r"attention\.output\.LayerNorm\.(weight|bias)", _OURS + r"attention.norm.\2"),
        (_LAYER + r"mlp\.gated_layers\.weight", _OURS + r"mlp.wi.weight"),
        (_LAYER + r"mlp\.wo\.(weight|bias)", _OURS + r"mlp.wo.\2"),
        (_LAYER + r"mlp\.layernorm\.(weight|bias)", _OURS + r"mlp.norm.\2"),
        (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"mlm_head.dense.\1"),
        (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.norm.\1"),
        (r"cls\.predictions\.decoder\.(weight|bias)", r"mlm_head.decoder.\1"),
        (r"bert\.pooler\.dense\.(weight|bias)", r"pooler.\1"),
        (r"classifier\.(weight|bias)", r"classifier.\1"),
    ]
]
# Buffers some exports carry; they hold no learned values.
_IGNORED = re.compile(r"bert\.embeddings\.(token_type_ids|position_ids)")
_TIED = "mlm_head.decoder.weight"


def load_original_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pt``/``.bin`` (plain or a Composer checkpoint).

    Pickled files are read with ``torch.load(weights_only=True)`` unless ``trust_pickle`` (Composer
    checkpoints pickle Composer objects beside the weights; only unpickle files you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    elif path.suffix in (".pt", ".bin", ".pth", ".ckpt"):
        _check_torch_save_format(path)  # garbage must not be answered with "pass --trust-pickle"
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as err:  # torch raises UnpicklingError (and others) for non-tensor pickles
            if trust_pickle:
                raise ValueError(f"{path}: cannot read checkpoint ({err})") from None
            raise ValueError(
                f"{path}: holds pickled objects beyond tensors (a Composer checkpoint?); if you trust the file, "
                f"pass trust_pickle=True / --trust-pickle ({type(err).__name__})"
            ) from None
    else:
        raise ValueError(f"{path}: unknown checkpoint suffix {path.suffix!r} (.safetensors, .pt, .bin, .pth, .ckpt)")
    return _unwrap(obj, path)


def _check_torch_save_format(path: Path) -> None:
    """``torch.save`` writes a zip archive (or, in the legacy format, a pickle starting with the PROTO
    opcode 0x80); anything else (an empty, truncated-to-nothing or unrelated file) is not a checkpoint."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(1)
    if not head:
        raise ValueError(f"{path}: empty file, not a checkpoint")
    if head != b"\x80" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")


def _unwrap(obj, path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state"), Mapping) and "model" in obj["state"]:
        obj = obj["state"]["model"]  # Composer
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: no state dict found (expected a mapping of parameter names to tensors)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: entries that are not tensors: {not_tensors[:10]}")
    if all(k.startswith("model.") for k in obj):
        obj = {k[len("model."):]: v for k, v in obj.items()}
    return dict(obj)


def _limited(keys, limit=25) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: MosaicBertConfig
) -> MosaicBertModel | MosaicBertForMaskedLM | MosaicBertForSequenceClassification:
    """Build the model the keys call for and load the renamed original weights into it.

    Raises:
        ValueError listing missing and unexpected keys (another architecture, another layer count, a
        missing head) or the parameters whose shapes differ from ``config``.
    """
    renamed, unexpected = {}, []
    for key, value in state_dict.items():
        if _IGNORED.fullmatch(key):
            continue
        for pattern, replacement in _RENAMES:
            if pattern.fullmatch(key):
                renamed[pattern.sub(replacement, key)] = value
                break
        else:
            unexpected.append(key)

    if "classifier.weight" in renamed:
        config = copy.deepcopy(config)
        config.num_labels = renamed["classifier.weight"].shape[0]  # resets id2label/label2id to match
        model = MosaicBertForSequenceClassification(config)
    elif any(k.startswith("mlm_head.") for k in renamed):
        model = MosaicBertForMaskedLM(config)
    else:
        model = MosaicBertModel(config)
        renamed = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in renamed.items()}

    if _TIED in renamed and isinstance(model, MosaicBertForMaskedLM):
        decoder = renamed.pop(_TIED)
        embeddings = renamed.get("bert.embeddings.word_embeddings.weight")
        if embeddings is not None and not torch.equal(decoder, embeddings):
            raise ValueError("cls.predictions.decoder.weight differs from the word embeddings: an untied decoder "
                             "is not MosaicBERT's (tie_word_embeddings)")
    expected = model.state_dict()
    tied = {_TIED} if isinstance(model, MosaicBertForMaskedLM) else set()
    missing = [k for k in expected if k not in renamed and k not in tied]
    unexpected += [k for k in renamed if k not in expected]
    if missing or unexpected:
        hf = any(".attention.self.query." in k for k in unexpected)
        raise ValueError(
            f"not a MosaicBERT checkpoint for this config ({config.num_hidden_layers} layers, mlp={config.mlp}, "
            f"position={config.position}): missing keys [{_limited(missing)}]; unexpected keys "
            f"[{_limited(unexpected)}]"
            + ("; this looks like a transformers BERT: convert its folder with --from-hf" if hf else "")
        )
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in renamed.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError("shape mismatch with the config: " + "; ".join(wrong[:10]))
    model.load_state_dict(renamed, strict=False)  # strict=False only because the tied decoder weight is implied
    return model


def resolve_config(config: str | Path | MosaicBertConfig) -> MosaicBertConfig:
    """A preset name, a config.json (or a folder holding one), or a config object."""
    if isinstance(config, MosaicBertConfig):
        return config
    from .presets import PRESETS, preset_config

    if str(config) in PRESETS:
        return preset_config(str(config))
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
    if path.is_file():
        # read this very file (a folder's config.json only when a folder is given), never a default config
        data = read_json(path, "a JSON config file")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON config file (expected an object)")
        if data.get("model_type", MosaicBertConfig.model_type) != MosaicBertConfig.model_type:
            raise ValueError(f"{path}: model_type {data['model_type']!r} is not {MosaicBertConfig.model_type!r}")
        return MosaicBertConfig.from_dict(data)
    raise ValueError(f"config {config!r}: not a preset ({', '.join(sorted(PRESETS))}) and not a config path")


def convert_checkpoint(
    checkpoint: str | Path,
    config: str | Path | MosaicBertConfig = "mosaic-bert-base",
    out_dir: str | Path | None = None,
    trust_pickle: bool = False,
):
    """Convert an original MosaicBERT checkpoint file; save it with ``save_pretrained`` when ``out_dir``.

    Returns the loaded model (``MosaicBertForMaskedLM``, ``...ForSequenceClassification`` or ``MosaicBertModel``).
    The output folder also gets a ``manifest.json`` (stage "convert", input path and hash).
    """
    import time

    from ..artifacts import atomic_directory, sha256_file, write_manifest

    start = time.perf_counter()
    cfg = resolve_config(config)
    try:
        model = convert_state_dict(load_original_checkpoint(checkpoint, trust_pickle), cfg)
    except ValueError as err:
        if str(checkpoint) in str(err):
            raise
        raise ValueError(f"{checkpoint}: {err}") from None  # name the file: key/shape errors do not
    if out_dir is not None:
        with atomic_directory(out_dir) as tmp:
            model.save_pretrained(tmp)
            write_manifest(
                tmp, "convert", config=None,
                inputs={"checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint)}},
                outputs={"model_class": type(model).__name__, "parameters": model.num_parameters()},
                timings={"convert_s": round(time.perf_counter() - start, 3)},
                model_config=model.config.to_dict(),
            )
    return model


# ----------------------------------------------------------------------------------------------------------
# transformers BERT -> MosaicBERT in BERT mode
# ----------------------------------------------------------------------------------------------------------

#: The decoder bias of the vocabulary rows added by padding to a multiple of 64: no token maps to them and
#: their embeddings are zero, so with this bias they take no probability mass (exp(-1e4) is 0 in fp32) and
#: the MLM loss over the padded vocabulary equals the source model's.
PADDED_ROW_BIAS = -1.0e4

HF_MODEL_TYPES = ("bert",)


def check_bert_model_type(model_type: str | None) -> None:
    """A ValueError naming ``model_type`` unless it is one :func:`convert_hf` takes."""
    if model_type not in HF_MODEL_TYPES:
        hint = " (already MosaicBERT: nothing to convert)" if model_type == MosaicBertConfig.model_type else ""
        raise ValueError(f"model_type {model_type!r} is not a BERT checkpoint{hint}; --from-hf converts "
                         f"{', '.join(HF_MODEL_TYPES)} models (BertModel, BertForMaskedLM, BertForPreTraining)")


def bert_mode_config(source: Any) -> MosaicBertConfig:
    """The MosaicBERT config that is architecturally the transformers ``BertConfig`` ``source``.

    Sizes, activation, LayerNorm eps, position table and dropout come from ``source``; the vocabulary is
    padded to a multiple of 64. Attention dropout is 0, MosaicBERT's recipe (the fused kernel has none; a
    BERT with attention dropout would otherwise train on the slow torch path); inference is unaffected.
    Raises ValueError for what BERT mode cannot express (relative positions, a decoder).
    """
    from ..data.tokenizer import padded_vocab_size

    check_bert_model_type(getattr(source, "model_type", None))
    position = getattr(source, "position_embedding_type", "absolute") or "absolute"
    if position != "absolute":
        raise ValueError(f"position_embedding_type {position!r}: only absolute (learned) positions map onto "
                         "MosaicBERT's position='learned'")
    if getattr(source, "is_decoder", False) or getattr(source, "add_cross_attention", False):
        raise ValueError("a BERT decoder (is_decoder / add_cross_attention) is not an encoder checkpoint")
    return MosaicBertConfig(
        vocab_size=padded_vocab_size(source.vocab_size),
        hidden_size=source.hidden_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        intermediate_size=source.intermediate_size,
        hidden_act=source.hidden_act,
        hidden_dropout_prob=source.hidden_dropout_prob,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=source.max_position_embeddings,
        type_vocab_size=source.type_vocab_size,
        initializer_range=source.initializer_range,
        layer_norm_eps=source.layer_norm_eps,
        pad_token_id=source.pad_token_id if source.pad_token_id is not None else 0,
        position="learned",
        mlp="gelu",
        unpad=True,
        low_precision_layernorm=False,
        attn_impl="auto",
    )


def _pad_rows(weight: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    """(V, ...) -> (rows, ...), the added rows set to ``fill``."""
    out = weight.new_full((rows, *weight.shape[1:]), fill)
    out[: weight.shape[0]] = weight
    return out


def bert_state_dict_to_mosaic(sd: Mapping[str, torch.Tensor], config: MosaicBertConfig, mlm: bool
                              ) -> dict[str, torch.Tensor]:
    """transformers BERT parameter names (``bert.`` prefix as in ``BertForMaskedLM``) -> ours.

    ==========================================================  =============================================
    transformers                                                ours
    ==========================================================  =============================================
    bert.embeddings.{word,position,token_type}_embeddings       bert.embeddings.* (word rows padded with 0)
    bert.embeddings.LayerNorm.*                                 bert.embeddings.norm.*
    bert.encoder.layer.N.attention.self.{query,key,value}.*     bert.encoder.layers.N.attention.Wqkv.* [q|k|v]
    bert.encoder.layer.N.attention.output.dense.*               bert.encoder.layers.N.attention.out.*
    bert.encoder.layer.N.attention.output.LayerNorm.*           bert.encoder.layers.N.attention.norm.*
    bert.encoder.layer.N.intermediate.dense.*                   bert.encoder.layers.N.mlp.wi.*
    bert.encoder.layer.N.output.dense.*                         bert.encoder.layers.N.mlp.wo.*
    bert.encoder.layer.N.output.LayerNorm.*                     bert.encoder.layers.N.mlp.norm.*
    cls.predictions.transform.dense.*                           mlm_head.dense.*
    cls.predictions.transform.LayerNorm.*                       mlm_head.norm.*
    cls.predictions.decoder.bias                                mlm_head.decoder.bias (padded with -1e4)
    cls.predictions.decoder.weight                              (tied to the word embeddings; checked equal)
    ==========================================================  =============================================

    ``bert.pooler.*`` and ``cls.seq_relationship.*`` (NSP) have no counterpart and are left out by the caller.
    Every other key is an error; so is a missing one.
    """
    rows = config.vocab_size
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise KeyError(key)
        used.add(key)
        return sd[key].float()

    out: dict[str, torch.Tensor] = {}
    try:
        e = "bert.embeddings."
        out[e + "word_embeddings.weight"] = _pad_rows(take(e + "word_embeddings.weight"), rows)
        out[e + "position_embeddings.weight"] = take(e + "position_embeddings.weight")
        out[e + "token_type_embeddings.weight"] = take(e + "token_type_embeddings.weight")
        out[e + "norm.weight"], out[e + "norm.bias"] = take(e + "LayerNorm.weight"), take(e + "LayerNorm.bias")
        for i in range(config.num_hidden_layers):
            src, dst = f"bert.encoder.layer.{i}.", f"bert.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                out[dst + f"attention.Wqkv.{kind}"] = torch.cat(
                    [take(src + f"attention.self.{p}.{kind}") for p in ("query", "key", "value")], dim=0)
                out[dst + f"attention.out.{kind}"] = take(src + f"attention.output.dense.{kind}")
                out[dst + f"attention.norm.{kind}"] = take(src + f"attention.output.LayerNorm.{kind}")
                out[dst + f"mlp.wi.{kind}"] = take(src + f"intermediate.dense.{kind}")
                out[dst + f"mlp.wo.{kind}"] = take(src + f"output.dense.{kind}")
                out[dst + f"mlp.norm.{kind}"] = take(src + f"output.LayerNorm.{kind}")
        if mlm:
            c = "cls.predictions."
            for kind in ("weight", "bias"):
                out[f"mlm_head.dense.{kind}"] = take(c + f"transform.dense.{kind}")
                out[f"mlm_head.norm.{kind}"] = take(c + f"transform.LayerNorm.{kind}")
            bias_key = c + "decoder.bias" if c + "decoder.bias" in sd else c + "bias"
            out["mlm_head.decoder.bias"] = _pad_rows(take(bias_key), rows, PADDED_ROW_BIAS)
            used.add(c + "bias")
            decoder = sd.get(c + "decoder.weight")
            if decoder is not None:
                used.add(c + "decoder.weight")
                if not torch.equal(decoder.float(), sd[e + "word_embeddings.weight"].float()):
                    raise ValueError("cls.predictions.decoder.weight differs from the word embeddings: an untied "
                                     "decoder cannot be expressed (MosaicBERT ties them)")
    except KeyError as err:
        raise ValueError(f"not a BERT checkpoint of this config ({config.num_hidden_layers} layers): missing key "
                         f"{err.args[0]}") from None
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"keys with no place in a BERT-mode MosaicBERT: [{_limited(unexpected)}]")
    return out


def _load_hf_bert(folder: Path):
    """(transformers BERT model in fp32, whether it carries an MLM head) from a model folder, every weight
    accounted for: a checkpoint whose keys do not fill the model is an error, never random weights."""
    from transformers import AutoConfig, BertForMaskedLM, BertModel

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a transformers model folder)")
    data = read_json(config_path, "a JSON config file")
    if not isinstance(data, dict):
        raise ValueError(f"{config_path}: not a JSON config file (expected an object)")
    check_bert_model_type(data.get("model_type"))  # before transformers guesses at another architecture
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    architectures = data.get("architectures") or []
    mlm = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in architectures)
    cls = BertForMaskedLM if mlm else BertModel
    try:
        model, info = cls.from_pretrained(str(folder), config=config, dtype=torch.float32, local_files_only=True,
                                          output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"cannot load the BERT weights ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    # pooler and NSP head are not part of the encoder; everything else must come from the checkpoint
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k and "seq_relationship" not in k]
    if missing:
        raise ValueError(f"the checkpoint does not hold these {cls.__name__} weights: [{_limited(missing)}] "
                         "(another architecture?)")
    if info.get("mismatched_keys"):
        raise ValueError(f"weights whose shapes differ from config.json: {info['mismatched_keys'][:5]}")
    return model.eval(), mlm


def _bert_to_mosaic(model: Any, mlm: bool):
    """A loaded transformers BERT (``BertModel`` or ``BertForMaskedLM``) -> the same network as MosaicBERT."""
    from .modeling import MosaicBertForMaskedLM, MosaicBertModel

    config = bert_mode_config(model.config)
    sd = model.state_dict()
    if not mlm:
        sd = {f"bert.{k}": v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not re.match(r"bert\.pooler\.|cls\.seq_relationship\.", k)}
    weights = bert_state_dict_to_mosaic(sd, config, mlm)
    ours = MosaicBertForMaskedLM(config) if mlm else MosaicBertModel(config)
    if not mlm:
        weights = {k[len("bert."):]: v for k, v in weights.items()}
    missing, unexpected = ours.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != _TIED]
    if missing or unexpected:  # the mapping above covers every parameter; this guards it
        raise RuntimeError(f"BERT -> MosaicBERT mapping incomplete: missing {missing}, unexpected {unexpected}")
    return ours.eval()


def convert_hf(source: str | Path, out_dir: str | Path | None = None):
    """Convert a transformers BERT folder, or a sentence-transformers folder around one, to MosaicBERT.

    ``source``:

    - a model folder (``config.json`` with ``model_type: bert``): ``BertModel`` -> :class:`MosaicBertModel`,
      ``BertForMaskedLM`` / ``BertForPreTraining`` -> :class:`MosaicBertForMaskedLM` (the MLM head kept; the
      NSP head and the pooler dropped); the tokenizer is saved beside it when the folder has one;
    - a sentence-transformers folder (``modules.json``) whose Transformer module is a BERT: the output is a
      sentence-transformers folder with our backbone (and its tokenizer) in place of the BERT and the same
      other modules, prompts and similarity function, which :class:`~mosaic_embed.encode.Encoder` runs on
      its packed path.

    The network is the same function: learned positions, GELU MLP with biases, fp32 LayerNorms, q/k/v fused
    into ``Wqkv`` (rows [q | k | v]), the vocabulary padded to a multiple of 64 with zero embedding rows.
    Returns the converted backbone. With ``out_dir`` the result is written there (atomically, with a
    ``manifest.json``). Errors name ``source``.
    """
    import time

    from ..artifacts import atomic_directory, folder_fingerprint, write_manifest

    start = time.perf_counter()
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a folder (--from-hf takes a transformers or sentence-transformers "
                                "model folder)")
    is_st = (source / "modules.json").is_file()
    try:
        if is_st:
            from ..encode.st import transformer_dir

            backbone_dir = transformer_dir(source)
        else:
            backbone_dir = source
        hf_model, mlm = _load_hf_bert(backbone_dir)
        model = _bert_to_mosaic(hf_model, mlm)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    if out_dir is None:
        return model
    tokenizer = _tokenizer_or_none(backbone_dir)
    with atomic_directory(out_dir) as tmp:
        if is_st:
            _write_st_folder(source, model, tokenizer, tmp)
        else:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        write_manifest(
            tmp, "convert", config=None,
            inputs={"from_hf": {"path": str(source.resolve()), "fingerprint": folder_fingerprint(source),
                                "architecture": type(hf_model).__name__,
                                "sentence_transformers": is_st}},
            outputs={"model_class": type(model).__name__, "parameters": model.num_parameters(),
                     "vocab_size": model.config.vocab_size, "source_vocab_size": hf_model.config.vocab_size,
                     "tokenizer": tokenizer is not None,
                     "attention_probs_dropout_prob": {"source": hf_model.config.attention_probs_dropout_prob,
                                                      "converted": 0.0}},
            timings={"convert_s": round(time.perf_counter() - start, 3)},
            model_config=model.config.to_dict(),
        )
    return model


def _tokenizer_or_none(folder: Path):
    """The folder's tokenizer (loaded to be saved beside the converted weights), or None when it has none."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        import logging

        logging.getLogger(__name__).warning("%s: no tokenizer files; the converted folder has no tokenizer", folder)
        return None
    from ..data.tokenizer import load_tokenizer

    return load_tokenizer(folder)


def _write_st_folder(source: Path, backbone: Any, tokenizer: Any, out: Path) -> None:
    """The sentence-transformers folder ``source`` rebuilt around ``backbone``: same modules after the
    Transformer (pooling, dense, normalize), same prompts and similarity function, same max_seq_length."""
    import tempfile

    from sentence_transformers import SentenceTransformer, models

    from ..encode.st import load_sentence_transformer, save_encoder

    original = load_sentence_transformer(source, "cpu")
    first = original[0]
    if not isinstance(first, models.Transformer):
        raise ValueError(f"{source}: the first module is {type(first).__name__}, not a Transformer")
    if tokenizer is None:
        raise ValueError(f"{source}: the sentence-transformers folder has no tokenizer files")
    with tempfile.TemporaryDirectory(prefix=".convert-backbone-", dir=out.parent) as tmp:
        backbone.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = models.Transformer(tmp, max_seq_length=first.max_seq_length,
                                         do_lower_case=bool(getattr(first, "do_lower_case", False)))
        rebuilt = SentenceTransformer(
            modules=[transformer, *list(original)[1:]], device="cpu", prompts=dict(original.prompts),
            default_prompt_name=original.default_prompt_name, similarity_fn_name=original.similarity_fn_name,
        )
        save_encoder(rebuilt.float(), out)  # a Dense module of an fp16 folder is stored in fp32 like the rest


__all__ = ["load_original_checkpoint", "convert_state_dict", "convert_checkpoint", "resolve_config",
           "bert_mode_config", "bert_state_dict_to_mosaic", "convert_hf"]
