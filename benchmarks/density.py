"""Density targets for one feature grid: jitted depthuda.density against a per-pixel NumPy loop.

  python benchmarks/density.py                 # 96 x 161 grid, 16 classes, K = 5
  python benchmarks/density.py --loop_rows=24  # time the loop on 24 rows, scale to the grid

The loop is the original's approach: for every cell, the density of every class (a sum over
components of products of 1-D normals), i.e. the 16 per-class maps it precomputed per source
image, then the value of the predicted class and g. depthuda computes the source target
(predicted class, ground-truth depth where the label agrees) for the batch on device.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from depthuda import density
from depthuda import gmm


def random_inputs(h: int, w: int, num_classes: int, k: int, seed: int):
  rng = np.random.default_rng(seed)
  params = gmm.GMMParams(
      weights=jnp.asarray(rng.dirichlet(np.ones(k), num_classes), jnp.float32),
      means=jnp.asarray(rng.uniform([0, 0, 1], [w, h, 60], (num_classes, k, 3)), jnp.float32),
      variances=jnp.asarray(rng.uniform([20, 10, 5], [800, 300, 400], (num_classes, k, 3)),
                            jnp.float32))
  logits = rng.normal(size=(1, h, w, num_classes)).astype(np.float32)
  labels = np.where(rng.random((1, h, w)) < 0.7, logits.argmax(-1),
                    rng.integers(0, num_classes, (1, h, w))).astype(np.int32)
  depth = rng.uniform(1, 60, (1, h, w)).astype(np.float32)
  return params, logits, labels, depth


def loop_targets(params, logits, labels, depth, rows: int, scale: float) -> np.ndarray:
  """Per-pixel loop over classes and components, in float64, for the first `rows` rows."""
  weights, means, variances = (np.asarray(a, np.float64) for a in
                               (params.weights, params.means, params.variances))
  num_classes, k = weights.shape
  out = np.zeros((rows, logits.shape[2]))
  for i in range(rows):
    for j in range(logits.shape[2]):
      pred = int(np.argmax(logits[0, i, j]))
      z = depth[0, i, j] if labels[0, i, j] == pred else 0.0
      v = np.array([j, i, z], np.float64)
      maps = np.zeros(num_classes)
      for c in range(num_classes):
        for m in range(k):
          var = variances[c, m]
          maps[c] += weights[c, m] * np.prod(
              np.exp(-(v - means[c, m]) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var))
      out[i, j] = 255 * (1 - np.exp(-scale * maps[pred]))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--height', type=int, default=96)
  parser.add_argument('--width', type=int, default=161)
  parser.add_argument('--num_classes', type=int, default=16)
  parser.add_argument('--num_components', type=int, default=5)
  parser.add_argument('--loop_rows', type=int, default=0, help='rows for the loop (0 = all)')
  parser.add_argument('--repeats', type=int, default=50)
  parser.add_argument('--scale', type=float, default=1e6)
  args = parser.parse_args()

  params, logits, labels, depth = random_inputs(args.height, args.width, args.num_classes,
                                                args.num_components, seed=0)
  source = jax.jit(density.source_density_target)
  start = time.perf_counter()
  ours = np.asarray(source(params, logits, labels, depth, args.scale))
  compile_time = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(source(params, logits, labels, depth, args.scale))
    times.append(time.perf_counter() - start)
  jit_time = float(np.median(times))

  rows = args.loop_rows or args.height
  start = time.perf_counter()
  expected = loop_targets(params, logits, labels, depth, rows, args.scale)
  loop_time = (time.perf_counter() - start) * args.height / rows
  max_diff = float(np.max(np.abs(ours[0, :rows] - expected)))

  print(f'source density target, grid {args.height}x{args.width}, {args.num_classes} classes, '
        f'K={args.num_components}, {jax.devices()[0].device_kind}')
  print(f'{"jitted depthuda (median of %d)" % args.repeats:40}{jit_time * 1e3:10.2f} ms')
  print(f'{"jit compile (first call)":40}{compile_time * 1e3:10.0f} ms')
  label = 'NumPy per-pixel loop' + ('' if rows == args.height else f' ({rows} rows, scaled)')
  print(f'{label:40}{loop_time * 1e3:10.0f} ms')
  print(f'{"ratio loop / jitted":40}{loop_time / jit_time:10.0f}x')
  print(f'{"max |difference| (0-255 scale)":40}{max_diff:10.2e}')
  print(f'{"targets strictly inside (1, 254)":40}{np.mean((ours > 1) & (ours < 254)):10.0%}')


if __name__ == '__main__':
  main()
