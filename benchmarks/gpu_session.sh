#!/usr/bin/env bash
# The device check for a session lent a GPU, as one prepared script (about 10 minutes on one
# H200): the CUDA tests, the methods against their floors, stacked vs separate trials, the tuned
# sweep with and without stacking, and torch.profiler traces of where the time goes. Numbers go
# under OUT (default gpu-results; the device tool's $OUT where set), for docs/performance.md.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
python -c "import featcache, classifiers" 2>/dev/null || pip install -q -e ".[dev]" || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/card.txt"
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, keep its output, go on
  local name=$1 limit=$2; shift 2
  echo "== $name (at most $limit s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $? after $SECONDS s in all"; tail -n 25 "$OUT/$name.txt"
}
step test_gpu 180 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
step methods 150 python benchmarks/stage2.py --device cuda --methods joint,crt,tau,lws,ncm,knn --rounds 3 \
  --no-peers --json "$OUT/methods.json"
step stacked 120 python benchmarks/stage2.py --device cuda --methods none --stacked crt,la_loss,lws,marc --rounds 3 \
  --json "$OUT/stacked.json"
step tuned_sweep 150 python benchmarks/stage2.py --device cuda --methods none --tuned-sweep --budget 8 --rounds 1 \
  --json "$OUT/tuned_sweep.json"
step trace 90 python benchmarks/stage2.py --device cuda --methods none --trace joint,crt,lws
