#!/usr/bin/env bash
# The main job on the embedded default data set (scikit-learn's digits, made long-tailed; no
# download): Stage 1 train -> extract to the cache -> Stage 2 sweep, table and plots.
set -euo pipefail
RUN=${RUN:-runs/demo}
export FEATCACHE_DIR=${FEATCACHE_DIR:-$RUN/cache}

echo "== Stage 1: train tinycnn on digits-lt with instance-balanced sampling"
featcache train --data digits-lt --arch tinycnn --sampler instance --epochs 30 --out "$RUN/stage1" --overwrite --quiet

echo "== Extract penultimate features into the cache ($FEATCACHE_DIR)"
ENTRY=$(featcache extract --ckpt "$RUN/stage1/last.pt" --quiet | tail -n 1)
featcache info "$ENTRY"

echo "== Stage 2: classifier strategies on the cached features (tau picked on val)"
lt-cls sweep --cache "$ENTRY" --methods joint,crt,tau,lws,ncm,knn --param tau.tau=auto --seeds 0,1,2 \
  --out "$RUN/sweep" --overwrite --quiet
echo "Tables: $RUN/sweep/table.{md,csv,tex}; plots: $RUN/sweep/*.png"
