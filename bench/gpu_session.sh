#!/usr/bin/env bash
# Everything a lent GPU session runs, in two device calls of at most 10 minutes each:
#   bash bench/gpu_session.sh verify   # build _C, the GPU tests, compute-sanitizer on each kernel
#   bash bench/gpu_session.sh bench    # python -m medusa_kernels.bench, Medusa-1 training check
#   bash bench/gpu_session.sh demo     # (optional, ~6 min) the demo model built from nothing,
#                                        then the tree size --nodes auto picks on the GPU
#   BUDGET=520 bash bench/gpu_session.sh all   # one call when device time is short: the GPU
#                                        tests, memcheck, then bench --quick (partial JSON kept)
# Each stage ends within BUDGET seconds (default 570, under the device tool's 600 s per call):
# every step's timeout is its own cap or what is left of the budget, whichever is smaller.
# Results land in $OUT (the device tool brings back at most 8 files; each stage writes at most
# 8); commit them under bench/results/. The CPU-only tests (decoder parity, training, demo,
# calibration, AOT compile, csrc build, bench --quick) are not rerun here: CI runs them.
# The copy of the tree sent to the GPU may lack .git: give the commit (typed in, from `git
# rev-parse HEAD` here) for the bench JSON, e.g. `MEDUSA_KERNELS_COMMIT=1a2b3c4 bash
# bench/gpu_session.sh bench`.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # H100/H200: build _C for sm_90 only
PY=${PY:-python3}  # the device image's python3 is the one with torch (`python` may not be)
BUDGET=${BUDGET:-570}
stage=${1:-verify}
KERNEL_TESTS=(python_tests/test_tree_attention.py python_tests/test_heads_topk.py
              python_tests/test_compact_kv.py python_tests/test_acceptance.py)
log() { echo "== $* ($(date +%T), ${SECONDS} s into the stage)"; }
# cap N: N seconds, or what is left of the budget if that is less (at least 1)
cap() {
  local left=$((BUDGET - SECONDS))
  [ "$1" -lt "$left" ] && left=$1
  [ "$left" -lt 1 ] && left=1
  echo "$left"
}

case "$stage" in
  verify|bench|demo|all) ;;
  *) echo "usage: bash bench/gpu_session.sh verify|bench|demo|all"; exit 2;;
esac

log install
# --no-index: the device machine reaches no network (pip must not wait on an index). If the
# build fails the stage goes on from the source tree (python -m runs from the repository
# root), without medusa_kernels._C: its failure is in install.log, the rest still gets tested.
timeout "$(cap 150)" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
  --disable-pip-version-check -e . > "$OUT/install.log" 2>&1 \
  || { tail -30 "$OUT/install.log"; echo "install FAILED: going on without it"; }
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name())"
"$PY" -c "import medusa_kernels._C" && echo "medusa_kernels._C ok" \
  || echo "medusa_kernels._C did not build (see install.log): the cuda backend is skipped"

if [ "$stage" = all ]; then
  log "GPU tests (kernels, decoding, sampling, op boundary)"
  timeout "$(cap 170)" "$PY" -m pytest -q -rs -p no:cacheprovider --durations=10 \
    "${KERNEL_TESTS[@]}" python_tests/test_gpu_decoding.py python_tests/test_triton_decoding.py \
    python_tests/test_sampling.py python_tests/test_ops_boundary.py 2>&1 \
    | tee "$OUT/pytest.log" | tail -25
  log "compute-sanitizer memcheck on the kernels' small-shape tests"
  limit=$(cap 80)
  pids=()
  for f in "${KERNEL_TESTS[@]}"; do
    name=$(basename "$f" .py)
    ( PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$limit" compute-sanitizer --tool memcheck \
        --error-exitcode 9 --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider \
        -k "not gpu" "$f" > "/tmp/san_$name.log" 2>&1
      echo "exit status $? (0 clean, 9 sanitizer errors, 1 test failures, 124 timed out)" \
        >> "/tmp/san_$name.log" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  for f in "${KERNEL_TESTS[@]}"; do
    name=$(basename "$f" .py)
    { echo "== memcheck $name"; head -c 60000 "/tmp/san_$name.log"; } >> "$OUT/sanitizer.log"
  done
  grep -E "^== |ERROR SUMMARY|exit status|passed|failed" "$OUT/sanitizer.log"
  log "bench --quick"
  timeout "$(cap 400)" "$PY" -m medusa_kernels.bench --quick --out "$OUT" 2>&1 \
    | tee "$OUT/bench.log" | tail -60
  bench_json=$(ls "$OUT"/20*.json 2>/dev/null | head -1)
  if [ -n "$bench_json" ] && [ ! -f "${bench_json%.json}.md" ]; then
    log "the bench was stopped: tables from the JSON it rewrote after every row"
    timeout 30 "$PY" -m medusa_kernels.bench.report "$bench_json" 2>&1 | tail -40
  fi
elif [ "$stage" = verify ]; then
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)  # Triton compiles in 4 processes
  log "GPU tests: the kernels' tests (on the GPU here), decoding with the kernels, op boundary"
  timeout "$(cap 240)" "$PY" -m pytest -q -rs ${xdist[@]+"${xdist[@]}"} --durations=15 \
    "${KERNEL_TESTS[@]}" python_tests/test_gpu_decoding.py python_tests/test_triton_decoding.py \
    python_tests/test_ops_boundary.py 2>&1 | tee "$OUT/pytest.log" | tail -40

  # compute-sanitizer on each kernel's small-shape tests (-k "not gpu": the big GPU shapes
  # would take minutes under the tools), the four files at once. memcheck runs without
  # PyTorch's caching allocator, so each tensor is its own cudaMalloc and a read or write past
  # it is caught (inside a cached segment it would not be); no CUDA graph is captured there.
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck; do
    limit=$(cap 300)
    [ "$tool" = memcheck ] && limit=$(cap $(((BUDGET - SECONDS) / 2)))  # half for racecheck
    log "compute-sanitizer $tool (timeout ${limit} s each)"
    pids=()
    for f in "${KERNEL_TESTS[@]}"; do
      name=$(basename "$f" .py)
      (
        [ "$tool" = memcheck ] && export PYTORCH_NO_CUDA_MEMORY_CACHING=1
        timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
          "$PY" -m pytest -q -p no:cacheprovider -k "not gpu" "$f" \
          > "/tmp/san_${tool}_$name.log" 2>&1
        echo "exit status $? (0 clean, 9 sanitizer errors, 1 test failures, 124 timed out)" \
          >> "/tmp/san_${tool}_$name.log"
      ) &
      pids+=($!)
    done
    wait "${pids[@]}"
    for f in "${KERNEL_TESTS[@]}"; do
      name=$(basename "$f" .py)
      { echo "== $tool $name"; head -c 100000 "/tmp/san_${tool}_$name.log"; } \
        >> "$OUT/sanitizer.log"
    done
  done
  grep -E "^== |ERROR SUMMARY|exit status|passed|failed" "$OUT/sanitizer.log"
elif [ "$stage" = bench ]; then
  log bench
  timeout "$(cap 330)" "$PY" -m medusa_kernels.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" \
    | tail -80
  bench_json=$(ls "$OUT"/20*.json 2>/dev/null | head -1)
  if [ -n "$bench_json" ] && [ ! -f "${bench_json%.json}.md" ]; then
    log "the bench was stopped: tables, Markdown and plot from the JSON it rewrote after every row"
    timeout 60 "$PY" -m medusa_kernels.bench.report "$bench_json" 2>&1 | tail -60
  fi
  log "Medusa-1 training check on the demo model"
  rm -rf /tmp/m1  # a fresh run: its self-distilled data must come from this demo model
  timeout "$(cap 120)" "$PY" -m medusa_kernels.train medusa1 \
    --model medusa_kernels/assets/demo/model --prompts demo:512 --max-new-tokens 96 \
    --num-heads 4 --seq-len 512 --batch-size 32 --steps 300 --out /tmp/m1 --measure-accept 32 \
    --report "$OUT/train_medusa1_demo.json" --no-progress 2>&1 | tee "$OUT/train.log" | tail -20
  log "tree calibration of the demo on the GPU: calibrated vs default tree, measured"
  timeout "$(cap 90)" "$PY" -m medusa_kernels.tree calibrate --nodes 63 --measure \
    --out "$OUT/calibrated_tree_gpu.json" 2>&1 | tail -5
  grep -E '"(expected|measured|default_[a-z_]+)_accepted"|measured_on' \
    "$OUT/calibrated_tree_gpu.json"
elif [ "$stage" = demo ]; then
  log "the demo from nothing on the GPU: tokenizer, pretraining, self-distillation, Medusa-1"
  rm -rf /tmp/demo_gpu
  timeout "$(cap 480)" "$PY" -m medusa_kernels.demo.build --device cuda --threads 8 \
    --out /tmp/demo_gpu --set pretrain_s=240 2>&1 | tee "$OUT/demo_build.log" | tail -40
  cp /tmp/demo_gpu/build_report.json "$OUT/demo_build_report_gpu.json" 2>/dev/null \
    || echo "no build report: the build did not finish (see demo_build.log)"
  log "the tree size the GPU's speed picks for the shipped demo (tree calibrate --nodes auto)"
  timeout "$(cap 80)" "$PY" -m medusa_kernels.tree calibrate --nodes auto \
    --out "$OUT/calibrated_tree_auto_gpu.json" 2>&1 | tail -12
fi
log "done"
