"""Density targets on the feature grid (METHOD §4), computed on device inside the train step.

The density head learns g(density_c(x, y, z)) with g(p) = 255 (1 - exp(-scale p)), scale = 1e6:
c is the class the segmenter currently predicts at a cell, (x, y) = (column, row) of the cell on
the feature grid (0-based) and z an inverse depth, and density_c the class's GMM (`gmm.py`). The
original precomputed one density map per class for every source image with a per-pixel loop;
here a whole batch is a handful of vectorised ops. The GMMs' points are the grid cells as
`grid_points` lays them out.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from depthuda import gmm


def grid_points(depth_grid: jax.Array) -> jax.Array:
  """(x, y, z) of every grid cell: depth_grid [..., h, w] -> [..., h, w, 3]; x = column, y = row."""
  z = depth_grid.astype(jnp.float32)
  cols = jnp.broadcast_to(jnp.arange(z.shape[-1], dtype=jnp.float32), z.shape)
  rows = jnp.broadcast_to(jnp.arange(z.shape[-2], dtype=jnp.float32)[:, None], z.shape)
  return jnp.stack([cols, rows, z], axis=-1)


def class_points(label_grid: jax.Array, depth_grid: jax.Array,
                 num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Grid cells as fit input: label_grid, depth_grid [B, h, w] -> points [B*h*w, 3] (shared by
  all classes), mask [C, B*h*w] (cell of class c; 255 and other labels are in no class)."""
  points = grid_points(depth_grid).reshape(-1, 3)
  mask = label_grid.reshape(1, -1) == jnp.arange(num_classes)[:, None]
  return points, mask


def density_to_target(p: jax.Array, scale: float = 1e6) -> jax.Array:
  """g(p) = 255 (1 - exp(-scale p)); expm1 keeps small densities exact in float32."""
  return -255.0 * jnp.expm1(-scale * p)


def _class_density_target(params: gmm.GMMParams, class_ids: jax.Array, z: jax.Array,
                          scale: float) -> jax.Array:
  """g(density_c(x, y, z)) at every cell: class_ids, z [B, h, w] -> [B, h, w]."""
  log_p = gmm.log_density(params, grid_points(z), class_ids)
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
