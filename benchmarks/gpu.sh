#!/usr/bin/env bash
# One adaptation iteration at full resolution on one GPU: depthuda vs the PyTorch reference.
#
#   bash benchmarks/gpu.sh [OUTDIR]        # default OUTDIR: $OUT, else runs/gpu_bench
#
# 760x1280, ResNet-101, batch 1 source + 1 target, float32 then bfloat16; each run sets up both
# frameworks and alternates their iterations (benchmarks/train_step.py). Reports compile time,
# median iteration time, peak device memory and model FLOPs utilisation (FLOPs from XLA's cost
# analysis of the compiled step), then the density targets' time on the device. About 4 minutes
# on an H100; every run is capped so the whole script ends within 5.
#
# Needs Python with JAX (CUDA), Flax, Optax, ml_collections and PyTorch (CUDA); no TensorFlow.
# ml_collections is pure Python: if it is missing, a wheel in .whl/ is used, else pip installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-runs/gpu_bench}}
PY=${PYTHON:-python3}
STEPS=${STEPS:-10}
# Smaller settings only to rehearse the script where there is no GPU (it then runs on the CPU):
#   HEIGHT=97 WIDTH=97 LAYERS=tiny BASE_WIDTH=16 STEPS=2 bash benchmarks/gpu.sh /tmp/gpu_rehearsal
HEIGHT=${HEIGHT:-760}
WIDTH=${WIDTH:-1280}
LAYERS=${LAYERS:-101}
BASE_WIDTH=${BASE_WIDTH:-64}
# Caps (seconds) that keep the GPU run within its 5 minutes; a rehearsal on a busy CPU raises them.
STEP_TIMEOUT=${STEP_TIMEOUT:-135}
DENSITY_TIMEOUT=${DENSITY_TIMEOUT:-20}
mkdir -p "${OUTDIR}"

if ! "${PY}" -c 'import ml_collections' 2>/dev/null; then
  if compgen -G '.whl/ml_collections-*.whl' >/dev/null; then
    "${PY}" -m pip install -q --no-deps --target /tmp/depthuda_site .whl/ml_collections-*.whl
  else
    "${PY}" -m pip install -q --target /tmp/depthuda_site ml-collections
  fi
  export PYTHONPATH=/tmp/depthuda_site${PYTHONPATH:+:${PYTHONPATH}}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
"${PY}" -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch",
  torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")' \
  | tee "${OUTDIR}/versions.txt"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    | tee -a "${OUTDIR}/versions.txt"
fi

status=0
for dtype in float32 bfloat16; do
  timeout "${STEP_TIMEOUT}" "${PY}" benchmarks/train_step.py --height="${HEIGHT}" --width="${WIDTH}" \
    --layers="${LAYERS}" --base_width="${BASE_WIDTH}" --steps="${STEPS}" --dtype="${dtype}" \
    --json="${OUTDIR}/train_step_${dtype}.json" \
    2>&1 | tee "${OUTDIR}/train_step_${dtype}.log" || status=$?
done
# The density targets on the device, against the per-pixel loop (one row timed): their share
# of the iteration is this time over the median iteration above.
timeout "${DENSITY_TIMEOUT}" "${PY}" benchmarks/density.py --loop_rows=1 2>&1 | tee "${OUTDIR}/density.log" \
  || status=$?
exit "${status}"
