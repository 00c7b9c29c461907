"""SYNTHIA -> Cityscapes, 7 classes, 1280x760.

  python -m depthuda.main --config=configs/synthia_city7.py --workdir=runs/synthia_city7

Self-training runs 10k steps. Reference mIoU: DADA 69.2, CTRL 72.3.
"""

from configs import common


def get_config():
  c = common.seven_class(common.get_base_config())
  c.pseudo.min_region_sizes = (1000, 772, 100, 316, 234, 173, 173)  # Set by hand in the original.
  c.self_train.num_steps = 10_000
  return c
