#!/usr/bin/env bash
# The one prepared GPU session: the CUDA tests, then the throughput benchmark of the
# README (resnet50 x {none, se, scsa}, batch 256, bf16, channels_last, eager and compiled).
# Usage (repo root, on a GPU machine): OUT=results/ bash benchmarks/gpu_check.sh
# Packages missing on the machine can travel as wheels in .whl/ (see the device notes).
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout 330 python3 -m scsa.benchmark --models resnet50 --attentions none,se,scsa --amp bf16 --batch-size 256 \
  --channels-last true --compile false,true --warmup 15 --steps 10 --rounds 3 --out "$OUT/throughput.json" \
  2>&1 | tee "$OUT/throughput.log"
