"""Load original MosaicBERT checkpoints (mosaicml/examples ``bert_layers.py``) into this package's model.

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
        raise ValueError(
            f"not a MosaicBERT checkpoint for this config ({config.num_hidden_layers} layers, mlp={config.mlp}, "
            f"position={config.position}): missing keys [{_limited(missing)}]; unexpected keys "
            f"[{_limited(unexpected)}]"
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


__all__ = ["load_original_checkpoint", "convert_state_dict", "convert_checkpoint", "resolve_config"]
