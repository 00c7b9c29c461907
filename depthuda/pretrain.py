r"""A pretrained start for the toy benchmark: the role ImageNet weights play on the real data.

  python -m depthuda.pretrain --config=configs/toy.py     (or: on first use, by depthuda.main)

The real experiments adapt from an ImageNet-trained ResNet (METHOD §3), whose trunk hands the
depth and density heads large, informative features. The toy's small ResNet has no such weights.
This module makes a start of that kind with depthuda's own code: it renders a separate set of
`pretrain.num_images` source-style scenes (generator seed `pretrain.seed`; the toy's datasets
use seed 0, so the adaptation never sees them), trains the segmenter on their 16-class
segmentation (a finer label set than the experiment's 7 classes, as ImageNet's 1,000 are not
the experiment's) for `pretrain.num_steps` steps of `train.self_train_step` (unweighted
cross-entropy, the config's SGD and batch at `pretrain.lr`, a poly schedule over those steps;
the adaptation's own `optim.lr` leaves the trunk alone, so runs that vary it share one), and
keeps the ResNet trunk alone, written where `init_from` points in the format of an ImageNet
conversion (`depthuda.converted`). Adaptation then initialises the classifier and heads itself
(the original's N(0, 0.01)) and loads the trunk over them, as it does with ImageNet weights.

The folder's `pretrain.json` records the settings it was made from (its content key): a run with
the same settings reuses it, other settings make it again. Same settings, same machine: same
weights. Concurrent runs wait for one another (a file lock).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np

from depthuda import checkpointing
from depthuda import converted
from depthuda import fileio
from depthuda import models
from depthuda import reporting
from depthuda import sharding
from depthuda import train
from depthuda.data import pipeline
from depthuda.data import toy

# Bumped whenever the pretraining (task, data, loop) changes what given settings produce.
VERSION = 1
RECORD = 'pretrain.json'
NUM_CLASSES = 16  # SYNTHIA's 16-class map of the scenes


def settings(config: ml_collections.ConfigDict) -> dict:
  """Everything the pretrained trunk depends on: the folder's content key."""
  return {'version': VERSION, 'generator_version': toy.GENERATOR_VERSION,
          'steps': config.pretrain.num_steps, 'seed': config.pretrain.seed,
          'num_images': config.pretrain.num_images,
          'source_size': list(config.data.toy_source_size),
          'input_size': list(config.data.input_size), 'batch_size': config.batch_size,
          'layers': list(config.model.layers), 'width': config.model.width,
          'bn_mode': config.model.bn_mode, 'compute_dtype': config.compute_dtype,
          'lr': config.pretrain.lr, 'momentum': config.optim.momentum,
          'weight_decay': config.optim.weight_decay, 'poly_power': config.optim.poly_power}


def is_current(config: ml_collections.ConfigDict) -> bool:
  """`init_from` holds the trunk these settings make."""
  try:
    with open(os.path.join(config.init_from, RECORD)) as f:
      return json.load(f) == settings(config)
  except (OSError, ValueError):
    return False


def pretraining_config(config: ml_collections.ConfigDict, scenes: str
                       ) -> ml_collections.ConfigDict:
  """The config of the pretraining run: the experiment's network and optimizer on the scenes in
  `scenes` (SYNTHIA layout), 16 classes, unweighted, from scratch."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.seed = config.pretrain.seed
    c.init_from = ''
    c.data.toy = False
    c.data.source_dir = os.path.join(scenes, 'SYNTHIA-RAND-CITYSCAPES')
    c.data.tfds_dir = os.path.join(scenes, 'tfds')
    c.data.num_classes = NUM_CLASSES
    c.loss.class_weights = None
    c.optim.lr = config.pretrain.lr
    c.optim.poly_horizon = config.pretrain.num_steps
    c.self_train.num_steps = config.pretrain.num_steps
  return c


def pretrain(config: ml_collections.ConfigDict, scenes: str) -> dict:
  """Renders the scenes into `scenes` and trains on them; returns the trained trunk's variables
  (numpy, `models.trunk`)."""
  c = pretraining_config(config, scenes)
  toy.generate_source(c.data.source_dir, seed=c.pretrain.seed,
                      num_source=c.pretrain.num_images, source_size=c.data.toy_source_size)
  mesh = sharding.make_mesh(jax.local_devices()[:1])  # one device: the same weights anywhere
  seg, disc = models.build(c, axis_name=sharding.AXIS)
  state, seg_tx, _ = train.init_state(c, seg, disc)
  state = sharding.replicate(state, mesh)
  step = sharding.make_sharded_step(train.self_train_step, mesh, seg=seg, seg_tx=seg_tx, config=c)
  batches = pipeline.source_train(c, models.feature_grid(c))
  metrics = None
  for _ in reporting.progress(range(c.pretrain.num_steps), desc='pretrain', unit='step'):
    batch = next(batches)
    state, metrics = step(state, sharding.shard_batch(
        {'image': batch['image'], 'label': batch['label']}, mesh))
  if metrics is not None and not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError('pretraining diverged (non-finite loss)')
  return models.trunk(jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))


def ensure(config: ml_collections.ConfigDict) -> bool:
  """Makes `config.init_from` the pretrained trunk of `config.pretrain` unless it is already
  (`is_current`); returns whether it trained. The scenes are deleted afterwards."""
  target = os.path.abspath(config.init_from)
  with fileio.local_lock(target + '.lock'):
    if is_current(config):
      return False
    build = target + '.build'
    shutil.rmtree(build, ignore_errors=True)
    trunk = pretrain(config, os.path.join(build, 'scenes'))
    meta = converted.metadata(converted.IMAGENET, config.model.layers, config.model.width, None,
                              source=f'depthuda.pretrain, {RECORD}')
    out = os.path.join(build, 'trunk')
    checkpointing.save_variables(out, trunk, meta)
    with open(os.path.join(out, RECORD), 'w') as f:
      json.dump(settings(config), f, indent=1)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(out, target)
    shutil.rmtree(build, ignore_errors=True)
  if reporting.is_writer():
    print(f'pretrain: wrote the pretrained trunk to {config.init_from}')
  return True


def main(argv: list[str]) -> None:
  from depthuda import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', cli.USAGE)
  cli.configure_logging()
  config = _CONFIG.value
  if not config.pretrain.num_steps:
    cli.fail('--config: pretrain.num_steps is 0 (no pretrained start to make)', cli.USAGE)
  if not ensure(config):
    print(f'pretrain: {config.init_from} is current, kept')


if __name__ == '__main__':
  import functools  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from depthuda import cli  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                            lock_config=True)
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config=_CONFIG))
