"""SYNTHIA -> Cityscapes, 7 classes, DeepLabV2-ResNet101 at 1280x760.

  python -m depthuda.main --config=configs/synthia_city7.py --workdir=runs/synthia_city7

Needs the datasets and pretrained/imagenet (README: "Datasets", "Pretrained weights and
the original's checkpoints"). Stages: fit_gmm, adapt (90k steps), pseudo_label (2,975 images),
self_train (10k steps), eval (500 images).
Expected runtime, an estimate (not yet measured on a GPU; benchmarks/gpu.sh measures the
step): 90k adaptation iterations of ~10 TFLOP and 10k lighter self-training ones;
about 1.7 h on one H100 at the 60 ms/iteration bfloat16 goal. The original took days
on one GPU.
Expected result: 7-class mIoU on Cityscapes val; published for orientation: DADA 69.2, CTRL 72.3.
"""

from configs import common


def get_config():
  c = common.seven_class(common.get_base_config())
  c.pseudo.min_region_sizes = common.MIN_REGION_SIZES_CITY7
  c.self_train.num_steps = 10_000  # The original's city7 alone; its small variant self-trains 30k.
  return c
