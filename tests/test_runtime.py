"""runtime.py: the one precision rule, device choice, rank/world and LR schedule every stage uses."""

from __future__ import annotations

import pytest
import torch

from mosaic_embed.config import ConfigError, ContrastiveConfig, GlueConfig, PretrainConfig, load_config
from mosaic_embed.runtime import WarmupLinearDecay, dist_state, resolve_device, resolve_precision


def test_precision_rule():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("bf16", "cuda:0") == torch.bfloat16
    with pytest.raises(ConfigError, match="train.precision: bf16 needs a CUDA device"):
        resolve_precision("bf16", cpu, "train.precision")
    with pytest.raises(ConfigError, match="choose one of auto, bf16, fp32"):
        resolve_precision("fp16", cpu)


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda"):
        resolve_device("tpu-ish")


def test_single_process_rank_and_world():
    state = dist_state()
    assert state.num_processes == 1 and state.process_index == 0 and state.is_main_process


def test_schedule_warms_up_then_decays_to_final():
    f = WarmupLinearDecay(warmup=4, total=20, final=0.02)
    assert [round(f(s), 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(19) == pytest.approx(0.02) and f(100) == pytest.approx(0.02)
    assert all(f(s) >= f(s + 1) for s in range(4, 25))
    assert WarmupLinearDecay(0, 10)(9) == 0.0
    with pytest.raises(ValueError, match="total >= 1"):
        WarmupLinearDecay(1, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer to precision bf16")
def test_every_stage_applies_the_same_bf16_rule(tmp_path):
    """bf16 without CUDA is one error in every stage (it used to raise, warn or pass silently)."""
    from mosaic_embed.train.contrastive import train_encoder
    from mosaic_embed.train.glue import run_glue
    from mosaic_embed.train.pretrain import pretrain
    from tests.helpers import tiny_mosaic, write_pairs_jsonl

    backbone = tiny_mosaic(tmp_path / "b", mlm=True)
    pairs = write_pairs_jsonl(tmp_path / "p.jsonl", n=8)
    contrastive = load_config(ContrastiveConfig, "tiny", model=str(backbone), pairs=str(pairs), out=tmp_path / "e",
                              precision="bf16")
    with pytest.raises(ConfigError, match="bf16 needs a CUDA device"):
        train_encoder(contrastive)
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "dev"):
        (task / f"{split}.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    glue = load_config(GlueConfig, "tiny", model=backbone, out=tmp_path / "g", precision="bf16", tasks=[],
                       custom_tasks=[{"path": str(task), "num_labels": 2}])
    with pytest.raises(ConfigError, match="bf16 needs a CUDA device"):
        run_glue(glue)
    pre = load_config(PretrainConfig, "tiny", out=tmp_path / "r", train={"precision": "bf16"})
    with pytest.raises(ConfigError, match="train.precision: bf16 needs a CUDA device"):
        pretrain(pre)
    for out in ("e", "g", "r"):
        assert not (tmp_path / out).exists(), out
