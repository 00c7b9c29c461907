#!/usr/bin/env bash
# One process on this machine: one GPU (or the CPU), or several GPUs of it.
#   CONFIG   experiment config (default configs/synthia_city.py)
#   WORKDIR  run directory (default runs/<config name>)
#   GPU      which GPUs to use (default 0; GPU=0,1,2,3,4,5,6,7 for eight, with
#            --config.batch_size=8: the batch must divide over the GPUs, README "Many devices")
# Extra arguments are passed on, e.g. --config.init_from=pretrained/imagenet --stage=adapt
set -euo pipefail
CONFIG=${CONFIG:-configs/synthia_city.py}
WORKDIR=${WORKDIR:-runs/$(basename "${CONFIG}" .py)}
export CUDA_VISIBLE_DEVICES=${GPU:-0}
exec python -m depthuda.main --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
