#!/usr/bin/env bash
# N processes on one machine, each owning one GPU (or, with CPU=1, one CPU device), joined by
# jax.distributed over localhost: the same code path as a multi-node run.
#   NPROC    number of processes (default: number of GPUs, or 2 on CPU)
#   CONFIG   experiment config (default configs/toy.py)
#   WORKDIR  run directory (default runs/<config name>)
#   PORT     coordinator port on localhost (default 12355)
#   CPU      1 to run on CPU devices only
# config.batch_size is global: it must divide by the total number of devices.
set -euo pipefail
CONFIG=${CONFIG:-configs/toy.py}
WORKDIR=${WORKDIR:-runs/$(basename "${CONFIG}" .py)}
PORT=${PORT:-12355}
if [[ "${CPU:-0}" == 1 ]]; then
  NPROC=${NPROC:-2}
  export JAX_PLATFORMS=cpu
else
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
fi
pids=()
for ((i = 0; i < NPROC; i++)); do
  if [[ "${CPU:-0}" != 1 ]]; then export CUDA_VISIBLE_DEVICES=$i; fi
  JAX_COORDINATOR_ADDRESS=localhost:${PORT} JAX_NUM_PROCESSES=${NPROC} JAX_PROCESS_ID=$i \
    python -m depthuda.main --multihost --config="${CONFIG}" --workdir="${WORKDIR}" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
