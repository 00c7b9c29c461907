"""Every command README.md shows names real modules, flags, config fields, files and targets;
the commands that need no dataset or GPU run here (the rest run in `make demo` and the tests
named in `_RUN_BY`)."""

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess

import numpy as np
import pytest

from depthuda import config_files
from tests import main_runs

README = os.path.join(main_runs.ROOT, 'README.md')
# Where the README's `python -m depthuda.X` commands are run, for the record (checked to exist).
_RUN_BY = {'depthuda.main': ('Makefile', 'tests/test_main.py'),
           'depthuda.predict': ('tests/test_predict.py',),
           'depthuda.convert': ('tests/test_convert.py',),
           'depthuda.pretrain': ('tests/test_pretrain.py',)}
# The config files a user passes to --config.
CONFIGS = sorted(n for n in os.listdir(os.path.join(main_runs.ROOT, 'configs'))
                 if n.endswith('.py') and n not in ('__init__.py', 'common.py'))


def _commands() -> list[str]:
  """The shell commands in README's code blocks, continuation lines joined, comments dropped."""
  with open(README) as f:
    blocks = re.findall(r'^```\n(.*?)^```', f.read(), flags=re.S | re.M)
  commands = []
  for block in blocks:
    for line in block.replace('\\\n', ' ').splitlines():
      line = line.split('  #')[0].strip()
      log_line = re.match(r'[IWEF]\d{4} ', line)  # absl's prefix: an example of the logs
      if line and not log_line and not line.startswith(('@', 'depthuda:', '}', 'title', 'author',
                                                        'booktitle', 'year')):
        commands.append(line)
  return commands


def _module_flags(module: str) -> set[str]:
  """Flags a depthuda module defines, read from its source (importing two CLIs would clash)."""
  path = importlib.util.find_spec(module).origin
  with open(path) as f:
    return set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", f.read()))


def _config(path: str):
  spec = importlib.util.spec_from_file_location('readme_config', os.path.join(main_runs.ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if part not in node:
      return False
    node = node[part]
  return True


def _check_python_command(tokens: list[str]) -> int:
  module = tokens[tokens.index('-m') + 1]
  assert module.startswith('depthuda.') and importlib.util.find_spec(module), module
  assert all(os.path.exists(os.path.join(main_runs.ROOT, p)) for p in _RUN_BY[module])
  flags = _module_flags(module)
  args = dict(t.lstrip('[').rstrip(']').lstrip('-').partition('=')[::2]
              for t in tokens if t.lstrip('[').startswith('--'))
  config_file = args.get('config', '')
  config = None if not config_file or '<' in config_file else _config(config_file)
  checked = 0
  for name in args:
    if name == 'config.<field>':  # the general form of the command
      continue
    if name.startswith('config.'):
      assert config is not None, f'--{name} without a config file'
      assert _has_field(config, name[len('config.'):]), f'{config_file} has no {name}'
    else:
      assert name in flags, f'{module} has no --{name}'
    checked += 1
  return checked


def test_every_readme_command_names_real_flags_fields_and_files():
  commands = _commands()
  kinds = set()
  for command in commands:
    tokens = shlex.split(command.replace('[', ' [').replace(' / ', ' '))
    if 'python' in tokens[0] and '-m' in tokens:
      kinds.add(tokens[tokens.index('-m') + 1])
      if tokens[tokens.index('-m') + 1] != 'venv':
        assert _check_python_command(tokens) > 0, command
    elif tokens[0] == 'make':
      with open(os.path.join(main_runs.ROOT, 'Makefile')) as f:
        targets = re.findall(r'^([\w-]+):', f.read(), flags=re.M)
      assert tokens[1] in targets, command
      kinds.add('make')
    elif tokens[0] == 'sbatch' or any(t.startswith('launch/') for t in tokens):
      script = next(t for t in tokens if t.startswith('launch/'))
      path = os.path.join(main_runs.ROOT, script)
      assert os.access(path, os.X_OK), script
      assert subprocess.run(['bash', '-n', path]).returncode == 0, script
      config = re.search(r'CONFIG=(\S+)', command)
      assert config is None or os.path.exists(os.path.join(main_runs.ROOT, config[1]))
      kinds.add('launch')
    elif any(t.startswith('benchmarks/') for t in tokens):
      script = next(t for t in tokens if t.startswith('benchmarks/'))
      with open(os.path.join(main_runs.ROOT, script)) as f:
        source = f.read()
      if script.endswith('.py'):
        defined = set(re.findall(r"add_argument\('--(\w+)'", source))
        used = {t[2:].partition('=')[0] for t in tokens if t.startswith('--')}
        assert used <= defined, f'{script} has no --{sorted(used - defined)}'
      else:
        assert subprocess.run(['bash', '-n', os.path.join(main_runs.ROOT, script)]).returncode == 0
      kinds.add('benchmarks')
    elif tokens[0].endswith('pip') or 'pip' in tokens:
      extras = re.findall(r"\.\[(\w+)\]", command)
      with open(os.path.join(main_runs.ROOT, 'pyproject.toml')) as f:
        pyproject = f.read()
      assert all(re.search(rf'^{e} = \[', pyproject, flags=re.M) for e in extras), command
      kinds.add('pip')
    else:
      pytest.fail(f'README command of an unknown kind: {command}')
  assert {'depthuda.main', 'depthuda.predict', 'depthuda.convert', 'make', 'launch',
          'pip', 'benchmarks'} <= kinds


def test_local_multiprocess_launcher_fits_what_one_process_fits(tmp_path_factory, tmp_path):
  """README's `NPROC=2 CPU=1 launch/local_multiprocess.sh`: two processes joined by
  jax.distributed sum their halves of the source set into the GMMs one process fits."""
  reference = main_runs.reference_workdir(tmp_path_factory)
  workdir = str(tmp_path / 'two')
  env = dict(main_runs.ENV, NPROC='2', CPU='1', CONFIG='configs/test.py', WORKDIR=workdir,
             PORT=str(20000 + os.getpid() % 20000),
             PATH=os.path.dirname(main_runs.sys.executable) + os.pathsep + os.environ['PATH'])
  completed = subprocess.run(['launch/local_multiprocess.sh', '--stage=fit_gmm'], cwd=main_runs.ROOT,
                             env=env, capture_output=True, text=True, timeout=main_runs.TIMEOUT)
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(os.path.join(reference, 'fit_gmm', 'gmm.json')) as f:
    expected = json.load(f)
  with open(os.path.join(workdir, 'fit_gmm', 'gmm.json')) as f:
    got = json.load(f)
  assert got['iterations'] == expected['iterations']
  for name, record in expected['classes'].items():
    assert got['classes'][name]['pixel_count'] == record['pixel_count']
    assert got['classes'][name]['num_points'] == record['num_points']
    for key in ('weights', 'means', 'variances'):
      np.testing.assert_allclose(got['classes'][name][key], record[key], rtol=1e-4, atol=1e-5)


@pytest.mark.cluster
def test_eight_gpu_recipe_runs_as_written_on_eight_devices(tmp_path):
  """README's 8-GPU line, as written, on 8 CPU devices standing in for the GPUs (the test
  config and its own small datasets, 2 adapt steps): the batch divides over the devices and the
  settings it gives pass the config check."""
  (line,) = [c for c in _commands() if c.startswith('GPU=0,1,2,3,4,5,6,7 launch/single_gpu.sh')]
  tokens = shlex.split(line)
  data = tmp_path / 'data'
  env = dict(main_runs.ENV, **dict(t.split('=', 1) for t in tokens[:1]), CONFIG='configs/test.py',
             WORKDIR=str(tmp_path / 'run'),
             XLA_FLAGS='--xla_force_host_platform_device_count=8 '
                       '--xla_backend_optimization_level=0',
             PATH=os.path.dirname(main_runs.sys.executable) + os.pathsep + os.environ['PATH'])
  completed = subprocess.run(
      [*tokens[1:], '--stage=adapt', '--config.adapt.num_steps=2', '--config.log_every_steps=1',
       '--config.eval_every_steps=1000', '--config.log_images_every_steps=0',
       '--config.loss.lambda_bal_src=0', '--config.loss.lambda_bal_tgt=0',
       f'--config.data.source_dir={data}/SYNTHIA-RAND-CITYSCAPES',
       f'--config.data.target_dir={data}/cityscapes', f'--config.data.tfds_dir={data}/tfds',
       '--config.data.toy_num_source=8', '--config.data.toy_num_target_train=8'],
      cwd=main_runs.ROOT, env=env, capture_output=True, text=True, timeout=main_runs.TIMEOUT)
  assert completed.returncode == 0, completed.stderr[-3000:]
  logged = main_runs.metrics(str(tmp_path / 'run'), 'adapt')
  assert [m['step'] for m in logged if 'loss' in m] == [1, 2]


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_says_how_to_run_it_and_what_to_expect(name):
  """Each experiment file starts with its command, then expected runtime and result."""
  path = os.path.join(main_runs.ROOT, 'configs', name)
  with open(path) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  assert doc, name
  assert f'python -m depthuda.main --config=configs/{name}' in doc
  assert re.search(r'Expected', doc) and re.search(r'\d+ (minutes|min|h)\b', doc), doc
  config = _config(os.path.join('configs', name))  # and it loads
  assert config.data.num_classes in (7, 16)


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_loads_from_anywhere_and_passes_the_check(name, tmp_path, monkeypatch):
  """What `--config=/abs/path/configs/<name>` does from another directory: the file's
  `from configs import ...` finds its siblings, and every field passes the base config's check."""
  monkeypatch.chdir(tmp_path)
  path = config_files.resolve(os.path.join(main_runs.ROOT, 'configs', name))
  config = config_files.load(path)
  config_files.check(config, config_files.base_config(), lambda field: f'{name}: ')
  assert config.to_dict() == _config(os.path.join('configs', name)).to_dict()
  with pytest.raises(config_files.ConfigError, match=r'data.num_classes=8: expected one of 7, 16'):
    config.data.num_classes = 8
    config_files.check(config, config_files.base_config(), lambda field: '')


@pytest.mark.parametrize('name', [n for n in CONFIGS if n != 'test.py'])  # test.py: a fixture
def test_learning_rate_reaches_zero_at_the_end_of_adaptation(name):
  """METHOD §5: 90,000 iterations on a poly horizon of 90,000; self-training restarts it."""
  config = _config(os.path.join('configs', name))
  assert config.optim.poly_horizon == config.adapt.num_steps, name
  assert config.self_train.num_steps <= config.optim.poly_horizon, name
