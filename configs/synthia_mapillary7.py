"""SYNTHIA -> Mapillary Vistas, 7 classes, 1280x760, unweighted segmentation loss.

  python -m depthuda.main --config=configs/synthia_mapillary7.py --workdir=runs/mapillary7

Reference mIoU: DADA 67.6, CTRL 71.8.
"""

from configs import common


def get_config():
  c = common.seven_class(common.get_base_config())
  c.data.target = 'mapillary'
  c.data.target_dir = 'data/mapillary'
  c.loss.class_weights = None
  c.loss.lambda_bal_src = 0.005
  c.loss.lambda_depth = 0.0001
  c.loss.lambda_adv = 0.001
  c.loss.lambda_bal_tgt = 0.001
  c.optim.disc_lr = 1e-4
  c.pseudo.min_region_sizes = (100, 87, 50, 62, 57, 54, 54)  # Set by hand in the original.
  return c
