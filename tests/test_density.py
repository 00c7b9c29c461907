"""Tests for depthuda.density: nearest resize and the density targets of METHOD §4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthuda import density
from depthuda import gmm

B, H, W, C, K = 2, 5, 7, 4, 3


def _params(seed=0):
  """Class GMMs on the 5 x 7 grid whose densities span g's range for scale 1e3."""
  rng = np.random.default_rng(seed)
  weights = rng.dirichlet(np.ones(K), C).astype(np.float32)
  means = rng.uniform([0, 0, 0], [W, H, 6], (C, K, 3)).astype(np.float32)
  variances = rng.uniform([1, 1, 0.5], [9, 6, 4], (C, K, 3)).astype(np.float32)
  return gmm.GMMParams(weights=jnp.asarray(weights), means=jnp.asarray(means),
                       variances=jnp.asarray(variances))


def _numpy_density(params, c, x, y, z):
  """sum_k w_ck prod_h N(v_h; mu_ckh, var_ckh), one component and one dimension at a time."""
  weights, means, variances = (np.asarray(a, np.float64) for a in jax.tree.leaves(params))
  total = 0.0
  for k in range(weights.shape[1]):
    term = weights[c, k]
    for h, v in enumerate((x, y, z)):
      var = variances[c, k, h]
      term *= np.exp(-(v - means[c, k, h]) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)
    total += term
  return total


def _numpy_targets(params, logits, z_of, scale, zero_where_nonpositive):
  """The original's way: every class's density at every cell, then the predicted class's."""
  out = np.zeros((B, H, W))
  for b in range(B):
    for i in range(H):
      for j in range(W):
        z = z_of(b, i, j, np.argmax(logits[b, i, j]))
        per_class = [_numpy_density(params, c, j, i, z) for c in range(C)]
        p = per_class[np.argmax(logits[b, i, j])]
        out[b, i, j] = 255 * (1 - np.exp(-scale * p))
        if zero_where_nonpositive and z <= 0:
          out[b, i, j] = 0
  return out


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, H, W, C)).astype(np.float32)
  labels = np.where(rng.random((B, H, W)) < 0.5, np.argmax(logits, -1),
                    rng.integers(0, C, (B, H, W)))
  labels[0, 0, :3] = 255
  depth = rng.uniform(0.5, 6, (B, H, W)).astype(np.float32)
  return logits, labels.astype(np.int32), depth


def test_density_targets_at_inverse_depth_65536():
  """SYNTHIA's raw depth 0 is inverse depth 65,536; the original's GMMs have components there
  (and at 64,270 for rider) with variance 1e-6. Both targets match float64 at those depths."""
  params = _params()
  means, variances = np.array(params.means), np.array(params.variances)
  means[0, 0, 2], variances[0, 0, 2] = 65536.0, 1e-6
  means[1, 0, 2], variances[1, 0, 2] = 64270.0, 1e-6
  params = gmm.GMMParams(weights=params.weights, means=jnp.asarray(means),
                         variances=jnp.asarray(variances))
  logits, labels, depth = _inputs()
  depth[0, :, :3] = 65536.0
  depth[1, :, 2:] = 64270.0
  depth[1, 0, 0] = 65536.0 + 1 / 128  # one float32 step above: 6e4 standard deviations off
  got = density.source_density_target(params, logits, labels, depth, 1e3)
  correct = lambda b, i, j, c: depth[b, i, j] if labels[b, i, j] == c else 0.0
  expected = _numpy_targets(params, logits, correct, 1e3, False)
  assert np.all(np.isfinite(got)) and expected.max() > 100  # the 1e-6 peaks are reached
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
  got = density.target_density_target(params, logits, depth, 1e3)
  expected = _numpy_targets(params, logits, lambda b, i, j, c: depth[b, i, j], 1e3, True)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('scale', [1e3, 1e6])
def test_source_density_target_matches_loop(scale):
  params = _params()
  logits, labels, depth = _inputs()
  ours = np.asarray(jax.jit(density.source_density_target)(params, logits, labels, depth, scale))
  expected = _numpy_targets(
      params, logits, lambda b, i, j, c: depth[b, i, j] if labels[b, i, j] == c else 0.0, scale,
      zero_where_nonpositive=False)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-3)
  if scale == 1e3:  # the check covers g's whole range, not only its saturation
    assert ours.min() < 50 and ours.max() > 200 and np.mean((ours > 5) & (ours < 250)) > 0.3


def test_target_density_target_matches_loop():
  params = _params(2)
  logits, _, depth = _inputs(3)
  depth[0, 1, :4] = [0.0, -1.0, 0.0, -0.5]  # no target where the predicted depth is not positive
  ours = np.asarray(jax.jit(density.target_density_target)(params, logits, depth, 1e3))
  expected = _numpy_targets(params, logits, lambda b, i, j, c: depth[b, i, j], 1e3,
                            zero_where_nonpositive=True)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(ours[0, 1, :4], 0.0)


def test_targets_carry_no_gradient():
  params = _params()
  logits, labels, depth = _inputs()

  def total(logits, depth):
    return (density.target_density_target(params, logits, depth, 1e3).sum()
            + density.source_density_target(params, logits, labels, depth, 1e3).sum())

  grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(logits), jnp.asarray(depth))
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_density_to_target():
  p = jnp.array([0.0, 1e-9, 1e-6, 1.0])
  np.testing.assert_allclose(np.asarray(density.density_to_target(p)),
                             255 * (1 - np.exp(-1e6 * np.asarray(p, np.float64))), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(density.density_to_target(p, 1.0)),
                             255 * -np.expm1(-np.asarray(p, np.float64)), rtol=1e-5)
