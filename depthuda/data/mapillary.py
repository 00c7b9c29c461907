"""Mapillary Vistas v1.2 read in place from its own folders (no TFDS preparation).

    <target_dir>/training/images/<key>.jpg     (or train/images, the original's name)
    <target_dir>/validation/images/<key>.jpg
    <target_dir>/validation/labels/<key>.png   8-bit PNG, palette or gray: pixel = label index
                                               into `labels.MAPILLARY_LABELS` (0..65)
    <target_dir>/testing/images/<key>.jpg      optional
    <target_dir>/train_list.txt       optional: the images to adapt on (default: all of training)
    <target_dir>/selftrain_list.txt   optional: the images to pseudo-label and self-train on
                                      (default: the adaptation images); the original used a
                                      list of 9,000 training images
    <target_dir>/config.json          optional: its label names are checked against ours

List files hold one image name per line, with or without `.jpg`.

The images differ in size and aspect ratio. As in the original, an image is resized (bicubic,
aspect preserved) to fit the input size and padded at the bottom or the right with black pixels
(0 before mean subtraction). Evaluation labels (METHOD §7), by `config.eval.protocol`:
'input_size', the original's: resized nearest with their aspect kept exactly as the image, and
padded with ignore to the input size; 'native', DADA's: at their own resolution, padded with
ignore at the bottom or the right to the input's aspect ratio. Either way the logits of the whole
padded input, upsampled to the padded label, line up with it.

This module lists files and does the size arithmetic and label reading with NumPy and PIL;
`depthuda.data.pipeline` turns the lists into tf.data streams. TensorFlow's PNG decoder expands
palette PNGs to their RGB colours, so label PNGs are read with PIL, which keeps the indices.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image

from depthuda.data import labels
from depthuda.errors import InputError

DOWNLOAD = ('download Mapillary Vistas v1.2 from https://www.mapillary.com/dataset/vistas and '
            'unpack it there (training/images, validation/images, validation/labels)')
# Split -> candidate folders, the official name first; list files that choose the images.
_FOLDERS = {'train': ('training', 'train'), 'selftrain': ('training', 'train'),
            'validation': ('validation',), 'test': ('testing',)}
_LISTS = {'train': 'train_list.txt', 'selftrain': 'selftrain_list.txt'}


@dataclasses.dataclass(frozen=True)
class Example:
  """One image's files; `label` is '' for splits without labels."""
  name: str
  image: str
  label: str


def _missing(what: str, target_dir: str) -> InputError:
  return InputError(f'Mapillary Vistas: {what} not found in data.target_dir='
                    f'{os.path.abspath(target_dir)}; {DOWNLOAD}')


def _split_folder(target_dir: str, split: str) -> str:
  for folder in _FOLDERS[split]:
    if os.path.isdir(os.path.join(target_dir, folder, 'images')):
      return os.path.join(target_dir, folder)
  raise _missing(' or '.join(f'{folder}/images' for folder in _FOLDERS[split]), target_dir)


def check_label_names(target_dir: str) -> None:
  """Fails if a config.json in `target_dir` lists other labels than Vistas v1.2's 66."""
  for name in ('config.json', 'config_v1.2.json'):
    path = os.path.join(target_dir, name)
    if os.path.isfile(path):
      with open(path) as f:
        found = tuple(label['name'] for label in json.load(f)['labels'])
      if found != labels.MAPILLARY_LABELS:
        raise InputError(f'{path}: its {len(found)} labels are not the 66 of Mapillary Vistas '
                         'v1.2 in their order; depthuda reads v1.2 labels')
      return


def _read_list(path: str) -> list[str]:
  with open(path) as f:
    names = [line.strip() for line in f if line.strip()]
  return [n[:-4] if n.endswith('.jpg') else n for n in names]


def list_split(target_dir: str, split: str) -> list[Example]:
  """The examples of `split` ('train', 'selftrain', 'validation' or 'test'), checked to exist.

  'train' and 'selftrain' follow their list files when present (in the list's order), else
  all training images sorted by name; 'validation' and 'test' are all their images, sorted.
  """
  if split not in _FOLDERS:
    raise ValueError(f'unknown Mapillary split {split!r}; expected one of {sorted(_FOLDERS)}')
  folder = _split_folder(target_dir, split)
  images = os.path.join(folder, 'images')
  present = sorted(f[:-4] for f in os.listdir(images) if f.endswith('.jpg'))
  if not present:
    raise _missing(f'JPEG images in {os.path.relpath(images, target_dir)}', target_dir)
  names = present
  lists = ('selftrain', 'train') if split == 'selftrain' else (split,)
  for list_path in [os.path.join(target_dir, _LISTS[s]) for s in lists if s in _LISTS]:
    if os.path.isfile(list_path):
      names = _read_list(list_path)
      absent = sorted(set(names) - set(present))
      if absent:
        raise InputError(f'{list_path} names {len(absent)} images missing from {images}, '
                         f'e.g. {absent[0]}.jpg')
      break
  label_dir = os.path.join(folder, 'labels')
  if split == 'validation':
    if not os.path.isdir(label_dir) and os.path.isdir(os.path.join(folder, 'v1.2', 'labels')):
      label_dir = os.path.join(folder, 'v1.2', 'labels')  # the v2.0 download's copy of v1.2
    if not os.path.isdir(label_dir):
      raise _missing('validation/labels', target_dir)
    labelled = {f[:-4] for f in os.listdir(label_dir) if f.endswith('.png')}
    unlabelled = [n for n in names if n not in labelled]
    if unlabelled:
      raise InputError(f'Mapillary Vistas: {len(unlabelled)} validation images lack a label, '
                       f'e.g. {os.path.join(label_dir, unlabelled[0] + ".png")}')
    _check_label_mode(os.path.join(label_dir, names[0] + '.png'))
  return [Example(name, os.path.join(images, name + '.jpg'),
                  os.path.join(label_dir, name + '.png') if split == 'validation' else '')
          for name in names]


def fitted_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
  """(W', H') of a `width` x `height` image resized, aspect kept, to fit (W, H) `size`.

  The side that limits the scale becomes exactly W or H; the other is truncated to an
  integer (the original's int()), at least 1.
  """
  target_w, target_h = size
  if width / height > target_w / target_h:
    return target_w, max(1, int(height * (target_w / width)))
  return max(1, int(width * (target_h / height))), target_h


def padded_label_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
  """(W', H') of a `width` x `height` label padded at the right or the bottom to `size`'s
  aspect ratio (W / H), truncated to integers as in the original."""
  ratio = size[0] / size[1]
  if ratio > width / height:
    return int(ratio * height), height
  if ratio < width / height:
    return width, int(width / ratio)
  return width, height


def _check_label_mode(source, image: Image.Image | None = None) -> None:
  image = image or Image.open(source)  # reads the header only
  if image.mode not in ('P', 'L'):
    raise InputError(f'Mapillary Vistas: {source} is a {image.mode} PNG; expected 8-bit label '
                     'indices (palette or gray), as in the v1.2 labels/ folders')


def read_label(data: bytes, size: tuple[int, int], table: np.ndarray,
               protocol: str = 'native') -> np.ndarray:
  """A label PNG's bytes -> int32 classes through `table`, padded with ignore.

  protocol 'input_size' (the original's): resized nearest (PIL) with its aspect kept to fit
  (W, H) `size` as the image is (`fitted_size`), then padded to [H, W]. 'native' (DADA's): at
  its own resolution, padded to the aspect ratio of `size` (`padded_label_size`), [H', W'].
  """
  image = Image.open(io.BytesIO(data))
  _check_label_mode('a label', image)
  if protocol == 'input_size':
    image = image.resize(fitted_size(image.width, image.height, size), Image.Resampling.NEAREST)
    width, height = size
  else:
    width, height = padded_label_size(image.width, image.height, size)
  ids = np.asarray(image)
  label = np.full((height, width), labels.IGNORE_LABEL, np.int32)
  label[:ids.shape[0], :ids.shape[1]] = table[ids]
  return label
