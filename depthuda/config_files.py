"""Experiment config files: found from any directory, loaded, and checked before any work.

A config file imports its siblings as `from configs import common`. `use_config_dir` makes
`configs` the package of the file's own folder, then of the configs shipped with depthuda
(`shipped_dir()`: the repository's configs/, or depthuda/configs/ in an installed package), so
a config loads whatever the working directory. A `--config` path that does not exist is looked up
among the shipped configs by its file name: `--config=configs/toy.py` works outside a checkout.

`check` compares a config with the base (configs/common.py `get_base_config()`, which declares
every field): no unknown or missing field, each of its field's type, within the values the code
accepts. All of this runs before JAX or TensorFlow is imported: a bad config costs no time.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import numbers
import os
import sys
import types
from typing import Any, Callable

import ml_collections


class ConfigError(Exception):
  """A config file or `--config.<field>` override the code cannot run; the message names it."""


def shipped_dir() -> str:
  """The configs that come with depthuda: in the package once installed, else the checkout's."""
  here = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(here, 'configs')
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), 'configs')


def resolve(path: str) -> str:
  """The config file `path` names (an optional `:argument` kept): as given, else a shipped one."""
  file, colon, argument = path.partition(':')
  if not os.path.isfile(file):
    shipped = os.path.join(shipped_dir(), os.path.basename(file))
    if not file.endswith('.py') or not os.path.isfile(shipped):
      names = sorted(n for n in os.listdir(shipped_dir())
                     if n.endswith('.py') and n not in ('__init__.py', 'common.py'))
      raise ConfigError(f'--config={path}: no such file (shipped configs: {", ".join(names)})')
    file = shipped
  return os.path.abspath(file) + colon + argument


def use_config_dir(file: str) -> None:
  """Makes `import configs.<name>` find the siblings of `file`, then the shipped configs."""
  folders = list(dict.fromkeys([os.path.dirname(os.path.abspath(file)), shipped_dir()]))
  package = sys.modules.get('configs')
  if package is not None and list(getattr(package, '__path__', [])) == folders:
    return
  for name in [n for n in sys.modules if n.startswith('configs.')]:
    del sys.modules[name]  # siblings of another folder
  spec = importlib.machinery.ModuleSpec('configs', None, is_package=True)
  spec.submodule_search_locations = folders
  package = importlib.util.module_from_spec(spec)
  sys.modules['configs'] = package


def load(path: str) -> ml_collections.ConfigDict:
  """The config of a resolved `--config` value; whatever the file raises becomes a ConfigError."""
  file, _, argument = path.partition(':')
  use_config_dir(file)
  try:
    loader = importlib.machinery.SourceFileLoader('depthuda_config_file', file)
    module = types.ModuleType(loader.name)
    module.__file__ = file
    loader.exec_module(module)
    config = module.get_config(*([argument] if argument else []))
  except Exception as e:  # pylint: disable=broad-except  # the file's own error, shown as such
    raise ConfigError(f'--config={file}: {type(e).__name__}: {e}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'--config={file}: get_config() returned {type(config).__name__}, '
                      'not an ml_collections.ConfigDict')
  return config


def base_config() -> ml_collections.ConfigDict:
  """get_base_config() of the shipped configs/common.py: the fields every config has."""
  spec = importlib.util.spec_from_file_location('depthuda_base_config',
                                                os.path.join(shipped_dir(), 'common.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_base_config()


def _leaves(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  leaves = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      leaves.update(_leaves(value, f'{prefix}{key}.'))
    else:
      leaves[prefix + key] = value
  return leaves


def _types(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, type]:
  """The declared type of each leaf (a field declared None has its FieldReference's type)."""
  found = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      found.update(_types(value, f'{prefix}{key}.'))
    else:
      found[prefix + key] = config.get_type(key)
  return found


def _suggestion(name: str, known: list[str]) -> str:
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  return f' (did you mean {close[0]}?)' if close else ''


def check_names(names: list[str], base: ml_collections.ConfigDict, where: Callable[[str], str]
                ) -> None:
  """Every name (`adapt.num_steps`) must be a field of `base`.

  where(name): who set field `name`, as a message's prefix: `--config.` for an override,
  `--config=FILE: ` for the file.
  """
  known = list(_leaves(base))
  for name in names:
    if name not in known:
      raise ConfigError(f'{where(name)}{name}: no such config field{_suggestion(name, known)}')


def _positive(value) -> bool:
  return value > 0


def _non_negative(value) -> bool:
  return value >= 0


def _sizes(count: int | None) -> Callable[[Any], bool]:
  return lambda value: (count is None or len(value) == count) and all(v > 0 for v in value)


# Fields whose value may also be None, and what None means.
_NULLABLE = ('loss.class_weights',      # an unweighted segmentation loss
             'pseudo.min_region_sizes')  # computed from the source's pixel counts
# The values the code accepts, beyond the type: (test, what is expected).
_CHOICES = {
    'compute_dtype': ('float32', 'bfloat16'),
    'nonfinite': ('stop', 'skip'),
    'model.bn_mode': ('train', 'frozen'),
    'model.head_init': ('normal', 'he'),
    'loss.disc_input': ('softmax', 'entropy', 'entropy_depth', 'entropy_density'),
    'data.source': ('synthia',),
    'data.target': ('cityscapes', 'mapillary'),
    'data.num_classes': (7, 16),
    'eval.protocol': ('native', 'input_size'),
}
_RULES = {
    **{name: (_positive, 'a positive number') for name in (
        'batch_size', 'checkpoint_every_steps', 'log_every_steps', 'eval_every_steps',
        'keep_checkpoints', 'model.width', 'model.disc_ndf', 'data.shuffle_buffer',
        'optim.lr', 'optim.disc_lr', 'optim.poly_horizon', 'gmm.num_components', 'gmm.max_iters',
        'gmm.density_scale', 'gmm.var_floor', 'data.toy_num_source', 'data.toy_num_target_train',
        'data.toy_num_target_val', 'data.toy_num_target_test', 'pretrain.num_images',
        'pretrain.lr')},
    **{name: (_non_negative, 'zero or more') for name in (
        'log_images_every_steps', 'adapt.num_steps', 'self_train.num_steps', 'eval.num_images',
        'eval.num_panels', 'gmm.tol', 'optim.momentum', 'optim.weight_decay', 'optim.poly_power',
        'loss.lambda_seg', 'loss.lambda_depth', 'loss.lambda_bal_src', 'loss.lambda_bal_tgt',
        'loss.lambda_adv', 'pretrain.num_steps', 'pretrain.seed')},
    'pseudo.threshold': (lambda v: 0 <= v <= 1, 'between 0 and 1'),
    'model.layers': (_sizes(4), '4 positive block counts'),
    **{name: (_sizes(2), '(width, height), positive') for name in (
        'data.input_size', 'data.label_size', 'pseudo.reference_input_size',
        'data.toy_source_size')},
}


def _type_ok(value: Any, declared: type) -> bool:
  if declared is bool:
    return isinstance(value, bool)
  if declared is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if declared is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if declared in (tuple, list):
    return isinstance(value, (tuple, list)) and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
  return isinstance(value, declared)


def check(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict,
          where: Callable[[str], str]) -> None:
  """Raises a ConfigError for the first field of `config` the code cannot run with.

  where(name): who set field `name`, as in `check_names`.
  """
  values, declared = _leaves(config), _types(base)
  check_names(list(values), base, where)
  missing = [name for name in declared if name not in values]
  if missing:
    raise ConfigError(f'{where(missing[0])}{missing[0]}: missing (derive the config from '
                      'configs/common.py get_base_config())')
  for name, value in values.items():
    if value is None and name in _NULLABLE:
      continue
    kind = declared[name]
    if not _type_ok(value, kind):
      nullable = ' or None' if name in _NULLABLE else ''
      raise ConfigError(f'{where(name)}{name}={value!r}: expected type {kind.__name__}{nullable}')
    if name in _CHOICES and value not in _CHOICES[name]:
      choices = [str(c) for c in _CHOICES[name]]
      raise ConfigError(f'{where(name)}{name}={value!r}: expected one of {", ".join(choices)}'
                        f'{_suggestion(str(value), choices)}')
    if name in _RULES and not _RULES[name][0](value):
      raise ConfigError(f'{where(name)}{name}={value!r}: expected {_RULES[name][1]}')
  if config.pretrain.num_steps and not (config.data.toy and config.init_from):
    name = 'pretrain.num_steps'
    raise ConfigError(f'{where(name)}{name}={config.pretrain.num_steps}: a pretrained start is '
                      'made for the toy (data.toy=True) into init_from, which is empty')
  classes = config.data.num_classes
  for name in _NULLABLE:
    value = values[name]
    if value is not None and len(value) != classes:
      raise ConfigError(f'{where(name)}{name} has {len(value)} entries for '
                        f'data.num_classes={classes}')


def overrides(argv: list[str]) -> list[str]:
  """The fields that `--config.<field>=<value>` arguments in `argv` set."""
  return [arg[len('--config.'):].partition('=')[0] for arg in argv if arg.startswith('--config.')]


def config_arg(argv: list[str]) -> tuple[int, str] | None:
  """(index, value) of the `--config=FILE` (or `--config FILE`) argument in `argv`, if any."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return i, arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return i + 1, argv[i + 1]
  return None


def prepare(argv: list[str]) -> tuple[list[str], Callable[[ml_collections.ConfigDict], None]]:
  """Checks what `argv` says of the config before absl parses it (which loads the file again and
  applies the overrides). Returns `argv` with `--config` resolved, and the check of the parsed
  config. Raises a ConfigError for a missing or failing file, or an unknown field."""
  argv = list(argv)
  found = config_arg(argv)
  named = overrides(argv)
  if found is None:
    if named:
      raise ConfigError(f'--config.{named[0]}: needs --config=FILE')
    return argv, lambda config: None
  index, value = found
  path = resolve(value)
  argv[index] = f'--config={path}' if argv[index].startswith('--config=') else path
  base = base_config()
  file_only = load(path)
  file_name = path.partition(':')[0]
  in_file = lambda name: f'--config={file_name}: '
  check_names(list(_leaves(file_only)), base, in_file)
  check_names(list(named), base, lambda name: '--config.')

  def check_parsed(config: ml_collections.ConfigDict) -> None:
    check(config, base, lambda name: '--config.' if name in named else in_file(name))

  return argv, check_parsed
