"""depthuda.gmm.fit against sklearn's GaussianMixture(diag): each from its own initialisation, and
both from the same initial parameters (EM alone).

  python benchmarks/gmm_fit.py                       # 16 classes x 1,000,000 points
  python benchmarks/gmm_fit.py --points_per_class=200000 --data=separated

Data: per class a random 5-component diagonal mixture at the real scale of the depth
distribution (x in [0, 161), y in [0, 96), inverse depth in [1, 300)); `overlapping` (the
default) overlaps enough that EM takes a few dozen iterations, `separated` has small components
of very different scales, where a poor initialisation merges two of them.
depthuda fits all classes in one jitted call; sklearn fits the classes one after another
(float64). Two sklearn fits per class:
- with its defaults (k-means initialisation, tol 1e-3, reg_covar 1e-6, 100 iterations), against
  depthuda's `fit` with its defaults, initialisation included: the likelihood each reaches;
- started from depthuda's initialisation (`fit` with max_iters=0) through means_init /
  weights_init / precisions_init, with the same tol, reg_covar (= var_floor) and iteration cap:
  EM alone.
Times are wall-clock; the first depthuda call also compiles, the later ones are the best of
--repeats. Also timed: `fit_streaming`, the fit_gmm stage's path, on the same points given in 4
chunks (same initialisation and iterations; its EM time is its total minus `fit`'s
initialisation).
"""

import argparse
import time

import jax
import numpy as np
from sklearn.mixture import GaussianMixture

from depthuda import gmm
from depthuda import gmm_streaming


def make_data(num_classes: int, n: int, k: int, seed: int, separated: bool) -> np.ndarray:
  """[C, n, 3] float32 points, each class its own random mixture."""
  rng = np.random.default_rng(seed)
  lo, hi = np.array([0.0, 0.0, 1.0]), np.array([161.0, 96.0, 300.0])
  points = np.empty((num_classes, n, 3), np.float32)
  for c in range(num_classes):
    means = rng.uniform(lo, hi, (k, 3))
    if separated:  # standard deviations from 0.2 to 6, log-uniform
      stds = np.exp(rng.uniform(np.log(0.2), np.log(6.0), (k, 3)))
    else:
      stds = rng.uniform(0.03, 0.15, (k, 3)) * (hi - lo)
    comp = rng.choice(k, n, p=rng.dirichlet(np.full(k, 2.0)))
    points[c] = means[comp] + rng.standard_normal((n, 3)) * stds[comp]
  return points


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_classes', type=int, default=16)
  parser.add_argument('--points_per_class', type=int, default=1_000_000)
  parser.add_argument('--data', choices=('overlapping', 'separated'), default='overlapping')
  parser.add_argument('--num_components', type=int, default=5)
  parser.add_argument('--max_iters', type=int, default=100)
  parser.add_argument('--tol', type=float, default=1e-3)
  parser.add_argument('--var_floor', type=float, default=1e-6)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--repeats', type=int, default=3, help='depthuda timings: best of this many')
  args = parser.parse_args()

  points = make_data(args.num_classes, args.points_per_class, args.num_components, args.seed,
                     args.data == 'separated')
  mask = np.ones(points.shape[:2], bool)
  kw = dict(num_components=args.num_components, seed=args.seed, tol=args.tol,
            var_floor=args.var_floor)

  # max_iters is a traced argument: one compilation serves the init-only and the full call.
  fit = lambda max_iters: gmm.fit(points, mask, max_iters=max_iters, return_info=True, **kw)
  _, first = timed(lambda: fit(0))
  # EM time = full fit - initialisation alone: each the best of --repeats, alternating.
  init_time = total = stream_total = float('inf')
  for _ in range(args.repeats):
    (init, _), seconds = timed(lambda: fit(0))
    init_time = min(init_time, seconds)
    (params, info), seconds = timed(lambda: fit(args.max_iters))
    total = min(total, seconds)
  ours_ll = np.asarray(gmm.mean_log_likelihood(params, points, mask))
  # The fit_gmm stage's path: the points streamed in chunks, the same initialisation.
  step = -(-args.points_per_class // 4)
  chunks = lambda: ((points[:, i:i + step], mask[:, i:i + step])
                    for i in range(0, args.points_per_class, step))
  stream = lambda max_iters: gmm_streaming.fit_streaming(chunks, points, mask,
                                                         max_iters=max_iters, **kw)
  timed(lambda: stream(1))  # Compiles.
  for _ in range(args.repeats):
    (_, stream_info), seconds = timed(lambda: stream(args.max_iters))
    stream_total = min(stream_total, seconds)

  sk_time, sk_ll, sk_iters = 0.0, [], []
  own_time, own_ll, own_iters = 0.0, [], []
  for c in range(args.num_classes):
    x = points[c].astype(np.float64)
    weights = np.asarray(init.weights[c], np.float64)
    model = GaussianMixture(
        args.num_components, covariance_type='diag', tol=args.tol, reg_covar=args.var_floor,
        max_iter=args.max_iters, init_params='random_from_data', random_state=args.seed,
        weights_init=weights / weights.sum(),  # sklearn checks the sum in float64
        means_init=np.asarray(init.means[c], np.float64),
        precisions_init=1.0 / np.asarray(init.variances[c], np.float64))
    start = time.perf_counter()
    model.fit(x)
    sk_time += time.perf_counter() - start
    sk_ll.append(model.score(x))
    sk_iters.append(model.n_iter_)
    model = GaussianMixture(args.num_components, covariance_type='diag', random_state=args.seed)
    start = time.perf_counter()
    model.fit(x)
    own_time += time.perf_counter() - start
    own_ll.append(model.score(x))
    own_iters.append(model.n_iter_)
  sk_ll, own_ll = np.array(sk_ll), np.array(own_ll)

  em_time = total - init_time
  print(f'{args.num_classes} classes x {args.points_per_class:,} points ({args.data}), '
        f'K={args.num_components}, D=3, tol={args.tol}, max_iters={args.max_iters}, '
        f'{jax.devices()[0].device_kind}')
  print(f'{"":34}{"depthuda":>12}{"sklearn":>12}')
  print('each from its own initialisation (defaults):')
  print(f'{"  fit wall time (s)":34}{total:12.2f}{own_time:12.2f}')
  print(f'{"  mean loglik per point":34}{ours_ll.mean():12.5f}{own_ll.mean():12.5f}')
  print(f'{"  min loglik diff over classes":34}{np.min(ours_ll - own_ll):12.5f}')
  print(f'{"  classes > 0.01 below the other":34}{int(np.sum(ours_ll < own_ll - 0.01)):12d}'
        f'{int(np.sum(own_ll < ours_ll - 0.01)):12d}')
  print(f'{"  EM iterations (sum over classes)":34}{int(np.sum(info["class_iterations"])):12d}'
        f'{sum(own_iters):12d}')
  print('from the same initial parameters (EM alone):')
  print(f'{"  EM wall time (s)":34}{em_time:12.2f}{sk_time:12.2f}')
  print(f'{"  init: k-means x num_inits (s)":34}{init_time:12.2f}{"(given)":>12}')
  print(f'{"  EM streamed in 4 chunks (s)":34}{stream_total - init_time:12.2f}{"-":>12}')
  print(f'{"  compile (s)":34}{first - init_time:12.2f}{"-":>12}')
  print(f'{"  EM iterations (max over classes)":34}{int(info["iterations"]):12d}'
        f'{max(sk_iters):12d}')
  print(f'{"  EM iterations (sum over classes)":34}{int(np.sum(info["class_iterations"])):12d}'
        f'{sum(sk_iters):12d}')
  print(f'{"  EM iterations streamed (max)":34}{int(stream_info["iterations"]):12d}{"-":>12}')
  print(f'{"  mean loglik per point":34}{ours_ll.mean():12.5f}{sk_ll.mean():12.5f}')
  print(f'{"  max |loglik diff| over classes":34}{np.max(np.abs(ours_ll - sk_ll)):12.5f}')
  print(f'speedup, sklearn with its defaults / depthuda with init: {own_time / total:.1f}x; '
        f'EM alone: {sk_time / em_time:.1f}x; sklearn EM alone / depthuda with init: '
        f'{sk_time / total:.1f}x')


if __name__ == '__main__':
  main()
