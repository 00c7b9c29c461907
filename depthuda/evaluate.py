"""Segmentation metrics: confusion matrix, per-class IoU and mIoU (METHOD §7).

The confusion matrix has the ground truth along rows and the prediction along
columns. Pixels labelled `ignore_label` are dropped, and so are pixels whose
label or prediction lies outside [0, C): a stray value never lands in a class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from depthuda.data.labels import IGNORE_LABEL

# 16-class indices of wall, fence and pole; papers also report mIoU without them.
MIOU13_EXCLUDED = (3, 4, 5)


def confusion_matrix(pred: Any, label: Any, num_classes: int,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """Confusion matrix on the host.

  Args:
    pred: integer predictions of any shape (NumPy or JAX).
    label: integer ground truth of the same shape.
    num_classes: C.
    ignore_label: label value that is not counted.

  Returns:
    [C, C] int64, entry [i, j] = pixels of label i predicted as j.
  """
  pred = np.asarray(pred).astype(np.int64).ravel()
  label = np.asarray(label).astype(np.int64).ravel()
  if pred.shape != label.shape:
    raise ValueError(f'pred has {pred.size} pixels, label has {label.size}.')
  valid = ((label != ignore_label) & (label >= 0) & (label < num_classes)
           & (pred >= 0) & (pred < num_classes))
  index = label[valid] * num_classes + pred[valid]
  counts = np.bincount(index, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_device(pred: jax.Array, label: jax.Array, num_classes: int,
                            ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """Jit-able confusion matrix, for counting next to the model on device.

  Same semantics as `confusion_matrix`. Counts are int32 (JAX's default
  without x64), exact for up to 2^31 - 1 pixels per call; sum the results of
  many images on the host in int64.

  Args:
    pred, label: integer arrays of one shape.
    num_classes: C (static).
    ignore_label: label value that is not counted.

  Returns:
    [C, C] int32.
  """
  pred = pred.astype(jnp.int32).ravel()
  label = label.astype(jnp.int32).ravel()
  valid = ((label != ignore_label) & (label >= 0) & (label < num_classes)
           & (pred >= 0) & (pred < num_classes))
  index = jnp.where(valid, label * num_classes + pred, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def iou_per_class(cm: Any) -> np.ndarray:
  """Intersection over union per class from a confusion matrix.

  IoU_c = cm[c, c] / (row_c + col_c - cm[c, c]). A class that appears in
  neither the labels nor the predictions has no union and gets NaN, so the
  nan-means below skip it instead of counting it as 0 or 1.

  Args:
    cm: [C, C] counts (rows = label).

  Returns:
    [C] float64 in [0, 1] or NaN.
  """
  cm = np.asarray(cm, np.float64)
  true_positive = np.diag(cm)
  union = cm.sum(axis=0) + cm.sum(axis=1) - true_positive
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(union > 0, true_positive / union, np.nan)


def _nanmean(values: np.ndarray) -> float:
  """Mean over non-NaN entries; NaN (without a warning) when all are NaN."""
  values = np.asarray(values, np.float64)
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else math.nan


def mean_iou(iou: Any) -> float:
  """mIoU: the mean over classes with a defined IoU (nanmean), in [0, 1]."""
  return _nanmean(iou)


def miou13(iou: Any) -> float:
  """The 13-class mIoU of a 16-class run: wall, fence and pole left out."""
  iou = np.asarray(iou, np.float64)
  if iou.shape != (16,):
    raise ValueError(f'miou13 needs 16 per-class IoUs, got shape {iou.shape}.')
  return _nanmean(np.delete(iou, MIOU13_EXCLUDED))


def _percent(value: float) -> float | None:
  # JSON has no NaN: an undefined IoU is written as null.
  return None if math.isnan(value) else 100.0 * value


def results_dict(cm: Any, class_names: Sequence[str]) -> dict[str, Any]:
  """Metrics of one evaluation as plain Python values, IoU in percent.

  Args:
    cm: [C, C] counts.
    class_names: C names, in class order.

  Returns:
    {'miou': float, 'miou13': float (16-class only),
     'per_class_iou': {name: float}}; an undefined value (a class absent from
    labels and predictions, or an empty matrix) is None.
  """
  iou = iou_per_class(cm)
  if len(class_names) != iou.shape[0]:
    raise ValueError(f'{len(class_names)} class names for a {iou.shape[0]}-class matrix.')
  results: dict[str, Any] = {'miou': _percent(mean_iou(iou))}
  if iou.shape[0] == 16:
    results['miou13'] = _percent(miou13(iou))
  results['per_class_iou'] = {
      name: _percent(float(value)) for name, value in zip(class_names, iou)}
  return results


def format_table(results: Mapping[str, Any]) -> str:
  """A human-readable table of `results_dict` output, one class per line."""
  per_class = results['per_class_iou']
  width = max([len('mIoU13')] + [len(name) for name in per_class])

  def line(name: str, value: float | None) -> str:
    shown = '   n/a' if value is None else f'{value:6.2f}'
    return f'{name:<{width}}  {shown}'

  lines = [f'{"class":<{width}}  {"IoU %":>6}', '-' * (width + 8)]
  lines += [line(name, value) for name, value in per_class.items()]
  lines.append('-' * (width + 8))
  lines.append(line('mIoU', results['miou']))
  if 'miou13' in results:
    lines.append(line('mIoU13', results['miou13']))
  return '\n'.join(lines)
