#!/usr/bin/env bash
# Cloud TPU VM pod slice, once: this checkout, a venv with jax[tpu] and (optionally) the data
# on every worker, for launch/tpu_pod.sh.
#   TPU_NAME  the TPU VM name;  ZONE  its zone;  PROJECT  the GCP project
#   REPO      where depthuda goes on the workers, relative to the home folder (default depthuda)
#   DATA      a gs:// folder holding data/ (the datasets) and pretrained/, copied into REPO
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}"
REPO=${REPO:-depthuda}
where=(--zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"} --worker=all)
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "${archive}"' EXIT
git -C "$(dirname "$0")/.." archive --format=tar.gz HEAD > "${archive}"
gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}":depthuda.tar.gz "${where[@]}"
jax=$(grep -o '"jax==[^"]*"' "$(dirname "$0")/../pyproject.toml" | tr -d '"')
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${where[@]}" --command="set -e; \
  mkdir -p ${REPO} && tar -xzf depthuda.tar.gz -C ${REPO} && cd ${REPO} && \
  python3 -m venv .venv && .venv/bin/pip install --quiet -e . '${jax/jax/jax[tpu]}' \
  ${DATA:+&& gcloud storage cp --recursive '${DATA%/}/*' .}"
