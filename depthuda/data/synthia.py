"""SYNTHIA-RAND-CITYSCAPES as a TFDS dataset read from a manual directory.

The folder as the archive unpacks (RAND_CITYSCAPES/):

    <source_dir>/RGB/0000000.png          8-bit RGB image
    <source_dir>/GT/LABELS/0000000.png    16-bit, class id in the first channel
    <source_dir>/Depth/Depth/0000000.png  16-bit depth (three identical channels)

or the flat layout of DADA and ADVENT's parsed copies (the original's), whose folders are used
where present:

    <source_dir>/parsed_LABELS/0000000.png  8-bit SYNTHIA class ids, one channel
    <source_dir>/Depth/0000000.png          16-bit depth, one channel

The builder stores each example as PNGs: image (uint8 [H, W, 3]), label
(uint8 [H, W, 1]), depth (uint16 [H, W, 1]) and the file's stem as name. Files
already in that form are copied byte for byte; others are normalised first:
the original reads depth with OpenCV as a single 16-bit grayscale channel, and
SYNTHIA's depth PNGs repeat the value in three identical 16-bit channels, so the
first channel is that value; a label PNG with several channels (SYNTHIA's raw
16-bit GT/LABELS) also keeps its first channel, which holds the class id.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from depthuda.data import preparing
from depthuda.errors import InputError

# Where each file kind is looked for, first existing folder first.
FOLDERS = {'image': ('RGB',), 'label': ('parsed_LABELS', 'GT/LABELS'),
           'depth': ('Depth/Depth', 'Depth')}


# Preparation time per image, roughly (README, Datasets): the archive's 16-bit colour labels and
# depth are decoded and written again as one-channel PNGs.
SECONDS_PER_IMAGE = 0.2

# SYNTHIA's class ids run from 0 (void) to 22 (lane marking); larger values mean the folder
# holds something else (colour-coded labels, another dataset's ids).
MAX_LABEL_ID = 22


def _png_header(path: str) -> tuple[int, int, int, int]:
  """(width, height, bit depth, colour type) of a complete PNG; colour type 0 is gray, 2 RGB.

  Checked here, when the dataset is prepared, because TFDS copies PNG files as they are and a
  bad one would otherwise only fail deep inside a training run.
  """
  with open(path, 'rb') as f:
    head = f.read(26)
    f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
    tail = f.read()
  if head[:8] != b'\x89PNG\r\n\x1a\n' or head[12:16] != b'IHDR':
    raise InputError(f'{path} is not a PNG file')
  if b'IEND\xaeB`\x82' not in tail:  # the end chunk (name and CRC) is missing
    raise InputError(f'{path} is truncated (the PNG ends early)')
  return struct.unpack('>IIBB', head[16:26])


def _decode(path: str, decode):
  """decode(path), with a decoding failure reported as an InputError naming the file."""
  try:
    return decode(path)
  except (OSError, SyntaxError, ValueError, tf.errors.OpError) as e:
    raise InputError(f'{path}: cannot decode the PNG ({str(e).splitlines()[0]})') from None


def _single_channel(path: str, dtype: type) -> str | np.ndarray:
  """`path` if it is a one-channel PNG of `dtype`, else its first channel [H, W, 1]."""
  _, _, bit_depth, colour_type = _png_header(path)
  bits = 16 if dtype == np.uint16 else 8
  if bits > bit_depth:
    raise InputError(f'{path}: {bit_depth}-bit PNG, expected {bits}-bit depth')
  if colour_type == 0 and bit_depth == bits:
    return path
  if bit_depth == 16:  # PIL cannot read 16-bit colour PNGs
    array = _decode(path, lambda p: tf.io.decode_png(
        tf.io.read_file(p), channels=0, dtype=tf.uint16).numpy())
  else:  # PIL keeps palette indices as they are
    array = _decode(path, lambda p: np.asarray(Image.open(p)))
  array = array[..., 0] if array.ndim == 3 else array
  if bits < bit_depth and array.max() >= 2 ** bits:
    raise InputError(f'{path}: values up to {array.max()} do not fit {bits} bits')
  return array.astype(dtype)[..., None]


def _rgb(path: str) -> str | np.ndarray:
  """`path` if it is an 8-bit RGB PNG, else the image converted as PIL does."""
  if _png_header(path)[2:] == (8, 2):
    return path
  return _decode(path, lambda p: np.asarray(Image.open(p).convert('RGB')))


def _checked_label(root: str, folders: dict[str, str], stem: str) -> str | np.ndarray:
  """The label feature of `stem` (as `_single_channel`), after checking that its three files
  have one size and that its ids are SYNTHIA's."""
  paths = {folder: os.path.join(root, folder, stem + '.png') for folder in folders.values()}
  sizes = {folder: _png_header(path)[:2] for folder, path in paths.items()}
  if len(set(sizes.values())) > 1:
    raise InputError(f'SYNTHIA: {stem}.png differs in size between folders ('
                     + ', '.join(f'{f} {w}x{h}' for f, (w, h) in sizes.items()) + f') in {root}')
  path = paths[folders['label']]
  feature = _single_channel(path, np.uint8)
  ids = (_decode(feature, lambda p: np.asarray(Image.open(p))) if isinstance(feature, str)
         else feature)
  if ids.max() > MAX_LABEL_ID:
    raise InputError(f'{path}: label id {ids.max()} is not a SYNTHIA class id '
                     f'(0-{MAX_LABEL_ID}); {folders["label"]} must hold ids, not colours')
  return feature


DOWNLOAD = ('download SYNTHIA-RAND-CITYSCAPES from https://synthia-dataset.net and unpack it '
            'there (RGB/, Depth/Depth/, GT/LABELS/; README.md, Datasets)')


def _missing(what: str, source_dir: str) -> InputError:
  return InputError(f'SYNTHIA: {what} not found in data.source_dir='
                    f'{os.path.abspath(source_dir)}; {DOWNLOAD}')


def find_folders(source_dir: str) -> dict[str, str]:
  """The folder of each file kind ('image', 'label', 'depth') in `source_dir`, relative to it."""
  found = {kind: next((f for f in candidates if os.path.isdir(os.path.join(source_dir, f))), '')
           for kind, candidates in FOLDERS.items()}
  absent = [' or '.join(f + '/' for f in FOLDERS[kind] if f != 'Depth/Depth')
            for kind, folder in found.items() if not folder]
  if absent:
    raise _missing(', '.join(absent), source_dir)
  return found


def list_examples(source_dir: str) -> list[str]:
  """Sorted file stems of `source_dir`, checked to have all three files."""
  folders = find_folders(source_dir)
  stems = sorted(f[:-4] for f in os.listdir(os.path.join(source_dir, folders['image']))
                 if f.endswith('.png'))
  if not stems:
    raise _missing(f'PNG images in {folders["image"]}/', source_dir)
  for folder in (folders['label'], folders['depth']):
    present = {f[:-4] for f in os.listdir(os.path.join(source_dir, folder))}
    missing = [s for s in stems if s not in present]
    if missing:
      raise InputError(f'SYNTHIA: {len(missing)} images lack a {folder} file, e.g. '
                       f'{os.path.join(source_dir, folder, missing[0] + ".png")}')
  return stems


class SynthiaRandCityscapes(tfds.core.GeneratorBasedBuilder):
  """SYNTHIA-RAND-CITYSCAPES: synthetic street scenes with class ids and depth."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'RGB, labels and depth of SYNTHIA-RAND-CITYSCAPES.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download SYNTHIA-RAND-CITYSCAPES (CVPR16) from https://synthia-dataset.net
  (Downloads page) and extract it; `manual_dir` (data.source_dir) is the
  unpacked RAND_CITYSCAPES folder:
    RGB/NNNNNNN.png            the images
    Depth/Depth/NNNNNNN.png    16-bit depth
    GT/LABELS/NNNNNNN.png      16-bit labels, the class id in the first channel
  parsed_LABELS/ (8-bit ids, as DADA and ADVENT use them) and a flat Depth/
  are read instead where present.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='SYNTHIA-RAND-CITYSCAPES: 9,400 synthetic 1280x760 images '
                    'with SYNTHIA class ids and 16-bit depth.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
            'label': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                         encoding_format='png'),
            'depth': tfds.features.Image(shape=(None, None, 1), dtype=np.uint16,
                                         encoding_format='png'),
            'name': tfds.features.Text(),
        }),
        homepage='https://synthia-dataset.net',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    return {'train': self._generate_examples(root, list_examples(root))}

  def _generate_examples(self, root: str, stems: list[str]):
    folders = find_folders(root)
    for stem in stems:
      path = lambda kind: os.path.join(root, folders[kind], stem + '.png')
      yield stem, {
          'image': _rgb(path('image')),
          'label': _checked_label(root, folders, stem),
          'depth': _single_channel(path('depth'), np.uint16),
          'name': stem,
      }


def prepare(source_dir: str, tfds_dir: str) -> tfds.core.DatasetBuilder:
  """The prepared builder of `source_dir` under `tfds_dir` (built on first use)."""
  stems = list_examples(source_dir)
  builder = SynthiaRandCityscapes(data_dir=tfds_dir)
  if not builder.is_prepared():
    with preparing.announced('SYNTHIA-RAND-CITYSCAPES', builder.data_dir, len(stems),
                             SECONDS_PER_IMAGE):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=source_dir, try_download_gcs=False))
  prepared = builder.info.splits['train'].num_examples
  if prepared != len(stems):
    raise InputError(f'{builder.data_dir} holds {prepared} SYNTHIA images but {source_dir} has '
                     f'{len(stems)}: delete it or point data.tfds_dir elsewhere')
  return builder
