#!/usr/bin/env bash
# Everything a lent GPU session runs, in two device calls of under 10 minutes each:
#   bash bench/gpu_session.sh verify   # build _C, GPU tests, compute-sanitizer on each kernel
#   bash bench/gpu_session.sh bench    # python -m medusa_kernels.bench + the Medusa-1 training check
# Results land in $OUT (the device tool brings them back); commit them under bench/results/.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage=${1:-verify}
log() { echo "== $* ($(date +%T))"; }

log install
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
python -c "import medusa_kernels._C as c, torch, triton; print('ext ok', torch.__version__, triton.__version__, torch.cuda.get_device_name())"

if [ "$stage" = verify ]; then
  log "GPU tests (all tests; GPU-only ones run here)"
  timeout 360 python -m pytest -q -rs -x python_tests --durations=15 2>&1 | tee "$OUT/pytest.log" | tail -40
  for t in tree_attention heads_topk compact_kv acceptance; do
    for tool in memcheck racecheck; do
      log "compute-sanitizer $tool $t"
      timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 \
        python -m pytest -q -x python_tests/test_$t.py 2>&1 | tail -4
    done
  done 2>&1 | tee "$OUT/sanitizer.log"
elif [ "$stage" = bench ]; then
  log bench
  timeout 420 python -m medusa_kernels.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -80
  log "Medusa-1 training check on the demo model"
  timeout 120 python -m medusa_kernels.train medusa1 --model medusa_kernels/assets/demo/model \
    --prompts demo:512 --max-new-tokens 96 --num-heads 4 --seq-len 512 --batch-size 32 \
    --steps 300 --out /tmp/m1 --measure-accept 32 --report "$OUT/train_medusa1_demo.json" 2>&1 | tail -20
fi
