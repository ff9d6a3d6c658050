#!/usr/bin/env bash
# One GPU, under 10 minutes: does the CUDA path work, how fast is it, does it agree with the CPU?
#
#   bash benchmarks/gpu_check.sh                     # a machine with one GPU; at most 9 min
#   QUICK=1 bash benchmarks/gpu_check.sh             # batch 4 only, 1 timed iteration
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh  # no GPU: tiny CPU sizes (1 min on 2 cores)
#
# On one H200 (2026-11-30) the whole took 363 s: device tests 22 s (stopped at a failure then),
# agreement 12-19 s each, inference 59 s, 12 training-step runs of 15-25 s. BUDGET (below)
# keeps the whole under 9 minutes whatever another machine takes.
#
# Steps, each under a header, in the order a, d, f, c, g, b (checks before timings, so that the time
# budget cuts timings, never checks; the training-step sweep last, its target setting first):
#   a. the device tests: TORCH_DEVICE=cuda pytest -m device (every test that takes the `device`
#      fixture; the gloo DDP, pydensecrf and signal tests are cpu_only and skipped here);
#   b. benchmarks/train_step.py at crop 512: batch 2 and 4 x fp32 / TF32 / bf16 x without and with
#      the regularized loss: s/iteration, per-stage times, peak CUDA memory;
#   c. benchmarks/infer.py: images/s of the multi-scale + flip prediction, with and without the CRF;
#   d. benchmarks/device_agreement.py: one training step on CUDA and on the CPU from the same
#      weights and batch (fp32, TF32 off, with the regularized loss): pseudo-label agreement and
#      loss differences, which must pass; then TF32 and bf16 against the same CPU reference, for
#      information only (they are expected to differ more);
#   f. benchmarks/bilateral_filter.py: the regularized loss's filter alone on each backend
#      (loss.reg_backend), batch 4 at the loss's resolution, with its values against pydensecrf2's;
#   g. benchmarks/validate.py with configs/coco.yaml: seconds per validation image (480 x 640),
#      to project the share of COCO's periodic validations in its schedule;
#   e. one Markdown table of everything (and the per-stage times), for docs/BENCHMARKS.md, with
#      the GPU, torch, CUDA and the commit (benchmarks/gpu_check_summary.py).
# A failing step is recorded and the others still run; the exit status is 1 if any step failed,
# timed out or was skipped for time (2 for a usage error). Everything is kept in $OUT: a log and
# the JSON line of every run, steps.tsv, summary.md.
#
# Environment: DEVICE (auto | cuda | cpu; auto: cuda when torch sees a GPU), QUICK=1,
# PYTHON (default .venv/bin/python if present, else python3), COMMIT (default: git's), OUT (default
# work_dirs/gpu_check/<date>), TEST_TIMEOUT (seconds for step a, default 300), RUN_TIMEOUT
# (seconds for any other run, default 150), BUDGET (seconds for all runs, default 540: a run is
# cut at the budget, and one that would get under 20 s is skipped; the summary follows).

set -u
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "bash >= 4.4 needed (empty arrays under set -u), this is $BASH_VERSION" >&2; exit 2
fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # afa importable without pip install -e

QUICK=${QUICK:-0}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
OUT=${OUT:-work_dirs/gpu_check/$(date +%Y%m%d-%H%M%S)}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
BUDGET=${BUDGET:-540}
cuda_ok() { "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }
DEVICE=${DEVICE:-auto}
case $DEVICE in
  auto) if cuda_ok; then DEVICE=cuda
        else DEVICE=cpu; echo "No GPU visible to torch: the reduced CPU version (DEVICE=cpu)"; fi ;;
  cuda) cuda_ok || { echo "DEVICE=cuda but torch ($PY) sees no GPU; DEVICE=cpu runs the" \
                          "reduced CPU version" >&2; exit 2; } ;;
  cpu) ;;
  *) echo "DEVICE must be auto, cuda or cpu, not '$DEVICE'" >&2; exit 2 ;;
esac

mkdir -p "$OUT" || exit 2
: > "$OUT/steps.tsv"

# What each step runs. On the CPU everything is tiny: this checks the script, not the numbers.
if [ "$DEVICE" = cuda ]; then
  TESTS=(tests)                                   # with -m device: every device test
  MODEL=(--backbone mit_b1)                       # the paper's
  CROP=512 THREADS=()
  if [ "$QUICK" = 1 ]; then BATCHES="4"; ITERS=(--iters 1 --warmup 1); IMAGES=4
  else BATCHES="4 2"; ITERS=(--iters 3 --warmup 2); IMAGES=8; fi
  PRECISIONS="bf16 tf32 fp32"  # the target setting (batch 4, bf16) first: the budget cuts the last
  INFER=(--device cuda --backbone mit_b1 --images "$IMAGES" --crf-workers 4)
  AGREE=(--device cuda --other cpu)
  AGREE_INFO="tf32 bf16"
  FILTER=(--device cuda --batch 4 --crop 512 --workers 4)
  VALIDATE=(--device cuda --amp bf16 --config configs/coco.yaml --size 480x640 --images 8)
else
  TESTS=(tests/test_affinity.py tests/test_cam.py)
  MODEL=(--backbone mit_b0 model.embedding_dim=32)
  CROP=64 THREADS=(--threads 2) BATCHES="2" ITERS=(--iters 1 --warmup 1)
  if [ "$QUICK" = 1 ]; then PRECISIONS="fp32"; else PRECISIONS="fp32 bf16"; fi
  INFER=(--device cpu --backbone mit_b0 --images 1 --crf-workers 1 --threads 2)
  AGREE=(--device cpu --other cpu --backbone mit_b0 --crop 64 --threads 2 model.embedding_dim=32)
  if [ "$QUICK" = 1 ]; then AGREE_INFO=""; else AGREE_INFO="bf16"; fi
  FILTER=(--device cpu --batch 2 --crop 64 --workers 1 --repeats 1)
  VALIDATE=(--device cpu --config configs/coco.yaml --backbone mit_b0 --size 96x128 --images 1)
fi

FAILED=()
header() { printf '\n==== %s ====\n' "$*"; }

# run NAME KIND TIMEOUT SETTING CMD...: output to $OUT/NAME.log (and the terminal), the last line
# to $OUT/NAME.json when it is a JSON object; KIND "info" records a failure without failing.
run() {
  local name=$1 kind=$2 limit=$3 setting=$4; shift 4
  local start=$SECONDS rc status
  if [ $((BUDGET - SECONDS)) -lt "$limit" ]; then limit=$((BUDGET - SECONDS)); fi
  if [ "$limit" -lt 20 ]; then
    FAILED+=("$name")
    printf '%s\t%s\t%s\t0\t%s\n' "$name" "$kind" "SKIPPED (time budget of $BUDGET s spent)" \
      "$setting" >> "$OUT/steps.tsv"
    echo "-> $name: skipped, the time budget of $BUDGET s is spent"
    return
  fi
  echo "\$ $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  tail -n 1 "$OUT/$name.log" | grep '^{' > "$OUT/$name.json" || rm -f "$OUT/$name.json"
  if [ "$rc" -eq 0 ]; then status=ok
  elif [ "$rc" -eq 124 ]; then status="TIMEOUT after ${limit} s"
  elif [ "$kind" = info ]; then status="differs (information only)"
  else status="FAILED (exit $rc)"
  fi
  if [ "$rc" -ne 0 ] && { [ "$kind" != info ] || [ "$rc" -eq 124 ]; }; then FAILED+=("$name"); fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$status" "$((SECONDS - start))" "$setting" \
    >> "$OUT/steps.tsv"
  echo "-> $name: $status ($((SECONDS - start)) s)"
}

# COMMIT may be given: a copy of the tree without .git (a rented GPU machine) cannot tell it.
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT+dirty"  # tracked files differ from the commit
fi
if [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null; then
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
elif [ "$DEVICE" = cuda ]; then
  GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')
else
  GPU="none (CPU smoke run: $(nproc) cores)"
fi

header "environment"
echo "device $DEVICE, GPU: $GPU, commit $COMMIT, QUICK=$QUICK, output $OUT"
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                              f"cuDNN {torch.backends.cudnn.version()}, "
                              f"{torch.get_num_threads()} CPU threads")' | tee "$OUT/torch.txt"
[ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null && nvidia-smi | tee "$OUT/nvidia-smi.txt"

header "a. device tests (TORCH_DEVICE=$DEVICE, -m device)"
run tests must "$TEST_TIMEOUT" "TORCH_DEVICE=$DEVICE pytest -m device ${TESTS[*]}" \
  env TORCH_DEVICE="$DEVICE" "$PY" -m pytest -q -m device -p no:cacheprovider "${TESTS[@]}"

header "d. one training step on $DEVICE vs the CPU: pseudo labels and losses"
run agree_fp32 must "$RUN_TIMEOUT" "fp32, TF32 off, reg loss" \
  "$PY" benchmarks/device_agreement.py "${AGREE[@]}" --reg-loss
for precision in $AGREE_INFO; do
  case $precision in tf32) flags=(--tf32) ;; bf16) flags=(--amp bf16) ;; esac
  run "agree_$precision" info "$RUN_TIMEOUT" "$precision (information only)" \
    "$PY" benchmarks/device_agreement.py "${AGREE[@]}" "${flags[@]}"
done

header "f. the regularized loss's bilateral filter on each backend"
run filter must "$RUN_TIMEOUT" "${FILTER[*]}" "$PY" benchmarks/bilateral_filter.py "${FILTER[@]}"

header "c. inference: multi-scale + flip, with and without the CRF"
run infer must "$RUN_TIMEOUT" "${INFER[*]}" "$PY" benchmarks/infer.py "${INFER[@]}"

header "g. validation with COCO's config"
run validate must "$RUN_TIMEOUT" "${VALIDATE[*]}" "$PY" benchmarks/validate.py "${VALIDATE[@]}"

header "b. training step: crop $CROP, batch $BATCHES x $PRECISIONS x regularized loss off/on"
for batch in $BATCHES; do
  for precision in $PRECISIONS; do
    case $precision in
      fp32) flags=() ;;
      tf32) flags=(--tf32) ;;
      bf16) flags=(--amp bf16) ;;
    esac
    regs="off on"  # on: loss.reg_backend=auto, the torch filter on CUDA
    # The target setting (the first batch and precision) also with the CPU filter processes.
    [ "$batch" = "${BATCHES%% *}" ] && [ "$precision" = "${PRECISIONS%% *}" ] && regs+=" pydensecrf"
    for reg in $regs; do
      case $reg in
        off) extra=() ;;
        on) extra=(--reg-loss) ;;
        pydensecrf) extra=(--reg-loss --reg-backend pydensecrf) ;;
      esac
      run "train_b${batch}_${precision}_reg${reg}" must "$RUN_TIMEOUT" \
        "batch $batch, $precision, reg loss $reg$([ "$reg" = on ] && echo " (auto)")" \
        "$PY" benchmarks/train_step.py --device "$DEVICE" --crop "$CROP" --batch "$batch" \
        "${ITERS[@]}" "${THREADS[@]}" "${flags[@]}" "${extra[@]}" "${MODEL[@]}"
    done
  done
done

header "e. summary (Markdown, also in $OUT/summary.md)"
"$PY" benchmarks/gpu_check_summary.py "$OUT" --gpu "$GPU" --commit "$COMMIT" --quick "$QUICK" \
  | tee "$OUT/summary.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || FAILED+=(summary)

header "result"
echo "$SECONDS s in all"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]} (logs in $OUT)"
  exit 1
fi
echo "all steps passed (logs in $OUT)"
