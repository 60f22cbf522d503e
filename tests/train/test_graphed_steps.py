"""Finetuning steps as CUDA graphs: the fixed-size layout (CPU) and graph replays vs eager steps (GPU)."""

import numpy as np
import pytest
import torch

from mosaic_embed.train.graphed_steps import MIN_BUCKET, static_layout, weighted_loss
from tests.helpers import tiny_mosaic, write_polarity_task


def _examples(n: int, rng: np.random.Generator, longest: int = 9, shortest: int = 3):
    sizes = rng.integers(shortest - 2, longest - 1, size=n)  # tokens between [CLS] and [SEP]
    seqs = [[2, *rng.integers(4, 120, size=int(k)).tolist(), 3] for k in sizes]
    types = [[0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2) for s in seqs]
    return seqs, types


@pytest.mark.parametrize("n, batch_size, max_seqlen", [(4, 4, 9), (3, 4, 9), (1, 16, 16), (16, 16, 9)])
def test_static_layout_holds_the_examples_then_bounded_fillers(n, batch_size, max_seqlen):
    rng = np.random.default_rng(n + batch_size)
    seqs, types = _examples(n, rng, longest=max_seqlen)
    labels = rng.integers(0, 3, size=n)
    b = static_layout(seqs, types, labels, batch_size, max_seqlen, pad_id=0)
    real = sum(map(len, seqs))
    assert b.bucket >= MIN_BUCKET and b.bucket & (b.bucket - 1) == 0
    assert b.input_ids.shape == b.token_type_ids.shape == (b.bucket,)
    n_seqs = batch_size + -(-b.bucket // max_seqlen)  # fixed per bucket: one graph serves every batch of it
    assert b.cu_seqlens.shape == (n_seqs + 1,) and b.cu_seqlens.dtype == np.int32
    lengths = np.diff(b.cu_seqlens)
    assert lengths[:n].tolist() == [len(s) for s in seqs]
    assert lengths.min() >= 1 and lengths.max() <= max_seqlen and b.cu_seqlens[-1] == b.bucket
    assert b.input_ids[:real].tolist() == [t for s in seqs for t in s] and not b.input_ids[real:].any()
    assert b.token_type_ids[:real].tolist() == [t for s in types for t in s]
    assert b.labels[:n].tolist() == labels.tolist() and b.weights.tolist() == [1.0] * n + [0.0] * (n_seqs - n)


def test_static_layout_errors():
    with pytest.raises(ValueError, match="exceeds max_seqlen=4"):
        static_layout([[2, 5, 6, 7, 3]], [[0] * 5], np.array([1]), 4, 4, 0)
    with pytest.raises(ValueError, match="5 examples for a batch of 4"):
        static_layout([[2, 3]] * 5, [[0, 0]] * 5, np.zeros(5, dtype=np.int64), 4, 8, 0)


@pytest.mark.parametrize("regression", [False, True])
def test_the_static_batch_gives_the_packed_batchs_logits_and_loss(tmp_path, regression):
    """Fillers change nothing for the examples: the same logits rows and loss as the plain packed batch."""
    from mosaic_embed.data import packing
    from mosaic_embed.train.glue import _loss, load_classifier

    model = load_classifier(tiny_mosaic(tmp_path / "m", mlm=True), 1 if regression else 3).eval()
    rng = np.random.default_rng(0)
    seqs, types = _examples(5, rng)
    labels = rng.normal(size=5).astype(np.float32) if regression else rng.integers(0, 3, size=5)
    plain = packing.packed_inputs(seqs, types)
    b = static_layout(seqs, types, labels, 8, 12, pad_id=0)
    with torch.no_grad():
        want = model(**plain).logits
        got = model(input_ids=torch.from_numpy(b.input_ids), token_type_ids=torch.from_numpy(b.token_type_ids),
                    cu_seqlens=torch.from_numpy(b.cu_seqlens), max_seqlen=12).logits
    torch.testing.assert_close(got[:5], want, atol=1e-5, rtol=1e-5)
    loss = weighted_loss(got.float(), torch.from_numpy(b.labels), torch.from_numpy(b.weights), regression)
    torch.testing.assert_close(loss, _loss(want.float(), torch.from_numpy(labels), regression), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
def test_graph_replays_train_like_eager_steps(tmp_path):
    """The same batches through GraphedSteps and through the eager step on the same layout give the same
    parameters (no dropout; bf16 autocast), across several buckets and a short last batch."""
    from mosaic_embed.train.glue import load_classifier
    from mosaic_embed.train.graphed_steps import GraphedSteps, _Graph

    device = torch.device("cuda")
    folder = tiny_mosaic(tmp_path / "m", mlm=True, attn_impl="auto", hidden_size=64, num_attention_heads=2)
    rng = np.random.default_rng(0)
    batches = []
    for i in range(12):
        n = 8 if i != 11 else 3
        # every third batch is long: 8 x >= 36 tokens + fillers outgrow the 256-token bucket
        seqs, types = _examples(n, rng, longest=40, shortest=36) if i % 3 == 0 else _examples(n, rng)
        batches.append((seqs, types, rng.integers(0, 2, size=n)))
    runs = {}
    for graphs in (True, False):
        torch.manual_seed(0)
        model = load_classifier(folder, 2).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device=device), fused=True, capturable=True)
        steps = GraphedSteps(model, opt, False, device, torch.bfloat16, 8, 40, 0)
        losses = []
        for seqs, types, labels in batches:
            if graphs:
                losses.append(steps.step(seqs, types, labels))
            else:
                g = _Graph(static_layout(seqs, types, labels, 8, 40, 0), device)
                losses.append(steps._forward_backward_update(g.inputs).clone())
        torch.cuda.synchronize()
        runs[graphs] = (torch.stack(losses).cpu(), [p.detach().float().cpu() for p in model.parameters()], steps)
    (lg, pg, sg), (le, pe, _) = runs[True], runs[False]
    assert sg.failed is None and len(sg.buckets) >= 2
    torch.testing.assert_close(lg, le, atol=1e-4, rtol=1e-4)
    for a, b in zip(pg, pe, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    first = load_classifier(folder, 2).state_dict()
    moved = [name for (name, p0), p1 in zip(first.items(), pg, strict=True) if not torch.equal(p0.float(), p1)]
    assert len(moved) > len(pg) // 2  # the steps trained


@pytest.mark.gpu
def test_glue_runner_with_graphs_learns(tmp_path):
    """The runner's default on CUDA (graphs, a MosaicBERT on packed batches) learns a separable task as well
    as its eager steps do, and says which buckets it captured."""
    from mosaic_embed.config import GlueConfig, load_config
    from mosaic_embed.train.glue import run_glue

    task = write_polarity_task(tmp_path / "polarity")
    model = tiny_mosaic(tmp_path / "m", mlm=True, attn_impl="auto", hidden_size=64, num_attention_heads=2)
    seeds = {}
    for graphs in (True, False):
        cfg = load_config(GlueConfig, "tiny", ["hparams.custom.epochs=6", "hparams.custom.lr=3e-3",
                                              "hparams.custom.seeds=[1]", f"cuda_graphs={str(graphs).lower()}"],
                          model=str(model), out=str(tmp_path / f"g{graphs}"), tasks=[],
                          custom_tasks=[{"path": str(task), "num_labels": 2}], device="cuda")
        seeds[graphs] = run_glue(cfg)["points"][0]["tasks"]["polarity"]["seeds"][0]
    assert seeds[True]["cuda_graphs"]["failed"] is None and seeds[True]["cuda_graphs"]["buckets"] == [256]
    assert seeds[False]["cuda_graphs"] is None
    assert seeds[True]["metrics"]["dev"]["accuracy"] >= 0.9
    assert abs(seeds[True]["final_loss"] - seeds[False]["final_loss"]) < 0.05
