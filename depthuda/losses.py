"""Loss functions of the adaptation and self-training stages (METHOD §5).

Every function here is pure JAX and jit-able; shapes are static, so the
interpolation matrices of `upsample_bilinear` are built with NumPy at trace time
and enter the compiled program as constants.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from depthuda.data.labels import IGNORE_LABEL


def _interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
  """Linear interpolation weights [out_size, in_size] with align_corners=True.

  Output index i samples the input at s = i * (in - 1) / (out - 1), so the first
  and last samples of input and output coincide (PyTorch's align_corners=True;
  a single output sample reads input index 0, as PyTorch does).
  """
  if out_size > 1:
    src = np.arange(out_size, dtype=np.float64) * (in_size - 1) / (out_size - 1)
  else:
    src = np.zeros((out_size,), np.float64)
  lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  rows = np.arange(out_size)
  matrix = np.zeros((out_size, in_size), np.float64)
  # `lo == hi` at the last input sample: both weights land on one entry.
  np.add.at(matrix, (rows, lo), 1.0 - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix.astype(np.float32)


def upsample_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize with align_corners=True (the original's `nn.Upsample`).

  Separable: one [H, h] and one [W, w] matrix applied with einsum, one axis at a
  time, so the largest intermediate is [B, H, w, C] rather than a gather of
  four neighbours at the output size; 96x161 -> 1024x2048 stays cheap.

  Args:
    x: [B, h, w, C] array.
    size: output (H, W).

  Returns:
    [B, H, W, C] in the promotion of x.dtype with float32 (bfloat16 logits come
    out float32, which the losses want anyway).
  """
  out_h, out_w = size
  _, in_h, in_w, _ = x.shape
  rows = jnp.asarray(_interpolation_matrix(out_h, in_h))
  cols = jnp.asarray(_interpolation_matrix(out_w, in_w))
  # HIGHEST: on GPUs the default float32 matmul precision may be TF32, whose
  # ~1e-3 relative error would make resized logits differ from a plain lerp.
  precision = jax.lax.Precision.HIGHEST
  y = jnp.einsum('Hh,bhwc->bHwc', rows, x, precision=precision)
  return jnp.einsum('Ww,bHwc->bHWc', cols, y, precision=precision)


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def weighted_cross_entropy(logits: jax.Array,
                           labels: jax.Array,
                           class_weights: jax.Array | None = None,
                           ignore_label: int = IGNORE_LABEL,
                           axis_name: str | None = None) -> jax.Array:
  """Class-weighted softmax cross-entropy, PyTorch `CrossEntropyLoss` 'mean'.

  loss = sum_i w[y_i] * l_i / sum_i w[y_i] over valid pixels i, where
  l_i = -log softmax(logits_i)[y_i]. Without weights this is the mean over
  valid pixels. Pixels labelled `ignore_label`, or with a label outside
  [0, C), are not valid. A batch without valid pixels gives 0 (not NaN), so a
  fully ignored crop does not poison the step.

  Args:
    logits: [B, H, W, C] (any float dtype; computed in float32).
    labels: [B, H, W] int.
    class_weights: [C] or None.
    ignore_label: label value that carries no loss.
    axis_name: inside a mapped (data-parallel) function, the batch axis name: numerator and
      denominator are summed over it, so every device returns the loss of the global batch.

  Returns:
    Scalar float32.
  """
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  label_logit = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - label_logit
  if class_weights is None:
    weights = valid.astype(jnp.float32)
  else:
    weights = jnp.asarray(class_weights, jnp.float32)[safe_labels] * valid
  total_weight = _psum(jnp.sum(weights), axis_name)
  has_weight = total_weight > 0
  # The double `where` keeps the gradient finite when nothing is valid.
  return jnp.where(has_weight,
                   _psum(jnp.sum(weights * nll), axis_name) / jnp.where(has_weight, total_weight, 1.0),
                   0.0)


def berhu(pred: jax.Array, target: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Reverse Huber loss of Laina et al., as the original applies it.

  d = pred - target; c = 0.2 * max|d| over the whole batch;
  per element |d| if |d| <= c, else (d^2 + c^2) / (2c); mean over all elements.
  c is a constant for differentiation: the original takes it with `.item()`.
  When every |d| is 0, c = 0 and the loss is 0 with a finite gradient.
  A SYNTHIA pixel at raw depth 0 (inverse depth 65,536) sets c near 13,000 for the whole batch,
  as in the original, so that every ordinary pixel takes the linear branch; in float32 d^2
  (up to ~4.3e9) and the loss stay finite. Inputs are cast to float32 whatever the compute dtype.

  Args:
    pred, target: arrays of one shape (e.g. [B, H, W]).
    axis_name: inside a mapped function, the batch axis: c is the maximum and the mean is
      taken over the global batch.

  Returns:
    Scalar float32.
  """
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  abs_diff = jnp.abs(diff)
  # Stopped before the reduction: `pmax` has no derivative rule, and c needs none.
  max_abs = jnp.max(jax.lax.stop_gradient(abs_diff))
  if axis_name is not None:
    max_abs = jax.lax.pmax(max_abs, axis_name)
  c = 0.2 * max_abs
  safe_c = jnp.where(c > 0, c, 1.0)
  quadratic = (diff * diff + c * c) / (2.0 * safe_c)
  per_element = jnp.where(abs_diff <= c, abs_diff, quadratic)
  count = _psum(jnp.asarray(per_element.size, jnp.float32), axis_name)
  return _psum(jnp.sum(per_element), axis_name) / count


def bce_with_logits(logits: jax.Array, target: float | jax.Array,
                    axis_name: str | None = None) -> jax.Array:
  """Mean binary cross-entropy on logits (PyTorch `BCEWithLogitsLoss`).

  Uses max(x, 0) - x*t + log(1 + exp(-|x|)), which never overflows.

  Args:
    logits: any shape.
    target: a float (0 = source, 1 = target for the discriminator) or an
      array broadcastable to `logits`.
    axis_name: inside a mapped function, the batch axis: the mean is over the global batch.

  Returns:
    Scalar float32.
  """
  x = logits.astype(jnp.float32)
  t = jnp.asarray(target, jnp.float32)
  per_element = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  count = _psum(jnp.asarray(per_element.size, jnp.float32), axis_name)
  return _psum(jnp.sum(per_element), axis_name) / count


def entropy_map(logits: jax.Array) -> jax.Array:
  """Per-channel weighted self-information -p * log2(p) / log2(C) (ADVENT).

  Computed from log_softmax, so p = 0 gives 0 * finite = 0 rather than the
  0 * -inf = NaN of a log of the probabilities.

  Args:
    logits: [..., C] with C >= 2.

  Returns:
    [..., C] float32, each entry in [0, 1/(e ln C)].
  """
  num_classes = logits.shape[-1]
  if num_classes < 2:
    raise ValueError(f'entropy_map needs at least 2 classes, got {num_classes}.')
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.exp(log_p) * log_p / math.log(num_classes)


# What the discriminator may classify (config.loss.disc_input); the last is the method's.
DISC_INPUTS = ('softmax', 'entropy', 'entropy_depth', 'entropy_density')


def discriminator_input(mode: str, seg_logits: jax.Array, density: jax.Array, depth: jax.Array,
                        size: tuple[int, int]) -> jax.Array:
  """The discriminator's input at the input size, from grid outputs (bilinear, align corners).

  Args:
    mode: 'softmax' softmax(up(seg)) (AdaptSegNet); 'entropy' entropy_map(up(seg)) (AdvEnt);
      'entropy_depth' that times up(depth), the predicted inverse depth (DADA's fusion of
      self-information with depth); 'entropy_density' that times up(density) (the method,
      METHOD §5).
    seg_logits: [B, h, w, C]; density, depth: [B, h, w, 1].
    size: (H, W) of the input images.
  Returns:
    [B, H, W, C] float32.
  """
  if mode not in DISC_INPUTS:
    raise ValueError(f'discriminator input must be one of {DISC_INPUTS}, got {mode!r}')
  up_seg = upsample_bilinear(seg_logits.astype(jnp.float32), size)
  if mode == 'softmax':
    return jax.nn.softmax(up_seg, axis=-1)
  entropy = entropy_map(up_seg)
  if mode == 'entropy':
    return entropy
  weight = density if mode == 'entropy_density' else depth
  return entropy * upsample_bilinear(weight.astype(jnp.float32), size)


def loss_weights(loss_config) -> dict[str, float]:
  """The weight of each adaptation loss term by name ('loss_seg', ...; `config.loss`'s lambdas),
  with the density terms at 0 when `loss_config.density_losses` is off."""
  weights = {name: float(getattr(loss_config, 'lambda_' + name[len('loss_'):]))
             for name in ('loss_seg', 'loss_depth', 'loss_bal_src', 'loss_bal_tgt', 'loss_adv')}
  if not loss_config.density_losses:
    weights['loss_bal_src'] = weights['loss_bal_tgt'] = 0.0
  return weights
