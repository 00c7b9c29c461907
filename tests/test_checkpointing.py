"""checkpointing.load_model: every checkpoint folder a user may name, and model selection."""

import os

import jax
import numpy as np
import pytest

from configs import test as test_config
from depthuda import checkpointing
from depthuda import converted
from depthuda import models
from depthuda.errors import InputError
from tests import main_runs


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = main_runs.reference_workdir(tmp_path_factory)
  config = test_config.get_config()
  seg, _ = models.build(config)
  return workdir, models.abstract_variables(config, seg), config


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_every_checkpoint_form_loads_the_model_it_names(reference, tmp_path):
  workdir, abstract, config = reference
  adapt = os.path.join(workdir, 'adapt')
  ckpts = checkpointing.StageCheckpoints(adapt)
  best, best_meta = ckpts.restore_best(abstract)
  best_step = ckpts.best_step()
  state = _saved_state(ckpts)
  ckpts.close()
  last = {'params': state['params'], 'batch_stats': state['batch_stats']}
  assert best_meta['step'] == best_step
  checkpointing.save_variables(str(tmp_path / 'converted'), best, converted.metadata(
      converted.TRAINED, config.model.layers, config.model.width, config.data.num_classes,
      'a test'))
  cases = {adapt: (best, best_step, 'best'),
           os.path.join(adapt, 'best'): (best, best_step, 'best'),
           os.path.join(adapt, 'best', str(best_step)): (best, best_step, None),
           os.path.join(adapt, 'checkpoints'): (last, 8, 'last'),
           os.path.join(adapt, 'checkpoints', '8'): (last, 8, None),
           str(tmp_path / 'converted'): (best, None, None)}
  for path, (expected, step, selection) in cases.items():
    variables, info = checkpointing.load_model(path + '/', 'best', abstract, config)
    _equal(variables, expected)
    assert (info['step'], info['selection'], info['checkpoint']) == (step, selection, path), path
  variables, info = checkpointing.load_model(adapt, 'last', abstract, config)
  _equal(variables, last)
  assert (info['step'], info['selection']) == (8, 'last')


def _saved_state(ckpts):
  """The latest whole TrainState as saved (nested dicts), read without a target."""
  import orbax.checkpoint as ocp
  step = ckpts.latest_step()
  return ocp.PyTreeCheckpointer().restore(os.path.join(ckpts.directory, 'checkpoints', str(step),
                                                       'state'))


def test_not_a_checkpoint_is_one_clear_line(reference, tmp_path):
  workdir, abstract, config = reference
  for path, message in ((tmp_path / 'absent', 'no such directory'),
                        (tmp_path, 'not a checkpoint'),
                        (os.path.join(workdir, 'fit_gmm'), 'not a checkpoint')):
    with pytest.raises(InputError, match=f'^--checkpoint=.*: {message} \\(expected a stage folder'):
      checkpointing.load_model(str(path), 'best', abstract, config)
  with pytest.raises(InputError, match=r"config.model_selection='first': expected one of"):
    checkpointing.load_model(os.path.join(workdir, 'adapt'), 'first', abstract, config)
  assert os.listdir(tmp_path) == []  # nothing created
