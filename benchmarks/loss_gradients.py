r"""How hard each loss term of the adapt step pulls on each part of the segmenter, at its start.

  python benchmarks/loss_gradients.py --workdir=W [--head_init=he,normal] [--config.FIELD=V ...]

W is a run of configs/toy.py (or another config via --config) whose fit_gmm stage is done. For
the segmenter `adapt` starts from (init_from, heads fresh) and the first source and target
batches, prints each weighted term of METHOD §5 (λ · loss) and the norm of its gradient with
respect to the trunk, the classifier and the two heads. The terms' gradients are what the step
sums; comparing them says which term steers the shared trunk. With --head_init, the heads'
initialisation is varied (the seeded draws of the rest stay the same).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from depthuda import gmm_record  # pylint: disable=wrong-import-position
from depthuda import losses  # pylint: disable=wrong-import-position
from depthuda import models  # pylint: disable=wrong-import-position
from depthuda import train  # pylint: disable=wrong-import-position
from depthuda.data import pipeline  # pylint: disable=wrong-import-position
from depthuda.stages import training  # pylint: disable=wrong-import-position

SOURCE_TERMS = ('loss_seg', 'loss_depth', 'loss_bal_src')
TARGET_TERMS = ('loss_bal_tgt', 'loss_adv')
PARTS = ('trunk', 'classifier', 'density_head', 'depth_head')


def part_norms(grads: dict) -> dict[str, float]:
  """The gradient's norm over each part of the segmenter's parameters."""
  squares = dict.fromkeys(PARTS, 0.0)
  for name, tree in grads.items():
    part = name if name in PARTS else 'trunk'
    squares[part] += float(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))
  return {part: value ** 0.5 for part, value in squares.items()}


def term_gradients(config, workdir: str) -> dict[str, tuple[float, dict[str, float]]]:
  """{term: (λ · loss, its gradient's norm per part)} at the start of `adapt`."""
  seg, disc = models.build(config, axis_name=None)
  variables = training.initial_variables(config, workdir, 'adapt', seg)
  state, _, _ = train.init_state(config, seg, disc, variables)
  gmm = gmm_record.load_params(workdir)
  src = jax.tree.map(jnp.asarray, next(iter(pipeline.source_train(config,
                                                                  models.feature_grid(config)))))
  tgt = jnp.asarray(next(iter(pipeline.target_train(config)))['image'])
  weights = losses.loss_weights(config.loss)

  def source(params, name):
    terms = train.source_loss(params, state.batch_stats, src, gmm, seg=seg, config=config,
                              axis_name=None)[1][0]
    return weights[name] * terms[name]

  def target(params, name):
    terms = train.target_loss(params, state.batch_stats, tgt, state.disc_params, gmm, seg=seg,
                              disc=disc, config=config, axis_name=None)[1][0]
    return weights[name] * terms[name]

  out = {}
  for fn, names in ((source, SOURCE_TERMS), (target, TARGET_TERMS)):
    for name in names:
      value, grads = jax.value_and_grad(fn)(state.params, name)
      out[name] = (float(value), part_norms(grads))
  return out


def _define_flags():
  """The command line's flags, defined when run as a script (importing this module, as the
  tests do beside depthuda's own commands, defines none)."""
  return (config_flags.DEFINE_config_file('config', 'configs/toy.py', 'experiment config'),
          flags.DEFINE_string('workdir', None, 'a run whose fit_gmm stage is done',
                              required=True),
          flags.DEFINE_list('head_init', ['he', 'normal'], 'head initialisations to compare'))


def main(argv):
  del argv
  for head_init in _HEAD_INIT.value:
    config = _CONFIG.value.copy_and_resolve_references()
    config.model.head_init = head_init
    print(f'head_init={head_init}: weighted term, then |gradient| by part')
    print(f'  {"term":14s} {"λ·loss":>9s} ' + ' '.join(f'{p:>13s}' for p in PARTS))
    for name, (value, norms) in term_gradients(config, _WORKDIR.value).items():
      print(f'  {name:14s} {value:9.4g} ' + ' '.join(f'{norms[p]:13.3g}' for p in PARTS))


if __name__ == '__main__':
  _CONFIG, _WORKDIR, _HEAD_INIT = _define_flags()
  app.run(main)
