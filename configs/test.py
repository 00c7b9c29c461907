"""A tiny variant of the toy benchmark for tests: every stage runs in seconds.

  python -m depthuda.main --config=configs/test.py --workdir=/tmp/depthuda_test

Expected: about 1 min on 2 CPU cores (imports and compilation dominate); the mIoU is
meaningless (8 source images, 8 adaptation steps in the tests).
"""

from configs import toy


def get_config():
  c = toy.get_config()
  c.batch_size = 2
  c.model.layers = (1, 1, 1, 1)
  c.model.width = 4
  c.model.disc_ndf = 4
  c.data.source_dir = 'data/test/SYNTHIA-RAND-CITYSCAPES'
  c.data.target_dir = 'data/test/cityscapes'
  c.data.tfds_dir = 'data/test/tfds'
  c.data.input_size = (64, 40)
  c.data.toy_num_source = 8
  c.data.toy_num_target_train = 6
  c.data.toy_num_target_val = 3
  c.data.toy_num_target_test = 1
  c.data.toy_source_size = (128, 76)
  c.adapt.num_steps = 6
  c.self_train.num_steps = 4
  c.checkpoint_every_steps = 3
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.log_images_every_steps = 3
  c.gmm.max_iters = 20
  c.init_from = ''  # from scratch: no pretrained start (tests/test_pretrain.py makes one)
  c.pretrain.num_steps = 0
  return c
