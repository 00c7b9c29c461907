"""Pseudo-labels for self-training: confidence threshold and spatial prior (METHOD §6).

A target prediction becomes a pseudo-label where the softmax confidence reaches
the threshold; then, per class c, every 8-connected region of c smaller than
N_c pixels is dropped (the "spatial aggregation prior": a class that covers
large areas in the source, like road, should not appear as small specks).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from depthuda.data.labels import IGNORE_LABEL

# 8-connectivity: diagonal neighbours join a region.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# N_c spans [SMALLEST_REGION, LARGEST_REGION] between the rarest and the most
# frequent source class, as in the original.
SMALLEST_REGION = 50
LARGEST_REGION = 5000


def confident_labels(probs: jax.Array, threshold: float = 0.9,
                     ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """Argmax labels where the top probability reaches `threshold`, else ignore.

  Jit-able, so the stage can threshold on device and fetch only uint8 maps.

  Args:
    probs: [..., H, W, C] softmax probabilities (C <= 255).
    threshold: minimum confidence kept (a pixel with max prob < threshold
      becomes `ignore_label`).
    ignore_label: value written for unconfident pixels.

  Returns:
    [..., H, W] uint8.
  """
  labels = jnp.argmax(probs, axis=-1)
  confident = jnp.max(probs, axis=-1) >= threshold
  return jnp.where(confident, labels, ignore_label).astype(jnp.uint8)


def spatial_prior(labels: Any, min_region_sizes: Any,
                  ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """Drops 8-connected regions of class c smaller than min_region_sizes[c] pixels.

  Runs on the host (scipy connected components). Values outside [0, C) (the
  ignore label included) are left as they are.

  Args:
    labels: [H, W] integer pseudo-labels.
    min_region_sizes: [C] N_c; a region of exactly N_c pixels is kept.
    ignore_label: value written over dropped regions.

  Returns:
    [H, W] array of the dtype of `labels`.
  """
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f'spatial_prior expects [H, W] labels, got shape {labels.shape}.')
  sizes = np.asarray(min_region_sizes)
  refined = labels.copy()
  for class_id in range(sizes.shape[0]):
    class_mask = labels == class_id
    if not class_mask.any():
      continue
    regions, _ = ndimage.label(class_mask, structure=_EIGHT_CONNECTED)
    region_size = np.bincount(regions.ravel())
    too_small = region_size < sizes[class_id]
    too_small[0] = False  # index 0 is the background of `class_mask`
    refined[too_small[regions]] = ignore_label
  return refined


def min_region_sizes(pixel_counts: Any) -> np.ndarray:
  """N_c = round(50 + 4950 * (n_c - n_min) / (n_max - n_min)) from source pixel counts.

  n_min and n_max are taken over the classes that occur (n_c > 0). A class
  absent from the source gets the smallest size, 50: nothing is known about
  its extent, and letting it shift n_min to 0 would change every other N_c.
  If all occurring classes have the same count (or none occurs), all get 50.
  Rounding is half up.

  Args:
    pixel_counts: [C] non-negative per-class pixel counts of the source set.

  Returns:
    [C] int64.
  """
  counts = np.asarray(pixel_counts, np.float64)
  if counts.ndim != 1 or np.any(counts < 0):
    raise ValueError(f'pixel_counts must be a 1-D array of non-negative counts, got {counts}.')
  sizes = np.full(counts.shape, float(SMALLEST_REGION))
  present = counts > 0
  if present.any():
    n_min, n_max = counts[present].min(), counts[present].max()
    if n_max > n_min:
      scale = (LARGEST_REGION - SMALLEST_REGION) / (n_max - n_min)
      sizes[present] = SMALLEST_REGION + scale * (counts[present] - n_min)
  return np.floor(sizes + 0.5).astype(np.int64)
