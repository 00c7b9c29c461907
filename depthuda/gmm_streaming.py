"""EM over point sets too large for one array: the data streamed through every iteration.

`fit_streaming` runs `gmm.fit`'s EM (same initialisation, E-step, M-step and stopping rule) on
chunks that a callable yields anew for each iteration, sums the E-step statistics over chunks,
devices and processes, and can stop and continue (`EMState`) with the result of an
uninterrupted fit. It builds on gmm.py's frame and statistics helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from depthuda import gmm
from depthuda.gmm import GMMParams
from depthuda.gmm import SufficientStats

# pylint: disable=protected-access  # gmm's frame and statistics helpers, shared in the package.

# fit_streaming sums up to this many pieces of `chunk_size` points per jitted call.
_PIECES_PER_CALL = 16


def _piece_stacks(points, mask, size: int):
  """A chunk cut along N into pieces of `size` points, in stacks of up to _PIECES_PER_CALL.

  Yields points [G, ..., D, size] and mask [G, C, size] (numpy, the layout `_sum_chunks`
  takes), G a power of two so that a few compilations serve every chunk length; the padding
  (points and whole pieces) is masked. The transposition happens here, on the host: inside the
  jitted call XLA fuses it into the loop's loads, which almost doubles the call's time.
  """
  num_points = points.shape[-2]
  num_pieces = -(-num_points // size)
  for first in range(0, num_pieces, _PIECES_PER_CALL):
    group = 1 << (min(_PIECES_PER_CALL, num_pieces - first) - 1).bit_length()
    lo, hi = first * size, (first + group) * size
    p, m = np.asarray(points[..., lo:hi, :]), np.asarray(mask[..., lo:hi])
    pad = hi - lo - p.shape[-2]
    p = np.pad(p, [(0, 0)] * (p.ndim - 2) + [(0, pad), (0, 0)])
    m = np.pad(m, [(0, 0), (0, pad)])
    p = np.moveaxis(p.reshape(p.shape[:-2] + (group, size, p.shape[-1])), -3, 0)
    yield (np.ascontiguousarray(np.swapaxes(p, -1, -2)),
           np.ascontiguousarray(m.reshape(len(m), group, size).swapaxes(0, 1)))


@jax.jit
def _stack_stats(frame: gmm._Frame, params: GMMParams, points, mask) -> SufficientStats:
  """Soft stats summed over a stack from `_piece_stacks`: points [G, ..., D, n], mask [G, C, n]."""
  return gmm._sum_chunks(gmm._class_stats, frame, params,
                         (points.astype(jnp.float32), mask.astype(bool)))


@flax.struct.dataclass
class EMState:
  """Where `fit_streaming` stands after `iteration` EM iterations (numpy values).

  params are in the per-class standardised frame, which `fit_streaming` derives again from
  (init_points, init_mask, seed): continuing from an EMState gives exactly the result of an
  uninterrupted fit.
  """
  iteration: int
  params: GMMParams
  prev_loglik: np.ndarray  # [C] mean log-likelihood of the last iteration a class was active
  num_iters: np.ndarray    # [C] int32
  converged: np.ndarray    # [C] bool
  counts: np.ndarray       # [C] points per class in the stream

  def to_arrays(self) -> dict[str, np.ndarray]:
    """Flat numpy arrays, e.g. for `np.savez`; inverse of `from_arrays`."""
    return {'iteration': np.asarray(self.iteration), 'weights': np.asarray(self.params.weights),
            'means': np.asarray(self.params.means),
            'variances': np.asarray(self.params.variances), 'prev_loglik': self.prev_loglik,
            'num_iters': self.num_iters, 'converged': self.converged, 'counts': self.counts}

  @classmethod
  def from_arrays(cls, arrays) -> EMState:
    return cls(int(arrays['iteration']),
               GMMParams(*(jnp.asarray(arrays[k]) for k in ('weights', 'means', 'variances'))),
               *(np.asarray(arrays[k]) for k in ('prev_loglik', 'num_iters', 'converged',
                                                 'counts')))


def fit_streaming(chunks: Callable[[], Iterable[tuple[jax.Array, jax.Array]]],
                  init_points: jax.Array, init_mask: jax.Array, num_components: int = 5,
                  seed: int = 0, max_iters: int = 100, tol: float = 1e-3,
                  var_floor: float = 1e-6,
                  reduce_fn: Callable[[SufficientStats], SufficientStats] | None = None, *,
                  num_inits: int = 4, kmeans_iters: int = 100, sample_size: int = 16384,
                  chunk_size: int = 8192,
                  progress: Callable[[int, float], None] | None = None,
                  resume: EMState | None = None,
                  on_iteration: Callable[[EMState], None] | None = None
                  ) -> tuple[GMMParams, dict]:
  """EM whose every iteration streams the data: for point sets too large for one array.

  Args:
    chunks: called once per EM iteration; yields (points, mask) with points [C, n, D] or [n, D]
      (one set shared by all classes, e.g. from `density.class_points`) and mask [C, n] bool. n may vary
      between chunks: each is cut into zero-padded pieces of `chunk_size` points.
    init_points, init_mask: [C, M, D], [C, M] in-memory sample (e.g. a uniform subsample of
      every class) for the standardisation frame and the k-means++ / Lloyd initialisation.
      Every class with points in `chunks` should have points here. On several hosts it must be
      the same everywhere.
    reduce_fn: applied to this process's summed SufficientStats once per iteration; must return
      the global sum, identical on every process (default: identity, one process).
    progress: called after each iteration as progress(iteration, mean_log_likelihood).
    resume: an EMState that `on_iteration` received from an earlier call with the same data,
      initial sample and arguments: EM continues from there (identical result to not stopping).
    on_iteration: called with the EMState after every iteration (e.g. to save it).
    Other arguments as in `fit`.
  Returns:
    (GMMParams in the original coordinates, info dict as in `fit`, numpy values).
  """
  reduce_fn = reduce_fn or (lambda stats: stats)
  frame, floor, params = gmm._initialise(
      jnp.asarray(init_points, jnp.float32), jnp.asarray(init_mask, bool), seed,
      var_floor, kmeans_iters, num_components=num_components, num_inits=num_inits,
      sample_size=sample_size, chunk_size=chunk_size)
  counts = np.sum(np.asarray(init_mask, bool), axis=1)  # replaced by the stream's own counts
  prev = np.full(counts.shape, -np.inf)
  num_iters = np.zeros(counts.shape, np.int32)
  converged = counts == 0
  first = 0
  if resume is not None:
    if resume.params.means.shape != params.means.shape:
      raise ValueError(f'fit_streaming: the EM state to resume has means of shape '
                       f'{resume.params.means.shape}, expected {params.means.shape}')
    params = resume.params
    prev, num_iters, converged, counts = (np.asarray(a) for a in (
        resume.prev_loglik, resume.num_iters, resume.converged, resume.counts))
    first = max_iters if converged.all() else resume.iteration  # a finished fit: no iteration
  for step in range(first, max_iters):
    stats = None
    for points, mask in chunks():
      for p, m in _piece_stacks(points, mask, chunk_size):
        part = _stack_stats(frame, params, p, m)
        stats = part if stats is None else stats + part
    if stats is None:
      raise ValueError('fit_streaming: chunks() yielded no data')
    stats = reduce_fn(stats)
    if step == 0:
      counts = np.asarray(stats.counts)
      converged = counts == 0
    loglik = np.asarray(stats.loglik) / np.maximum(counts, 1)
    active = ~converged
    params = gmm._select(jnp.asarray(active), gmm.m_step(stats, floor), params)
    converged = converged | (np.abs(loglik - prev) < tol)
    prev = np.where(active, loglik, prev)
    num_iters += active
    if on_iteration is not None:
      on_iteration(EMState(step + 1, jax.device_get(params), prev.copy(), num_iters.copy(),
                           converged.copy(), counts.copy()))
    if progress is not None:
      info = gmm._info(num_iters, converged, prev, counts, frame)
      progress(step + 1, float(info['mean_log_likelihood']))
    if converged.all():
      break
  info = jax.tree.map(np.asarray, gmm._info(num_iters, converged, prev, counts, frame))
  return gmm._to_original(frame, params, jnp.asarray(counts)), info
