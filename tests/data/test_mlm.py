"""MLM masking statistics, determinism, and packed / padded collation (data/mlm.py)."""

import numpy as np
import pytest
import torch

from mosaic_embed.data.mlm import (
    IGNORE_INDEX,
    EpochShuffleSampler,
    KeyedDataset,
    MLMMasker,
    PaddedMLMCollator,
    UnpaddedMLMCollator,
)

SPECIAL = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID, VOCAB = 4, 128


def masker(p=0.3, seed=0):
    return MLMMasker(mask_token_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIAL, mask_prob=p, seed=seed)


def features(lengths, first_key=0, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": [2] + rng.integers(5, VOCAB, n - 2).tolist() + [3], "mask_key": first_key + i}
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("p", [0.15, 0.30])
def test_masking_ratio_and_80_10_10(p):
    feats = features([128] * 400)
    batch = UnpaddedMLMCollator(masker(p))(feats)
    orig = torch.tensor(np.concatenate([f["input_ids"] for f in feats]))
    labels, ids = batch["labels"], batch["input_ids"]
    selected = labels != IGNORE_INDEX
    maskable = ~torch.isin(orig, torch.tensor(SPECIAL))
    n = int(maskable.sum())  # 400 * 126 = 50400 maskable tokens
    frac = selected.sum().item() / n
    assert abs(frac - p) < 4 * (p * (1 - p) / n) ** 0.5
    # labels hold the original token wherever a prediction is asked for, nowhere else
    assert torch.equal(labels[selected], orig[selected])
    assert torch.equal(ids[~selected], orig[~selected])
    k = int(selected.sum())
    as_mask = (ids[selected] == MASK_ID).sum().item() / k
    kept = (ids[selected] == orig[selected]).sum().item() / k
    assert abs(as_mask - 0.8) < 0.02
    # "kept" also catches random draws that hit the original token (1/123 of the random 10 %)
    assert abs(kept - 0.1) < 0.015
    assert abs(1 - as_mask - kept - 0.1) < 0.015
    # random replacements never produce special tokens
    replaced = selected & (ids != MASK_ID) & (ids != orig)
    assert not torch.isin(ids[replaced], torch.tensor(SPECIAL)).any()


def test_special_tokens_never_masked():
    feats = [{"input_ids": [2, 0, 1, 3] * 30 + [5, 6], "mask_key": i} for i in range(50)]
    batch = UnpaddedMLMCollator(masker(0.9))(feats)
    ids = torch.tensor(np.concatenate([f["input_ids"] for f in feats]))
    special = torch.isin(ids, torch.tensor(SPECIAL))
    assert (batch["labels"][special] == IGNORE_INDEX).all()
    assert torch.equal(batch["input_ids"][special], ids[special])
    assert (batch["labels"][~special] != IGNORE_INDEX).any()


def test_masks_are_a_function_of_seed_and_key():
    feats = features([50, 60, 70])
    a = UnpaddedMLMCollator(masker(seed=1))(feats)
    b = UnpaddedMLMCollator(masker(seed=1))(list(reversed(feats)))  # order inside the batch does not matter
    rev_ids = torch.cat([b["input_ids"][int(b["cu_seqlens"][i]):int(b["cu_seqlens"][i + 1])] for i in (2, 1, 0)])
    assert torch.equal(a["input_ids"], rev_ids)
    c = UnpaddedMLMCollator(masker(seed=2))(feats)
    assert not torch.equal(a["labels"], c["labels"])
    d = UnpaddedMLMCollator(masker(seed=1))(features([50, 60, 70], first_key=100))  # same text, next epoch
    assert not torch.equal(a["labels"], d["labels"])


def test_packed_collation_hand_computed():
    feats = [{"input_ids": [2, 10, 3], "mask_key": 0}, {"input_ids": [2, 11, 12, 13, 3], "mask_key": 1},
             {"input_ids": [2, 3], "mask_key": 2}]
    batch = UnpaddedMLMCollator(masker(0.15))(feats)
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 3, 8, 10]
    assert batch["max_seqlen"] == 5 and batch["num_tokens"] == 10
    assert batch["input_ids"].shape == (10,) and batch["labels"].shape == (10,)
    unmasked = batch["labels"] == IGNORE_INDEX
    flat = torch.tensor([2, 10, 3, 2, 11, 12, 13, 3, 2, 3])
    assert torch.equal(batch["input_ids"][unmasked], flat[unmasked])
    # the labelled rows, found on the host for the model (no device sync for their count)
    assert batch["masked_rows"].dtype == torch.int64
    assert batch["masked_rows"].tolist() == [i for i in range(10) if not unmasked[i]]


def test_padded_collation_matches_packed():
    feats = features([7, 20, 13])
    m = masker()
    packed = UnpaddedMLMCollator(m)(feats)
    padded = PaddedMLMCollator(m, pad_token_id=0, pad_to_multiple_of=8)(feats)
    assert padded["input_ids"].shape == (3, 24)
    valid = padded["attention_mask"].bool()
    assert valid.sum(1).tolist() == [7, 20, 13]
    assert torch.equal(padded["input_ids"][valid], packed["input_ids"])
    assert torch.equal(padded["labels"][valid], packed["labels"])
    assert (padded["labels"][~valid] == IGNORE_INDEX).all() and (padded["input_ids"][~valid] == 0).all()
    assert padded["num_tokens"] == 40


def test_collator_errors():
    with pytest.raises(ValueError, match="mask_key"):
        UnpaddedMLMCollator(masker())([{"input_ids": [2, 5, 3]}])
    with pytest.raises(ValueError, match="empty"):
        UnpaddedMLMCollator(masker())([])
    with pytest.raises(ValueError, match="mask_prob"):
        masker(p=1.0)


def test_keyed_dataset_and_sampler_order():
    base = [{"input_ids": [2, i + 5, 3]} for i in range(10)]
    ds = KeyedDataset(base, epochs=3)
    sampler = EpochShuffleSampler(10, 3, seed=5)
    order = list(sampler)
    assert order == list(EpochShuffleSampler(10, 3, seed=5))  # stateless: resumable by skipping
    assert sorted(order) == list(range(30))
    for e in range(3):  # every pass is a permutation of the examples, keyed apart
        assert sorted(k % 10 for k in order[10 * e: 10 * (e + 1)]) == list(range(10))
        assert all(10 * e <= k < 10 * (e + 1) for k in order[10 * e: 10 * (e + 1)])
    assert order[:10] != order[10:20] and ds[order[0]]["mask_key"] == order[0]
    assert ds[23]["input_ids"] == base[3]["input_ids"]
    with pytest.raises(IndexError):
        ds[30]
