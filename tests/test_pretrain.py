"""depthuda.pretrain: the toy's pretrained start, made by depthuda's own training code."""

import json
import os

import jax
import numpy as np

from configs import test as test_config
from depthuda import checkpointing
from depthuda import converted
from depthuda import models
from depthuda import pretrain
from depthuda import train


def test_pretrained_trunk_is_made_once_reused_remade_and_loaded(tmp_path):
  config = test_config.get_config()
  config.init_from = str(tmp_path / 'pretrained')
  config.pretrain.num_steps = 3
  config.pretrain.num_images = 4
  assert pretrain.ensure(config)
  # An ImageNet-style folder: the trunk alone, with its record; the scenes are gone.
  meta = converted.check_init_from(config)
  assert meta['kind'] == converted.IMAGENET
  assert sorted(os.listdir(config.init_from)) == ['metadata.json', 'pretrain.json', 'variables']
  assert not os.path.exists(config.init_from + '.build')
  with open(os.path.join(config.init_from, 'pretrain.json')) as f:
    assert json.load(f) == pretrain.settings(config)
  stamp = os.path.getmtime(os.path.join(config.init_from, 'metadata.json'))
  assert not pretrain.ensure(config)  # current: reused as it is
  assert os.path.getmtime(os.path.join(config.init_from, 'metadata.json')) == stamp

  seg, _ = models.build(config)
  loaded = checkpointing.load_variables(config.init_from, models.abstract_variables(config, seg),
                                        meta)
  assert not set(models.HEADS) & set(loaded['params'])
  start = train.init_segmenter(config, seg, jax.device_get(loaded))
  fresh = train.init_segmenter(config, seg)
  # Adaptation starts from the trained trunk and the seeded (untrained) heads.
  assert not np.array_equal(start['params']['conv1']['kernel'], fresh['params']['conv1']['kernel'])
  np.testing.assert_array_equal(start['params']['conv1']['kernel'],
                                loaded['params']['conv1']['kernel'])
  for head in models.HEADS:
    jax.tree.map(np.testing.assert_array_equal, start['params'][head], fresh['params'][head])

  config.pretrain.num_steps = 4  # other settings: made again
  assert pretrain.ensure(config)
  with open(os.path.join(config.init_from, 'pretrain.json')) as f:
    assert json.load(f)['steps'] == 4


def test_adaptation_learning_rate_leaves_the_pretrained_trunk_current(tmp_path):
  """The pretrained trunk depends on the pretraining's own settings: a run that changes the
  adaptation's learning rate (the toy benchmark's one-ulp row) reuses the trunk the other runs
  use, instead of making one at its own rate over the shared folder."""
  from configs import toy  # pylint: disable=import-outside-toplevel
  config = toy.get_config()
  config.init_from = str(tmp_path / 'pretrained')
  os.makedirs(config.init_from)
  with open(os.path.join(config.init_from, pretrain.RECORD), 'w') as f:
    json.dump(pretrain.settings(config), f)
  assert pretrain.is_current(config)
  rerun = config.copy_and_resolve_references()
  rerun.optim.lr = float(np.nextafter(np.float32(config.optim.lr), np.float32(1)))
  assert pretrain.is_current(rerun)
  assert pretrain.pretraining_config(rerun, str(tmp_path)).optim.lr == config.pretrain.lr
  other = config.copy_and_resolve_references()
  other.pretrain.lr = config.pretrain.lr / 2
  assert not pretrain.is_current(other)
  assert pretrain.pretraining_config(other, str(tmp_path)).optim.lr == config.pretrain.lr / 2
