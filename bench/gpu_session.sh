#!/usr/bin/env bash
# A GPU round in two device calls, each under 10 minutes on one H100 / H200 (BUDGET seconds):
#   bash bench/gpu_session.sh verify  # 1: build _C; the GPU tests; compute-sanitizer memcheck and
#                                     #    racecheck on the kernels' tests; the CUDA extension's
#                                     #    tests (test_csrc_build.py: nvcc; the cuda backend of
#                                     #    test_compact_kv.py on the GPU)
#   MEDUSA_KERNELS_COMMIT=<hash> bash bench/gpu_session.sh bench
#                                     # 2: the full bench (not --quick: transformers' static-cache
#                                     #    peer at 7B, every shape) with the per-kernel step profile
# Optional, when device time is left: `extra` (the Medusa-1 training check and the demo's tree
# calibration on the GPU, about 4 min) and `demo` (the demo built from nothing, about 6 min).
# A stage runs its steps in order of worth; each step's timeout is its own cap or what is left
# of BUDGET (default 540 s, under the device tool's 600 s a call), whichever is smaller, so the
# stage ends in time and a step cut short says so (exit status 124 in its log). STEPS="a b"
# runs only those steps of the stage (a rerun of one that failed), e.g.
#   STEPS=racecheck BUDGET=200 bash bench/gpu_session.sh verify
# Results land in $OUT (at most 8 files a stage: the device tool brings back 8); commit them
# under bench/results/. The copy of the tree sent to the GPU may lack .git: MEDUSA_KERNELS_COMMIT
# gives the commit for the bench JSON.
# DRY_RUN=1: on a machine without a GPU, says what each step would run and skips what needs a
# GPU (the bench stage runs a short CPU bench instead, so the files it leaves are checked);
# python_tests/test_gpu_session.py runs it.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # H100/H200: build _C for sm_90 only
PY=${PY:-python3}  # the device image's python3 is the one with torch (`python` may not be)
BUDGET=${BUDGET:-540}
[ "${DRY_RUN:-0}" = 1 ] && DRY_RUN=1 || DRY_RUN=0
stage=${1:-verify}
KERNEL_TESTS=(python_tests/test_tree_attention.py python_tests/test_heads_topk.py
              python_tests/test_compact_kv.py python_tests/test_acceptance.py)
# what touches the GPU beyond the kernels: decoding with the kernels, sampling, the op boundary,
# exact sampling replayed from CUDA graphs, the model families through the Triton kernels
GPU_TESTS=("${KERNEL_TESTS[@]}" python_tests/test_gpu_decoding.py
           python_tests/test_triton_decoding.py python_tests/test_sampling.py
           python_tests/test_ops_boundary.py
           "python_tests/test_exact_generate.py::test_exact_sampling_in_cuda_graphs_is_plain_sampling"
           "python_tests/test_families.py::test_triton_kernels_decode_as_transformers")
case "$stage" in
  verify) ALL_STEPS="install csrc tests memcheck racecheck";;
  bench) ALL_STEPS="install bench";;
  extra) ALL_STEPS="install train calibrate";;
  demo) ALL_STEPS="demo";;
  *) echo "usage: [DRY_RUN=1] [BUDGET=s] [STEPS='...'] bash bench/gpu_session.sh verify|bench|extra|demo"
     exit 2;;
esac
STEPS=${STEPS:-$ALL_STEPS}
for s in $STEPS; do
  case " $ALL_STEPS " in *" $s "*) ;; *) echo "stage $stage has no step '$s' (it has: $ALL_STEPS)"
                                          exit 2;; esac
done
if [ "$DRY_RUN" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"
then
  echo "no CUDA GPU here: this script is for a lent GPU machine (DRY_RUN=1 to check it on a CPU)"
  exit 2
fi
log() { echo "== $* ($(date +%T), ${SECONDS} s into the stage, budget ${BUDGET} s)"; }
# cap N: N seconds, or what is left of the budget if that is less (at least 1)
cap() {
  local left=$((BUDGET - SECONDS))
  [ "$1" -lt "$left" ] && left=$1
  [ "$left" -lt 1 ] && left=1
  echo "$left"
}
wanted() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
# gpu_step NAME: false (and a line saying so) in a dry run, where a step needing a GPU is skipped
gpu_step() {
  [ "$DRY_RUN" = 1 ] || return 0
  echo "dry run: skipped '$1' (needs a GPU): $2"
  return 1
}
log "stage $stage: steps $STEPS$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"

if wanted install; then
  log install
  # --no-index: the device machine reaches no network. Skipped when _C already imports (a warm
  # machine keeps the last call's build). If the build fails the stage goes on from the source
  # tree without medusa_kernels._C: its failure is in install.log, the rest still gets tested.
  if "$PY" -c "import medusa_kernels._C" 2>/dev/null; then
    echo "medusa_kernels._C already built: install skipped"
  elif gpu_step install "pip install --no-build-isolation --no-deps --no-index -e . (builds _C)"
  then
    timeout "$(cap 180)" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
      --disable-pip-version-check -e . > "$OUT/install.log" 2>&1 \
      || { tail -30 "$OUT/install.log"; echo "install FAILED: going on without it"; }
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton',
      triton.__version__, torch.cuda.get_device_name())"
    "$PY" -c "import medusa_kernels._C" && echo "medusa_kernels._C ok" \
      || echo "medusa_kernels._C did not build (see install.log): the cuda backend is skipped"
  fi
fi

csrc_pid=
if wanted csrc; then
  # nvcc only (CPU work): in the background while the GPU tests run; skips itself without nvcc
  log "CUDA extension sources: test_csrc_build.py (nvcc, in the background)"
  timeout "$(cap 240)" "$PY" -m pytest -q -rs -p no:cacheprovider python_tests/test_csrc_build.py \
    > "$OUT/csrc.log" 2>&1 &
  csrc_pid=$!
fi

if wanted tests && gpu_step tests "pytest ${GPU_TESTS[*]}"; then
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)  # Triton compiles in 4 processes
  log "GPU tests: kernels (cuda backend of compact_kv included), decoding, sampling, families"
  timeout "$(cap 240)" "$PY" -m pytest -q -rs -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} \
    --durations=15 "${GPU_TESTS[@]}" 2>&1 | tee "$OUT/pytest.log" | tail -40
fi

# compute-sanitizer on each kernel's small-shape tests (-k "not gpu": the big GPU shapes would
# take minutes under the tools): memcheck and racecheck at once, the four files each, 8
# processes. memcheck runs without PyTorch's caching allocator, so each tensor is its own
# cudaMalloc and a read or write past it is caught (inside a cached segment it would not be).
tools=()
wanted memcheck && gpu_step memcheck "compute-sanitizer --tool memcheck pytest -k 'not gpu' \
${KERNEL_TESTS[*]}" && tools+=(memcheck)
wanted racecheck && gpu_step racecheck "compute-sanitizer --tool racecheck pytest -k 'not gpu' \
${KERNEL_TESTS[*]}" && tools+=(racecheck)
if [ "${#tools[@]}" -gt 0 ]; then
  limit=$(cap $((BUDGET - SECONDS - 15)))  # what is left, less the time to collect the logs
  log "compute-sanitizer ${tools[*]} (timeout ${limit} s each)"
  pids=()
  for tool in "${tools[@]}"; do
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
  done
  wait "${pids[@]}"
  : > "$OUT/sanitizer.log"
  for tool in "${tools[@]}"; do
    for f in "${KERNEL_TESTS[@]}"; do
      name=$(basename "$f" .py)
      { echo "== $tool $name"; head -c 100000 "/tmp/san_${tool}_$name.log"; } \
        >> "$OUT/sanitizer.log"
    done
  done
  grep -E "^== |ERROR SUMMARY|exit status|passed|failed" "$OUT/sanitizer.log"
fi

if [ -n "$csrc_pid" ]; then
  wait "$csrc_pid"
  echo "test_csrc_build.py: exit status $? (0 passed or skipped, see csrc.log)"
  tail -5 "$OUT/csrc.log"
fi

if wanted bench; then
  args=(--out "$OUT")
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: skipped 'bench' (needs a GPU): $PY -m medusa_kernels.bench ${args[*]}"
    echo "dry run: a short CPU bench instead, to check the files this stage leaves"
    args+=(--device cpu --quick --only compact_kv,step_profile --no-plot)
  fi
  log "bench: every section, full shapes, the step profile (step_profile) beside the JSON"
  timeout "$(cap $((BUDGET - SECONDS - 20)))" "$PY" -m medusa_kernels.bench "${args[@]}" 2>&1 \
    | tee "$OUT/bench.log" | tail -80
  bench_json=$(ls "$OUT"/20*.json 2>/dev/null | grep -v -- -profile.json | head -1)
  if [ -n "$bench_json" ] && [ ! -f "${bench_json%.json}.md" ]; then
    log "the bench was stopped: tables, Markdown and plot from the JSON it rewrote after every row"
    timeout 20 "$PY" -m medusa_kernels.bench.report "$bench_json" 2>&1 | tail -60
  fi
  ls "$OUT"/*-profile.md >/dev/null 2>&1 || echo "no step profile: the bench ended before it"
fi

if wanted train && gpu_step train "python -m medusa_kernels.train medusa1 (demo)"; then
  log "Medusa-1 training check on the demo model"
  rm -rf /tmp/m1  # a fresh run: its self-distilled data must come from this demo model
  timeout "$(cap 120)" "$PY" -m medusa_kernels.train medusa1 \
    --model medusa_kernels/assets/demo/model --prompts demo:512 --max-new-tokens 96 \
    --num-heads 4 --seq-len 512 --batch-size 32 --steps 300 --out /tmp/m1 --measure-accept 32 \
    --report "$OUT/train_medusa1_demo.json" --no-progress 2>&1 | tee "$OUT/train.log" | tail -20
fi
if wanted calibrate && gpu_step calibrate "python -m medusa_kernels.tree calibrate --measure"; then
  log "tree calibration of the demo on the GPU: calibrated vs default tree, measured"
  timeout "$(cap 90)" "$PY" -m medusa_kernels.tree calibrate --nodes 63 --measure \
    --out "$OUT/calibrated_tree_gpu.json" 2>&1 | tail -5
  grep -E '"(expected|measured|default_[a-z_]+)_accepted"|measured_on' \
    "$OUT/calibrated_tree_gpu.json"
fi
if wanted demo && gpu_step demo "python -m medusa_kernels.demo.build --device cuda"; then
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
log "done: $(ls "$OUT" | wc -l) files in $OUT"
