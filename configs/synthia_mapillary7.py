"""SYNTHIA -> Mapillary Vistas, 7 classes, 1280x760, unweighted segmentation loss.

  python -m depthuda.main --config=configs/synthia_mapillary7.py --workdir=runs/mapillary7

Needs the datasets and pretrained/imagenet (README: "Datasets", "Pretrained weights and
the original's checkpoints"). Stages: fit_gmm, adapt (90k steps), pseudo_label (9,000 images),
self_train (30k steps), eval (2,000 images).
Expected runtime, an estimate (not yet measured on a GPU; benchmarks/gpu.sh measures the
step): 90k adaptation iterations of ~10 TFLOP and 30k lighter self-training ones;
about 2 h on one H100 at the 60 ms/iteration bfloat16 goal. The original took days
on one GPU.
Expected result: 7-class mIoU on Mapillary validation, scored at 1280x760 as the original
(eval.protocol); published for orientation: DADA 67.6,
CTRL 71.8.
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
  c.pseudo.min_region_sizes = common.MIN_REGION_SIZES_MAPILLARY7
  # The original scores labels resized (nearest, aspect kept) and padded to the input size;
  # 'native' scores at the labels' own resolution, as DADA.
  c.eval.protocol = 'input_size'
  return c
