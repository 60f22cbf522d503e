"""Test helpers shared by every test folder: tiny models and tokenizers, BEIR folders, pairs, the CLI under\ntorchrun (no network; each builds in seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

WORDS = (
    "the a of and to in is it that was for on with as by at from this be are or an not have "
    "city team game news court plan rain storm market price bank film music school car road "
    "river health vote police fire water power food space ship star cat dog"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(folder: Path, vocab: list[str] | None = None) -> None:
    """A BERT WordPiece tokenizer into ``folder``: ``vocab`` (128 entries, specials first), or by default
    the words of :data:`WORDS`, letters and ##letters."""
    from transformers import BertTokenizerFast

    if vocab is None:
        letters = list("abcdefghijklmnopqrstuvwxyz")
        vocab = SPECIAL + letters + [f"##{c}" for c in letters] + list(".,!?'") + WORDS
        vocab = list(dict.fromkeys(vocab))[:128]
        vocab += [f"[unused{i}]" for i in range(128 - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5: the tokenizers-backed BERT tokenizer takes the vocabulary as a dict (a vocab_file
    # argument is ignored, leaving only the special tokens)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=512)
    tok.save_pretrained(folder)


TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


def tiny_bert(folder: Path, seed: int = 0, mlm: bool = False, dropout: float = 0.0,
              vocab: list[str] | None = None) -> Path:
    """A transformers BERT (hidden 32, 2 layers, 4 heads, vocab 128): ``BertModel``, or ``BertForMaskedLM``
    with ``mlm``, saved with its tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(**TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=0)
    (BertForMaskedLM if mlm else BertModel)(cfg).save_pretrained(folder)
    write_tokenizer(folder, vocab)
    return folder


def tiny_mosaic(folder: Path, seed: int = 0, mlm: bool = False, dropout: float = 0.0,
                vocab: list[str] | None = None, **overrides) -> Path:
    """A MosaicBERT (hidden 32, 2 layers, 4 heads, vocab 128, exact torch path): ``MosaicBertModel``, or
    ``MosaicBertForMaskedLM`` with ``mlm``, saved with its tokenizer. ``overrides`` set config fields."""
    from mosaic_embed.model import MosaicBertForMaskedLM, MosaicBertModel, preset_config

    torch.manual_seed(seed)
    cfg = preset_config("mosaic-bert-tiny", **{**TINY, "hidden_dropout_prob": dropout,
                                               "attention_probs_dropout_prob": 0.0, "attn_impl": "torch", **overrides})
    (MosaicBertForMaskedLM if mlm else MosaicBertModel)(cfg).save_pretrained(folder)
    write_tokenizer(folder, vocab)
    return folder


TOPICS = {
    "storm": "the storm brought rain and fire to the city road",
    "market": "the bank market price rose as the vote was near",
    "music": "a film and music school for the city",
    "space": "a space ship and a star in the news",
    "river": "the river water and power plan of the city",
    "police": "police court news on the car and the road",
}


def write_beir(folder: Path) -> Path:
    """A 6-topic BEIR folder: one document per topic plus distractors, one query per topic."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i, (topic, text) in enumerate(TOPICS.items()):
            f.write(json.dumps({"_id": f"d{i}", "title": topic, "text": text}) + "\n")
            f.write(json.dumps({"_id": f"x{i}", "title": "", "text": "a cat and a dog " * (i + 1)}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for i, topic in enumerate(TOPICS):
            f.write(json.dumps({"_id": f"q{i}", "text": f"{topic} news"}) + "\n")
    with open(folder / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(len(TOPICS)):
            f.write(f"q{i}\td{i}\t1\n")
    return folder


def write_pairs_jsonl(path: Path, n: int = 16, negatives: bool = False) -> Path:
    topics = list(TOPICS.items())
    with open(path, "w") as f:
        for i in range(n):
            topic, text = topics[i % len(topics)]
            row = {"query": f"{topic} {WORDS[i % len(WORDS)]}", "positive": f"{text} {WORDS[(i * 7) % len(WORDS)]}"}
            if negatives:
                row["negative"] = topics[(i + 1) % len(topics)][1]
            f.write(json.dumps(row) + "\n")
    return path


def run_cli_torchrun(nproc: int, cli_args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m mosaic_embed.cli ARGS``.

    The launcher's rank variables are dropped from the environment, so a test run inside another torchrun
    does not inherit them; one thread per rank keeps two ranks from fighting over two cores; GPUs are hidden,
    so the ranks are CPU (gloo) ranks on a GPU machine too.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "mosaic_embed.cli", *cli_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def packed_mlm_batch(lens, seed, vocab=128, host_rows=False):
    """A packed masked-LM batch of sequences of lengths ``lens``: random ids, 30 % of them labelled; with
    ``host_rows`` the labelled rows too, as the packed collator gives them (``masked_rows``)."""
    from mosaic_embed.data.mlm import masked_rows

    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    ids = torch.randint(5, vocab, (total,), generator=gen)
    labels = torch.where(torch.rand(total, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    batch = {"input_ids": ids, "labels": labels, "cu_seqlens": cu, "max_seqlen": max(lens)}
    return {**batch, "masked_rows": masked_rows(labels)} if host_rows else batch


def write_polarity_task(task: Path) -> Path:
    """A separable two-class task in the SST-2 layout (train.tsv, dev.tsv): the words decide the label."""
    task.mkdir(parents=True, exist_ok=True)
    good = ["a good fun film", "the best movie", "good and fun", "the best film of the year", "a fun good movie"]
    bad = ["a bad dull film", "the worst movie", "bad and dull", "the worst film of the year", "a dull bad movie"]
    rows = [f"{s}\t1" for s in good] + [f"{s}\t0" for s in bad]
    (task / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows * 4) + "\n")
    (task / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return task


def traced_as_one_graph(model, batch: dict):
    """``torch._dynamo.explain`` of ``model(**batch)`` (tracing only, no code generation) as training compiles it
    (dispatch resolved first, the data-dependent row count captured); asserts one graph and no break."""
    from mosaic_embed.kernels.dispatch import warm_dispatch

    torch._dynamo.reset()
    warm_dispatch(model, "cpu", torch.float32)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explained = torch._dynamo.explain(model)(**batch)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    return explained
