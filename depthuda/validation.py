"""Scoring a model on the target validation set (METHOD §7): the `eval` stage's scores and the
validation during training.

Each validation image is resized to the input size; the logits are upsampled bilinearly
(align corners) to the label's size, arg-maxed and counted into a confusion matrix on device.
The label's size is the evaluation protocol's (`config.eval.protocol`, `pipeline.target_val`):
Cityscapes' full 2048x1024, or for Mapillary the input size (the original's) or the label's own
resolution (DADA's). Optional test-time augmentation (`config.eval.flip`, `config.eval.scales`)
averages the softmax of several views. Processes evaluate their own shards, one image per device
at a time, and sum the matrices. The images come through the tf.data pipeline, so unlike the
core modules this one needs TensorFlow.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from depthuda import evaluate as metrics_lib
from depthuda import losses
from depthuda import reporting
from depthuda import sharding
from depthuda import train
from depthuda import visualize
from depthuda.data import labels as label_lib
from depthuda.data import pipeline
from depthuda.errors import InputError

IGNORE = label_lib.IGNORE_LABEL


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _logits(seg, variables, image, scale: float, flip: bool):
  """[1,H,W,3] image -> [1,h,w,C] float32 logits on the feature grid of the image rescaled by
  `scale` (bilinear, align corners) and, if `flip`, mirrored left to right."""
  if scale != 1.0:
    h, w = image.shape[1:3]
    image = losses.upsample_bilinear(image, (max(1, round(h * scale)), max(1, round(w * scale))))
  if flip:
    image = image[:, :, ::-1]
  logits, _, _ = seg.apply(variables, image, train=False)
  return logits.astype(jnp.float32)


def views(config: ml_collections.ConfigDict) -> tuple[tuple[float, bool], ...]:
  """The (scale, flip) views of test-time augmentation; ((1.0, False),) without it."""
  scales = tuple(config.eval.scales)
  if not scales or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
    raise InputError(f'config.eval.scales={scales!r}: expected a tuple of positive input scales, '
                     'e.g. (1.0,) or (0.75, 1.0, 1.25)')
  if not isinstance(config.eval.flip, bool):
    raise InputError(f'config.eval.flip={config.eval.flip!r}: expected True or False')
  flips = (False, True) if config.eval.flip else (False,)
  return tuple((float(scale), flip) for scale in scales for flip in flips)


def view_logits(seg, variables, image, view_list) -> tuple[jax.Array, ...]:
  """The grid logits of each (scale, flip) view of a [1,H,W,3] image."""
  return tuple(_logits(seg, variables, image, scale, flip) for scale, flip in view_list)


def mean_probabilities(logits, flips, size) -> jax.Array:
  """The softmax averaged over views, [1,H,W,C]: each view's logits upsampled (bilinear, align
  corners) to `size` (H, W), softmaxed, and mirrored back where its input was mirrored."""
  total = 0.0
  for view, flip in zip(logits, flips):
    probs = jax.nn.softmax(losses.upsample_bilinear(view, size), axis=-1)
    total = total + (probs[:, :, ::-1] if flip else probs)
  return total / len(logits)


def _confusion_per_image(pred, label, num_classes):
  """[n,HL,WL] predictions and labels -> [C,C]: the sum of the images' confusion matrices."""
  count = functools.partial(metrics_lib.confusion_matrix_device, num_classes=num_classes)
  return jax.vmap(count)(pred, label).sum(0)


# Jitted apart from the network: Mapillary's native labels come in many sizes, and a new size
# then compiles only this small function. It also keeps the network's activations and the
# upsampled logits from being live together.
@functools.partial(jax.jit, static_argnums=(2,))
def _confusion(logits, label, num_classes):
  """[n,h,w,C] logits, [n,HL,WL] labels -> [C,C] confusion matrix of the upsampled predictions."""
  up = losses.upsample_bilinear(logits, label.shape[1:3])
  return _confusion_per_image(jnp.argmax(up, -1), label, num_classes)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _confusion_of_views(logits, flips, label, num_classes):
  """As `_confusion`, for the arg-max of `mean_probabilities` of several views."""
  probs = mean_probabilities(logits, flips, label.shape[1:3])
  return _confusion_per_image(jnp.argmax(probs, -1), label, num_classes)


def local_mesh() -> Mesh:
  """The `data` mesh of this process's devices: each process evaluates its own images."""
  return sharding.make_mesh(jax.local_devices())


def on_mesh(variables, mesh: Mesh):
  """`variables` replicated over `mesh`, without a trip through the host: the training state
  (replicated over the mesh of every process) as it is, or its copies on this process's devices;
  a restored model (on one device) copied from device to device."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable and x.is_fully_replicated:
      local = {s.device: s.data for s in x.addressable_shards}
      return jax.make_array_from_single_device_arrays(
          x.shape, sharding, [local[d] for d in mesh.devices.flat])
    return jax.device_put(x, sharding)

  return jax.tree.map(put, variables)


def local_split(variables) -> tuple[Any, NamedSharding]:
  """(`variables` on this process's devices, the sharding that splits a batch over them: one
  image per device of a batch of `sharding.num_devices`)."""
  mesh = local_mesh()
  return on_mesh(variables, mesh), NamedSharding(mesh, P(sharding.AXIS))


def batches(examples, size: int):
  """Lists of up to `size` consecutive examples."""
  examples = iter(examples)
  while batch := list(itertools.islice(examples, size)):
    yield batch


def stack(arrays, size: int, fill) -> np.ndarray:
  """[1, ...] arrays -> [size, ...], padded with `fill`."""
  batch = np.concatenate(arrays)
  pad = np.full((size - len(arrays),) + batch.shape[1:], fill, batch.dtype)
  return np.concatenate([batch, pad])


def evaluate(config: ml_collections.ConfigDict, seg, variables, desc: str = 'eval',
             mesh: Mesh | None = None) -> dict:
  """mIoU (and 13-class mIoU for 16-class runs) of `variables` on the target validation set.

  The images are evaluated in batches of one per device of `mesh` (default: this process's
  devices), split over its `data` axis: each device predicts one image as a single device
  would, and the counts are exact integers, so the result does not depend on the devices.
  """
  mesh = local_mesh() if mesh is None else mesh
  variables = on_mesh(variables, mesh)
  split = NamedSharding(mesh, P(sharding.AXIS))
  size = mesh.devices.size
  view_list = views(config)
  flips = tuple(flip for _, flip in view_list)
  num_classes = config.data.num_classes
  cm = np.zeros((num_classes, num_classes), np.int64)
  examples = pipeline.target_val(config, config.eval.protocol)
  total = min(config.eval.num_images or len(examples), len(examples))  # 0: all of them
  bar = reporting.progress(total=total, desc=desc, unit='img')
  for batch in batches(itertools.islice(examples, total), size):
    images = jax.device_put(stack([e['image'] for e in batch], size, 0), split)
    logits = view_logits(seg, variables, images, view_list)
    labels = [e['label'] for e in batch]
    if all(label.shape == labels[0].shape for label in labels):
      # Padding images are labelled ignore: they count nothing.
      parts = [(logits, jax.device_put(stack(labels, size, IGNORE), split))]
    else:  # Mapillary's native labels: each image at its own size
      parts = [(tuple(view[i:i + 1] for view in logits), label)
               for i, label in enumerate(labels)]
    for part_logits, label in parts:
      if len(part_logits) == 1:  # no augmentation: the arg-max of the logits themselves
        cm += np.asarray(_confusion(part_logits[0], label, num_classes))
      else:
        cm += np.asarray(_confusion_of_views(part_logits, flips, label, num_classes))
    bar.update(len(batch))
  bar.close()
  if jax.process_count() > 1:
    cm = np.asarray(multihost_utils.process_allgather(cm)).sum(0)
  result = metrics_lib.results_dict(cm, label_lib.class_names(num_classes))
  result['confusion_matrix'] = cm.tolist()
  return result


def settings(config: ml_collections.ConfigDict) -> dict:
  """How the scores were computed, recorded next to them in results.json."""
  return {'protocol': config.eval.protocol, 'flip': bool(config.eval.flip),
          'scales': [float(s) for s in config.eval.scales]}


def image_panels(config: ml_collections.ConfigDict, seg, variables, count: int,
                 height: int = 256) -> dict:
  """A few validation panels: input | prediction | ground truth | depth | density.

  Everything is shown `height` rows tall (legible in TensorBoard for the toy's 96 rows and the
  full 760 alike): image, logits, depth and density resized bilinearly (the logits as for
  evaluation, then arg-maxed), labels nearest. Depth (inverse depth) uses each image's own
  1st-99th percentile range (`visualize.colorize_scalar`); density the fixed range [0, 255] of
  its target g(p) (METHOD §4).
  """
  variables = on_mesh(variables, local_mesh())
  predict = train.predict_fn(seg)
  num_classes = config.data.num_classes
  panels = {}
  for i, example in enumerate(pipeline.target_val(config)):
    if i >= count:
      break
    h, w = example['image'].shape[1:3]
    size = (height, max(1, round(w * height / h)))
    resize = lambda x: np.asarray(losses.upsample_bilinear(jnp.asarray(x, jnp.float32), size))[0]
    logits, dens, depth = (resize(x) for x in predict(variables, example['image']))
    rgb = visualize.denormalize(resize(example['image']))
    label = np.asarray(example['label'][0])
    rows = np.arange(size[0]) * label.shape[0] // size[0]
    cols = np.arange(size[1]) * label.shape[1] // size[1]
    label = label[rows[:, None], cols[None, :]]
    panels[f'val/{i}'] = visualize.panel(
        [rgb, visualize.colorize(logits.argmax(-1), num_classes),
         visualize.colorize(label, num_classes), visualize.colorize_scalar(depth[..., 0]),
         visualize.colorize_scalar(dens[..., 0], 0.0, 255.0, cmap='viridis')],
        ['image', 'prediction', 'ground truth', 'inverse depth', 'density'])
  return panels
