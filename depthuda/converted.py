"""What a folder written by `python -m depthuda.convert` holds, checked before anything loads.

The folder has `variables/` (Orbax) and `metadata.json`:
  {"kind": "imagenet", "layers": [3, 4, 23, 3], "width": 64, "source": "...pth"}
  {"kind": "trained", "num_classes": 7, "layers": [3, 4, 23, 3], "width": 64, "source": "...pth"}
An ImageNet conversion holds the ResNet trunk alone, so one folder starts every experiment
whatever its class count; a trained one holds the whole segmenter. The record is checked against
the config up front, so a mismatch ends in one line naming the fix instead of Orbax's message.
Imports nothing heavy: `depthuda.main` checks `init_from` before it imports JAX.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from depthuda import fileio
from depthuda.errors import InputError

METADATA = 'metadata.json'
IMAGENET = 'imagenet'
TRAINED = 'trained'
_CONVERT = 'python -m depthuda.convert --torch_checkpoint=IN.pth --output={}'


def metadata(kind: str, layers: Sequence[int], width: int, num_classes: int | None,
             source: str) -> dict:
  """The record of a conversion; num_classes only for a trained model."""
  meta = {'kind': kind, 'layers': [int(n) for n in layers], 'width': int(width),
          'source': source}
  if kind == TRAINED:
    meta['num_classes'] = int(num_classes)
  return meta


def write_metadata(directory: fileio.PathLike, meta: dict) -> None:
  fileio.write_atomic(fileio.Path(directory) / METADATA, json.dumps(meta, indent=2) + '\n')


def read_metadata(directory: fileio.PathLike, setting: str) -> dict:
  """The record in `directory`; InputError (prefixed with `setting`, e.g.
  'config.init_from=DIR') if the folder holds no conversion or one without a valid record."""
  if not (fileio.Path(directory) / 'variables').is_dir():
    raise InputError(
        f'{setting}: no converted checkpoint at {fileio.Path(directory) / "variables"}; '
        'download DeepLab_resnet_pretrained_imagenet.pth (linked from the original authors\' '
        'repository) or use one of their trained checkpoints, and convert it: '
        + _CONVERT.format(directory))
  path = fileio.Path(directory) / METADATA
  try:
    meta = json.loads(path.read_text())
  except FileNotFoundError:
    raise InputError(f'{setting}: {directory} has no {METADATA} (converted by an older '
                     'depthuda, or not by depthuda.convert); convert the .pth again: '
                     + _CONVERT.format(directory)) from None
  except (OSError, ValueError):  # unreadable, or not JSON
    meta = None
  if not (isinstance(meta, dict) and meta.get('kind') in (IMAGENET, TRAINED)
          and isinstance(meta.get('layers'), list) and isinstance(meta.get('width'), int)
          and (meta['kind'] == IMAGENET or isinstance(meta.get('num_classes'), int))):
    raise InputError(f'{setting}: {path} is not a record of depthuda.convert; convert the .pth '
                     'again: ' + _CONVERT.format(directory))
  return meta


def check(directory: str, setting: str, num_classes: int, layers: Sequence[int], width: int,
          trained_only: bool = False) -> dict:
  """Reads the record and checks that it fits a model; returns it.

  Args:
    directory: a folder written by `depthuda.convert`.
    setting: how the user named it, prefixed to every message ('config.init_from=DIR').
    num_classes, layers, width: the model's (config.data.num_classes, config.model.*).
    trained_only: an ImageNet trunk does not do (prediction needs the classifier and heads).
  Raises:
    InputError: one line, naming the mismatch and the fix.
  """
  meta = read_metadata(directory, setting)
  if tuple(meta['layers']) != tuple(layers) or meta['width'] != width:
    raise InputError(
        f'{setting}: {directory} holds a ResNet with layers {tuple(meta["layers"])} and width '
        f'{meta["width"]}; this config has model.layers={tuple(layers)} and '
        f'model.width={width}: set those to match, or convert a checkpoint of that architecture')
  if meta['kind'] == IMAGENET and trained_only:
    raise InputError(f'{setting}: {directory} holds an ImageNet trunk without a trained '
                     'classifier or heads; give a trained model (a workdir, or a conversion '
                     'of a trained checkpoint of the original)')
  if meta['kind'] == TRAINED and meta['num_classes'] != num_classes:
    raise InputError(
        f'{setting}: {directory} holds a trained {meta["num_classes"]}-class model; this config '
        f'has {num_classes} classes (data.num_classes): use a checkpoint trained for '
        f'{num_classes} classes, or an ImageNet conversion (python -m depthuda.convert '
        '--torch_checkpoint=DeepLab_resnet_pretrained_imagenet.pth --output=pretrained/imagenet)')
  return meta


def check_init_from(config: Any) -> dict:
  """`check` for `config.init_from` (an ml_collections ConfigDict): an ImageNet trunk, or a
  trained model of the config's classes and architecture."""
  return check(config.init_from, f'config.init_from={config.init_from}',
               config.data.num_classes, config.model.layers, config.model.width)
