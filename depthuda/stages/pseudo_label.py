"""The `pseudo_label` stage: confident, spatially plausible labels for the target set (METHOD §6).

The adapted model (`config.model_selection`: adapt's best, as the original, or its last) predicts
each target training image in eval mode, one image per device of the process; logits are
upsampled to the input size; pixels with confidence below the threshold and regions of class c smaller than
N_c pixels (8-connected) become ignore (the spatial prior; `config.pseudo.spatial_prior` turns it
off). Labels are written as PNGs, one per image, atomically
(a killed run leaves at most a temporary file, never a half-written PNG). A cut-off run resumes:
it keeps every PNG that decodes to a label map of the right size and classes, and labels the
rest. `labels/provenance.json` records the model and settings the PNGs come from; labels of
another model (adapt trained further, another threshold) are deleted, not reused.
"""

from __future__ import annotations

import functools
import io
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from jax.experimental import multihost_utils

from depthuda import checkpointing
from depthuda import fileio
from depthuda import gmm_record
from depthuda import losses
from depthuda import models
from depthuda import pseudo
from depthuda import reporting
from depthuda import validation
from depthuda import visualize
from depthuda.data import labels as label_lib
from depthuda.data import pipeline
from depthuda.errors import InputError

IGNORE = label_lib.IGNORE_LABEL


def label_dir(workdir: fileio.PathLike) -> fileio.Path:
  return fileio.Path(workdir) / 'pseudo_label' / 'labels'


def region_sizes(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
  """N_c from the config override, else from the source pixel counts of fit_gmm."""
  if config.pseudo.min_region_sizes is not None:
    sizes = np.asarray(config.pseudo.min_region_sizes, np.int64)
    if sizes.shape != (config.data.num_classes,):
      raise InputError(f'config.pseudo.min_region_sizes needs {config.data.num_classes} values, '
                       f'got {sizes.size}')
    return sizes
  # The formula's 50..5000 pixels are at the original's 1280x760 input; other inputs scale
  # with their area, so a region covers the same fraction of the image.
  w, h = config.data.input_size
  ref_w, ref_h = config.pseudo.reference_input_size
  scale = (w * h) / (ref_w * ref_h)
  sizes = pseudo.min_region_sizes(gmm_record.pixel_counts(workdir))
  return np.maximum(1, np.round(sizes * scale)).astype(np.int64)


def _provenance(config: ml_collections.ConfigDict, model_meta: dict, sizes: np.ndarray) -> dict:
  """What the labels depend on: the model (adapt's selected one) and the labelling settings."""
  miou = model_meta.get('miou')  # none for the 'last' model
  return {'model_step': int(model_meta['step']),
          'model_miou': None if miou is None else float(miou),
          'threshold': float(config.pseudo.threshold), 'min_region_sizes': sizes.tolist(),
          'input_size': list(config.data.input_size), 'num_classes': config.data.num_classes,
          'spatial_prior': bool(config.pseudo.spatial_prior)}


def refine(labels: np.ndarray, sizes: np.ndarray, config: ml_collections.ConfigDict
           ) -> np.ndarray:
  """[H, W] confident labels -> pseudo-labels: the spatial prior's (regions of class c smaller
  than sizes[c] dropped) or, with config.pseudo.spatial_prior off, the labels as they are."""
  if not config.pseudo.spatial_prior:
    return labels
  return pseudo.spatial_prior(labels, sizes, ignore_label=IGNORE)


def _read_provenance(out: fileio.Path) -> dict | None:
  try:
    return json.loads((out / 'provenance.json').read_text())
  except (OSError, ValueError):
    return None


def _start_labelling(out: fileio.Path, provenance: dict) -> None:
  """Keeps the labels of an earlier run with the same provenance; deletes anything else."""
  if reporting.is_writer():
    out.mkdir(parents=True, exist_ok=True)
    same = _read_provenance(out) == provenance
    for path in out.iterdir():
      if fileio.is_temporary(path.name) or (not same and path.suffix == '.png'):
        path.unlink()
    if not same:
      reporting.write_json(out / 'provenance.json', provenance)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('pseudo_label: labels directory ready')


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def confident(seg, variables, images, size: tuple[int, int], threshold: float) -> jax.Array:
  """[n,h,w,3] -> [n,H,W] uint8 at `size` (H, W): the arg-max where the softmax confidence
  passes the threshold, else ignore. The weights are an argument: one compiled program per
  model shape, not per set of weights (nor weights baked into it as constants). Images split
  over devices are labelled where they lie."""
  logits, _, _ = seg.apply(variables, images, train=False)
  probs = jax.nn.softmax(losses.upsample_bilinear(logits.astype(jnp.float32), size), -1)
  return pseudo.confident_labels(probs, threshold, ignore_label=IGNORE)


def _read_label(path: fileio.Path, size_hw: tuple[int, int], num_classes: int
                ) -> np.ndarray | None:
  """The [H, W] uint8 labels of an earlier run's PNG, or None if it is missing or unusable."""
  try:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
      labels = np.asarray(image)
  except (OSError, SyntaxError, ValueError):  # PIL's errors for missing or damaged files
    return None
  valid = (labels.dtype == np.uint8 and labels.shape == size_hw
           and bool(np.all((labels < num_classes) | (labels == IGNORE))))
  return labels if valid else None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  out = label_dir(workdir)
  num_classes = config.data.num_classes
  sizes = region_sizes(config, workdir)
  seg, _ = models.build(config)
  abstract = models.abstract_variables(config, seg)
  w, h = config.data.input_size
  with checkpointing.StageCheckpoints(fileio.Path(workdir) / 'adapt') as ckpts:
    variables, meta = ckpts.restore_model(config.model_selection, abstract)
  _start_labelling(out, _provenance(config, meta, sizes))

  # One image per device of this process, as evaluation does.
  variables, split = validation.local_split(variables)
  size = split.num_devices
  kept = np.zeros(num_classes, np.int64)
  count = 0
  examples = reporting.progress(pipeline.target_images(config, 'selftrain'), desc='pseudo_label',
                                unit='img')
  for batch in validation.batches(examples, size):
    paths = [out / f"{example['name']}.png" for example in batch]
    # Resume: reuse what an earlier run wrote.
    found = [_read_label(path, (h, w), num_classes) for path in paths]
    missing = [i for i, labels in enumerate(found) if labels is None]
    if missing:
      images = validation.stack([batch[i]['image'] for i in missing], size, 0)
      predicted = np.asarray(confident(seg, variables, jax.device_put(images, split), (h, w),
                                       float(config.pseudo.threshold)))
      for i, labels in zip(missing, predicted):
        found[i] = refine(labels, sizes, config)
        visualize.save_png(paths[i], found[i].astype(np.uint8))
    for labels in found:
      kept += np.bincount(labels[labels != IGNORE].ravel(), minlength=num_classes)[:num_classes]
    count += len(batch)
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
  """results.json has the stage, the labels come from adapt's current selected model and settings,
  and the PNGs are all there with the right size (headers are read, not whole images)."""
  entry = reporting.read_results(workdir).get('pseudo_label')
  out = label_dir(workdir)
  provenance = _read_provenance(out)
  if not entry or provenance is None:
    return False
  with checkpointing.StageCheckpoints(fileio.Path(workdir) / 'adapt') as ckpts:
    model = ckpts.model_meta(config.model_selection)
  try:
    sizes = region_sizes(config, workdir)
  except FileNotFoundError:  # fit_gmm's output is gone
    return False
  if model is None or provenance != _provenance(config, model, sizes):
    return False
  w, h = config.data.input_size
  count = 0
  for path in out.iterdir():
    if path.suffix == '.png':
      try:
        # PIL reads the header only; from a remote store, through an open file.
        with path.open('rb') as f, Image.open(f) as image:
          if image.size != (w, h) or image.mode != 'L':
            return False
      except (OSError, SyntaxError, ValueError):
        return False
      count += 1
  return count == entry['images']
