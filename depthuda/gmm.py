"""Per-class diagonal Gaussian mixtures over (x, y, inverse depth), fitted by EM in JAX.

METHOD §4: class c has a K-component diagonal GMM over its source points (x, y, z) = (grid
column, grid row, inverse depth). All classes are fitted at once (a leading class axis, per-class
routines vmapped); classes with different point counts share one padded [C, N, D] array with a
mask [C, N]. Masked entries are replaced by zeros before any arithmetic, so whatever sits under
the mask has no influence.

Numerics (float32; x up to 161, y up to 96, z from ~1 to hundreds):
- EM runs in per-class standardised coordinates (minus the class mean, over the class std) and
  the result is mapped back. For a diagonal GMM this change of frame is exact (log-likelihoods
  shift by a per-class constant, so the tolerance test is unchanged); only the rounding improves.
  `var_floor` is applied in the original coordinates, as sklearn's `reg_covar`.
- Second moments are summed about the E-step's component means, not about zero: a component
  collapsed onto one value (sky at inverse depth 1, a pole on one grid column) gets exactly
  `var_floor` rather than the float32 noise of E[x^2] - E[x]^2.

A class without points gets weights 1/K, means 0 and variances 1 (a standard normal at the
origin): finite everywhere, and its density is negligible at every real grid cell.

`fit` fits points held in one array; `gmm_streaming.fit_streaming` runs the same EM on data
streamed through every iteration (the fit_gmm stage's path).
"""

from __future__ import annotations

import functools
import math

import flax
import jax
from jax import lax
import jax.numpy as jnp

# Added to every component mass, as sklearn does (10 * eps), so weights never reach exactly 0.
_MASS_EPS = 10 * float(jnp.finfo(jnp.float32).eps)


@flax.struct.dataclass
class GMMParams:
  """weights [C, K] (rows sum to 1), means [C, K, D], variances [C, K, D] (diagonal)."""
  weights: jax.Array
  means: jax.Array
  variances: jax.Array


@flax.struct.dataclass
class SufficientStats:
  """E-step sums for one set of parameters; every field adds over chunks, devices and hosts.

  With r_nk the responsibilities and mu_k the means the E-step used:
  resp_sums [C, K] = sum_n r_nk; weighted_sums [C, K, D] = sum_n r_nk (x_n - mu_k);
  weighted_squares [C, K, D] = sum_n r_nk (x_n - mu_k)^2; reference_sums [C, K, D] =
  sum_n r_nk mu_k (carries mu_k through a plain sum, so `lax.psum` of the whole tree is valid);
  loglik [C] = sum_n log p(x_n); counts [C] int32 = number of unmasked points.
  """
  resp_sums: jax.Array
  weighted_sums: jax.Array
  weighted_squares: jax.Array
  reference_sums: jax.Array
  loglik: jax.Array
  counts: jax.Array

  def __add__(self, other: SufficientStats) -> SufficientStats:
    return jax.tree.map(jnp.add, self, other)


@flax.struct.dataclass
class _Frame:
  """Per-class standardisation: x_std = (x - offset) / scale; offset, scale [C, D]."""
  offset: jax.Array
  scale: jax.Array


def log_density(params: GMMParams, x: jax.Array, class_ids: jax.Array) -> jax.Array:
  """log sum_k pi_ck prod_h N(x_h; mu_ckh, var_ckh): x [..., D], class_ids [...] int -> [...]."""
  variances = params.variances[class_ids]
  log_norm = (jnp.log(params.weights[class_ids])
              - 0.5 * jnp.sum(jnp.log(2 * jnp.pi * variances), axis=-1))
  maha = jnp.sum((x[..., None, :] - params.means[class_ids]) ** 2 / variances, axis=-1)
  return jax.nn.logsumexp(log_norm - 0.5 * maha, axis=-1)


def _moments(devs, mask, resp, means, loglik) -> SufficientStats:
  """One class's sums from devs (D arrays [K, N] of x - mu_k) and resp [K, N] (0 where masked)."""
  resp_sums = jnp.sum(resp, axis=-1)
  return SufficientStats(
      resp_sums=resp_sums,
      weighted_sums=jnp.stack([jnp.sum(resp * dev, axis=-1) for dev in devs], axis=-1),
      weighted_squares=jnp.stack([jnp.sum(resp * dev * dev, axis=-1) for dev in devs], axis=-1),
      reference_sums=resp_sums[:, None] * means, loglik=loglik,
      counts=jnp.sum(mask, dtype=jnp.int32))


# The per-class E-steps take points transposed, [D, N], and unroll the D dimensions: with N on
# the fast axis the [K, N] temporaries vectorise and stay in cache.
def _deviations(offset, scale, centers, points_t, mask):
  """D arrays [K, N]: standardised point minus each center, points zeroed where masked."""
  x = jnp.where(mask, (points_t - offset[:, None]) / scale[:, None], 0.0)
  return [x[d] - centers[:, d, None] for d in range(x.shape[0])]


def _class_stats(offset, scale, params: GMMParams, points_t, mask):
  """Soft E-step of one class: points_t [D, N], mask [N]; params in the standardised frame."""
  devs = _deviations(offset, scale, params.means, points_t, mask)
  precision = 1.0 / params.variances
  log_norm = (jnp.log(params.weights)
              - 0.5 * jnp.sum(jnp.log(2 * jnp.pi * params.variances), axis=-1))
  log_joint = log_norm[:, None] - 0.5 * sum(dev * dev * precision[:, d, None]
                                            for d, dev in enumerate(devs))
  # logsumexp by hand, so the exponentials double as responsibilities.
  top = jnp.max(log_joint, axis=0)
  expo = jnp.exp(log_joint - top)
  total = jnp.sum(expo, axis=0)
  resp = expo * (mask / total)
  loglik = jnp.sum(jnp.where(mask, top + jnp.log(total), 0.0))
  return _moments(devs, mask, resp, params.means, loglik)


def _class_assign_stats(offset, scale, centers, points_t, mask):
  """Hard (k-means) assignment of one class; loglik holds minus the inertia."""
  devs = _deviations(offset, scale, centers, points_t, mask)
  dist2 = sum(dev * dev for dev in devs)
  nearest = jnp.argmin(dist2, axis=0)
  resp = ((jnp.arange(centers.shape[0])[:, None] == nearest) & mask).astype(jnp.float32)
  return _moments(devs, mask, resp, centers, -jnp.sum(jnp.where(mask, jnp.min(dist2, 0), 0.0)))


def _over_classes(class_fn, frame: _Frame, class_params, points_t, mask) -> SufficientStats:
  """class_fn vmapped over classes; points_t [C, D, N] or [D, N] (shared by every class)."""
  shared = None if points_t.ndim == 2 else 0
  return jax.vmap(class_fn, in_axes=(0, 0, 0, shared, 0))(frame.offset, frame.scale,
                                                          class_params, points_t, mask)


@jax.jit
def _stats_in_frame(frame: _Frame, params: GMMParams, points, mask) -> SufficientStats:
  """Soft stats of points [C, N, D] or [N, D] (shared by every class) in the natural layout."""
  return _over_classes(_class_stats, frame, params,
                       jnp.swapaxes(points.astype(jnp.float32), -1, -2), mask.astype(bool))


def accumulate(params: GMMParams, points: jax.Array, mask: jax.Array) -> SufficientStats:
  """E-step sums (jitted) of points [C, N, D] or [N, D] (shared by all classes), mask [C, N]."""
  num_classes, _, dim = params.means.shape
  frame = _Frame(offset=jnp.zeros((num_classes, dim)), scale=jnp.ones((num_classes, dim)))
  return _stats_in_frame(frame, params, jnp.asarray(points), jnp.asarray(mask))


@jax.jit
def m_step(stats: SufficientStats, var_floor: float | jax.Array) -> GMMParams:
  """Maximum-likelihood parameters from summed stats; var_floor broadcasts to [C, K, D].

  A component without responsibility keeps a weight of ~1e-6 / N, mean 0 and variance
  var_floor, like sklearn's; a class without points gets uniform weights.
  """
  mass = stats.resp_sums + _MASS_EPS
  safe = jnp.maximum(stats.resp_sums, jnp.finfo(jnp.float32).tiny)[..., None]
  shift = stats.weighted_sums / safe
  means = stats.reference_sums / safe + shift
  variances = jnp.maximum(stats.weighted_squares / safe - shift ** 2, 0.0) + var_floor
  return GMMParams(weights=mass / jnp.sum(mass, axis=-1, keepdims=True), means=means,
                   variances=variances)


def mean_log_likelihood(params: GMMParams, points: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean log density per unmasked point, per class: [C] (NaN for a class without points)."""
  stats = accumulate(params, points, mask)
  return stats.loglik / stats.counts


def _fit_frame(points: jax.Array, mask: jax.Array) -> _Frame:
  """Per-class mean and std of the masked points [C, N, D] (std 1 where it is 0)."""
  m = mask[..., None]
  count = jnp.maximum(jnp.sum(m, axis=1), 1)
  offset = jnp.sum(jnp.where(m, points, 0.0), axis=1) / count
  var = jnp.sum(jnp.where(m, (points - offset[:, None]) ** 2, 0.0), axis=1) / count
  return _Frame(offset=offset, scale=jnp.where(var > 0, jnp.sqrt(var), 1.0))


def _draw(key, weights, num: int):
  """num indices drawn with probabilities proportional to weights [N] >= 0 (inverse CDF: a
  categorical draw would need N random numbers per index)."""
  cdf = jnp.cumsum(weights)
  indices = jnp.searchsorted(cdf, jax.random.uniform(key, (num,)) * cdf[-1], side='right')
  return jnp.minimum(indices, weights.shape[0] - 1)


def _kmeans_plusplus(key, x, mask, num_components: int):
  """Greedy k-means++ seeds of one class among its masked standardised points x [D, N]: -> [K, D].

  Each new seed is the best of 2 + log(K) candidates drawn by D^2 sampling, the one that lowers
  the k-means cost most (sklearn's k-means++): single draws often put two seeds in one cluster
  and none in a small, tight one, which Lloyd's iterations then cannot undo.
  """
  x = jnp.where(mask, x, 0.0)
  num_trials = 2 + int(math.log(num_components))
  keys = jax.random.split(key, num_components)
  uniform = mask.astype(jnp.float32)

  def dist2_to(points):  # [T, D] -> [T, N]
    return jnp.where(mask, sum((x[d] - points[:, d, None]) ** 2 for d in range(x.shape[0])), 0.0)

  def add_center(k, carry):
    centers, dist2 = carry
    # D^2 sampling; with every point on a chosen seed already, fall back to uniform.
    weights = jnp.where(jnp.any(dist2 > 0), dist2, uniform)
    candidates = x[:, _draw(keys[k], weights, num_trials)].T
    trial_dist2 = jnp.minimum(dist2, dist2_to(candidates))
    best = jnp.argmin(jnp.sum(trial_dist2, axis=-1))
    return centers.at[k].set(candidates[best]), trial_dist2[best]

  first = x[:, _draw(keys[0], uniform, 1)].T
  centers = jnp.zeros((num_components, x.shape[0])).at[0].set(first[0])
  return lax.fori_loop(1, num_components, add_center, (centers, dist2_to(first)[0]))[0]


def _sample(key, points, mask, size: int):
  """Up to `size` masked points per class, evenly spread over the class's points from a random
  start: points [C, N, D], mask [C, N] -> [C, size, D], [C, size] (all points when N <= size)."""
  if points.shape[1] <= size:
    return points, mask
  counts = jnp.sum(mask, axis=1)
  start = jax.random.uniform(key, counts.shape)
  step = jnp.maximum(counts / size, 1.0)[:, None]
  ranks = jnp.minimum(jnp.floor((jnp.arange(size) + start[:, None]) * step).astype(jnp.int32),
                      counts[:, None] - 1)
  # The position of each class's (rank + 1)-th masked point.
  positions = jax.vmap(jnp.searchsorted)(jnp.cumsum(mask, axis=1), ranks + 1)
  positions = jnp.minimum(positions, points.shape[1] - 1)
  valid = jnp.arange(size) < counts[:, None]
  sample = jnp.take_along_axis(points, positions[..., None], axis=1)
  return jnp.where(valid[..., None], sample, 0.0), valid


def _to_chunks(points, mask, chunk_size: int):
  """[C, N, D], [C, N] -> [n, C, D, chunk], [n, C, chunk] (zero-padded, padding masked)."""
  (num_classes, num_points, dim), chunk = points.shape, min(chunk_size, points.shape[1])
  pad = -num_points % chunk
  points = jnp.pad(points, ((0, 0), (0, pad), (0, 0))).reshape(num_classes, -1, chunk, dim)
  mask = jnp.pad(mask, ((0, 0), (0, pad))).reshape(num_classes, -1, chunk)
  return points.transpose(1, 0, 3, 2), mask.swapaxes(0, 1)


def _sum_chunks(class_fn, frame: _Frame, class_params, chunks) -> SufficientStats:
  """`_over_classes` summed over the chunks (bounded memory), one chunk per loop iteration.

  The loop carries the chunk it works on and loads the next one for the following iteration:
  sliced where it is used, XLA's CPU backend fuses the slice into every elementwise fusion of
  the E-step, which slows them (BUILD_NOTES.md, "Performance work").
  """
  stats_fn = functools.partial(_over_classes, class_fn, frame, class_params)
  num_chunks = chunks[0].shape[0]
  first = jax.tree.map(lambda a: a[0], chunks)
  shapes = jax.eval_shape(stats_fn, *first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def add_chunk(i, carry):
    total, current = carry
    following = jnp.minimum(i + 1, num_chunks - 1)
    loaded = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, following, keepdims=False),
                          chunks)
    return total + stats_fn(*current), loaded

  return lax.fori_loop(0, num_chunks, add_chunk, (zeros, first))[0]


@functools.partial(jax.jit,
                   static_argnames=('num_components', 'num_inits', 'sample_size', 'chunk_size'))
def _initialise(points, mask, seed, var_floor, kmeans_iters, *, num_components, num_inits,
                sample_size, chunk_size):
  """Frame, var floor [C, 1, D] in it and initial params, the best of `num_inits` starts.

  Each start runs k-means (greedy k-means++ seeds, Lloyd until the centers stop moving or after
  kmeans_iters) on a sample of each class, in the standardised frame. Per class, the start whose
  hard-assignment GMM gives the sample the highest likelihood is kept: sklearn's single start
  (a full k-means) leaves two components merged on some classes of well-separated data.
  """
  num_classes = points.shape[0]
  frame = _fit_frame(points, mask)
  floor = var_floor / frame.scale[:, None, :] ** 2
  sample_key, seed_key = jax.random.split(jax.random.key(seed))
  sample, sample_mask = _sample(sample_key, points, mask, sample_size)
  # Every start is a class of its own: [num_inits * C, ...], start-major.
  tile = lambda a: jnp.tile(a, (num_inits,) + (1,) * (a.ndim - 1))
  frames, floors = jax.tree.map(tile, frame), tile(floor)
  sample, sample_mask = tile(sample), tile(sample_mask)
  standardised = (sample - frames.offset[:, None]) / frames.scale[:, None]
  keys = jax.random.split(seed_key, num_inits * num_classes)
  centers = jax.vmap(_kmeans_plusplus, in_axes=(0, 0, 0, None))(
      keys, jnp.swapaxes(standardised, -1, -2), sample_mask, num_components)
  chunks = _to_chunks(sample, sample_mask, chunk_size)

  def lloyd(carry):
    centers, _, step = carry
    stats = _sum_chunks(_class_assign_stats, frames, centers, chunks)
    # An emptied cluster keeps its seed.
    moved = jnp.where(stats.resp_sums[..., None] > 0, m_step(stats, 0.0).means, centers)
    return moved, jnp.max(jnp.sum((moved - centers) ** 2, axis=(-2, -1))), step + 1

  # sklearn's k-means tolerance: 1e-4 times the mean variance of the (here standardised) data.
  centers = lax.while_loop(lambda carry: (carry[2] < kmeans_iters) & (carry[1] > 1e-4), lloyd,
                           (centers, jnp.inf, 0))[0]
  params = m_step(_sum_chunks(_class_assign_stats, frames, centers, chunks), floors)
  loglik = _sum_chunks(_class_stats, frames, params, chunks).loglik
  best = jnp.argmax(loglik.reshape(num_inits, num_classes), axis=0)
  params = jax.tree.map(
      lambda a: a.reshape((num_inits, num_classes) + a.shape[1:])[best, jnp.arange(num_classes)],
      params)
  return frame, floor, params


def _select(pick_new, new: GMMParams, old: GMMParams) -> GMMParams:
  """Per class [C]: new params where pick_new, else old (converged classes stay frozen)."""
  return jax.tree.map(lambda a, b: jnp.where(pick_new.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                      new, old)


def _to_original(frame: _Frame, params: GMMParams, counts) -> GMMParams:
  """Standardised params -> original coordinates; classes without points get the default."""
  means = params.means * frame.scale[:, None] + frame.offset[:, None]
  variances = params.variances * frame.scale[:, None] ** 2
  empty = (counts == 0)[:, None]
  k = params.weights.shape[-1]
  return GMMParams(weights=jnp.where(empty, 1.0 / k, params.weights),
                   means=jnp.where(empty[..., None], 0.0, means),
                   variances=jnp.where(empty[..., None], 1.0, variances))


def _info(num_iters, converged, mean_loglik, counts, frame: _Frame) -> dict:
  """Fit summary from the last E-step's mean log-likelihoods [C] (standardised frame)."""
  present = counts > 0
  class_mean = jnp.where(present, mean_loglik - jnp.sum(jnp.log(frame.scale), axis=-1), jnp.nan)
  total = jnp.sum(jnp.where(present, class_mean * counts, 0.0))
  return {'iterations': jnp.max(num_iters), 'class_iterations': num_iters,
          'converged': converged, 'class_mean_log_likelihood': class_mean,
          'mean_log_likelihood': total / jnp.maximum(jnp.sum(counts), 1)}


@functools.partial(jax.jit, static_argnames=('num_components', 'num_inits', 'sample_size',
                                             'chunk_size', 'return_info'))
def fit(points: jax.Array, mask: jax.Array, num_components: int = 5, seed: int = 0,
        max_iters: int = 100, tol: float = 1e-3, var_floor: float = 1e-6, *,
        num_inits: int = 4, kmeans_iters: int = 100, sample_size: int = 16384,
        chunk_size: int = 8192, return_info: bool = False):
  """EM for C diagonal GMMs at once on in-memory points (jitted).

  Args:
    points: [C, N, D] float; class c's points are points[c][mask[c]].
    mask: [C, N] bool.
    num_components: K.
    seed: seed of the initialisation (sample and k-means++).
    max_iters: cap on EM iterations (each class stops on its own once converged; 0 returns the
      initialisation).
    tol: convergence threshold on the change of the mean log-likelihood per point (sklearn's).
    var_floor: added to every variance (sklearn's reg_covar), in the original coordinates; > 0.
    num_inits: k-means starts per class; EM starts from the best (see `_initialise`).
    kmeans_iters: cap on Lloyd iterations after k-means++ seeding (they stop once the centers
      stop moving).
    sample_size: points per class the k-means starts run on (evenly spread over the class).
    chunk_size: points per class processed at once (memory ~ C * chunk * K * D floats).
    return_info: also return a dict: 'iterations' (max over classes), 'class_iterations' [C],
      'converged' [C], 'class_mean_log_likelihood' [C], 'mean_log_likelihood' (all points), the
      log-likelihoods those of the last E-step.
  Returns:
    GMMParams in the coordinates of `points` (and the info dict if return_info).
  """
  if points.ndim != 3 or points.shape[1] == 0:
    raise ValueError(f'fit: points must be [C, N, D] with N > 0, got shape {points.shape}')
  points, mask = points.astype(jnp.float32), mask.astype(bool)
  frame, floor, params = _initialise(points, mask, seed, var_floor, kmeans_iters,
                                     num_components=num_components, num_inits=num_inits,
                                     sample_size=sample_size, chunk_size=chunk_size)
  chunks = _to_chunks(points, mask, chunk_size)
  counts = jnp.sum(mask, axis=1, dtype=jnp.int32)

  def cond(state):
    _, _, _, converged, step = state
    return (step < max_iters) & ~jnp.all(converged)

  def body(state):
    params, prev, num_iters, converged, step = state
    stats = _sum_chunks(_class_stats, frame, params, chunks)
    loglik = stats.loglik / jnp.maximum(stats.counts, 1)
    active = ~converged
    params = _select(active, m_step(stats, floor), params)
    # sklearn's rule: stop once the mean log-likelihood per point moves by less than tol.
    converged = converged | (jnp.abs(loglik - prev) < tol)
    prev = jnp.where(active, loglik, prev)
    return params, prev, num_iters + active, converged, step + 1

  init = (params, jnp.full(counts.shape, -jnp.inf), jnp.zeros_like(counts), counts == 0, 0)
  params, mean_loglik, num_iters, converged, _ = lax.while_loop(cond, body, init)
  params = _to_original(frame, params, counts)
  info = _info(num_iters, converged, mean_loglik, counts, frame)
  return (params, info) if return_info else params
