#!/usr/bin/env bash
# Time every k-means Triton launch config, the autotuned pick and deterministic=True on
# the CUDA device, after checking each config's labels (exact) on it. One call answers
# which config is fastest. Skips itself without CUDA.
# Usage: benchmarks/gpu_kmeans_variants.sh [python]   (from the repository root)
set -euo pipefail
PY=${1:-python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_kmeans_variants: no CUDA device; skipped"
  exit 0
fi
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_"))')
OUT=benchmarks/results/$GPU
mkdir -p "$OUT"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kmeans_assign.py -k "every_launch_config"
"$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_kmeans_assign.py -k gpu_variant \
  --benchmark-json "$OUT/kmeans_variants.json"
"$PY" benchmarks/report.py "$OUT/kmeans_variants.json" --out "$OUT/kmeans_variants.md"
