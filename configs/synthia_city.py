"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, 16 classes, DeepLabV2-ResNet101 at 1280x760.

  python -m depthuda.main --config=configs/synthia_city.py --workdir=runs/synthia_city

Needs the datasets and pretrained/imagenet (README: "Datasets", "Pretrained weights and
the original's checkpoints"). Stages: fit_gmm, adapt (90k steps), pseudo_label (2,975 images),
self_train (30k steps), eval (500 images).
Expected runtime, an estimate (not yet measured on a GPU; benchmarks/gpu.sh measures the
step): 90k adaptation iterations of ~10 TFLOP and 30k lighter self-training ones;
about 2 h on one H100 at the 60 ms/iteration bfloat16 goal. The original took days
on one GPU.
Expected result: 16- and 13-class mIoU on Cityscapes val (results.json); for orientation, the
published DADA reaches 42.6 / 49.8, CTRL 44.9 / 51.3, CorDA 55.0 / 62.8.
"""

from configs import common


def get_config():
  c = common.get_base_config()
  # The original's N_c (METHOD §6), rounded; delete this line to compute them from the source
  # pixel counts of your copy of SYNTHIA (fit_gmm/gmm.json) instead.
  c.pseudo.min_region_sizes = common.MIN_REGION_SIZES_16
  return c
