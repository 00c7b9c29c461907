"""The procedural toy benchmark written in the SYNTHIA and Cityscapes file layouts.

Scenes come from `depthuda.data.toy_scene` (a seeded street-scene renderer with a source and a
target style); this module gives them each dataset's class ids and depth encoding and writes
them atomically: SYNTHIA-RAND-CITYSCAPES folders for the source, Cityscapes' two zips for the
target.

NumPy and PIL only; no TensorFlow.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile

import numpy as np
from PIL import Image
import tqdm

# The scene API, re-exported: `toy.render_scene` etc. stay where users and tests find them.
from depthuda.data.toy_scene import (  # noqa: F401
    CLASSES, SOURCE_STYLE, TARGET_STYLE, Camera, Style, render_scene, source_camera,
    target_camera)

# Dataset ids of the scene classes, in `CLASSES` order.
# SYNTHIA has a lane-marking class (22); Cityscapes counts markings as road (7) and labels the
# ego vehicle's bonnet 1 (ignored by every map).
SYNTHIA_IDS = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 17, 19, 21, 22, 0], np.uint8)
CITYSCAPES_IDS = np.array([23, 11, 7, 8, 13, 21, 17, 26, 20, 24, 33, 32, 19, 22, 25, 28, 12, 7, 1],
                          np.uint8)

TARGET_SIZE = (2048, 1024)  # Cityscapes images; TFDS's builder fixes it.
SKY_RAW_DEPTH = 65535       # SYNTHIA's raw depth for sky: inverse depth ~1.
CITIES = {'train': ('aachen', 'bremen', 'zurich'), 'val': ('frankfurt', 'lindau', 'munster'),
          'test': ('berlin', 'bielefeld')}


def raw_depth(depth_m: np.ndarray) -> np.ndarray:
  """SYNTHIA-style uint16 depth: centimetres, sky 65535, so that 65536 / (raw + 1) is inverse
  depth (~1 for the sky)."""
  raw = np.round(np.minimum(depth_m, 655.34) * 100)
  return np.where(np.isfinite(depth_m), raw, SKY_RAW_DEPTH).astype(np.uint16)


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=6)
  return buffer.getvalue()


@contextlib.contextmanager
def _atomic_dir(path: str):
  """Yields a temporary sibling of `path`, renamed to `path` once complete.

  A run cut off midway leaves at most a hidden `.name.*` directory, never a partial `path`; if
  another process finished `path` first, ours is dropped.
  """
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.', dir=os.path.dirname(path))
  os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stick to the renamed dataset
  try:
    yield tmp
    os.rename(tmp, path)
  except OSError:
    if not os.path.isdir(path):
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _write_source(root: str, seed: int, num: int, size: tuple[int, int], bar: tqdm.tqdm) -> None:
  """SYNTHIA-RAND-CITYSCAPES layout: RGB/, parsed_LABELS/, Depth/ with NNNNNNN.png files."""
  cam = source_camera(size)
  for folder in ('RGB', 'parsed_LABELS', 'Depth'):
    os.makedirs(os.path.join(root, folder))
  for i in range(num):
    rgb, classes, depth = render_scene(cam, SOURCE_STYLE, np.random.default_rng([seed, 0, i]))
    for folder, array in (('RGB', rgb), ('parsed_LABELS', SYNTHIA_IDS[classes]),
                          ('Depth', raw_depth(depth))):
      with open(os.path.join(root, folder, f'{i:07d}.png'), 'wb') as f:
        f.write(_png(array))
    bar.update()


def _write_target(root: str, seed: int, counts: dict[str, int], size: tuple[int, int],
                  bar: tqdm.tqdm) -> None:
  """Cityscapes' two zips; scenes rendered at `size` and upsampled by pixel repetition."""
  scale = TARGET_SIZE[0] // size[0]
  if (size[0] * scale, size[1] * scale) != TARGET_SIZE:
    raise ValueError(f'toy target size {size} must divide {TARGET_SIZE} evenly')
  up = lambda a: np.repeat(np.repeat(a, scale, 0), scale, 1)
  cam = target_camera(size)
  images = zipfile.ZipFile(os.path.join(root, 'leftImg8bit_trainvaltest.zip'), 'w')
  labels = zipfile.ZipFile(os.path.join(root, 'gtFine_trainvaltest.zip'), 'w')
  with images, labels:  # stored, not deflated: PNGs are compressed already
    for archive in (images, labels):
      archive.writestr('README', 'Procedural toy data in the Cityscapes layout.\n')
    for split_index, (split, count) in enumerate(counts.items()):
      cities = CITIES[split]
      for i in range(count):
        rng = np.random.default_rng([seed, 1, split_index, i])
        rgb, classes, _ = render_scene(cam, TARGET_STYLE, rng, ego_vehicle=True)
        ids = CITYSCAPES_IDS[classes]
        if split == 'test':  # Cityscapes' test labels carry no classes
          ids = np.where(classes == CLASSES.index('ego'), 1, 0).astype(np.uint8)
        city = cities[i % len(cities)]
        stem = f'{split}/{city}/{city}_{i // len(cities):06d}_000019'
        images.writestr(f'leftImg8bit/{stem}_leftImg8bit.png', _png(up(rgb)))
        labels.writestr(f'gtFine/{stem}_gtFine_labelIds.png', _png(up(ids)))
        bar.update()


# Bumped whenever the renderer or the file writers change what a seed produces (1 was the
# generator before manifests, whose directories have no toy.json; 2 had the target's horizon at
# 0.42 of the frame, which shifted its ground depths against the source's).
GENERATOR_VERSION = 3
MANIFEST = 'toy.json'


def _manifest(**fields) -> dict:
  return {'generator_version': GENERATOR_VERSION, **fields}


def _is_stale(path: str, manifest: dict) -> bool:
  """Whether `path` holds toy data written for other settings (or by another generator)."""
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      return json.load(f) != manifest
  except FileNotFoundError:
    return False  # not written by this generator (or by an early one): never touched
  except json.JSONDecodeError:
    return True


def _write(path: str, manifest: dict, write, bar: tqdm.tqdm) -> None:
  if os.path.isdir(path):  # stale: ours to replace
    shutil.rmtree(path)
  with _atomic_dir(path) as tmp:
    write(tmp, bar)
    with open(os.path.join(tmp, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=1)


def generate(source_dir: str, target_dir: str, *, seed: int = 0, num_source: int = 200,
             num_target_train: int = 100, num_target_val: int = 40, num_target_test: int = 4,
             source_size: tuple[int, int] = (320, 190),
             target_size: tuple[int, int] = (512, 256)) -> list[str]:
  """Writes the toy source (SYNTHIA layout) and target (Cityscapes zips).

  Every image has its own generator seeded by (seed, domain, split, index), so the data depend
  on nothing else. A missing directory is written under a temporary name and renamed when
  complete, with a `toy.json` of the settings and GENERATOR_VERSION that produced it. An
  existing directory is kept, unless its `toy.json` names other settings or another version:
  then it is rewritten (one without `toy.json` was not written here and is never touched).

  Args:
    source_dir: receives RGB/, parsed_LABELS/ and Depth/ (NNNNNNN.png).
    target_dir: receives leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (2048x1024).
    source_size: (W, H) of source images; SYNTHIA's aspect ratio by default.
    target_size: (W, H) at which target scenes are rendered, then upsampled (nearest) to
      2048x1024; must divide it.

  Returns:
    The directories written by this call.
  """
  counts = {'train': num_target_train, 'val': num_target_val, 'test': num_target_test}
  source_size, target_size = tuple(source_size), tuple(target_size)
  domains = [  # (directory, manifest, images, writer)
      (source_dir, _manifest(seed=seed, num_source=num_source, source_size=list(source_size)),
       num_source, lambda root, bar: _write_source(root, seed, num_source, source_size, bar)),
      (target_dir, _manifest(seed=seed, counts=counts, target_size=list(target_size)),
       sum(counts.values()),
       lambda root, bar: _write_target(root, seed, counts, target_size, bar))]
  todo = [d for d in domains if not os.path.isdir(d[0]) or _is_stale(d[0], d[1])]
  if todo:
    with tqdm.tqdm(total=sum(d[2] for d in todo), desc='toy data', unit='image',
                   disable=not sys.stderr.isatty()) as bar:  # no bar redraws in a log file
      for path, manifest, _, write in todo:
        _write(path, manifest, write, bar)
  return [d[0] for d in todo]


def generate_source(source_dir: str, *, seed: int, num_source: int,
                    source_size: tuple[int, int] = (320, 190)) -> bool:
  """Writes a source-style scene set alone (SYNTHIA layout), as `generate` writes the toy's
  source: kept if its `toy.json` matches, else (re)written. Returns whether it wrote."""
  source_size = tuple(source_size)
  manifest = _manifest(seed=seed, num_source=num_source, source_size=list(source_size))
  if os.path.isdir(source_dir) and not _is_stale(source_dir, manifest):
    return False
  with tqdm.tqdm(total=num_source, desc='toy scenes', unit='image',
                 disable=not sys.stderr.isatty()) as bar:
    _write(source_dir, manifest,
           lambda root, bar: _write_source(root, seed, num_source, source_size, bar), bar)
  return True
