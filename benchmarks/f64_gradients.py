r"""float32 segmenter gradients under XLA flag settings, against float64.

  python benchmarks/f64_gradients.py [--flags=--xla_cpu_experimental_ynn_fusion_type=+eltwise]

A ResNet-50-shaped DeepLabV2 (blocks 3, 4, 6, 3; width 16; 7 classes) on a 2 x 97 x 97 batch,
BatchNorm in training mode, loss = sum of its three outputs times fixed random weights. Prints
each float32 gradient's relative error against float64 (median and worst over parameter
tensors) for: XLA's default flags; the same with the two images in the other order (the exact
gradient is the same, so this is float32 reassociation noise amplified by the network); and
`--flags`. Each setting runs in its own process (XLA reads its flags once).
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(out: str, dtype_name: str, swap: bool) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_x64', True)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from depthuda import models  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(dtype_name)
  model = models.DeepLabV2Depth(num_classes=7, layers=(3, 4, 6, 3), width=16, dtype=dtype)
  rng = np.random.default_rng(0)
  x = rng.normal(0, 60, (2, 97, 97, 3))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 97, 97, 3), jnp.float32), train=False)
  shapes = jax.eval_shape(lambda: model.apply(variables, jnp.zeros(x.shape), train=False))
  weights = [rng.normal(size=s.shape) for s in shapes]
  if swap:
    x, weights = x[::-1], [w[::-1] for w in weights]
  variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)

  def loss(params):
    outputs, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                             jnp.asarray(x, dtype), train=True, mutable=['batch_stats'])
    return sum(jnp.sum(o.astype(dtype) * jnp.asarray(w, dtype)) for o, w in zip(outputs, weights))

  grads = jax.jit(jax.grad(loss))(variables['params'])
  np.savez(out, **{jax.tree_util.keystr(k): np.asarray(g, np.float64)
                   for k, g in jax.tree_util.tree_leaves_with_path(grads)})


def run(out: str, dtype: str, swap: bool = False, flags: str = '') -> dict:
  env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + flags).strip())
  subprocess.run([sys.executable, os.path.abspath(__file__), f'--worker={out}',
                  f'--dtype={dtype}'] + (['--swap'] if swap else []), check=True, env=env)
  return dict(np.load(out))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--flags', default='--xla_cpu_experimental_ynn_fusion_type=+eltwise',
                      help='XLA flags of the third float32 setting')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  parser.add_argument('--dtype', default='float32', help=argparse.SUPPRESS)
  parser.add_argument('--swap', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.dtype, args.swap)
    return
  with tempfile.TemporaryDirectory() as tmp:
    path = lambda name: os.path.join(tmp, name + '.npz')
    exact = run(path('f64'), 'float64')
    settings = {'default flags': run(path('default'), 'float32'),
                'default flags, images swapped': run(path('swapped'), 'float32', swap=True),
                args.flags: run(path('flags'), 'float32', flags=args.flags)}
  print(f'float32 gradient vs float64, relative error over {len(exact)} parameter tensors:')
  for name, grads in settings.items():
    errors = [np.linalg.norm(grads[k] - exact[k]) / np.linalg.norm(exact[k]) for k in exact]
    print(f'  {name:48s} median {np.median(errors):.2e}  worst {np.max(errors):.2e}')


if __name__ == '__main__':
  main()
