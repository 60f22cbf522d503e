"""Embedding throughput: our MosaicBERT encoder pipeline vs sentence-transformers over transformers' BertModel.

Workload: ``--n`` texts (default 50,000) cut from the shared corpus at mixed lengths, uniform 8..200 words
(about 112 word pieces on average), truncated at 256 tokens. Both systems: bf16 on GPU, batch 128,
random weights (throughput does not depend on them), mean pooling + normalisation, and tokenization
*included* in the timed region (it is part of what a user waits for).

- ours: ``mosaic_embed.encode.Encoder`` over MosaicBERT-Base (137 M parameters): tokenization of the next
  window in a background thread, length-sorted packed batches (no padding tokens), bf16, the Triton
  varlen ALiBi attention on CUDA;
- baseline: ``SentenceTransformer.encode`` over transformers' ``BertModel`` BERT-Base (110 M), SDPA
  attention, bf16, its own length sorting, batch 128.

Figures: sentences/s, real (non-padding) tokens/s and forward MFU = 2 x parameters x real tokens/s /
measured peak, the peak being the FLOP/s of a bf16 8192^3 matmul timed in the same run.
Writes ``benchmarks/results/encode_throughput.json`` with ``{"speedup": ours / baseline sentences/s, ...}``.

    python benchmarks/encode_throughput.py                        # GPU, full size
    python benchmarks/encode_throughput.py --tiny --n 64          # CPU smoke run (tests use this)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def corpus_dir() -> Path:
    if os.environ.get("MOSAIC_DATA"):
        return Path(os.environ["MOSAIC_DATA"]) / "corpus"
    return ROOT.parent / "shared" / "data" / "corpus"


def make_texts(corpus: Path, n: int, seed: int = 0, min_words: int = 8, max_words: int = 200) -> list[str]:
    """``n`` texts of uniform random length in [min_words, max_words] words, cut in order from the corpus."""
    from mosaic_embed.data.corpus import iter_documents

    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < n:
        before = len(texts)
        for doc in iter_documents(corpus):
            words = doc.split()
            i = 0
            while i < len(words) and len(texts) < n:
                k = rng.randint(min_words, max_words)
                piece = words[i : i + k]
                if len(piece) >= min_words:
                    texts.append(" ".join(piece))
                i += k
            if len(texts) >= n:
                break
        if len(texts) == before:
            raise ValueError(f"{corpus}: no document has {min_words}+ words")
    return texts


def matmul_peak(device, dtype, size: int, reps: int = 10) -> float:
    """Measured FLOP/s of a ``size``^3 matmul (the MFU denominator)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - t)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_models(workdir: Path, tiny: bool, max_seq_len: int):
    """Save (ours, baseline) encoder folders: random MosaicBERT / BertModel + mean pooling + normalize."""
    import torch
    from transformers import BertConfig, BertModel

    from mosaic_embed.data.tokenizer import load_tokenizer, padded_vocab_size
    from mosaic_embed.model import MosaicBertModel, preset_config
    from mosaic_embed.train.contrastive import build_encoder, save_encoder

    tok = load_tokenizer(None)  # bundled bert-base-uncased WordPiece
    torch.manual_seed(0)
    if tiny:
        ours_cfg = preset_config("mosaic-bert-mini", vocab_size=padded_vocab_size(tok))
        base_cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                              vocab_size=len(tok), max_position_embeddings=512)
    else:
        ours_cfg = preset_config("mosaic-bert-base", vocab_size=padded_vocab_size(tok))
        base_cfg = BertConfig(vocab_size=len(tok))  # BERT-Base defaults
    for name, model in (("ours", MosaicBertModel(ours_cfg)), ("baseline", BertModel(base_cfg))):
        model.save_pretrained(workdir / f"{name}-backbone")
        tok.save_pretrained(workdir / f"{name}-backbone")
        save_encoder(build_encoder(workdir / f"{name}-backbone", "mean", True, max_seq_len, device="cpu"),
                     workdir / name)
    return workdir / "ours", workdir / "baseline"


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_ours(folder: Path, texts: list[str], batch_size: int, max_seq_len: int, device: str, warmup: int) -> dict:
    from mosaic_embed.encode import Encoder

    enc = Encoder.load(folder, device=device, max_seq_len=max_seq_len)
    enc.encode(texts[:warmup], batch_size=batch_size)  # compile/autotune, allocator warm-up
    sync(device)
    t = time.perf_counter()
    emb = enc.encode(texts, batch_size=batch_size)
    sync(device)
    seconds = time.perf_counter() - t
    tokens = sum(len(x) for x in enc.tokenize(texts))  # counted outside the timed region
    return {"seconds": seconds, "tokens": tokens, "params": n_params(enc.backbone), "path": enc.path_used,
            "dtype": str(enc.dtype), "dim": int(emb.shape[1]),
            "attn_impl": getattr(enc.backbone.config, "attn_impl", None)}


def run_baseline(folder: Path, texts: list[str], batch_size: int, max_seq_len: int, device: str,
                 warmup: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device=device, model_kwargs={"attn_implementation": "sdpa"})
    st.max_seq_length = max_seq_len
    if torch.device(device).type == "cuda":
        st.to(torch.bfloat16)
    st.encode(texts[:warmup], batch_size=batch_size)
    sync(device)
    t = time.perf_counter()
    emb = st.encode(texts, batch_size=batch_size)
    sync(device)
    seconds = time.perf_counter() - t
    tok = st[0].tokenizer
    tokens = sum(len(x) for x in tok(texts, truncation=True, max_length=max_seq_len)["input_ids"])
    model = st[0].auto_model
    return {"seconds": seconds, "tokens": tokens, "params": n_params(model), "path": "SentenceTransformer.encode",
            "dtype": str(next(model.parameters()).dtype), "dim": int(emb.shape[1]),
            "attn_impl": getattr(model.config, "_attn_implementation", None)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="mini-sized models (CPU smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--peak-size", type=int, default=8192, help="matmul size for the measured peak")
    p.add_argument("--warmup", type=int, default=2048)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "encode_throughput.json")
    args = p.parse_args(argv)

    import torch

    import mosaic_embed  # noqa: F401

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    texts = make_texts(args.corpus or corpus_dir(), args.n)
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, base_dir = build_models(Path(tmp), args.tiny, args.max_seq_len)
        warmup = min(args.warmup, len(texts))
        ours = run_ours(ours_dir, texts, args.batch_size, args.max_seq_len, device, warmup)
        base = run_baseline(base_dir, texts, args.batch_size, args.max_seq_len, device, warmup)
    peak_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    peak = matmul_peak(device, peak_dtype, args.peak_size)
    for r in (ours, base):
        r["sentences_per_s"] = len(texts) / r["seconds"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["forward_mfu"] = 2 * r["params"] * r["tokens_per_s"] / peak
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "speedup": ours["sentences_per_s"] / base["sentences_per_s"],
        "ours": ours,
        "baseline": base,
        "n_texts": len(texts),
        "mean_tokens": ours["tokens"] / len(texts),
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "tiny": args.tiny,
        "matmul_peak_flops": peak,
        "matmul_peak": f"{args.peak_size}^3 {str(peak_dtype).replace('torch.', '')}",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": triton_version,
        "git_commit": commit,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'system':10s} {'sent/s':>10s} {'tokens/s':>12s} {'MFU':>7s}  params")
    for name, r in (("ours", ours), ("baseline", base)):
        print(f"{name:10s} {r['sentences_per_s']:10.1f} {r['tokens_per_s']:12.0f} {r['forward_mfu']:7.3f}  "
              f"{r['params'] / 1e6:.1f}M ({r['path']}, {r['dtype']}, attn {r['attn_impl']})")
    print(f"speedup {result['speedup']:.2f}x  ({len(texts)} texts, {result['mean_tokens']:.1f} tokens mean) -> {args.out}")
    return result


if __name__ == "__main__":
    main()
