"""SYNTHIA -> Cityscapes, 7 classes, 640x320 input (feature grid 81x41).

  python -m depthuda.main --config=configs/synthia_city7_small.py --workdir=runs/city7_small

Needs the datasets and pretrained/imagenet (README: "Datasets", "Pretrained weights and
the original's checkpoints"). Stages: fit_gmm, adapt (90k steps), pseudo_label (2,975 images),
self_train (30k steps), eval (500 images).
Expected runtime, an estimate (not yet measured on a GPU; benchmarks/gpu.sh measures the
step): the steps of synthia_city.py at a fifth of the pixels;
well under 1 h on one H100 at the 60 ms/iteration bfloat16 goal. The original took days
on one GPU.
Expected result: 7-class mIoU on Cityscapes val; published for orientation: DADA 63.4, CTRL 65.4.
"""

from configs import common


def get_config():
  c = common.small_input(common.seven_class(common.get_base_config()))
  c.pseudo.min_region_sizes = common.MIN_REGION_SIZES_CITY7
  c.loss.lambda_depth = 0.001
  return c
