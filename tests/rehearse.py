r"""A real-size rehearsal: the five experiment configs on data of the real sizes and layouts.

  python tests/rehearse.py [--workdir=DIR] [--jobs=2] [--configs=synthia_city,...]

Writes synthetic datasets (the toy's scenes, upsampled) of the real image sizes in the layouts
users download: SYNTHIA-RAND-CITYSCAPES as its archive unpacks (RGB/, Depth/Depth/ and GT/LABELS/
at 1280x760, 16-bit three-channel PNGs, raw depth 0 included), the two Cityscapes zips at
2048x1024, and Mapillary Vistas folders with images and labels of several sizes and aspect
ratios. Then every stage of each experiment config runs through `python -m depthuda.main` with
the network shrunk and the step counts cut (the data settings are the configs' own), and the
outputs are checked: results.json, metrics.jsonl, the feature grid of fit_gmm, pseudo-labels at
the input size, and evaluation at the size eval.protocol sets (the confusion matrix counts every
valid label pixel: Cityscapes at 2048x1024, Mapillary fitted to the input size). Catches what the toy's small sizes hide. `make rehearse`; not part of `make test`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from depthuda.data import labels  # noqa: E402
from depthuda.data import toy  # noqa: E402
from depthuda.data import toy_scene  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import main_runs  # noqa: E402

CONFIGS = ('synthia_city', 'synthia_city7', 'synthia_city7_small', 'synthia_mapillary7',
           'synthia_mapillary7_small')
SYNTHIA_SIZE = (1280, 760)  # (W, H)
CITYSCAPES_SIZE = (2048, 1024)
NUM_SOURCE = 3
CITYSCAPES_COUNTS = {'train': 2, 'val': 2, 'test': 1}
# Vistas' images vary: 4:3 and 16:9 landscape, a portrait one, one narrower than the input.
MAPILLARY_TRAIN = ((4032, 3024), (1920, 1080))
MAPILLARY_VAL = ((1920, 1080), (1080, 1920), (3264, 2448))
# The toy's classes as Vistas v1.2 labels.
TOY_TO_MAPILLARY = {
    'sky': 'nature--sky', 'building': 'construction--structure--building',
    'road': 'construction--flat--road', 'sidewalk': 'construction--flat--sidewalk',
    'fence': 'construction--barrier--fence', 'vegetation': 'nature--vegetation',
    'pole': 'object--support--pole', 'car': 'object--vehicle--car',
    'sign': 'object--traffic-sign--front', 'person': 'human--person',
    'bicycle': 'object--vehicle--bicycle', 'motorcycle': 'object--vehicle--motorcycle',
    'light': 'object--traffic-light', 'terrain': 'nature--terrain',
    'rider': 'human--rider--bicyclist', 'bus': 'object--vehicle--bus',
    'wall': 'construction--barrier--wall', 'lanemarking': 'marking--general',
    'ego': 'void--ego-vehicle'}
MAPILLARY_IDS = np.array([labels.MAPILLARY_LABELS.index(TOY_TO_MAPILLARY[c])
                          for c in toy_scene.CLASSES], np.uint8)
# The network shrunk, the steps cut; everything about the data stays the config's.
OVERRIDES = ('--config.init_from=', '--config.model.layers=(1,1,1,1)', '--config.model.width=4',
             '--config.model.disc_ndf=4', '--config.adapt.num_steps=2',
             '--config.self_train.num_steps=1', '--config.checkpoint_every_steps=2',
             '--config.log_every_steps=1', '--config.eval_every_steps=2',
             '--config.log_images_every_steps=2', '--config.gmm.max_iters=3',
             '--config.data.shuffle_buffer=4')


def _scene(style, size: tuple[int, int], seed: list[int], scale: int, **kwargs):
  """A toy scene rendered at `size` / `scale` and upsampled by pixel repetition."""
  cam = (toy_scene.source_camera if style is toy_scene.SOURCE_STYLE else toy_scene.target_camera)(
      (size[0] // scale, size[1] // scale))
  rgb, classes, depth = toy_scene.render_scene(cam, style, np.random.default_rng(seed), **kwargs)
  up = lambda a: np.repeat(np.repeat(a, scale, 0), scale, 1)
  return up(rgb), up(classes), up(depth)


def _png(array: np.ndarray) -> bytes:
  if array.dtype == np.uint16 and array.ndim == 3:  # PIL writes no 16-bit colour PNGs
    import tensorflow as tf
    return tf.io.encode_png(array, compression=1).numpy()
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def write_synthia(root: str) -> None:
  """RAND_CITYSCAPES as unpacked: RGB/, Depth/Depth/, GT/LABELS/ (ids in channel 0)."""
  for folder in ('RGB', 'Depth/Depth', 'GT/LABELS'):
    os.makedirs(os.path.join(root, folder))
  for i in range(NUM_SOURCE):
    rgb, classes, depth = _scene(toy_scene.SOURCE_STYLE, SYNTHIA_SIZE, [0, i], 4)
    raw = toy.raw_depth(depth)
    raw[-40:, :200] = 0  # SYNTHIA has raw depth 0 (inverse depth 65,536) near the camera
    ids = toy.SYNTHIA_IDS[classes].astype(np.uint16)
    instance = np.zeros_like(ids)
    files = {'RGB': rgb, 'Depth/Depth': np.stack([raw] * 3, -1),
             'GT/LABELS': np.stack([ids, instance, instance], -1)}
    for folder, array in files.items():
      with open(os.path.join(root, folder, f'{i:07d}.png'), 'wb') as f:
        f.write(_png(array))


def write_cityscapes(root: str) -> None:
  """The two official zips."""
  os.makedirs(root)
  with zipfile.ZipFile(os.path.join(root, 'leftImg8bit_trainvaltest.zip'), 'w') as images, \
      zipfile.ZipFile(os.path.join(root, 'gtFine_trainvaltest.zip'), 'w') as gt:
    for s, (split, count) in enumerate(CITYSCAPES_COUNTS.items()):
      for i in range(count):
        rgb, classes, _ = _scene(toy_scene.TARGET_STYLE, CITYSCAPES_SIZE, [1, s, i], 4,
                                 ego_vehicle=True)
        ids = toy.CITYSCAPES_IDS[classes]
        city = toy.CITIES[split][0]
        stem = f'{split}/{city}/{city}_{i:06d}_000019'
        images.writestr(f'leftImg8bit/{stem}_leftImg8bit.png', _png(rgb))
        gt.writestr(f'gtFine/{stem}_gtFine_labelIds.png', _png(ids))


def write_mapillary(root: str) -> None:
  """training/images, validation/{images,labels} (palette PNGs), config.json."""
  for folder in ('training/images', 'validation/images', 'validation/labels'):
    os.makedirs(os.path.join(root, folder))
  for s, (split, sizes) in enumerate((('training', MAPILLARY_TRAIN),
                                      ('validation', MAPILLARY_VAL))):
    for i, size in enumerate(sizes):
      rgb, classes, _ = _scene(toy_scene.TARGET_STYLE, (size[0] // 8 * 8, size[1] // 8 * 8),
                               [2, s, i], 8)
      name = f'{split[:1]}{i:021d}'
      Image.fromarray(rgb).resize(size, Image.BILINEAR).save(
          os.path.join(root, split, 'images', name + '.jpg'), quality=90)
      if split == 'validation':
        ids = np.asarray(Image.fromarray(MAPILLARY_IDS[classes]).resize(size, Image.NEAREST))
        label = Image.fromarray(ids, 'P')
        label.putpalette(np.random.default_rng(0).integers(0, 256, 768, np.uint8).tolist())
        label.save(os.path.join(root, split, 'labels', name + '.png'))
  with open(os.path.join(root, 'config.json'), 'w') as f:
    json.dump({'labels': [{'name': n} for n in labels.MAPILLARY_LABELS]}, f)


def scored_pixels(config, data: str) -> int:
  """The validation label pixels the evaluation must count: every valid one at the labels' own
  size ('native'), or, for Mapillary's 'input_size' protocol, after resizing each label
  (nearest, aspect kept) to fit the input size as its image is (METHOD §7)."""
  table = labels.label_map(config.data.target, config.data.num_classes)
  if config.data.target == 'cityscapes':
    with zipfile.ZipFile(os.path.join(data, 'cityscapes', 'gtFine_trainvaltest.zip')) as gt:
      images = [Image.open(io.BytesIO(gt.read(n))) for n in gt.namelist()
                if n.startswith('gtFine/val/')]
  else:
    folder = os.path.join(data, 'mapillary', 'validation', 'labels')
    images = [Image.open(os.path.join(folder, n)) for n in sorted(os.listdir(folder))]
  total = 0
  for image in images:
    if config.eval.protocol == 'input_size':
      (w, h), (width, height) = config.data.input_size, image.size
      fitted = ((w, int(height * (w / width))) if width / height > w / h
                else (int(width * (h / height)), h))
      image = image.resize(fitted, Image.NEAREST)
    total += int((table[np.asarray(image)] != labels.IGNORE_LABEL).sum())
  return total


def _run(name: str, data: str, workdir: str) -> tuple[subprocess.CompletedProcess, float]:
  target = 'mapillary' if 'mapillary' in name else 'cityscapes'
  command = [sys.executable, '-m', 'depthuda.main', f'--config=configs/{name}.py',
             f'--workdir={workdir}', *OVERRIDES,
             f'--config.data.source_dir={data}/RAND_CITYSCAPES',
             f'--config.data.target_dir={data}/{target}', f'--config.data.tfds_dir={data}/tfds']
  start = time.monotonic()
  done = subprocess.run(command, cwd=ROOT, env=main_runs.ENV, text=True, capture_output=True,
                        timeout=3600)
  return done, time.monotonic() - start


def _png_size(path: str) -> tuple[int, int]:
  with Image.open(path) as image:
    return image.size


def check(name: str, workdir: str, data: str, num_selftrain: int) -> list[str]:
  """What is wrong with `workdir`'s outputs (empty: all right)."""
  import importlib
  config = importlib.import_module(f'configs.{name}').get_config()
  valid_pixels = scored_pixels(config, data)
  w, h = config.data.input_size
  grid = {(760, 1280): (96, 161), (320, 640): (41, 81)}[(h, w)]
  problems = []
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  missing = {'fit_gmm', 'adapt', 'pseudo_label', 'self_train', 'eval'} - set(results)
  if missing:
    problems.append(f'results.json lacks {sorted(missing)}')
  with open(os.path.join(workdir, 'fit_gmm', 'gmm.json')) as f:
    fitted = json.load(f)
  if tuple(fitted['grid_size_hw']) != grid:
    problems.append(f'fit_gmm on a {fitted["grid_size_hw"]} grid, expected {grid}')
  for stage, steps in (('adapt', 2), ('self_train', 1)):
    records = [json.loads(line) for line in open(os.path.join(workdir, stage, 'metrics.jsonl'))]
    if max(r['step'] for r in records) != steps:
      problems.append(f'{stage}/metrics.jsonl ends at step {records[-1]["step"]}, not {steps}')
    bad = [k for r in records for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
      problems.append(f'{stage}/metrics.jsonl has non-finite {sorted(set(bad))}')
  label_dir = os.path.join(workdir, 'pseudo_label', 'labels')
  pseudo = sorted(f for f in os.listdir(label_dir) if f.endswith('.png'))
  sizes = {_png_size(os.path.join(label_dir, f)) for f in pseudo}
  if len(pseudo) != num_selftrain or sizes != {(w, h)}:
    problems.append(f'{len(pseudo)} pseudo-labels of sizes {sizes}, expected {num_selftrain} '
                    f'at {(w, h)}')
  result = results.get('eval', {})
  counted = int(np.sum(result.get('confusion_matrix', 0)))
  if counted != valid_pixels:
    problems.append(f'eval counted {counted} label pixels, the labels hold {valid_pixels}')
  if len(result.get('per_class_iou', ())) != config.data.num_classes:
    problems.append(f'eval per_class_iou {result.get("per_class_iou")}')
  for output in ('per_class_iou.txt', 'confusion_matrix.png'):
    if not os.path.isfile(os.path.join(workdir, 'eval', output)):
      problems.append(f'eval/{output} missing')
  return problems


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='', help='kept afterwards (default: a temporary one)')
  parser.add_argument('--jobs', type=int, default=2, help='configs run side by side')
  parser.add_argument('--configs', default=','.join(CONFIGS))
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix='depthuda-rehearse-')
  data = os.path.join(root, 'data')
  start = time.monotonic()
  if not os.path.isdir(data):
    write_synthia(os.path.join(data, 'RAND_CITYSCAPES'))
    write_cityscapes(os.path.join(data, 'cityscapes'))
    write_mapillary(os.path.join(data, 'mapillary'))
  print(f'rehearse: data in {data} ({time.monotonic() - start:.0f} s)', flush=True)
  names = args.configs.split(',')
  failed = 0
  # The first run prepares the TFDS datasets the others share (a lock would serialise them).
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    first = pool.submit(_run, names[0], data, os.path.join(root, names[0]))
    first.result()
    runs = {names[0]: first} | {n: pool.submit(_run, n, data, os.path.join(root, n))
                                for n in names[1:]}
    for name, future in runs.items():
      done, seconds = future.result()
      target = 'mapillary' if 'mapillary' in name else 'cityscapes'
      selftrain = len(MAPILLARY_TRAIN) if target == 'mapillary' else CITYSCAPES_COUNTS['train']
      problems = ([f'exit status {done.returncode}: {done.stderr.strip()[-2000:]}']
                  if done.returncode else
                  check(name, os.path.join(root, name), data, selftrain))
      failed += bool(problems)
      print(f'rehearse: {name}: {"FAILED" if problems else "ok"} ({seconds:.0f} s)', flush=True)
      for problem in problems:
        print(f'  {problem}', flush=True)
  print(f'rehearse: {len(names) - failed}/{len(names)} configs ok in '
        f'{time.monotonic() - start:.0f} s', flush=True)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
