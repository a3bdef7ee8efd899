#!/usr/bin/env bash
# The GPU figures of the performance page (docs/performance.md), in one call on a GPU machine (issue 17):
# the CUDA tests, `promptlearn benchmark` at 1000, 100 and 10 real ImageNet class names (RN50, 16 shots,
# ImageNet's 50 epochs) and a whole 1000-class run timed end to end (`promptlearn benchmark-full-run`).
# Results go to $OUT (default output/gpu). MODEL, CLASSES, SHOTS, EPOCHS, STEPS and TRAIN_PER_CLASS shrink
# it for a dry run on the CPU.
set -uo pipefail
OUT=${OUT:-output/gpu}
MODEL=${MODEL:-RN50} CLASSES=${CLASSES:-1000} SHOTS=${SHOTS:-16} STEPS=${STEPS:-300}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-20} EPOCHS=${EPOCHS:-}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the machine lacks, carried as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" || exit 1

step() { echo "=== $1 ($(date +%T))"; }
if [ -z "${SKIP_TESTS:-}" ]; then
  step "CUDA tests"
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu_step.py tests/test_feature_extraction.py \
    -k "cuda_graph_replay or gpu_features" 2>&1 | tail -15 | tee "$OUT/tests.log"
fi

bench() {  # classes, output suffix, extra arguments
  timeout 300 $PY -m promptlearn benchmark --model "$MODEL" --classes "$1" --class-names imagenet --shots "$SHOTS" \
    --protocol imagenet --promptlearn-steps "$STEPS" --reference-steps 5 --warmup-steps 2 \
    --output "$OUT/benchmark-$1$2.json" "${@:3}" 2>&1 | grep -v Warning | tail -6
}
step "whole run, $CLASSES classes"  # the reference figures join it afterwards (full_run.with_reference)
timeout "${FULL_RUN_LIMIT:-400}" $PY -m promptlearn benchmark-full-run --model "$MODEL" --classes "$CLASSES" \
  --shots "$SHOTS" --train-per-class "$TRAIN_PER_CLASS" ${EPOCHS:+--epochs "$EPOCHS"} \
  --output "$OUT/full-run-$CLASSES.json" --work-dir /tmp > "$OUT/full-run.log" 2>&1
grep -aE "whole run|wrote|Error|error|cuda_graphs" "$OUT/full-run.log" | tail -6
step "benchmark, $CLASSES classes"; bench "$CLASSES" ""
step "benchmark, $CLASSES classes, every step eager"; bench "$CLASSES" "-eager" --no-cuda-graphs --no-reference
for n in 100 10; do
  [ "$n" -lt "$CLASSES" ] && { step "benchmark, $n classes"; bench "$n" ""; }
done
step done
