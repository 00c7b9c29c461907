"""The `pseudo_label` stage: confident, spatially plausible labels for the target set (METHOD §6).

The best adapted model predicts each target training image in eval mode; logits are upsampled to
the input size; pixels with confidence below the threshold and regions of class c smaller than
N_c pixels (8-connected) become ignore. Labels are written as PNGs, one per image, atomically:
a cut-off run resumes by skipping the images whose PNG exists.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from jax.experimental import multihost_utils

from depthuda import checkpointing
from depthuda import losses
from depthuda import pseudo
from depthuda import reporting
from depthuda import train
from depthuda import visualize
from depthuda.data import labels as label_lib
from depthuda.data import pipeline
from depthuda.stages import fit_gmm

IGNORE = 255


def label_dir(workdir: str) -> str:
  return os.path.join(workdir, 'pseudo_label', 'labels')


def region_sizes(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
  """N_c from the config override, else from the source pixel counts of fit_gmm."""
  if config.pseudo.min_region_sizes is not None:
    sizes = np.asarray(config.pseudo.min_region_sizes, np.int64)
    if sizes.shape != (config.data.num_classes,):
      raise ValueError(f'config.pseudo.min_region_sizes needs {config.data.num_classes} values, '
                       f'got {sizes.size}')
    return sizes
  # The formula's 50..5000 pixels are at the original's 1280x760 input; other inputs scale
  # with their area, so a region covers the same fraction of the image.
  w, h = config.data.input_size
  ref_w, ref_h = config.pseudo.reference_input_size
  scale = (w * h) / (ref_w * ref_h)
  sizes = pseudo.min_region_sizes(fit_gmm.pixel_counts(workdir))
  return np.maximum(1, np.round(sizes * scale)).astype(np.int64)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  out = label_dir(workdir)
  os.makedirs(out, exist_ok=True)
  num_classes = config.data.num_classes
  sizes = region_sizes(config, workdir)
  seg, _ = train.build_models(config, axis_name=None)
  w, h = config.data.input_size
  abstract = jax.eval_shape(lambda: seg.init(jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3)),
                                             train=False))
  variables, meta = checkpointing.StageCheckpoints(os.path.join(workdir, 'adapt')).restore_best(abstract)

  @jax.jit
  def confident(images):
    """[1,H,W,3] -> [H,W] uint8: argmax where the softmax confidence passes the threshold."""
    logits, _, _ = seg.apply(variables, images, train=False)
    probs = jax.nn.softmax(losses.upsample_bilinear(logits.astype(jnp.float32), (h, w)), -1)
    return pseudo.confident_labels(probs[0], config.pseudo.threshold, ignore_label=IGNORE)

  kept = np.zeros(num_classes, np.int64)
  count = 0
  for example in reporting.progress(pipeline.target_images(config, 'train'), desc='pseudo_label',
                                    unit='img'):
    path = os.path.join(out, f"{example['name']}.png")
    if os.path.exists(path):  # Resume: count what an earlier run wrote.
      labels = np.asarray(Image.open(path))
    else:
      labels = pseudo.spatial_prior(np.asarray(confident(example['image'])), sizes,
                                    ignore_label=IGNORE)
      visualize.save_png(path, labels.astype(np.uint8))
    kept += np.bincount(labels[labels != IGNORE].ravel(), minlength=num_classes)[:num_classes]
    count += 1
  if jax.process_count() > 1:
    kept = np.asarray(multihost_utils.process_allgather(kept)).sum(0)
    count = int(np.asarray(multihost_utils.process_allgather(np.int64(count))).sum())
  total = count * h * w
  names = label_lib.class_names(num_classes)
  summary = {
      'images': count, 'model_step': meta['step'],
      'kept_fraction': float(kept.sum() / max(total, 1)),
      'kept_fraction_per_class': {n: float(kept[c] / max(total, 1)) for c, n in enumerate(names)},
      'min_region_sizes': {n: int(sizes[c]) for c, n in enumerate(names)},
  }
  if reporting.is_writer():
    print(f'pseudo_label: {count} images, {100 * summary["kept_fraction"]:.1f}% of pixels kept')
    for n in names:
      print(f'  {n:<14} {100 * summary["kept_fraction_per_class"][n]:5.1f}%  '
            f'N_c={summary["min_region_sizes"][n]}')
  return summary


def is_complete(config: ml_collections.ConfigDict, workdir: str) -> bool:
  entry = reporting.read_results(workdir).get('pseudo_label')
  if not entry:
    return False
  out = label_dir(workdir)
  return os.path.isdir(out) and len([f for f in os.listdir(out) if f.endswith('.png')]) >= entry['images']
