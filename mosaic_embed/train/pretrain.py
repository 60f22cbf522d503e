"""MLM pretraining: corpus -> token shards -> masked-LM training on HF ``Trainer`` -> ``runs/NAME/final``.

``pretrain(cfg)`` is the whole stage; the CLI (``mosaic-embed pretrain``) is a thin layer over it.

Engine: transformers' ``Trainer`` (accelerate underneath, so ``torchrun`` gives DDP, or FSDP with
``train.fsdp``), specialised by :class:`MLMTrainer` for what the paper's recipe needs:

* unpadded batches: the collator packs a batch into ``input_ids`` (T,) + ``cu_seqlens``; only real tokens
  are moved or computed (``BertForMaskedLM``, which needs (B, S), gets the padded collator instead);
* the schedule: linear warmup, then linear decay to ``final_lr_fraction`` of the peak;
* decoupled weight decay scaled by the schedule (torch AdamW with ``weight_decay = wd / lr_peak``);
* validation always masks 15 %, reports token-weighted MLM loss and accuracy;
* checkpoints as ``checkpoints/step-NNNNNN/`` (loadable model + tokenizer + ``checkpoint_meta.json`` +
  optimizer/scheduler/RNG/trainer state), written under a temporary name and renamed when complete,
  the last ``keep_last`` kept plus ``keep_steps``;
* exact resume: the data order is a pure function of the seed (:class:`~mosaic_embed.data.mlm.KeyedDataset`,
  :class:`~mosaic_embed.data.mlm.EpochShuffleSampler`), masks are hashed from (seed, sample key), and the
  Trainer restores model, optimizer, scheduler and RNG states, then skips the consumed batches;
* a non-finite loss stops the run (:class:`NonFiniteLossError`) before anything else is saved.

``checkpoint_meta.json`` records ``wall_clock_s``: seconds spent training (data, forward, backward,
optimizer) summed over all resumed segments, *excluding* validation and checkpoint writing (setup such
as tokenisation and model construction is excluded too); ``elapsed_s`` is the same including validation
and checkpoint writing. ``tokens_seen`` counts real (non-padding) tokens over all ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..artifacts import atomic_write_json, read_manifest, remove_temporaries, write_manifest, writer_lock
from ..config import ConfigError, PretrainConfig, PretrainModelConfig, save_config
from ..data.mlm import (
    IGNORE_INDEX,
    VALIDATION_MASK_PROB,
    EpochShuffleSampler,
    KeyedDataset,
    MLMMasker,
    PaddedMLMCollator,
    UnpaddedMLMCollator,
)
from ..kernels.dispatch import warm_dispatch
from ..runtime import WarmupLinearDecay, dist_state, peak_flops, resolve_device, resolve_precision
from .callbacks import JsonlMetricsCallback, ProgressCallback, TimedCheckpointCallback, one_bar
from .checkpoints import CHECKPOINT_META, latest_checkpoint, list_checkpoints

logger = logging.getLogger(__name__)


#: transformers ``BertConfig`` shapes for the baseline (Devlin et al.; small/mini as in Turc et al. 2019).
HF_BERT_PRESETS: dict[str, dict[str, int]] = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "bert-mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------
# model, schedule
# ----------------------------------------------------------------------------------------------------------


def build_model(model_cfg: PretrainModelConfig, tokenizer: Any) -> PreTrainedModel:
    """The masked-LM model a recipe asks for; vocabulary = the tokenizer's, padded to a multiple of 64.

    ``init_from`` continues from saved weights (domain-adaptive pretraining, see :func:`load_init_model`).
    A key of ``overrides`` that is not a field of the model's config is a :class:`ConfigError` (it would
    otherwise be stored in ``config.json`` and ignored).
    """
    from ..data.tokenizer import padded_vocab_size

    if model_cfg.init_from is not None:
        return load_init_model(model_cfg, tokenizer)
    if model_cfg.arch == "hf_bert" and model_cfg.preset not in HF_BERT_PRESETS:
        raise ValueError(f"model.preset: unknown hf_bert preset {model_cfg.preset!r}; choose from {sorted(HF_BERT_PRESETS)}")
    vocab = padded_vocab_size(tokenizer)
    if model_cfg.arch == "mosaic_bert":
        from ..model import MosaicBertForMaskedLM, preset_config

        check_model_overrides(model_cfg)
        config = preset_config(model_cfg.preset, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                               **model_cfg.overrides)
        return MosaicBertForMaskedLM(config)
    from transformers import BertConfig, BertForMaskedLM

    check_model_overrides(model_cfg)
    fields = {**HF_BERT_PRESETS[model_cfg.preset], **model_cfg.overrides}
    try:
        config = BertConfig(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, **fields)
    except TypeError as err:
        raise ValueError(f"model.overrides: {err}") from None
    config._attn_implementation = "sdpa"
    return BertForMaskedLM(config)


#: Config fields that shape a model's weights: a continued checkpoint keeps them (others, e.g. attn_impl or
#: dropout, may be overridden).
_ARCHITECTURE_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size", "position", "mlp", "position_embedding_type",
})

#: The model_type of an ``init_from`` checkpoint that each ``model.arch`` continues.
_ARCH_MODEL_TYPE = {"mosaic_bert": "mosaic_bert", "hf_bert": "bert"}


def init_folder(model_cfg: PretrainModelConfig) -> Path:
    """The model folder of ``model.init_from``: the folder itself, or the Transformer module's folder of a
    sentence-transformers folder (e.g. a converted all-MiniLM-L6-v2). Its ``model_type`` must be the one
    ``model.arch`` trains; a transformers BERT for ``mosaic_bert`` is pointed to ``convert --from-hf``."""
    from ..artifacts import read_json

    folder = Path(model_cfg.init_from)
    if not folder.is_dir():
        raise FileNotFoundError(f"model.init_from: {folder} is not a folder")
    if (folder / "modules.json").is_file():
        from ..encode.st import transformer_dir

        folder = transformer_dir(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model.init_from: {folder} has no config.json (not a saved model folder)")
    data = read_json(config_path, "a JSON config file")
    model_type = data.get("model_type") if isinstance(data, dict) else None
    expected = _ARCH_MODEL_TYPE[model_cfg.arch]
    if model_type != expected:
        hint = ("; convert it first (mosaic-embed convert --from-hf) or continue it as a BERT with "
                "--set model.arch=hf_bert") if model_type == "bert" else ""
        raise ConfigError(f"model.init_from: {folder} holds a {model_type!r} model but model.arch="
                          f"{model_cfg.arch} continues {expected!r} checkpoints{hint}")
    return folder


def init_tokenizer(cfg: PretrainConfig) -> PretrainConfig:
    """With ``model.init_from``, the run's tokenizer is the checkpoint's: ``data.tokenizer`` unset becomes
    the checkpoint folder; one that is set must have the same vocabulary (else a ConfigError naming both).
    A checkpoint without tokenizer files takes ``data.tokenizer`` (or the bundled one) if its vocabulary size
    fits the model's."""
    import dataclasses

    from ..data.tokenizer import load_tokenizer, padded_vocab_size

    if cfg.model.init_from is None:
        return cfg
    folder = init_folder(cfg.model)
    has_tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    if has_tokenizer:
        own = load_tokenizer(folder)
        if cfg.data.tokenizer is None:
            return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(folder)))
        given = load_tokenizer(cfg.data.tokenizer)
        if given.get_vocab() != own.get_vocab():
            diff = sorted(set(given.get_vocab().items()) ^ set(own.get_vocab().items()))[:3]
            raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} is not the tokenizer of model.init_from {folder} "
                              f"({len(given)} vs {len(own)} tokens; e.g. {diff}): the checkpoint's embeddings "
                              "are indexed by its own vocabulary; leave data.tokenizer unset to use it")
        return cfg
    from ..artifacts import read_json

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = read_json(folder / "config.json").get("vocab_size")
    if padded_vocab_size(tokenizer) != padded_vocab_size(int(vocab or 1)):
        raise ConfigError(f"model.init_from: {folder} has no tokenizer files and a vocabulary of {vocab}; the "
                          f"tokenizer {cfg.data.tokenizer or 'bert-base-uncased (bundled)'} has {len(tokenizer)} "
                          "tokens: give the checkpoint's tokenizer as data.tokenizer")
    logger.warning("model.init_from: %s has no tokenizer files; using %s (same vocabulary size)", folder,
                   cfg.data.tokenizer or "the bundled bert-base-uncased")
    return cfg


def load_init_model(model_cfg: PretrainModelConfig, tokenizer: Any) -> PreTrainedModel:
    """The masked-LM model of ``model.init_from``, every encoder weight from the checkpoint.

    An MLM checkpoint (a pretraining run's ``final``, ``MosaicBertForMaskedLM``, a converted
    ``BertForMaskedLM``) continues with its head; an encoder-only checkpoint (``MosaicBertModel``, a
    converted sentence encoder) gets a freshly initialised MLM head, with a warning. ``model.overrides``
    set config fields (e.g. ``attn_impl``). A checkpoint whose encoder weights do not fill the model, or
    whose vocabulary is not the tokenizer's (padded to 64), is an error.
    """
    from transformers import AutoModelForMaskedLM

    from ..artifacts import read_json
    from ..data.tokenizer import padded_vocab_size

    folder = init_folder(model_cfg)
    check_model_overrides(model_cfg)
    saved = read_json(folder / "config.json")
    conflicts = {k: (v, saved.get(k)) for k, v in model_cfg.overrides.items()
                 if k in _ARCHITECTURE_FIELDS and saved.get(k) != v}
    if conflicts:
        k, (want, have) = next(iter(conflicts.items()))
        raise ConfigError(f"model.overrides.{k}={want!r} but the checkpoint in model.init_from has {k}={have!r}: "
                          "a continued model keeps its architecture (drop the override, e.g. "
                          "--set model.overrides={} when the recipe sets one)")
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(str(folder), output_loading_info=True,
                                                           local_files_only=True, **model_cfg.overrides)
    except (OSError, RuntimeError) as err:  # size mismatches, unreadable weights
        raise ValueError(f"model.init_from: cannot load {folder} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    head = ("mlm_head.",) if model_cfg.arch == "mosaic_bert" else ("cls.",)
    missing = list(info.get("missing_keys", []))
    encoder_missing = [k for k in missing if not k.startswith(head)]
    if encoder_missing:
        raise ValueError(f"model.init_from: {folder} does not hold these weights of the model: "
                         f"{sorted(encoder_missing)[:8]} (another architecture or size?)")
    if missing:
        logger.warning("model.init_from: %s has no MLM head (an encoder-only checkpoint): the head starts from "
                       "fresh weights (%s)", folder, ", ".join(sorted(missing)[:4]))
    if model.config.vocab_size != padded_vocab_size(tokenizer):
        raise ValueError(f"model.init_from: {folder} has a vocabulary of {model.config.vocab_size} rows but the "
                         f"tokenizer has {len(tokenizer)} tokens ({padded_vocab_size(tokenizer)} padded)")
    return model


def check_model_overrides(model_cfg: PretrainModelConfig) -> None:
    """Every key of ``model.overrides`` names a field of the model's config class (else a ConfigError)."""
    if model_cfg.arch == "mosaic_bert":
        from ..model import MosaicBertConfig as config_cls
    else:
        from transformers import BertConfig as config_cls
    known = set(config_cls().to_dict())
    unknown = sorted(set(model_cfg.overrides) - known)
    if unknown:
        raise ConfigError(f"model.overrides.{unknown[0]}: not a field of {config_cls.__name__}; it takes "
                          + ", ".join(sorted(k for k in known if not k.startswith("_"))))


# ----------------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------------


class MLMTrainer(Trainer):
    """``Trainer`` for MLM pretraining on packed or padded batches; see the module docstring for what differs.

    Extra constructor arguments: ``run_dir`` (checkpoints go to ``run_dir/checkpoints``), ``train_cfg``
    (:class:`~mosaic_embed.config.PretrainTrainConfig`), ``train_sampler`` (the stateless data order),
    ``eval_collator``, ``resume_meta`` (the checkpoint meta being resumed, restoring counters) and
    ``data_order`` (recorded in every checkpoint, checked on resume).
    """

    def __init__(self, *args, run_dir: Path, train_cfg, train_sampler, eval_collator, data_order: dict,
                 resume_meta: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.train_cfg = train_cfg
        self.train_sampler = train_sampler
        self.eval_collator = eval_collator
        self.data_order = data_order
        # The models compute a mean over labelled tokens themselves; never let Trainer pass num_items_in_batch
        # (BertForMaskedLM would ignore it and the loss would no longer be divided by the accumulation steps).
        self.model_accepts_loss_kwargs = False
        meta = resume_meta or {}
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self._wall_before = float(meta.get("wall_clock_s", 0.0))
        self._elapsed_before = float(meta.get("elapsed_s", 0.0))
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.peak_flops, self.peak_note = peak_flops(self.args.device, train_cfg.peak_tflops)
        self._local_tokens = 0  # this rank's real tokens since the last sync
        self._window_tokens = 0  # global tokens since the last training log
        self._loss_sum: torch.Tensor | None = None  # sum of per-step losses since the last training log
        self._bad_loss: torch.Tensor | None = None
        self._segment_start: float | None = None
        self._excluded_s = 0.0  # validation + checkpoint writing time of this segment
        self._window_start = 0.0
        self._window_excluded = 0.0
        self.last_eval: dict[str, float] = dict(meta.get("last_eval") or {})  # a resumed run's, from its checkpoint

    # ---- clocks and counters -------------------------------------------------------------------------

    def _start_clock(self) -> None:
        if self._segment_start is None:
            self._segment_start = time.perf_counter()
            self._window_start = self._segment_start
            self._last_logged_step = self.state.global_step

    def elapsed_s(self) -> float:
        seg = 0.0 if self._segment_start is None else time.perf_counter() - self._segment_start
        return self._elapsed_before + seg

    def wall_clock_s(self) -> float:
        seg = 0.0 if self._segment_start is None else time.perf_counter() - self._segment_start
        return self._wall_before + seg - self._excluded_s

    def _reduce_counters(self) -> tuple[bool, float]:
        """Fold every rank's counters since the last call with one collective and one host sync.

        Adds all ranks' tokens to ``tokens_seen`` (and the log window) and returns (whether any rank saw a
        non-finite loss, the mean over ranks of the summed step losses since the last training log).
        All ranks must call it together. One packed all-reduce instead of one per counter: each is a
        host-GPU sync, and at one log per step they cost data-parallel runs several percent of throughput.
        """
        dev = self.args.device
        zero = torch.zeros((), device=dev, dtype=torch.float64)
        packed = torch.stack([
            self._bad_loss.double() if self._bad_loss is not None else zero,
            self._loss_sum.double() if self._loss_sum is not None else zero,
            torch.tensor(float(self._local_tokens), dtype=torch.float64, device=dev),
        ])
        if self.args.world_size > 1:
            packed = self.accelerator.reduce(packed, reduction="sum")
        n_bad, loss_total, total = packed.tolist()
        self._local_tokens = 0
        self.tokens_seen += int(total)
        self._window_tokens += int(total)
        return n_bad > 0, loss_total / max(1, self.args.world_size)

    def sync_tokens(self) -> None:
        """Add every rank's tokens since the last sync to ``tokens_seen`` (a collective: all ranks call it)."""
        self._reduce_counters()

    def _raise_if_nonfinite(self, bad: bool | None = None) -> None:
        """Stop on a NaN/inf loss, naming the last good checkpoint. ``bad``: an already reduced flag; when
        None, the flag is reduced here (a collective on several ranks)."""
        if bad is None:
            if self._bad_loss is None:
                return
            flag = self._bad_loss
            if self.args.world_size > 1:
                flag = self.accelerator.reduce(flag.to(torch.int32), reduction="sum") > 0
            bad = bool(flag.item())
        if bad:
            good = latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"the training loss became NaN/inf by step {self.state.global_step + 1}; stopped. "
                + (f"Last good checkpoint: {good}" if good else "No checkpoint was saved before it.")
                + " Lower train.lr, raise warmup, or check the data; resume from the checkpoint with --resume."
            )

    # ---- training ------------------------------------------------------------------------------------

    def _get_train_sampler(self, *args, **kwargs):
        return self.train_sampler

    def floating_point_ops(self, inputs) -> int:
        return 0  # MFU is computed from real tokens in log(); skip Trainer's per-batch parameter count

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            cfg = self.train_cfg
            warmup = int(round(cfg.warmup_fraction * num_training_steps))
            sched = WarmupLinearDecay(warmup, num_training_steps, cfg.final_lr_fraction)
            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, sched)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._start_clock()
        self._local_tokens += int(inputs.pop("num_tokens"))
        loss = super().training_step(model, inputs, num_items_in_batch)
        # `loss` is this microbatch's mean loss / accumulation steps: summing microbatches gives the step loss.
        self._loss_sum = loss.detach().float() if self._loss_sum is None else self._loss_sum + loss.detach().float()
        finite = torch.isfinite(loss.detach())
        self._bad_loss = ~finite if self._bad_loss is None else (self._bad_loss | ~finite)
        if loss.device.type == "cpu":  # free to check at once on CPU; on GPU checked at logs and saves
            self._raise_if_nonfinite()
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (all ranks arrive here together)
            bad, loss_sum = self._reduce_counters()
            self._raise_if_nonfinite(bad)
            steps = max(self.state.global_step - self._last_logged_step, 1)
            logs["loss"] = loss_sum / steps
            self._loss_sum = None
            self._last_logged_step = self.state.global_step
            now = time.perf_counter()
            dt = max(now - self._window_start - self._window_excluded, 1e-9)
            logs["tokens_per_s"] = self._window_tokens / dt
            logs["mfu"] = (6.0 * self.n_params * logs["tokens_per_s"] / (self.peak_flops * self.args.world_size)
                           if self.peak_flops else None)
            logs["mfu_peak"] = self.peak_note
            self._window_tokens, self._window_start, self._window_excluded = 0, now, 0.0
            logs["tokens_seen"] = self.tokens_seen
            logs["wall_clock_s"] = round(self.wall_clock_s(), 3)
            logs["elapsed_s"] = round(self.elapsed_s(), 3)
        # Trainer's epoch is a fraction of the repeated KeyedDataset; report passes over the real data instead
        self.state.epoch = self.state.global_step * self.data_order["global_batch_size"] / self.data_order["train_examples"]
        super().log(logs, *args, **kwargs)

    # ---- validation ----------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-weighted MLM loss and accuracy on the validation split at 15 % masking (fixed masks)."""
        t0 = time.perf_counter()
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        world, rank = max(1, self.args.world_size), self.args.process_index
        # equal shares per rank, so that sharded models (FSDP) run the same number of forwards everywhere
        per_rank = len(dataset) // world
        indices = list(range(rank * per_rank, (rank + 1) * per_rank))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=self.train_cfg.eval_batch_size,
            collate_fn=self.eval_collator, shuffle=False, generator=torch.Generator(),
        )
        model = self.model_wrapped if self.is_fsdp_enabled else self.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)  # loss * n, correct, n
        use_bf16 = bool(self.args.bf16)
        with torch.no_grad():
            for batch in loader:
                batch.pop("num_tokens")
                batch = self._prepare_inputs(batch)
                with torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = model(**batch)
                labels = batch["labels"]
                sel = labels != IGNORE_INDEX
                n = sel.sum()
                logits = out.logits
                # MosaicBERT returns logits only for the labelled positions: (n, V) instead of (..., V), and
                # only in eval mode (its training forward returns none: with mlm_loss_impl="triton" the decoder
                # is fused with the loss and the logits never exist)
                pred = (logits if logits.shape[:-1] != labels.shape else logits[sel]).argmax(-1)
                sums += torch.stack([out.loss.double() * n, (pred == labels[sel]).sum().double(), n.double()])
        if was_training:
            model.train()
        if world > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        loss_sum, correct, n = sums.tolist()
        metrics = {
            f"{metric_key_prefix}_loss": loss_sum / max(n, 1.0),
            f"{metric_key_prefix}_accuracy": correct / max(n, 1.0),
            f"{metric_key_prefix}_masked_tokens": int(n),
        }
        dt = time.perf_counter() - t0
        self._excluded_s += dt
        self._window_excluded += dt
        self.last_eval = dict(metrics, step=self.state.global_step)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    # ---- checkpoints ---------------------------------------------------------------------------------

    def take_final_checkpoint(self, checkpoint: Path) -> None:
        """Resume from a checkpoint of the run's last step: its weights and state, and no training.
        ``Trainer.train`` would train one step past ``max_steps`` from there (it skips the trained batches,
        then steps once before it checks the limit). The callbacks see a training of no steps, so the metrics
        file is cut back to the checkpoint's logs."""
        if self.is_fsdp_enabled:  # FSDP loads weights into the wrapped model inside Trainer.train only
            raise ValueError(f"--resume: {checkpoint} is the run's last step (train.max_steps); under FSDP the "
                             "run cannot be finished from it: copy it as final/, or raise train.max_steps")
        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)

    def _get_output_dir(self, trial=None) -> str:
        # Trainer writes checkpoint-N here; _save_checkpoint renames it to checkpoints/step-NNNNNN when complete
        return str(self.ckpt_root / ".staging")

    def _save_checkpoint(self, model, trial=None) -> None:
        bad, _ = self._reduce_counters()
        self._raise_if_nonfinite(bad)  # never save weights that produced a NaN
        t0 = time.perf_counter()
        step = self.state.global_step
        staging = self.ckpt_root / ".staging" / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            meta = self.checkpoint_meta()
            atomic_write_json(staging / CHECKPOINT_META, meta)
            final = self.ckpt_root / f"step-{step:06d}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            with contextlib.suppress(OSError):  # leave no empty staging folder behind
                staging.parent.rmdir()
            rotate_checkpoints(self.ckpt_root, self.train_cfg.keep_last, self.train_cfg.keep_steps)
        self.accelerator.wait_for_everyone()
        dt = time.perf_counter() - t0
        self._excluded_s += dt
        self._window_excluded += dt

    def checkpoint_meta(self) -> dict[str, Any]:
        step = self.state.global_step
        samples = step * self.data_order["global_batch_size"]
        return {
            "step": step,
            "wall_clock_s": round(self.wall_clock_s(), 3),
            "elapsed_s": round(self.elapsed_s(), 3),
            "tokens_seen": self.tokens_seen,
            "samples_seen": samples,
            "epoch": samples / self.data_order["train_examples"],
            "learning_rate": self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else None,
            "last_eval": self.last_eval or None,
            "world_size": self.args.world_size,
            "data_order": self.data_order,
            "wall_clock_note": "wall_clock_s excludes validation and checkpoint writing; elapsed_s includes them",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


# ----------------------------------------------------------------------------------------------------------
# checkpoint folders
# ----------------------------------------------------------------------------------------------------------


def _remove_partial_writes(run_dir: Path) -> None:
    """What a killed run leaves half-written, removed by the next writer (which holds the lock): a checkpoint
    or ``final/`` being staged, and the temporaries of atomic writes. Complete checkpoints are never touched."""
    for partial in (run_dir / "checkpoints" / ".staging", run_dir / ".final.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    remove_temporaries(run_dir)
    for _, ckpt in list_checkpoints(run_dir):
        remove_temporaries(ckpt)


def _guard_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); a fresh run into a used folder, or a resume
    with nothing to resume, is an error raised before anything is written."""
    if resume:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
        return latest
    if list_checkpoints(run_dir) or (run_dir / "final").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose a new --out")
    return None


def rotate_checkpoints(ckpt_root: Path, keep_last: int, keep_steps: Sequence[int] = ()) -> None:
    """Delete complete checkpoints except the newest ``keep_last`` and those whose step is in ``keep_steps``.

    Ours on purpose, not transformers' ``save_total_limit``: that rotation knows neither ``keep_steps``
    (the checkpoints a Pareto sweep finetunes must never be deleted) nor our ``step-NNNNNN`` folders, which
    appear only once complete (renamed from Trainer's staging folder) so a kill never leaves a torn one.
    """
    ckpts = list_checkpoints(ckpt_root)
    keep = {s for s, _ in ckpts[-keep_last:]} | set(keep_steps)
    for step, path in ckpts:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------------


def compile_in_place(model: torch.nn.Module, packed: bool, device_type: str | None = None,
                     dtype: torch.dtype | None = None) -> None:
    """``torch.compile`` the model in place (``nn.Module.compile``), so parameter names, ``save_pretrained``
    and the Trainer's checkpoints are unchanged. Packed batches vary in length: MosaicBERT is compiled with
    dynamic shapes from the start. ``capture_dynamic_output_shape_ops`` lets the graph hold the MLM head's
    ``nonzero`` over the masked rows (a data-dependent row count; the head's loss has no Python branch on
    it), so forward, head and loss compile as one graph with no break."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    warm_dispatch(model, device_type, dtype or torch.float32)
    if getattr(getattr(model, "config", None), "unpad", True) is False:
        # torch 2.11's Inductor fails an assertion in its coalescing analysis (tiling_utils.get_pw_red_splits)
        # on the padded MosaicBERT graph with dynamic shapes (seen on an H200 with every `unpad: false` recipe);
        # the analysis only chooses a tiling, so the padded path compiles without it.
        import torch._inductor.config as inductor_config

        inductor_config.triton.coalesce_tiling_analysis = False
    model.compile(dynamic=True if packed else None)


def make_collators(arch: str, tokenizer: Any, mask_prob: float, seed: int):
    """(train collator at ``mask_prob``, validation collator at 15 %) for the model's input layout."""
    train_masker = MLMMasker.from_tokenizer(tokenizer, mask_prob, seed=seed)
    # validation masks depend on a fixed seed only, so every evaluation of every run sees the same masks
    eval_masker = MLMMasker.from_tokenizer(tokenizer, VALIDATION_MASK_PROB, seed=0)
    if arch == "mosaic_bert":
        return UnpaddedMLMCollator(train_masker), UnpaddedMLMCollator(eval_masker)
    pad = tokenizer.pad_token_id
    return PaddedMLMCollator(train_masker, pad_token_id=pad), PaddedMLMCollator(eval_masker, pad_token_id=pad)


def train_mlm(
    model: PreTrainedModel,
    tokenizer: Any,
    train_tokens: Any,
    eval_tokens: Any,
    cfg: PretrainConfig,
    *,
    resume: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> MLMTrainer:
    """Train ``model`` on token datasets (rows with ``input_ids``) into ``cfg.out``; returns the finished trainer.

    ``resume=True`` continues from the latest complete checkpoint in ``cfg.out/checkpoints``.
    """
    tc = cfg.train
    run_dir = Path(cfg.out)
    world = dist_state().num_processes
    per_step = tc.microbatch_size * world
    if tc.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size ({tc.global_batch_size}) must be a multiple of microbatch_size x devices "
            f"({tc.microbatch_size} x {world})"
        )
    accum = tc.global_batch_size // per_step
    n_train = len(train_tokens)
    if n_train == 0:
        raise ValueError("the training split has no sequences")
    epochs = max(1, math.ceil(tc.max_steps * tc.global_batch_size / n_train))
    arch = "mosaic_bert" if getattr(model.config, "model_type", "") == "mosaic_bert" else "hf_bert"
    train_collator, eval_collator = make_collators(arch, tokenizer, tc.mask_prob, tc.seed)
    train_ds = KeyedDataset(train_tokens, epochs=epochs)
    eval_ds = KeyedDataset(eval_tokens.select(range(min(len(eval_tokens), tc.eval_samples)))
                           if hasattr(eval_tokens, "select") else eval_tokens)
    sampler = EpochShuffleSampler(n_train, epochs, seed=tc.seed)
    data_order = {"seed": tc.seed, "global_batch_size": tc.global_batch_size, "train_examples": n_train,
                  "mask_prob": tc.mask_prob}

    resume_from, resume_meta = _guard_run_dir(run_dir, resume), None
    if resume_from is not None:
        resume_meta = json.loads((resume_from / CHECKPOINT_META).read_text(encoding="utf-8"))
        saved = resume_meta.get("data_order", {})
        diff = {k: (saved.get(k), v) for k, v in data_order.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                f"--resume: {resume_from} was trained with a different data order "
                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
                + "; resuming would not continue the same run"
            )

    use_bf16 = resolve_precision(tc.precision, resolve_device("auto"), "train.precision") == torch.bfloat16
    if tc.compile:
        torch._dynamo.config.optimize_ddp = tc.compile_split_at_ddp_buckets
        compile_in_place(model, packed=arch == "mosaic_bert", dtype=torch.bfloat16 if use_bf16 else torch.float32)
    if "tensorboard" in tc.report_to:  # transformers 5 reads the TensorBoard folder from the environment
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    fused = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=tc.max_steps,
        per_device_train_batch_size=tc.microbatch_size,
        per_device_eval_batch_size=tc.eval_batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=tc.lr,
        adam_beta1=tc.betas[0],
        adam_beta2=tc.betas[1],
        adam_epsilon=tc.eps,
        # torch AdamW decays by lr * weight_decay; dividing by the peak gives Composer's decoupled decay
        weight_decay=tc.weight_decay / tc.lr,
        optim="adamw_torch_fused" if fused else "adamw_torch",
        max_grad_norm=tc.max_grad_norm,
        bf16=use_bf16,
        logging_strategy="steps",
        logging_steps=tc.log_every_steps,
        logging_nan_inf_filter=False,
        eval_strategy="steps" if tc.eval_every_steps else "no",
        eval_steps=tc.eval_every_steps or None,
        save_strategy="steps" if tc.save_every_steps else "no",
        save_steps=tc.save_every_steps or None,
        save_total_limit=None,  # rotate_checkpoints keeps keep_last + keep_steps
        seed=tc.seed,
        dataloader_num_workers=tc.dataloader_workers,
        dataloader_drop_last=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        # pinned batches copied without waiting: a blocking copy would first wait for the previous step's
        # kernels to finish, so the GPU idles while the host starts the next step
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        use_cpu=not torch.cuda.is_available(),  # makes torchrun on CPU a gloo DDP run (tests, smoke checks)
        remove_unused_columns=False,
        report_to=list(tc.report_to) or "none",
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        fsdp="full_shard auto_wrap" if tc.fsdp else None,
    )
    cbs: list[TrainerCallback] = [
        ProgressCallback(peak_note=peak_flops(args.device, tc.peak_tflops)[1]),
        JsonlMetricsCallback(run_dir / "metrics.jsonl"),
    ]
    if tc.save_every_minutes:
        cbs.append(TimedCheckpointCallback(tc.save_every_minutes))
    cbs.extend(callbacks)
    trainer = MLMTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=train_collator,
        processing_class=tokenizer,
        callbacks=cbs,
        run_dir=run_dir,
        train_cfg=tc,
        train_sampler=sampler,
        eval_collator=eval_collator,
        data_order=data_order,
        resume_meta=resume_meta,
    )
    one_bar(trainer)
    if resume_meta is not None and int(resume_meta["step"]) >= tc.max_steps:
        trainer.take_final_checkpoint(resume_from)  # (the run stopped while it validated or wrote final/)
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if trainer.last_eval.get("step") != trainer.state.global_step:
        trainer.evaluate()
    return trainer


def pretrain(
    cfg: PretrainConfig, *, resume: bool = False, callbacks: Sequence[TrainerCallback] = (),
    log: Callable[[str], None] | None = None,
) -> Path:
    """Corpus -> shards (cached) -> MLM pretraining -> ``cfg.out/final`` (model + tokenizer + manifest).

    Returns the run folder. ``resume=True`` continues an interrupted run from its latest checkpoint.
    ``log`` (the main process only) receives the corpus and shard summaries, and a warning when a GPU-sized
    recipe is about to run on a CPU. One writer per run folder (``artifacts.writer_lock``).
    """
    from ..data.shards import format_shards_summary, load_shards, prepare_shards
    from ..data.tokenizer import load_tokenizer

    run_dir = Path(cfg.out)
    t_start = time.perf_counter()
    # before tokenizing: a wrong --out/--resume or an impossible precision fails at once
    resolve_precision(cfg.train.precision, resolve_device("auto"), "train.precision")
    check_model_overrides(cfg.model)
    cfg = init_tokenizer(cfg)  # --init-from: the checkpoint's tokenizer, or a named mismatch
    _guard_run_dir(run_dir, resume)
    from transformers import set_seed

    state = dist_state()
    say = log if (log is not None and state.is_main_process) else (lambda _msg: None)
    # under torchrun the main process tokenizes (or finds the cached shards) first; the others then reuse them
    with state.main_process_first():
        shards = prepare_shards(cfg.data, log=say)
    say(format_shards_summary(read_manifest(shards, expect_stage="data")))
    dsd = load_shards(shards)
    for split in ("train", "validation"):
        if split not in dsd:
            raise ValueError(f"{shards}: no '{split}' split (found {sorted(dsd)})")
    tokenizer = load_tokenizer(str(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    set_seed(cfg.train.seed)  # model initialisation is part of the seeded run
    model = build_model(cfg.model, tokenizer)
    limit = getattr(model.config, "max_position_embeddings", None)
    if getattr(model.config, "position", "learned") == "learned" and limit and cfg.data.max_seq_len > limit:
        raise ConfigError(f"data.max_seq_len {cfg.data.max_seq_len}: the model has learned positions for {limit} tokens")
    _warn_if_cpu_sized_wrong(model, cfg, say)
    with contextlib.ExitStack() as stack:
        if state.is_main_process:
            # the run folder appears only once its inputs are known good: a bad corpus, tokenizer or model
            # setting leaves nothing behind; from here on it has one writer
            stack.enter_context(writer_lock(run_dir, "mosaic-embed pretrain"))
            _guard_run_dir(run_dir, resume)  # again, locked: another writer may have finished a run meanwhile
            _remove_partial_writes(run_dir)
            if not resume:
                save_config(cfg, run_dir / "config.yaml")
        t_setup = time.perf_counter() - t_start
        _train_and_save(model, tokenizer, dsd, shards, cfg, resume, callbacks, t_setup)
    return run_dir


#: A generous sustained fp32 rate for a CPU, for the "this recipe needs a GPU" estimate only.
_CPU_FLOPS = 2e11


def _warn_if_cpu_sized_wrong(model: PreTrainedModel, cfg: PretrainConfig, say: Callable[[str], None]) -> None:
    """Tell a CPU user, before hours pass, that the recipe they picked is sized for a GPU."""
    if resolve_device("auto").type != "cpu":
        return
    tc = cfg.train
    flops = 6.0 * sum(p.numel() for p in model.parameters()) * tc.max_steps * tc.global_batch_size * cfg.data.max_seq_len
    hours = flops / _CPU_FLOPS / 3600
    if hours > 1.0:
        say(f"warning: this recipe ({tc.max_steps:,} steps x {tc.global_batch_size} sequences of "
            f"{cfg.data.max_seq_len} tokens) is sized for a GPU: on this CPU it would take roughly "
            f"{hours:,.0f} hours or more. For a CPU try --recipe tiny or mosaic-bert-mini, or lower "
            "--set train.max_steps=...")


def _train_and_save(model, tokenizer, dsd, shards: Path, cfg: PretrainConfig, resume: bool,
                    callbacks: Sequence[TrainerCallback], t_setup: float) -> None:
    """Train, then write ``final/`` (model, tokenizer, manifest) under a temporary name and rename it."""
    run_dir = Path(cfg.out)
    trainer = train_mlm(model, tokenizer, dsd["train"], dsd["validation"], cfg, resume=resume, callbacks=callbacks)

    # final/: every rank joins save_model (FSDP gathers the full state); rank 0 writes and renames.
    staging = run_dir / ".final.partial"
    if trainer.args.should_save and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.sync_tokens()  # count the tokens since the last log (a collective: every rank)
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        meta = trainer.checkpoint_meta()
        shards_manifest = _maybe_manifest(shards)
        write_manifest(
            staging,
            "pretrain",
            config=cfg,
            inputs={"shards": str(Path(shards).resolve()), "shards_manifest": shards_manifest,
                    "corpus": str(Path(cfg.data.corpus).resolve()) if cfg.data.corpus else "bundled",
                    "init_from": str(Path(cfg.model.init_from).resolve()) if cfg.model.init_from else None},
            outputs={"model_type": model.config.model_type, "parameters": trainer.n_params},
            timings={"setup_s": round(t_setup, 3), "wall_clock_s": meta["wall_clock_s"],
                     "elapsed_s": meta["elapsed_s"]},
            step=meta["step"],
            tokens_seen=meta["tokens_seen"],
            world_size=max(1, trainer.args.world_size),
            final_eval=trainer.last_eval,
        )
        final = run_dir / "final"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    trainer.accelerator.wait_for_everyone()


def _maybe_manifest(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        m = read_manifest(path)
        return {k: m.get(k) for k in ("stage", "created", "outputs")}
    return None


__all__ = [
    "HF_BERT_PRESETS",
    "MLMTrainer",
    "NonFiniteLossError",
    "build_model",
    "init_tokenizer",
    "load_init_model",
    "latest_checkpoint",
    "list_checkpoints",
    "make_collators",
    "pretrain",
    "rotate_checkpoints",
    "train_mlm",
]
