"""SYNTHIA -> Mapillary Vistas, 7 classes, 640x320.

  python -m depthuda.main --config=configs/synthia_mapillary7_small.py --workdir=runs/mapillary7_small

Reference mIoU: DADA 55.8, CTRL 61.9.
"""

from configs import common
from configs import synthia_mapillary7


def get_config():
  return common.small_input(synthia_mapillary7.get_config())
