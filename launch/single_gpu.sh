#!/usr/bin/env bash
# One GPU (or CPU) on this machine.
#   CONFIG   experiment config (default configs/synthia_city.py)
#   WORKDIR  run directory (default runs/<config name>)
#   GPU      which GPU to use (default 0)
# Extra arguments are passed on, e.g. --config.init_from=pretrained/imagenet --stage=adapt
set -euo pipefail
CONFIG=${CONFIG:-configs/synthia_city.py}
WORKDIR=${WORKDIR:-runs/$(basename "${CONFIG}" .py)}
export CUDA_VISIBLE_DEVICES=${GPU:-0}
exec python -m depthuda.main --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
