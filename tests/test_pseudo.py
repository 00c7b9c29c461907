"""Tests for depthuda.pseudo: confidence threshold, spatial prior, region sizes."""

from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthuda import pseudo


def _flood_fill_prior(labels, sizes, ignore_label=255):
  """Independent reference: BFS over 8-neighbours, one region at a time."""
  height, width = labels.shape
  out = labels.copy()
  seen = np.zeros(labels.shape, bool)
  for y in range(height):
    for x in range(width):
      c = labels[y, x]
      if seen[y, x] or not 0 <= c < len(sizes):
        continue
      region, queue = [], deque([(y, x)])
      seen[y, x] = True
      while queue:
        i, j = queue.popleft()
        region.append((i, j))
        for di in (-1, 0, 1):
          for dj in (-1, 0, 1):
            ni, nj = i + di, j + dj
            if (0 <= ni < height and 0 <= nj < width and not seen[ni, nj]
                and labels[ni, nj] == c):
              seen[ni, nj] = True
              queue.append((ni, nj))
      if len(region) < sizes[c]:
        for i, j in region:
          out[i, j] = ignore_label
  return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_spatial_prior_matches_flood_fill(seed):
  rng = np.random.default_rng(seed)
  # Blocky maps (upsampled noise) so regions of many sizes occur.
  coarse = rng.integers(0, 5, size=(12, 16))
  labels = np.kron(coarse, np.ones((3, 3), np.int64))[:31, :45]
  labels = np.where(rng.random(labels.shape) < 0.08, rng.integers(0, 5, labels.shape), labels)
  labels[rng.random(labels.shape) < 0.05] = 255
  labels = labels.astype(np.uint8)
  sizes = rng.integers(1, 40, size=5)
  got = pseudo.spatial_prior(labels, sizes)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, _flood_fill_prior(labels, sizes))
  assert (got == 255).sum() > (labels == 255).sum()  # the test exercises dropping


def test_spatial_prior_uses_eight_connectivity():
  # A diagonal of three pixels: one 8-connected region of 3, three 4-connected of 1.
  labels = np.full((4, 4), 1, np.int32)
  for i in range(3):
    labels[i, i] = 0
  kept = pseudo.spatial_prior(labels, [3, 1])
  np.testing.assert_array_equal(kept, labels)  # size 3 is not smaller than 3
  dropped = pseudo.spatial_prior(labels, [4, 1])
  assert np.all(dropped[labels == 0] == 255)
  assert np.all(dropped[labels == 1] == 1)


def test_spatial_prior_leaves_ignore_and_unknown_values():
  labels = np.array([[255, 0, 9], [0, 0, 9]], np.int64)
  out = pseudo.spatial_prior(labels, [10, 10], ignore_label=255)
  np.testing.assert_array_equal(out, [[255, 255, 9], [255, 255, 9]])
  np.testing.assert_array_equal(labels, [[255, 0, 9], [0, 0, 9]])  # input untouched


def test_confident_labels_threshold():
  probs = np.array([[[0.95, 0.05], [0.5, 0.5]],
                    [[0.1, 0.9], [0.2, 0.8]]], np.float32)
  got = jax.jit(pseudo.confident_labels)(probs)
  assert got.dtype == jnp.uint8
  np.testing.assert_array_equal(got, [[0, 255], [1, 255]])
  np.testing.assert_array_equal(pseudo.confident_labels(probs, threshold=0.5), [[0, 0], [1, 1]])


def test_min_region_sizes_closed_form():
  counts = np.array([10, 1000, 505, 257.5, 0])
  sizes = pseudo.min_region_sizes(counts)
  assert sizes.dtype == np.int64
  # n_min -> 50, n_max -> 5000, midpoint -> 2525, quarter -> 1287.5 rounded up to 1288.
  np.testing.assert_array_equal(sizes, [50, 5000, 2525, 1288, 50])


def test_min_region_sizes_degenerate_counts():
  np.testing.assert_array_equal(pseudo.min_region_sizes([7, 7, 0]), [50, 50, 50])
  np.testing.assert_array_equal(pseudo.min_region_sizes([0, 0]), [50, 50])
  with pytest.raises(ValueError):
    pseudo.min_region_sizes([1, -1])


def test_pseudo_label_stage_refines_with_the_prior_or_keeps_the_confidence_rule():
  """pseudo.spatial_prior off: the stage's pseudo-labels are the confident labels themselves."""
  from configs import test as test_config
  from depthuda.stages import pseudo_label
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, (12, 14)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.2] = 255
  sizes = np.array([4, 40, 2])
  config = test_config.get_config()
  with_prior = pseudo_label.refine(labels, sizes, config)
  np.testing.assert_array_equal(with_prior, _flood_fill_prior(labels, sizes))
  assert (with_prior != labels).any()  # the test would see a prior that does nothing
  config.pseudo.spatial_prior = False
  np.testing.assert_array_equal(pseudo_label.refine(labels, sizes, config), labels)
