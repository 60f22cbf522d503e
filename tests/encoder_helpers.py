"""Tiny models, tokenizers and BEIR folders shared by the encoder tests (no network, seconds to build)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "the a of and to in is it that was for on with as by at from this be are or an not have "
    "city team game news court plan rain storm market price bank film music school car road "
    "river health vote police fire water power food space ship star cat dog"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(folder: Path) -> None:
    """A BERT WordPiece tokenizer with a 128-entry vocabulary (words, letters, ##letters) into ``folder``."""
    from transformers import BertTokenizerFast

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = SPECIAL + letters + [f"##{c}" for c in letters] + list(".,!?'") + WORDS
    vocab = list(dict.fromkeys(vocab))[:128]
    vocab += [f"[unused{i}]" for i in range(128 - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=512)
    tok.save_pretrained(folder)


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A transformers BertModel (hidden 32, 2 layers, 4 heads, vocab 128, no dropout) + tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def tiny_mosaic(folder: Path, seed: int = 0) -> Path:
    """A MosaicBertModel (hidden 32, 2 layers, 4 heads, vocab 128, no dropout) + tokenizer."""
    from mosaic_embed.model import MosaicBertModel, preset_config

    torch.manual_seed(seed)
    cfg = preset_config("mosaic-bert-tiny", vocab_size=128, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, max_position_embeddings=128, attn_impl="torch")
    MosaicBertModel(cfg).save_pretrained(folder)
    write_tokenizer(folder)
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
