"""PyTorch state dicts of the original -> Flax variables of `DeepLabV2Depth`.

Two kinds of files are accepted (METHOD §3):
- the ImageNet initialization `DeepLab_resnet_pretrained_imagenet.pth`: keys `Scale.conv1.weight`,
  `Scale.layer1.0.downsample.1.running_var`, ..., and `Scale.layer5.*` (an old classifier, skipped).
  It gives the ResNet trunk alone; the classifier and heads start from the loading run's init;
- trained checkpoints of the original: the same names without `Scale.`, the classifier as
  `layer6.conv2d_list.{0..3}`, the density head as `enc4_{1,2,3}` and the depth head as
  `enc5_{1,2,3}`, all with weight and bias (the parameter count of METHOD §3 includes the head
  biases). Their unused `enc4_4` and `dec4` are skipped.

A trained checkpoint must hold the whole model: a missing classifier or head key is an error.
`num_batches_tracked` is ignored. Torch never needs to be imported here: values are arrays.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from depthuda.models.deeplab import DeepLabV2Depth, trunk

IMAGENET_PREFIX = 'Scale.'
# Keys of the original that this model has no use for.
_SKIPPED = re.compile(r'^(layer5|enc4_4|dec4)\.|\.num_batches_tracked$')
_BLOCK = re.compile(r'^layer([1-4])\.(\d+)\.')
# Keys that only a trained checkpoint has: the classifier and the heads.
_HEAD_PREFIXES = ('layer6.', 'enc4_', 'enc5_')
_CLASSIFIER_KEY = 'layer6.conv2d_list.0.weight'
# Flax leaf name -> torch parameter / buffer name.
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}
_SUBMODULE_NAMES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}
# Input side for shape inference; parameters don't depend on it.
_DUMMY_SIDE = 32
# How many names an error message lists per kind.
_MAX_LISTED = 12


def _normalize(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Drops the `Scale.` prefix and the skipped keys; values as float32 numpy arrays."""
  arrays = {}
  for key, value in state_dict.items():
    key = key.removeprefix(IMAGENET_PREFIX)
    if not _SKIPPED.search(key):
      arrays[key] = np.asarray(value, dtype=np.float32)
  return arrays


def infer_architecture(state_dict: Mapping[str, Any]) -> tuple[tuple[int, ...], int]:
  """(layers, width) of the ResNet trunk a state dict holds, e.g. ((3, 4, 23, 3), 64).

  Blocks per layer are counted from the `layer{i}.{j}.` names; the width is conv1's output
  channels. Raises ValueError if either is absent.
  """
  shapes = {key.removeprefix(IMAGENET_PREFIX): np.shape(value)
            for key, value in state_dict.items()}
  if 'conv1.weight' not in shapes:
    raise ValueError('missing key conv1.weight (the ResNet stem): not a checkpoint of the '
                     'original DeepLabV2')
  blocks = {1: set(), 2: set(), 3: set(), 4: set()}
  for key in shapes:
    if match := _BLOCK.match(key):
      blocks[int(match[1])].add(int(match[2]))
  if empty := [f'layer{i}' for i, found in blocks.items() if not found]:
    raise ValueError(f'no blocks of {", ".join(empty)} in the state dict')
  return tuple(max(found) + 1 for found in blocks.values()), int(shapes['conv1.weight'][0])


def _torch_name(path: tuple[str, ...]) -> str:
  """Flax variable path -> the original's name.

  ('params', 'layer3_5', 'downsample_bn', 'scale') -> 'layer3.5.downsample.1.weight',
  ('params', 'classifier', 'conv2', 'bias') -> 'layer6.conv2d_list.2.bias',
  ('params', 'density_head', 'conv1', 'kernel') -> 'enc4_1.weight' (depth_head: enc5_*).
  """
  _, top, *inner, leaf = path
  if top == 'classifier':
    module = f'layer6.conv2d_list.{inner[0].removeprefix("conv")}'
  elif top in ('density_head', 'depth_head'):
    number = '4' if top == 'density_head' else '5'
    module = f'enc{number}_{inner[0].removeprefix("conv")}'
  elif inner:
    module = '.'.join(top.split('_') + [_SUBMODULE_NAMES.get(inner[0], inner[0])])
  else:
    module = top
  return f'{module}.{_LEAF_NAMES[leaf]}'


def _to_flax(value: np.ndarray) -> np.ndarray:
  """Conv weights OIHW -> HWIO; vectors unchanged."""
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """HWIO -> OIHW, the layout the state dict uses."""
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def _listed(names: list[str]) -> str:
  more = len(names) - _MAX_LISTED
  return ', '.join(names[:_MAX_LISTED]) + (f' and {more} more' if more > 0 else '')


def from_torch_state_dict(state_dict: Mapping[str, Any],
                          num_classes: int | None = None) -> dict[str, Any]:
  """Flax variables of `DeepLabV2Depth` from a state dict of the original.

  An ImageNet file (no classifier `layer6` and no heads; its old `layer5` classifier is skipped)
  gives the ResNet trunk alone: the classifier and heads are left to the fresh, seeded init of
  the run that loads it, as the original initializes them, so one conversion serves any class
  count. A trained checkpoint gives the whole model, every key accounted for.

  Args:
    state_dict: {name: array} (numpy arrays or anything `np.asarray` takes, detached CPU
      torch tensors included) with the original's names: an ImageNet `Scale.` file or a trained
      checkpoint.
    num_classes: for a trained checkpoint, the classes its classifier must have (None: whatever
      it has). Not used for an ImageNet file.
  Returns:
    {'params': ..., 'batch_stats': ...} of `DeepLabV2Depth(num_classes, layers, width)` with
    (layers, width) = `infer_architecture`: the whole tree, or its `trunk` for an ImageNet file.
  Raises:
    ValueError: listing unknown keys, missing keys and shape mismatches, or naming a classifier
      of another class count.
  """
  layers, width = infer_architecture(state_dict)
  arrays = _normalize(state_dict)
  trained = any(key.startswith(_HEAD_PREFIXES) for key in arrays)
  classifier = arrays.get(_CLASSIFIER_KEY)
  if trained and classifier is not None:
    if num_classes is not None and num_classes != classifier.shape[0]:
      raise ValueError(f'the classifier ({_CLASSIFIER_KEY}) has {classifier.shape[0]} classes, '
                       f'not num_classes={num_classes}')
    num_classes = classifier.shape[0]
  # An ImageNet trunk does not depend on the class count: any will do for its shapes.
  model = DeepLabV2Depth(num_classes=num_classes or 1, layers=layers, width=width)
  shapes = jax.eval_shape(functools.partial(
      model.init, jax.random.PRNGKey(0), jnp.zeros((1, _DUMMY_SIDE, _DUMMY_SIDE, 3), jnp.float32),
      train=False))
  expected = flax.traverse_util.flatten_dict(shapes if trained else trunk(shapes))
  names = {path: _torch_name(path) for path in expected}

  known = set(names.values())
  unknown = sorted(key for key in arrays if key not in known)
  missing = sorted(name for name in names.values() if name not in arrays)
  mismatched = []
  for path, name in names.items():
    if name in arrays and _to_flax(arrays[name]).shape != expected[path].shape:
      mismatched.append(f'{name} {arrays[name].shape} (model expects '
                        f'{_torch_shape(expected[path].shape)})')
  if unknown or missing or mismatched:
    problems = [f'{kind}: {_listed(keys)}' for kind, keys in
                (('unknown keys', unknown), ('missing keys', missing),
                 ('shape mismatches', mismatched)) if keys]
    what = (f'DeepLabV2Depth(num_classes={num_classes}, layers={layers}, width={width})'
            if trained else f'the ResNet trunk (layers={layers}, width={width})')
    raise ValueError(f'state dict does not fit {what}; ' + '; '.join(problems))
  return flax.traverse_util.unflatten_dict(
      {path: jnp.asarray(_to_flax(arrays[name])) for path, name in names.items()})
