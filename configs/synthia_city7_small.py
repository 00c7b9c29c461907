"""SYNTHIA -> Cityscapes, 7 classes, 640x320 (feature grid 81x41).

  python -m depthuda.main --config=configs/synthia_city7_small.py --workdir=runs/city7_small

Reference mIoU: DADA 63.4, CTRL 65.4.
"""

from configs import common
from configs import synthia_city7


def get_config():
  c = common.small_input(synthia_city7.get_config())
  c.loss.lambda_depth = 0.001
  return c
