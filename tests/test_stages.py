"""The stage dispatcher and the stages' layout."""

import ast
import json
import pathlib

import pytest

from configs import test as test_config
from depthuda import stages
from depthuda import validation

STAGES_DIR = pathlib.Path(__file__).resolve().parent.parent / 'depthuda' / 'stages'


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Dotted names of every module `path` imports (`from a import b` gives a and a.b)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def test_stages_never_import_stages():
  """Only the dispatcher (stages/__init__.py) imports stage modules; what two stages share
  lives outside the package."""
  stage_modules = {f'depthuda.stages.{p.stem}' for p in STAGES_DIR.glob('*.py')
                   if p.name != '__init__.py'}
  assert {'depthuda.stages.fit_gmm', 'depthuda.stages.training'} <= stage_modules
  offenders = {p.name: sorted(_imported_modules(p) & (stage_modules | {'depthuda.stages'}))
               for p in STAGES_DIR.glob('*.py') if p.name != '__init__.py'}
  assert {name: mods for name, mods in offenders.items() if mods} == {}


_PROBED = ('fit_gmm', 'adapt', 'pseudo_label', 'self_train', 'eval')


@pytest.mark.parametrize('stage_dirs', [(), ('adapt', 'self_train')])
def test_probing_a_workdir_creates_nothing(tmp_path, stage_dirs):
  """Asking whether each stage is complete writes nothing, also where results.json names stages
  whose outputs are gone and where stage folders exist without checkpoints (a stage that was cut
  off before its first save)."""
  config = test_config.get_config()
  results = {'fit_gmm': {}, 'pseudo_label': {'images': 1},
             'adapt': {'steps': config.adapt.num_steps, 'best_step': 3},
             'self_train': {'steps': config.self_train.num_steps, 'best_step': 3},
             'eval': {**validation.settings(config), 'model_stage': 'self_train',
                      'model_selection': config.model_selection, 'model_step': 3}}
  (tmp_path / 'results.json').write_text(json.dumps(results))
  for name in stage_dirs:
    (tmp_path / name).mkdir()
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
  assert [stages.is_complete(stage, config, str(tmp_path)) for stage in _PROBED] == [False] * 5
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before
