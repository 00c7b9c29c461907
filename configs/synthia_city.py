"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, 16 classes, DeepLabV2-ResNet101 at 1280x760.

  python -m depthuda.main --config=configs/synthia_city.py --workdir=runs/synthia_city \
      --config.init_from=pretrained/imagenet

Runs fit_gmm, adapt (90k steps), pseudo_label, self_train (30k), eval. About 3-4 days on one
V100 in the original; published 16-class mIoU for reference: DADA 42.6, CTRL 44.9, CorDA 55.0.
"""

from configs import common


def get_config():
  c = common.get_base_config()
  # The original's N_c (METHOD §6), rounded; delete this line to compute them from the source
  # pixel counts of your copy of SYNTHIA (fit_gmm/gmm.json) instead.
  c.pseudo.min_region_sizes = (3165, 3311, 5000, 89, 89, 219, 50, 61, 1788, 1202, 762, 123, 730,
                               302, 78, 81)
  return c
