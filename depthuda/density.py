"""Density targets on the feature grid (METHOD §4), computed on device inside the train step.

The density head learns g(density_c(x, y, z)) with g(p) = 255 (1 - exp(-scale p)), scale = 1e6:
c is the class the segmenter currently predicts at a cell, (x, y) = (column, row) of the cell on
the feature grid (0-based) and z an inverse depth, and density_c the class's GMM (`gmm.py`). The
original precomputed one density map per class for every source image with a per-pixel loop;
here a whole batch is a handful of vectorised ops.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from depthuda import gmm


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of every output index, as PyTorch's 'nearest' computes it.

  PyTorch (float32 and uint8 tensors) evaluates floor(dst * scale) in float32 with
  scale = float(in) / out, which can land one below the exact floor(dst * in / out) when that is
  an integer (e.g. 2 -> 166 at dst 83; not at 760x1280 -> 96x161 or 320x640 -> 41x81). Matching
  it keeps label and depth grids cell-for-cell identical to the original's.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize of x [B, H, W] or [B, H, W, C] to size (h, w), any dtype.

  Matches torch.nn.functional.interpolate(mode='nearest'): src = floor(dst * in / out), with
  PyTorch's float32 rounding (see `_nearest_indices`).
  """
  rows = _nearest_indices(x.shape[1], size[0])
  cols = _nearest_indices(x.shape[2], size[1])
  return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


def density_to_target(p: jax.Array, scale: float = 1e6) -> jax.Array:
  """g(p) = 255 (1 - exp(-scale p)); expm1 keeps small densities exact in float32."""
  return -255.0 * jnp.expm1(-scale * p)


def _class_density_target(params: gmm.GMMParams, class_ids: jax.Array, z: jax.Array,
                          scale: float) -> jax.Array:
  """g(density_c(x, y, z)) at every cell: class_ids, z [B, h, w] -> [B, h, w]."""
  log_p = gmm.log_density(params, gmm.grid_points(z), class_ids)
  return density_to_target(jnp.exp(log_p), scale)


def source_density_target(params: gmm.GMMParams, seg_logits: jax.Array, label_grid: jax.Array,
                          depth_grid: jax.Array, scale: float = 1e6) -> jax.Array:
  """Target of the source density head [B, h, w].

  Args:
    params: the class GMMs (C classes).
    seg_logits: [B, h, w, C] current source prediction; c = argmax.
    label_grid: [B, h, w] int ground truth on the grid (255 = ignore).
    depth_grid: [B, h, w] ground-truth inverse depth on the grid.
    scale: the 1e6 of g.
  Returns:
    g(density_c(x, y, z)) with z = the ground-truth inverse depth where the ground-truth class is
    c and 0 elsewhere (wrong or ignored cells are scored at z = 0, as in the original).
  """
  pred = jnp.argmax(seg_logits, axis=-1)
  z = jnp.where(label_grid == pred, depth_grid.astype(jnp.float32), 0.0)
  return lax.stop_gradient(_class_density_target(params, pred, z, scale))


def target_density_target(params: gmm.GMMParams, seg_logits: jax.Array, depth_pred: jax.Array,
                          scale: float = 1e6) -> jax.Array:
  """Target of the target-domain density head [B, h, w].

  Args:
    params: the class GMMs (C classes).
    seg_logits: [B, h, w, C] target prediction; c = argmax.
    depth_pred: [B, h, w] predicted inverse depth.
    scale: the 1e6 of g.
  Returns:
    g(density_c(x, y, depth_pred)) where depth_pred > 0, else 0. Both inputs are treated as
    constants (no gradient flows into the target).
  """
  pred = jnp.argmax(seg_logits, axis=-1)
  z = lax.stop_gradient(depth_pred.astype(jnp.float32))
  target = _class_density_target(params, pred, z, scale)
  return lax.stop_gradient(jnp.where(z > 0, target, 0.0))
