#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker; jax.distributed discovers the pod.
#   TPU_NAME  the TPU VM name;  ZONE  its zone;  PROJECT  the GCP project
#   CONFIG    experiment config;  WORKDIR  a gs:// or shared path every worker can write
#   REPO      where depthuda is checked out on the workers (default ~/depthuda)
# config.batch_size must divide by the number of TPU chips (cores) in the slice.
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${WORKDIR:?}"
CONFIG=${CONFIG:-configs/synthia_city.py}
REPO=${REPO:-~/depthuda}
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"} \
  --worker=all --command="cd ${REPO} && \
  .venv/bin/python -m depthuda.main --multihost --config=${CONFIG} --workdir=${WORKDIR} $*"
