"""Tests for depthuda.gmm and gmm_streaming: EM against sklearn, masking, streaming, densities."""

import jax
import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture

from depthuda import density
from depthuda import gmm
from depthuda import gmm_streaming

K = 5
# One padded shape for most tests, so the jitted fit compiles once for the file.
COUNTS = [500, 1200, 800]


def _well_separated(counts, seed=0):
  """Padded [C, N, 3] points at the real scale (x < 161, y < 96, z up to ~300) and the mask."""
  rng = np.random.default_rng(seed)
  centers = np.array([[20, 10, 2], [140, 80, 50], [80, 50, 200], [30, 85, 120], [150, 15, 280]],
                     np.float64)
  points = np.zeros((len(counts), max(counts), 3), np.float32)
  mask = np.zeros((len(counts), max(counts)), bool)
  for c, n in enumerate(counts):
    shifted = centers + rng.normal(0, 3, centers.shape)
    stds = rng.uniform(0.5, 4, centers.shape)
    comp = rng.integers(0, K, n)
    points[c, :n] = shifted[comp] + rng.standard_normal((n, 3)) * stds[comp]
    mask[c, :n] = True
  return points, mask


def _numpy_log_density(params, x, c):
  """log sum_k w_k prod_h N(x_h; mu_kh, var_kh) for one point x [D] of class c, in float64."""
  w, mu, var = (np.asarray(a, np.float64)[c] for a in (params.weights, params.means,
                                                       params.variances))
  log_terms = np.log(w) - 0.5 * np.sum(np.log(2 * np.pi * var) + (x - mu) ** 2 / var, axis=-1)
  return logsumexp(log_terms)


def _assert_params_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_fit_matches_sklearn_loglik():
  counts = COUNTS
  points, mask = _well_separated(counts)
  params, info = gmm.fit(points, mask, num_components=K, seed=0, tol=1e-3, var_floor=1e-6,
                         return_info=True)
  ours = np.asarray(gmm.mean_log_likelihood(params, points, mask))
  assert bool(np.all(info['converged']))
  for c, n in enumerate(counts):
    x = points[c, :n].astype(np.float64)
    reference = GaussianMixture(K, covariance_type='diag', tol=1e-3, reg_covar=1e-6,
                                random_state=0).fit(x)
    assert abs(ours[c] - reference.score(x)) < 0.01
  np.testing.assert_allclose(np.asarray(params.weights).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(info['class_mean_log_likelihood']), ours, atol=0.01)


def _separated_scales(num_classes, n, seed):
  """[C, n, 3] points: per class K clusters on distinct cells of a coarse lattice over the real
  range, with standard deviations from 0.2 to 6 (log-uniform, per dimension) and uneven weights."""
  rng = np.random.default_rng(seed)
  lattice = np.stack(np.meshgrid([20, 60, 100, 140], [12, 48, 84], [10, 80, 150, 220, 290],
                                 indexing='ij'), -1).reshape(-1, 3)
  points = np.zeros((num_classes, n, 3), np.float32)
  for c in range(num_classes):
    centers = lattice[rng.choice(len(lattice), K, replace=False)] + rng.uniform(-5, 5, (K, 3))
    stds = np.exp(rng.uniform(np.log(0.2), np.log(6.0), (K, 3)))
    comp = rng.choice(K, n, p=rng.dirichlet(np.full(K, 2.0)))
    points[c] = centers[comp] + rng.standard_normal((n, 3)) * stds[comp]
  return points


def test_fit_from_its_own_initialisation_reaches_sklearn():
  """On every class of fresh data, `fit` with its defaults ends at least as high as sklearn's
  GaussianMixture with its defaults (k-means initialisation): no merged components."""
  num_classes, n = 8, 2000
  mask = np.ones((num_classes, n), bool)
  for seed in range(6):
    points = _separated_scales(num_classes, n, seed)
    ours = np.asarray(gmm.mean_log_likelihood(gmm.fit(points, mask, num_components=K, seed=seed),
                                              points, mask))
    for c in range(num_classes):
      x = points[c].astype(np.float64)
      reference = GaussianMixture(K, covariance_type='diag', random_state=seed).fit(x).score(x)
      assert ours[c] >= reference - 0.01, (seed, c, ours[c], reference)


def test_masked_values_have_no_influence():
  points, mask = _well_separated(COUNTS, seed=1)
  params = gmm.fit(points, mask, num_components=K, seed=3)
  rng = np.random.default_rng(1)
  for garbage in (1e7 * rng.standard_normal(points.shape), np.full(points.shape, np.nan),
                  np.full(points.shape, -np.inf)):
    noisy = np.where(mask[..., None], points, garbage).astype(np.float32)
    other = gmm.fit(noisy, mask, num_components=K, seed=3)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(other)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fit_streaming_equals_fit():
  points, mask = _well_separated(COUNTS, seed=2)
  expected, expected_info = gmm.fit(points, mask, num_components=K, seed=5, return_info=True)
  bounds = [0, 150, 600, 601, 1200]  # uneven chunks, one of a single point

  def chunks():
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      yield points[:, lo:hi], mask[:, lo:hi]

  seen = []
  params, info = gmm_streaming.fit_streaming(chunks, points, mask, num_components=K, seed=5,
                                             progress=lambda step, ll: seen.append((step, ll)))
  _assert_params_close(params, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(info['class_iterations'],
                                np.asarray(expected_info['class_iterations']))
  assert [s for s, _ in seen] == list(range(1, int(info['iterations']) + 1))
  assert abs(seen[-1][1] - float(info['mean_log_likelihood'])) < 1e-6


def test_fit_streaming_resumed_equals_uninterrupted():
  """EM cut off after 3 iterations and continued from the EMState (through its numpy arrays,
  as the fit_gmm stage stores it) ends exactly where an uninterrupted fit ends."""
  # One broad Gaussian per class fitted with K components: EM takes many small steps.
  rng = np.random.default_rng(3)
  points = (rng.standard_normal((3, 1200, 3)) * [40, 25, 90] + [80, 48, 150]).astype(np.float32)
  mask = np.ones((3, 1200), bool)
  chunks = lambda: [(points[:, :700], mask[:, :700]), (points[:, 700:], mask[:, 700:])]
  states = []
  expected, expected_info = gmm_streaming.fit_streaming(
      chunks, points, mask, num_components=K, seed=2, tol=1e-6, max_iters=30,
      on_iteration=states.append)
  assert [s.iteration for s in states] == list(range(1, int(expected_info['iterations']) + 1))
  assert int(expected_info['iterations']) > 4
  saved = gmm_streaming.EMState.from_arrays(
      {k: np.copy(v) for k, v in states[2].to_arrays().items()})
  later = []
  params, info = gmm_streaming.fit_streaming(
      chunks, points, mask, num_components=K, seed=2, tol=1e-6, max_iters=30, resume=saved,
      on_iteration=later.append)
  assert later[0].iteration == 4
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  jax.tree.map(np.testing.assert_array_equal, info, expected_info)
  # Resuming from the last state returns the same fit without another iteration.
  final, _ = gmm_streaming.fit_streaming(
      chunks, points, mask, num_components=K, seed=2, tol=1e-6, max_iters=30, resume=states[-1],
      on_iteration=lambda s: pytest.fail('iterated again'))
  jax.tree.map(np.testing.assert_array_equal, final, expected)


def test_fit_streaming_on_shared_grid_points():
  """Chunks of grid cells shared by all classes (density.class_points) give the per-class fit."""
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 4, (6, 12, 20))
  labels[labels == 3] = 255  # ignore: in no class
  labels[:, :6] = np.where(labels[:, :6] == 0, 1, labels[:, :6])
  depth = rng.gamma(2.0, 10.0, labels.shape).astype(np.float32) + 1
  num_classes = 3
  points, mask = density.class_points(labels, depth, num_classes)
  per_class = np.broadcast_to(np.asarray(points), (num_classes,) + points.shape).copy()
  # The k-means starts run on a sample of each class's points (fewer than it has).
  expected = gmm.fit(per_class, np.asarray(mask), num_components=3, seed=1, sample_size=200)

  def chunks():
    for i in range(0, 6, 2):
      yield density.class_points(labels[i:i + 2], depth[i:i + 2], num_classes)

  params, _ = gmm_streaming.fit_streaming(chunks, per_class, np.asarray(mask), num_components=3,
                                          seed=1, sample_size=200)
  _assert_params_close(params, expected, rtol=1e-4, atol=1e-4)
  # Cell (row 2, column 7) of image 1 is the point (7, 2, depth).
  index = 1 * 12 * 20 + 2 * 20 + 7
  np.testing.assert_allclose(np.asarray(points[index]), [7, 2, depth[1, 2, 7]])


def test_initial_sample_spreads_over_each_class():
  """The k-means sample: `size` distinct points of the class, spread over its whole order, or
  all its points where it has fewer; nothing from under the mask."""
  rng = np.random.default_rng(11)
  n, size = 500, 40
  mask = np.zeros((3, n), bool)
  mask[1, rng.choice(n, 25, replace=False)] = True
  mask[2, rng.choice(n, 400, replace=False)] = True
  index = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None], (3, n, 3))
  points = np.where(mask[..., None], index, np.nan).astype(np.float32)
  sample, valid = (np.asarray(a) for a in gmm._sample(jax.random.key(0), points, mask, size))
  assert sample.shape == (3, size, 3) and valid.sum(1).tolist() == [0, 25, size]
  np.testing.assert_array_equal(sample[~valid], 0.0)
  np.testing.assert_array_equal(sample[1, :25, 0], np.flatnonzero(mask[1]))
  ranks = np.searchsorted(np.flatnonzero(mask[2]), sample[2, :, 0])
  np.testing.assert_array_equal(np.flatnonzero(mask[2])[ranks], sample[2, :, 0])  # class points
  assert set(np.diff(ranks).tolist()) <= {9, 10, 11} and ranks[0] < 10  # every 10th, from start


def test_stats_add_over_chunks():
  points, mask = _well_separated(COUNTS, seed=6)
  params = gmm.fit(points, mask, num_components=K, max_iters=2)
  whole = gmm.accumulate(params, points, mask)
  halves = (gmm.accumulate(params, points[:, :123], mask[:, :123])
            + gmm.accumulate(params, points[:, 123:], mask[:, 123:]))
  _assert_params_close(halves, whole, rtol=1e-4, atol=1e-3)
  _assert_params_close(gmm.m_step(halves, 1e-6), gmm.m_step(whole, 1e-6), rtol=1e-4, atol=1e-4)


def test_stacked_pieces_sum_to_the_whole():
  """fit_streaming's stacks of pieces: 21 pieces of 64 points make a stack of 16 and one of 8
  (3 of them padding); their stats add up to those of all points at once, per class."""
  points, mask = _well_separated([1300, 700, 1349], seed=9)
  points = np.where(mask[..., None], points, np.nan).astype(np.float32)  # padding is ignored
  params = gmm.fit(np.nan_to_num(points), mask, num_components=K, max_iters=2)
  frame = gmm._Frame(offset=np.zeros((3, 3), np.float32), scale=np.ones((3, 3), np.float32))
  stacks = list(gmm_streaming._piece_stacks(points, mask, 64))
  assert [m.shape for _, m in stacks] == [(16, 3, 64), (8, 3, 64)]
  assert [p.shape for p, _ in stacks] == [(16, 3, 3, 64), (8, 3, 3, 64)]
  total = sum((gmm_streaming._stack_stats(frame, params, *stack) for stack in stacks[1:]),
              gmm_streaming._stack_stats(frame, params, *stacks[0]))
  whole = gmm.accumulate(params, np.nan_to_num(points), mask)
  np.testing.assert_array_equal(np.asarray(total.counts), mask.sum(1))
  _assert_params_close(total, whole, rtol=1e-4, atol=1e-3)


def test_log_density_matches_numpy():
  rng = np.random.default_rng(7)
  c_num, d = 4, 3
  weights = rng.dirichlet(np.ones(K), c_num).astype(np.float32)
  means = rng.uniform([0, 0, 1], [161, 96, 300], (c_num, K, d)).astype(np.float32)
  variances = rng.uniform(1, 400, (c_num, K, d)).astype(np.float32)
  variances[0, 0] = 1e-6  # a collapsed component
  params = gmm.GMMParams(weights=weights, means=means, variances=variances)
  x = rng.uniform([0, 0, 0], [161, 96, 300], (2, 9, d)).astype(np.float32)
  x[0, 0] = means[0, 0]
  class_ids = rng.integers(0, c_num, (2, 9))
  class_ids[0, 0] = 0
  ours = np.asarray(gmm.log_density(params, x, class_ids))
  expected = np.array([[_numpy_log_density(params, x[i, j], class_ids[i, j]) for j in range(9)]
                       for i in range(2)])
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-3)


def test_degenerate_and_empty_classes():
  """A point mass (sky at inverse depth 1, one grid column) gets exactly var_floor; an empty
  class gets the documented default; everything stays finite."""
  rng = np.random.default_rng(8)
  n = 2000
  points = np.zeros((3, n, 3), np.float32)
  points[0, :, 0] = rng.integers(0, 161, n)
  points[0, :, 1] = rng.integers(0, 30, n)
  points[0, :, 2] = 1.0
  points[2] = rng.normal([80, 40, 20], [30, 10, 5], (n, 3))
  points[2, :, 0] = 77.0
  mask = np.ones((3, n), bool)
  mask[1] = False
  params, info = gmm.fit(points, mask, num_components=3, var_floor=1e-6, return_info=True)
  variances = np.asarray(params.variances)
  np.testing.assert_allclose(variances[0, :, 2], 1e-6, rtol=1e-3)
  np.testing.assert_allclose(variances[2, :, 0], 1e-6, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(params.means)[0, :, 2], 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(params.weights)[1], 1 / 3)
  np.testing.assert_array_equal(np.asarray(params.means)[1], 0.0)
  np.testing.assert_array_equal(variances[1], 1.0)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(params))
  assert int(info['class_iterations'][1]) == 0 and bool(info['converged'][1])
  assert np.isnan(info['class_mean_log_likelihood'][1])
  assert np.isfinite(float(info['mean_log_likelihood']))


def test_component_at_inverse_depth_65536():
  """SYNTHIA's raw depth 0 gives inverse depth 65,536: the original's GMMs of pole, sign,
  vegetation, person, car and bus have a component there with variance 1e-6. float32 EM finds
  it beside ordinary depths, finite, at exactly 65,536 with the variance floor."""
  rng = np.random.default_rng(9)
  n = 3000
  near = rng.random(n) < 0.3
  points = np.stack([rng.uniform(0, 161, n), rng.uniform(0, 96, n),
                     np.where(near, 65536.0, rng.normal(100, 20, n))], -1)[None].astype(np.float32)
  params = gmm.fit(points, np.ones((1, n), bool), num_components=3, var_floor=1e-6)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(params))
  means, variances = np.asarray(params.means)[0], np.asarray(params.variances)[0]
  (k,) = np.flatnonzero(means[:, 2] > 1000)
  assert means[k, 2] == 65536.0
  np.testing.assert_allclose(variances[k, 2], 1e-6, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(params.weights)[0, k], near.mean(), rtol=1e-4)


def test_fit_rejects_empty_point_axis():
  with pytest.raises(ValueError, match='N > 0'):
    gmm.fit(np.zeros((2, 0, 3), np.float32), np.zeros((2, 0), bool))


def test_initial_sample_does_not_depend_on_the_split_over_processes():
  """Two processes' offers, concatenated, give the sample one process takes from all images;
  it is spread over the images and classes, and capped per class."""
  from depthuda.stages import fit_gmm
  rng = np.random.default_rng(0)
  classes = rng.integers(0, 4, (6, 5, 7)).astype(np.uint8)
  classes[:, 0] = 255  # ignored cells are never sampled
  depths = rng.uniform(1, 300, classes.shape).astype(np.float16)
  whole = fit_gmm.init_sample(classes, depths, 3, 0, seed=1, per_class=20)
  offers = [fit_gmm.sample_candidates(classes[lo:hi], depths[lo:hi], 3, lo, 1, 20)
            for lo, hi in ((0, 2), (2, 6))]
  split = fit_gmm.choose_sample(*(np.concatenate(parts, 1) for parts in zip(*offers)), 20)
  for a, b in zip(whole, split):
    np.testing.assert_array_equal(a, b)
  points, mask = whole
  assert mask.sum(1).tolist() == [20, 20, 20]
  for c in range(3):  # every sampled point is a real cell of its class, no cell twice
    found = {(int(xx), int(yy), float(zz)) for xx, yy, zz in points[c]}
    assert len(found) == 20
    cells = {(xx, yy, float(depths[i, yy, xx])) for i in range(6) for yy in range(5)
             for xx in range(7) if classes[i, yy, xx] == c}
    assert found <= cells
  other = fit_gmm.init_sample(classes, depths, 3, 0, seed=2, per_class=20)
  assert not np.array_equal(other[0], whole[0])  # the seed matters
