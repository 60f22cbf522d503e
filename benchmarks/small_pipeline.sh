#!/usr/bin/env bash
# The small real run, end to end on one GPU host: pretrain MosaicBERT-Small on the shared corpus, finetune
# it on the two real classification tasks (benchmarks/glue_small.py) and train + evaluate retrieval
# encoders on the news BEIR set (benchmarks/retrieval_news.py, systems (a) and (d)).
#
# Staging (from the project root on a machine with ../shared):
#   bash ../shared/gpu/stage.sh corpus tasks retrieval/news
# On the GPU host (carry .whl and .gpudata):
#   source .gpudata/preamble.sh && bash benchmarks/small_pipeline.sh [PRETRAIN_STEPS]
# Results land in benchmarks/results/{glue_small,retrieval_news}.json; logs and copies go to $OUT if set.
set -uo pipefail
STEPS=${1:-2000}
DATA=${MOSAIC_DATA:-../shared/data}
RUN=${RUN:-runs/small}
LOGS=${OUT:-runs/small-logs}
mkdir -p "$LOGS"
status=0

step() {  # step NAME TIMEOUT_S CMD...: run one stage, log it, keep going on failure (later stages say why)
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" | grep -vE '^\s*$|it/s\]|s/it\]' | tail -40
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [[ $rc == 0 ]] || status=1
}

step pretrain 330 python3 -m mosaic_embed.cli pretrain --corpus "$DATA/corpus" --recipe mosaic-bert-small \
  --out "$RUN" --set train.max_steps="$STEPS" --set train.eval_every_steps=500 \
  --set train.save_every_steps=500
step glue 150 python3 benchmarks/glue_small.py --model "$RUN/final" --tasks sst2_like,sms_spam
step retrieval 150 python3 benchmarks/retrieval_news.py --systems mosaic+pairs,mosaic+auto \
  --backbone "$RUN/final" --corpus "$DATA/corpus/news_train.jsonl.gz"

cp benchmarks/results/glue_small.json benchmarks/results/retrieval_news.json "$LOGS/" 2>/dev/null
cp "$RUN/final/manifest.json" "$LOGS/pretrain_manifest.json" 2>/dev/null
cp "$RUN/metrics.jsonl" "$LOGS/pretrain_metrics.jsonl" 2>/dev/null
exit $status
