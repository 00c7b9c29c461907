"""Decoding of one example's files inside tf.data (METHOD §2), as graph ops.

Images: resized to (W, H) `size` (bicubic with antialiasing, rounded to 8 bits as PIL's resize
in the original), RGB -> BGR, mean-subtracted. Labels and depth: resized nearest; labels mapped
through a [256] class table (255 = ignore); SYNTHIA depth becomes inverse depth 65536 / (raw + 1).
SYNTHIA labels and depth also go to the feature grid straight from the files' own resolution,
by PIL's nearest rule, as the original builds its density maps (`decode_source_maps`).
Mapillary images keep their aspect ratio and are padded (`decode_padded_image`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from depthuda.data import labels
from depthuda.data import mapillary


def hw(size) -> tuple[int, int]:
  width, height = size
  return int(height), int(width)


def resize_bicubic(image: tf.Tensor, height_width) -> tf.Tensor:
  """8-bit [h, w, 3] -> float32 [H, W, 3] of whole numbers in [0, 255]: an antialiased bicubic
  resize to `height_width`, rounded to 8 bits as PIL's resize (the original's) is.

  An image that has that size already is only converted: at scale 1 the kernel samples
  weights (0, 1, 0), so resize, rounding and clipping are all exactly the identity there, and
  they cost most of a SYNTHIA image's decode (1280x760 is the input size).
  """
  height_width = tf.convert_to_tensor(height_width, tf.int32)
  same = tf.reduce_all(tf.equal(tf.shape(image)[:2], height_width))

  def resize():
    out = tf.image.resize(tf.cast(image, tf.float32), height_width, method='bicubic',
                          antialias=True)
    return tf.clip_by_value(tf.round(out), 0, 255)

  return tf.cond(same, lambda: tf.cast(image, tf.float32), resize)


def decode_image(png: tf.Tensor, size) -> tf.Tensor:
  """PNG -> float32 [H, W, 3] at (W, H) `size`, BGR, mean-subtracted."""
  image = resize_bicubic(tf.io.decode_png(png, channels=3), hw(size))
  return tf.ensure_shape(image, hw(size) + (3,))[..., ::-1] - labels.MEAN_BGR


def decode_label(png: tf.Tensor, size, table: np.ndarray | None,
                 valid_ids: np.ndarray | None = None) -> tf.Tensor:
  """1-channel 8-bit PNG -> int32 [H, W], nearest-resized, mapped through `table`.

  With `valid_ids` (a [256] bool table), a label holding any other id fails with an error that
  names the first such id (checked before resizing, so no pixel escapes the check).
  """
  label = tf.io.decode_png(png, channels=1)
  if valid_ids is not None:
    ids = tf.cast(label[..., 0], tf.int32)
    bad = tf.logical_not(tf.gather(tf.constant(valid_ids), ids))
    first = tf.gather_nd(ids, tf.where(bad)[:1])
    check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)),
                                ['label id', first, 'is outside the ids the dataset defines'])
    with tf.control_dependencies([check]):
      label = tf.identity(label)
  label = tf.image.resize(label, hw(size), method='nearest')
  label = tf.cast(label[..., 0], tf.int32)
  return label if table is None else tf.gather(tf.constant(table, tf.int32), label)


def decode_padded_image(data: tf.Tensor, size) -> tuple[tf.Tensor, tf.Tensor]:
  """JPEG of any size -> (f32 [H, W, 3], i32 [2]): resized with its aspect kept to fit (W, H)
  `size` (`mapillary.fitted_size`), padded at the bottom/right with black (0 before mean
  subtraction, as the original pads), BGR, mean-subtracted; and the (rows, columns) it fills."""
  # The accurate integer DCT decodes exactly as PIL (the original); TF's default does not.
  rgb = tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE')
  height, width = tf.unstack(tf.cast(tf.shape(rgb)[:2], tf.float64))
  target_h, target_w = hw(size)
  # float64 as in Python, so that the sizes equal mapillary.fitted_size's.
  fit_width = width / height > target_w / target_h
  full_h, full_w = tf.constant(target_h, tf.float64), tf.constant(target_w, tf.float64)
  rows = tf.where(fit_width, tf.floor(height * (target_w / width)), full_h)
  cols = tf.where(fit_width, full_w, tf.floor(width * (target_h / height)))
  valid = tf.cast(tf.maximum(tf.stack([rows, cols]), 1), tf.int32)
  image = resize_bicubic(rgb, valid)
  image = tf.pad(image, [[0, target_h - valid[0]], [0, target_w - valid[1]], [0, 0]])
  image = tf.ensure_shape(image, (target_h, target_w, 3))
  return image[..., ::-1] - labels.MEAN_BGR, valid


def decode_padded_label(data: tf.Tensor, size, table: np.ndarray,
                        protocol: str = 'native') -> tf.Tensor:
  """8-bit label-index PNG -> i32 classes padded with ignore: [H, W] at (W, H) `size` for
  protocol 'input_size', [HL, WL] at its own resolution for 'native' (`mapillary.read_label`;
  PIL keeps palette indices)."""
  read = lambda png: mapillary.read_label(png, tuple(size), table, protocol)
  label = tf.numpy_function(read, [data], tf.int32, stateful=False)
  return tf.ensure_shape(label, hw(size) if protocol == 'input_size' else (None, None))


def mask_padding(label: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
  """[H, W] label with ignore outside the top-left `valid` (rows, columns)."""
  rows = tf.range(tf.shape(label)[0])[:, None] < valid[0]
  cols = tf.range(tf.shape(label)[1])[None, :] < valid[1]
  return tf.where(rows & cols, label, labels.IGNORE_LABEL)


def _inverse_depth(raw: tf.Tensor) -> tf.Tensor:
  """uint16 [H, W, 1] raw SYNTHIA depth -> float32 [H, W] 65536 / (raw + 1); raw 0 gives 65,536."""
  return 65536.0 / (tf.cast(raw[..., 0], tf.float32) + 1.0)


def decode_inverse_depth(png: tf.Tensor, size) -> tf.Tensor:
  """SYNTHIA 16-bit depth PNG -> float32 [H, W] inverse depth 65536 / (raw + 1)."""
  return _inverse_depth(tf.image.resize(tf.io.decode_png(png, channels=1, dtype=tf.uint16),
                                        hw(size), method='nearest'))


def pil_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index [out_size] of every output index under PIL's `Image.resize(..., NEAREST)`.

  The PIL rule: output i reads input floor((i + 1/2) s), s = in / out (the input pixel under the
  output cell's centre), with the positions accumulated in float64 as PIL accumulates them
  (s / 2, then + s per step), so that exact integers land where PIL's do. The torch (and
  OpenCV) rule, floor(i s), reads about half a cell earlier.
  """
  steps = np.full(out_size, in_size / out_size, np.float64)
  steps[0] /= 2
  return np.add.accumulate(steps).astype(np.int64)


def resize_nearest_pil(image: tf.Tensor, height_width: tuple[int, int]) -> tf.Tensor:
  """[H, W, C] (any size, any dtype) -> [h, w, C] by PIL's nearest rule (`pil_nearest_indices`)."""
  def take(x, axis, out_size):
    indices = tf.numpy_function(lambda n: pil_nearest_indices(int(n), out_size),
                                [tf.shape(x)[axis]], tf.int64, stateful=False)
    return tf.gather(x, tf.ensure_shape(indices, (out_size,)), axis=axis)
  return take(take(image, 0, height_width[0]), 1, height_width[1])


def decode_source_maps(label_png: tf.Tensor, depth_png: tf.Tensor, size,
                       grid_hw: tuple[int, int], table: np.ndarray) -> dict[str, tf.Tensor]:
  """A SYNTHIA example's label and depth PNGs, each decoded once, at two resolutions.

  Returns {'label': i32 [H, W], 'depth': f32 [H, W]} at (W, H) `size`, as `decode_label` and
  `decode_inverse_depth`, and {'label_grid': i32 [h, w], 'depth_grid': f32 [h, w]} on the
  feature grid `grid_hw`: resized straight from the files' own resolution by PIL's nearest rule,
  as the original makes the grids its density maps and GMMs come from (METHOD §4), not from the
  input-size maps (the two differ when the input is smaller than the files, e.g. 640x320).
  """
  label = tf.io.decode_png(label_png, channels=1)
  raw = tf.io.decode_png(depth_png, channels=1, dtype=tf.uint16)
  classes = lambda x: tf.gather(tf.constant(table, tf.int32), tf.cast(x[..., 0], tf.int32))
  resize = lambda x: tf.image.resize(x, hw(size), method='nearest')
  return {'label': classes(resize(label)), 'depth': _inverse_depth(resize(raw)),
          'label_grid': classes(resize_nearest_pil(label, grid_hw)),
          'depth_grid': _inverse_depth(resize_nearest_pil(raw, grid_hw))}
