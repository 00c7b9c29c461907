r"""How far one bfloat16 adapt step's update is from the float32 one, per parameter.

  python benchmarks/bf16_gradients.py [--seed=0]

With the toy's network (configs/toy.py), from the same float32 state and one synthetic batch,
runs `train.adapt_step` with `compute_dtype` float32 and bfloat16 (source-only and full loss
weights) and prints, per parameter, the cosine between the two updates (lowest first) and their
median. Also checks
that a bfloat16 convolution's kernel gradient accumulates in float32: its error against a
float32 convolution of the same bfloat16-rounded operands is then bfloat16's final rounding
(~2^-9 relative).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import toy  # pylint: disable=g-import-not-at-top,wrong-import-position
from depthuda import gmm, models, train  # pylint: disable=g-import-not-at-top,wrong-import-position

LAMBDAS = ('lambda_depth', 'lambda_bal_src', 'lambda_bal_tgt', 'lambda_adv')


def synthetic_batch(config, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  w, h = config.data.input_size
  b, c = config.batch_size, config.data.num_classes
  image = lambda: jnp.asarray(rng.normal(0, 60, (b, h, w, 3)), jnp.float32)
  label = rng.integers(0, c, (b, h, w)).astype(np.int32)
  depth = rng.uniform(1, 200, (b, h, w)).astype(np.float32)
  rows, cols = (np.floor((np.arange(m) + 0.5) * n / m).astype(int)  # the PIL rule
                for n, m in zip((h, w), models.feature_grid(config)))
  return {'source': {'image': image(), 'label': jnp.asarray(label), 'depth': jnp.asarray(depth),
                     'label_grid': jnp.asarray(label[:, rows][:, :, cols]),
                     'depth_grid': jnp.asarray(depth[:, rows][:, :, cols])},
          'target': {'image': image()}}


def synthetic_gmm(config, seed: int) -> gmm.GMMParams:
  rng = np.random.default_rng(seed)
  c, k = config.data.num_classes, config.gmm.num_components
  return gmm.GMMParams(
      weights=jnp.full((c, k), 1.0 / k),
      means=jnp.asarray(rng.uniform([0, 0, 1], [20, 12, 200], (c, k, 3)), jnp.float32),
      variances=jnp.asarray(rng.uniform([2, 2, 20], [20, 20, 2000], (c, k, 3)), jnp.float32))


def update(config, dtype: str, state, batch, gmm_params):
  config = config.copy_and_resolve_references()
  config.compute_dtype = dtype
  seg, disc = models.build(config)
  _, seg_tx, disc_tx = train.init_state(config, seg, disc)
  step = jax.jit(lambda s, b, g: train.adapt_step(s, b, g, seg=seg, disc=disc, seg_tx=seg_tx,
                                                  disc_tx=disc_tx, config=config, axis_name=None))
  new, _ = step(state, batch, gmm_params)
  return jax.tree.map(lambda a, b: np.asarray(a - b, np.float64), new.params, state.params)


def compare(config, name: str, seed: int) -> None:
  config = config.copy_and_resolve_references()
  config.seed = seed
  seg, disc = models.build(config)
  state, _, _ = train.init_state(config, seg, disc)
  batch, gmm_params = synthetic_batch(config, seed), synthetic_gmm(config, seed)
  d32 = update(config, 'float32', state, batch, gmm_params)
  d16 = update(config, 'bfloat16', state, batch, gmm_params)
  rows = []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(d32), jax.tree.leaves(d16)):
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm > 0:
      rows.append((float((a * b).sum() / norm), jax.tree_util.keystr(path)))
  rows.sort()
  print(f'{name}: median cosine {np.median([r[0] for r in rows]):.4f} over {len(rows)} '
        'parameters; lowest:')
  for cos, path in rows[:5]:
    print(f'  {cos:.4f}  {path}')


def conv_accumulation(seed: int) -> None:
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (2, 48, 80, 64))
  w = jax.random.normal(k[1], (3, 3, 64, 64)) * 0.05
  ct = jax.random.normal(k[2], (2, 48, 80, 64))
  rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)

  @jax.jit
  def kernel_grad(x, w, ct):
    conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.vjp(conv, w)[1](ct)[0]

  bf16 = np.asarray(kernel_grad(*(a.astype(jnp.bfloat16) for a in (x, w, ct))), np.float64)
  ref = np.asarray(kernel_grad(rounded(x), rounded(w), rounded(ct)), np.float64)
  err = np.linalg.norm(bf16 - ref) / np.linalg.norm(ref)
  print(f'bf16 conv kernel gradient vs float32 on the same rounded operands: relative error '
        f'{err:.2e} (bfloat16 rounding of the result alone: ~{2.0**-9:.1e})')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--seed', type=int, default=0, help='of the state, batch and GMMs')
  args = parser.parse_args()
  config = toy.get_config()
  conv_accumulation(args.seed)
  compare(config, 'full adapt', args.seed)
  for field in LAMBDAS:
    config.loss[field] = 0.0
  compare(config, 'source-only', args.seed)


if __name__ == '__main__':
  main()
