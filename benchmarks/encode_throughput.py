"""Embedding throughput: our MosaicBERT encoder pipeline vs sentence-transformers over transformers' BertModel.

Workload: ``--n`` texts (default 50,000) cut from the shared corpus at mixed lengths, uniform 8..200 words
(about 112 word pieces on average), truncated at 256 tokens. Both systems: bf16 on GPU, the same texts,
random weights (throughput does not depend on them), mean pooling + normalisation, and tokenization
*included* in the timed region (it is part of what a user waits for).

- ours: ``mosaic_embed.encode.Encoder`` over MosaicBERT-Base (137 M parameters), exactly what
  ``mosaic-embed embed`` runs: the Rust tokenizer on all cores in a background thread a window ahead,
  length-sorted packed batches cut by a token budget (``--max-tokens``, default 32768 real tokens on GPU;
  no padding tokens), bf16, the Triton varlen ALiBi attention and fused GeGLU on CUDA;
- baseline: ``SentenceTransformer.encode`` over transformers' ``BertModel`` BERT-Base (110 M), SDPA
  attention, bf16, its own length sorting, batch 128.

Figures: sentences/s, real (non-padding) tokens/s and forward MFU = 2 x parameters x real tokens/s /
measured peak, the peak being the FLOP/s of a bf16 8192^3 matmul timed in the same run.
Writes ``benchmarks/results/encode_throughput.json`` with ``{"speedup": ours / baseline sentences/s, ...}``.

    python benchmarks/encode_throughput.py                        # GPU, full size
    python benchmarks/encode_throughput.py --check 2048 --variants eager,none,65536   # + correctness, sweep
    python benchmarks/encode_throughput.py --tiny --n 64          # CPU smoke run (tests use this)

``--same-model`` (the CPU row: users without a GPU): both systems run *one* network. The baseline is a
transformers ``BertModel`` (``--shape minilm``: all-MiniLM-L6-v2's 6 x 384, the usual CPU embedder; ``base``:
BERT-Base) in sentence-transformers; ours is that folder through ``mosaic-embed convert --from-hf`` (BERT mode:
learned positions, GELU MLP) on our packed Encoder, fp32 both on CPU. ``--check N`` then compares the vectors.

    python benchmarks/encode_throughput.py --device cpu --same-model --shape minilm --n 2000 --warmup 200 \
        --batch-size 32 --check 256 --out benchmarks/results/encode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_models(workdir: Path, tiny: bool, max_seq_len: int):
    """Save (ours, baseline) encoder folders: random MosaicBERT / BertModel + mean pooling + normalize."""
    import torch
    from transformers import BertConfig, BertModel

    from mosaic_embed.data.tokenizer import load_tokenizer, padded_vocab_size
    from mosaic_embed.encode import build_encoder, save_encoder
    from mosaic_embed.model import MosaicBertModel, preset_config

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


def build_same_model(workdir: Path, shape: str, max_seq_len: int):
    """Save (ours, baseline) encoder folders holding one network: a random transformers BertModel in
    sentence-transformers (baseline) and the same folder converted to MosaicBERT's BERT mode (ours)."""
    import torch
    from transformers import BertConfig, BertModel

    from mosaic_embed.data.tokenizer import load_tokenizer
    from mosaic_embed.encode import build_encoder, save_encoder
    from mosaic_embed.model.convert import convert_hf

    tok = load_tokenizer(None)
    torch.manual_seed(0)
    dims = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
            "base": {},
            "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}[shape]
    BertModel(BertConfig(vocab_size=len(tok), **dims)).save_pretrained(workdir / "baseline-backbone")
    tok.save_pretrained(workdir / "baseline-backbone")
    save_encoder(build_encoder(workdir / "baseline-backbone", "mean", True, max_seq_len, device="cpu"),
                 workdir / "baseline")
    convert_hf(workdir / "baseline", workdir / "ours")
    return workdir / "ours", workdir / "baseline"


def _budget(value: str) -> int | None:
    """--max-tokens: "auto" = the Encoder's default (None), "none" = no budget (a whole window per batch), else tokens."""
    return {"auto": None, "none": 1 << 40}[value] if value in ("auto", "none") else int(value)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_ours(folder: Path, texts: list[str], batch_size: int, max_seq_len: int, device: str, warmup: int,
             max_tokens: int | None = None, compile: bool = False, check: int = 0) -> dict:
    """Time ``Encoder.encode`` (tokenization included) with the given packed-batch settings.

    Also times, outside the measured region, tokenization alone and the device part alone (the same
    windows pre-tokenized), so the report says where the seconds go. ``check`` > 0: cosine of the packed
    path against ``SentenceTransformer.encode`` of the same model on the first ``check`` texts.
    """
    import numpy as np

    from mosaic_embed.encode import Encoder, plan_window

    enc = Encoder.load(folder, device=device, max_seq_len=max_seq_len, max_tokens=max_tokens, compile=compile,
                       batch_size=batch_size)
    t = time.perf_counter()
    enc.encode(texts[:warmup], batch_size=batch_size)  # compile/autotune, allocator warm-up
    sync(device)
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    emb = enc.encode(texts, batch_size=batch_size)
    sync(device)
    seconds = time.perf_counter() - t
    # where the time goes (outside the measured region)
    t = time.perf_counter()
    flat, lens = enc.tokenize_flat(texts)
    tokenize_s = time.perf_counter() - t
    win = plan_window(flat, lens, batch_size, enc.max_tokens)
    sync(device)
    t = time.perf_counter()
    enc._embed_packed(win).cpu()
    device_s = time.perf_counter() - t
    r = {"seconds": seconds, "tokens": int(lens.sum()), "params": n_params(enc.backbone), "path": enc.path_used,
         "dtype": str(enc.dtype), "dim": int(emb.shape[1]),
         "attn_impl": getattr(enc.backbone.config, "attn_impl", None), "max_tokens": enc.max_tokens,
         "compiled_layers": enc.compiled, "n_batches": int(len(win.bounds) - 1), "warmup_s": warmup_s,
         "tokenize_only_s": tokenize_s, "device_only_s": device_s,
         "device_only_note": f"all {len(texts)} texts as one pre-tokenized window: forwards + pooling + readback"}
    if check:
        ref = enc.st.encode(texts[:check], batch_size=batch_size, convert_to_numpy=True)
        got = emb[:check]
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        r["check_vs_st_encode"] = {"n": check, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        ids = enc.tokenize(texts[:check])
        f2, l2 = enc.tokenize_flat(texts[:check])
        r["check_vs_st_encode"]["same_token_ids"] = bool(f2.tolist() == [x for i in ids for x in i])
        r["_vectors"] = got  # for the same-model check against the baseline's own vectors (not written)
    return r


def run_baseline(folder: Path, texts: list[str], batch_size: int, max_seq_len: int, device: str,
                 warmup: int, keep: int = 0) -> dict:
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
            "attn_impl": getattr(model.config, "_attn_implementation", None), "_vectors": emb[:keep]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="mini-sized models (CPU smoke run)")
    p.add_argument("--same-model", action="store_true",
                   help="one network for both: a BertModel, and it converted to MosaicBERT (see the module doc)")
    p.add_argument("--shape", choices=("minilm", "base", "tiny"), default="minilm", help="--same-model's BERT")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=2048)
    p.add_argument("--max-tokens", default="auto", help="ours: real tokens per packed batch ('auto': 32768 on GPU)")
    p.add_argument("--compile", choices=("on", "off"), default="off",
                   help="ours: torch.compile the MosaicBERT layers (off: the Encoder default)")
    p.add_argument("--check", type=int, default=0, help="ours: cosine vs SentenceTransformer.encode on N texts")
    p.add_argument("--variants", default="",
                   help="extra ours-only runs after the main result is written, e.g. 'eager,none,eager:65536'")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "encode_throughput.json")
    args = p.parse_args(argv)

    import torch

    import mosaic_embed  # noqa: F401

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    texts = make_texts(args.corpus or corpus_dir(), args.n)
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, base_dir = (build_same_model(Path(tmp), args.shape, args.max_seq_len) if args.same_model
                              else build_models(Path(tmp), args.tiny, args.max_seq_len))
        warmup = min(args.warmup, len(texts))
        # "auto" = the Encoder's default budget (None); "none" = no budget (a whole window per batch)
        max_tokens = _budget(args.max_tokens)
        compile_ = args.compile == "on"
        ours = run_ours(ours_dir, texts, args.batch_size, args.max_seq_len, device, warmup, max_tokens,
                        compile_, args.check)
        base = run_baseline(base_dir, texts, args.batch_size, args.max_seq_len, device, warmup, args.check)
        mine, theirs = ours.pop("_vectors", None), base.pop("_vectors")
        if args.same_model and mine is not None:  # one network: our vectors against the original's
            import numpy as np

            cos = (mine * theirs).sum(1) / np.linalg.norm(mine, axis=1) / np.linalg.norm(theirs, axis=1)
            ours["check_vs_baseline"] = {"n": len(cos), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        from mosaic_embed.runtime import peak_flops

        peak, peak_note = peak_flops(device)
        for r in (ours, base):
            _rates(r, len(texts), peak)
        result = _write(args, ours, base, texts, peak, peak_note, device)
        variants = []
        for v in filter(None, args.variants.split(",")):
            # "16384" / "none" (a whole window per batch) / "eager" / "eager:16384" / "compile" / "compile:16384"
            mode, _, budget = v.rpartition(":") if ":" in v else ((v, "", "auto") if v in ("eager", "compile")
                                                                   else ("", "", v))
            budget = _budget(budget)
            run = run_ours(ours_dir, texts, args.batch_size, args.max_seq_len, device, warmup, budget,
                           mode == "compile", min(args.check, 512))
            run.pop("_vectors", None)
            run["variant"] = v
            _rates(run, len(texts), peak)
            run["speedup"] = run["sentences_per_s"] / base["sentences_per_s"]
            variants.append(run)
            print(f"variant {v}: {run['sentences_per_s']:.1f} sent/s, {run['tokens_per_s']:.0f} tok/s, "
                  f"speedup {run['speedup']:.2f}x, device-only {run['device_only_s']:.2f}s", flush=True)
            result["variants"] = variants
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _rates(r: dict, n_texts: int, peak: float) -> None:
    r["sentences_per_s"] = n_texts / r["seconds"]
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    r["forward_mfu"] = 2 * r["params"] * r["tokens_per_s"] / peak


def _write(args, ours: dict, base: dict, texts: list[str], peak: float, peak_note: str, device: str) -> dict:
    """Assemble, save and print the main result (ours with the chosen settings vs the baseline)."""
    import torch

    from mosaic_embed.artifacts import git_commit

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
        "same_model": (f"one network: a random BertModel ({args.shape}) in sentence-transformers vs it converted "
                       "to MosaicBERT (BERT mode) on our Encoder") if args.same_model else False,
        "matmul_peak_flops": peak,
        "mfu_peak": peak_note,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": triton_version,
        "git_commit": git_commit(),
        "timed_region": "encode(texts) of all texts, tokenization included, after a warm-up on the first "
                        f"{min(args.warmup, len(texts))} texts; token counts outside it",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'system':10s} {'sent/s':>10s} {'tokens/s':>12s} {'MFU':>7s}  params")
    for name, r in (("ours", ours), ("baseline", base)):
        print(f"{name:10s} {r['sentences_per_s']:10.1f} {r['tokens_per_s']:12.0f} {r['forward_mfu']:7.3f}  "
              f"{r['params'] / 1e6:.1f}M ({r['path']}, {r['dtype']}, attn {r['attn_impl']})")
    print(f"speedup {result['speedup']:.2f}x  ({len(texts)} texts, {result['mean_tokens']:.1f} tokens mean) -> {args.out}")
    print(f"ours: tokenize-only {ours['tokenize_only_s']:.2f}s, device-only {ours['device_only_s']:.2f}s, "
          f"{ours['n_batches']} batches, warm-up {ours['warmup_s']:.1f}s, check {ours.get('check_vs_st_encode')}",
          flush=True)
    return result


if __name__ == "__main__":
    main()
