r"""SYNTHIA -> Mapillary Vistas, 7 classes, 640x320 input.

  python -m depthuda.main --config=configs/synthia_mapillary7_small.py \
      --workdir=runs/mapillary7_small

Needs the datasets and pretrained/imagenet (README: "Datasets", "Pretrained weights and
the original's checkpoints"). Stages: fit_gmm, adapt (90k steps), pseudo_label (9,000 images),
self_train (30k steps), eval (2,000 images).
Expected runtime, an estimate (not yet measured on a GPU; benchmarks/gpu.sh measures the
step): the steps of synthia_mapillary7.py at a fifth of the pixels;
well under 1 h on one H100 at the 60 ms/iteration bfloat16 goal. The original took days
on one GPU.
Expected result: 7-class mIoU on Mapillary validation, scored at 640x320 as the original
(eval.protocol); published for orientation: DADA 55.8,
CTRL 61.9.
"""

from configs import common
from configs import synthia_mapillary7


def get_config():
  return common.small_input(synthia_mapillary7.get_config())
