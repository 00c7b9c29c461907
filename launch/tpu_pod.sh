#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker; jax.distributed discovers the pod.
# Run launch/tpu_setup.sh once first (depthuda, its venv and the data on every worker).
#   TPU_NAME  the TPU VM name;  ZONE  its zone;  PROJECT  the GCP project
#   CONFIG    experiment config;  WORKDIR  gs://bucket/run, or a folder every worker mounts and can write
#   REPO      where depthuda is on the workers, relative to the home folder (default depthuda)
# config.batch_size must divide by the number of devices of the slice (README "Many devices"),
# e.g. --config.batch_size=16 --config.optim.lr=4e-3 --config.optim.disc_lr=4e-3 on a v4-32.
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${WORKDIR:?}"
CONFIG=${CONFIG:-configs/synthia_city.py}
REPO=${REPO:-depthuda}
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"} \
  --worker=all --command="cd ${REPO} && \
  .venv/bin/python -m depthuda.main --multihost --config=${CONFIG} --workdir=${WORKDIR} $*"
