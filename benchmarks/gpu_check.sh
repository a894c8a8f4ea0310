#!/usr/bin/env bash
# The one prepared GPU session, for one H100 or H200, in under 8 minutes (BUDGET seconds; every
# step runs under `timeout`, capped by what is left, so a slow step cannot overrun the session):
#   1. a correctness gate: the CUDA tests of the Triton paths (tests/test_gpu.py's, the kernel
#      test files' `cuda` ones, the launch/pass budgets);
#   2. per-module forward + backward times at ResNet-50's four stage shapes (bench_modules.py);
#   3. ResNet-50 training img/s (bf16, channels_last, batch 256): the seven attentions x {torch, triton}
#      eager;
#   4. kernel=auto's decisions in the same set-up (benchmarks/kernel_decisions.py: per module and stage
#      shape, the chosen path, ms per path, the difference; and the first step's overhead);
#   5. compiled runs while the budget lasts: none, scsa x {torch, triton} (a minute each);
#   6. the rest of the GPU tests with the time left;
#   7. a summary table (printed last, also in $OUT/summary.md): img/s, then the decisions.
# Usage (repo root, on a GPU machine): OUT=results/ bash benchmarks/gpu_check.sh
# Packages missing on the machine can travel as wheels in .whl/ (see the device notes).
set -uo pipefail
OUT=${OUT:-gpu_results}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

left() { echo $(( BUDGET - SECONDS )); }
step() {  # step CAP LOG CMD...: run CMD under timeout min(CAP, time left), output to $OUT/LOG
  local cap=$1 log=$2; shift 2
  local t; t=$(left); (( t > cap )) && t=$cap
  if (( t < 20 )); then echo "skipped (budget): $*" | tee -a "$OUT/skipped.txt"; return; fi
  echo "== [$SECONDS s] $log (timeout ${t}s)"
  timeout -k 5 "$t" "$@" > "$OUT/$log" 2>&1
  echo "   rc=$? after $SECONDS s; $(tail -n 1 "$OUT/$log")"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

TESTS=(tests/test_gpu.py tests/test_kernels.py tests/test_kernels_scsa.py)
GATE="triton_attention or auto_kernel or on_cuda or budget or fast_scsa"
step 100 gate_tests.log python3 -m pytest "${TESTS[@]}" -q -p no:cacheprovider -k "$GATE"
step 90 modules.log python3 benchmarks/bench_modules.py --batch-size 256 --amp bf16 --warmup 2 --iters 5 --rounds 3 \
  --out "$OUT/modules.json"
BENCH=(python3 -m scsa.analysis.benchmark --models resnet50 --amp bf16 --batch-size 256 --channels-last true --warmup 6
       --steps 6 --rounds 3)
step 120 throughput_eager.log "${BENCH[@]}" --attentions none,scsa,se,eca,cbam,ca,ema --kernels torch,triton \
  --compile false --out "$OUT/throughput_eager.json"
step 75 kernel_decisions.log python3 benchmarks/kernel_decisions.py --model resnet50 \
  --attentions scsa,se,eca,cbam,ca,ema --batch-size 256 --amp bf16 --channels-last true --steps 2 \
  --out "$OUT/kernel_decisions.json"
step 80 compiled_none.log "${BENCH[@]}" --attentions none --compile true --out "$OUT/compiled_none.json"
for k in triton torch; do
  step 80 "compiled_scsa_$k.log" "${BENCH[@]}" --attentions scsa --kernels $k --compile true \
    --out "$OUT/compiled_scsa_$k.json"
done
step 600 rest_tests.log python3 -m pytest "${TESTS[@]}" -q -p no:cacheprovider -k "not ($GATE)" \
  --deselect tests/test_gpu.py::test_train_cli_on_gpu

python3 - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, os, sys
out = sys.argv[1]
print(open(os.path.join(out, "gpu.txt")).read().strip(), "\n")
rows = []
for name in ("throughput_eager", "compiled_none", "compiled_scsa_triton", "compiled_scsa_torch"):
    path = os.path.join(out, name + ".json")
    rows += json.load(open(path))["results"] if os.path.exists(path) else []
base = {r["compile"]: r["img_per_s"] for r in rows if r["attention"] == "none"}
print("| attention | kernel | compile | img/s | vs none |\n|---|---|---|---:|---:|")
for r in rows:
    ratio = r["img_per_s"] / base[r["compile"]] if r["compile"] in base else float("nan")
    print(f"| {r['attention']} | {r.get('kernel') or '-'} | {r['compile']} | {r['img_per_s']:.0f} | {ratio:.3f} |")
for log in ("kernel_decisions.log", "modules.log"):  # kernel=auto's decisions, then the per-module times
    if os.path.exists(os.path.join(out, log)):
        kept = "".join(l for l in open(os.path.join(out, log)) if l.startswith(("|", "device")) or not l.strip())
        print(f"\n{log}:\n" + kept.strip() + "\n")
for log in ("gate_tests.log", "rest_tests.log"):
    p = os.path.join(out, log)
    if os.path.exists(p):
        lines = [l for l in open(p).read().splitlines() if l.strip()]
        print(f"{log}: {lines[-1] if lines else 'empty'}")
EOF
echo "total ${SECONDS}s"
