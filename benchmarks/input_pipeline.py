r"""tf.data throughput of the adaptation input: source + target pairs per second per CPU core.

  python benchmarks/input_pipeline.py                  # 1280x760 input, 1 core and all cores
  python benchmarks/input_pipeline.py --cores=1,2,4 --pairs=64

The adapt stage reads one source example (SYNTHIA RGB, label and 16-bit depth PNGs at
1280x760) and one target image (a Cityscapes 2048x1024 PNG, resized bicubic with antialiasing
to 1280x760) per step, through `depthuda.data.pipeline.source_train` / `target_train`: the
production streams, TFDS reading, shuffling, decoding and prefetching included. The data are
toy scenes generated at full size into a temporary directory (`depthuda.data.toy.generate`);
procedural images compress better than photographs, so their PNGs decode somewhat faster than
the real datasets'.

Each core count runs in its own process pinned to that many cores (sched_setaffinity), one
after the other in one invocation. The last lines extrapolate the single-core rate to a 16-core
GPU host and compare it with the step rate the GPU would ask for (--step_ms, default 60 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_REPLY = '@@'


def _config(root: str):
  from configs import common
  c = common.get_base_config()
  c.batch_size = 1
  c.data.source_dir = os.path.join(root, 'SYNTHIA-RAND-CITYSCAPES')
  c.data.target_dir = os.path.join(root, 'cityscapes')
  c.data.tfds_dir = os.path.join(root, 'tfds')
  c.data.toy = False  # written by `generate` below, in the real datasets' layouts
  return c


def generate(root: str, num_images: int) -> None:
  """Toy source at 1280x760 and target at 2048x1024 (rendered at full size, not upsampled)."""
  from depthuda.data import toy
  config = _config(root)
  toy.generate(config.data.source_dir, config.data.target_dir, seed=0, num_source=num_images,
               num_target_train=num_images, num_target_val=1, num_target_test=1,
               source_size=(1280, 760), target_size=(2048, 1024))


def measure(root: str, pairs: int, warmup: int) -> dict:
  """Pairs per second through the production source and target streams."""
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  from depthuda import models
  from depthuda.data import decoding
  from depthuda.data import labels
  from depthuda.data import pipeline
  config = _config(root)
  # Where one pair's time goes: each decode op alone on one file of each kind (first, while no
  # tf.data threads are running).
  breakdown = {}
  rgb = os.path.join(config.data.source_dir, 'RGB', '0000000.png')
  files = {'source RGB': rgb, 'source RGB, resized anyway': rgb,
           'source label': rgb.replace('RGB', 'parsed_LABELS'),
           'source depth': rgb.replace('RGB', 'Depth')}
  size_hw = decoding.hw(config.data.input_size)
  ops = {'source RGB': lambda b: decoding.decode_image(b, config.data.input_size),
         # What decode_image cost before it skipped the (identity) resize at the input size.
         'source RGB, resized anyway': lambda b: tf.clip_by_value(tf.round(tf.image.resize(
             tf.cast(tf.io.decode_png(b, channels=3), tf.float32), size_hw, method='bicubic',
             antialias=True)), 0, 255)[..., ::-1] - labels.MEAN_BGR,
         'source label': lambda b: decoding.decode_label(b, config.data.input_size, None),
         'source depth': lambda b: decoding.decode_inverse_depth(b, config.data.input_size)}
  import zipfile
  with zipfile.ZipFile(os.path.join(config.data.target_dir, 'leftImg8bit_trainvaltest.zip')) as z:
    name = next(n for n in z.namelist() if n.endswith('.png') and '/train/' in n)
    target_png = z.read(name)
  contents = {k: tf.io.read_file(v) for k, v in files.items()}
  contents['target image'] = tf.constant(target_png)
  ops['target image'] = lambda b: decoding.decode_image(b, config.data.input_size)
  ops['target PNG decode only'] = lambda b: tf.io.decode_png(b, channels=3)
  contents['target PNG decode only'] = contents['target image']
  for key, op in ops.items():
    fn = tf.function(op)
    fn(contents[key])
    start = time.perf_counter()
    for _ in range(10):
      fn(contents[key]).numpy()
    breakdown[key] = (time.perf_counter() - start) / 10
  source = pipeline.source_train(config, models.feature_grid(config))
  target = pipeline.target_train(config)
  for _ in range(warmup):  # Builds the TFDS datasets on first use, fills the prefetch buffers.
    next(source), next(target)
  start = time.perf_counter()
  for _ in range(pairs):
    src, tgt = next(source), next(target)
  elapsed = time.perf_counter() - start
  assert src['image'].shape == (1, 760, 1280, 3) and tgt['image'].shape == (1, 760, 1280, 3)

  return {'pairs_per_s': pairs / elapsed, 'cores': len(os.sched_getaffinity(0)),
          'breakdown_s': breakdown, 'target_png_bytes': len(target_png)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cores', default=f'1,{os.cpu_count()}',
                      help='comma-separated core counts, one pinned process each')
  parser.add_argument('--pairs', type=int, default=32, help='timed source+target pairs')
  parser.add_argument('--warmup', type=int, default=4)
  parser.add_argument('--num_images', type=int, default=8, help='toy images per domain')
  parser.add_argument('--step_ms', type=float, default=60.0, help='GPU step time to keep ahead of')
  parser.add_argument('--host_cores', type=int, default=16, help='cores of the GPU host')
  parser.add_argument('--root', default='', help='data directory (default: a temporary one)')
  parser.add_argument('--measure', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.measure])
    print(_REPLY + json.dumps(measure(args.root, args.pairs, args.warmup)), flush=True)
    return

  with tempfile.TemporaryDirectory(prefix='depthuda_input_') as tmp:
    root = args.root or tmp
    start = time.perf_counter()
    generate(root, args.num_images)
    print(f'toy data: {args.num_images} source (1280x760) + {args.num_images} target '
          f'(2048x1024) images in {time.perf_counter() - start:.0f} s', file=sys.stderr)
    results = {}
    for cores in (int(c) for c in args.cores.split(',')):
      out = subprocess.run([sys.executable, __file__, f'--measure={cores}', f'--root={root}',
                            f'--pairs={args.pairs}', f'--warmup={args.warmup}'],
                           check=True, stdout=subprocess.PIPE, text=True).stdout
      results[cores] = json.loads(next(line for line in out.splitlines()
                                       if line.startswith(_REPLY))[len(_REPLY):])

  print(f'\nadapt input at 1280x760, batch 1 source + 1 target, {args.pairs} pairs timed, '
        f'{os.cpu_count()} CPUs here')
  print(f'{"cores":>6}{"pairs/s":>10}{"pairs/s/core":>14}')
  for cores, r in results.items():
    print(f'{r["cores"]:>6}{r["pairs_per_s"]:>10.2f}{r["pairs_per_s"] / r["cores"]:>14.2f}')
  one = min(results, key=lambda c: results[c]['cores'])
  print('\none pair, each decode alone (ms, 1 core):')
  for key, t in results[one]['breakdown_s'].items():
    print(f'  {key:26}{t * 1e3:8.1f}')
  per_core = results[one]['pairs_per_s'] / results[one]['cores']
  need = 1e3 / args.step_ms
  host = per_core * args.host_cores
  print(f'\n{args.host_cores}-core host (linear in cores): {host:.1f} pairs/s; a {args.step_ms:.0f} ms '
        f'step needs {need:.1f} pairs/s -> {"keeps ahead" if host >= need else "falls behind"} '
        f'({host / need:.1f}x); cores needed: {need / per_core:.1f}')


if __name__ == '__main__':
  main()
