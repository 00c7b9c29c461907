"""The `eval` stage and the validation used during training (METHOD §7).

Each validation image is resized to the input size; the logits are upsampled bilinearly
(align corners) to the full label resolution (2048x1024 for Cityscapes), arg-maxed and counted
into a confusion matrix on device. Processes evaluate their own shards and sum the matrices.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from depthuda import checkpointing
from depthuda import evaluate as metrics_lib
from depthuda import losses
from depthuda import reporting
from depthuda import train
from depthuda import visualize
from depthuda.data import labels as label_lib
from depthuda.data import pipeline


@functools.partial(jax.jit, static_argnums=(0,))
def _logits(seg, variables, image):
  """[1,H,W,3] image -> [1,h,w,C] float32 logits on the feature grid."""
  logits, _, _ = seg.apply(variables, image, train=False)
  return logits.astype(jnp.float32)


# Jitted apart from the network: Mapillary's labels come in many sizes, and a new size then
# compiles only this small function. It also keeps the network's activations and the
# upsampled logits from being live together.
@functools.partial(jax.jit, static_argnums=(2,))
def _confusion(logits, label, num_classes):
  """[1,h,w,C] logits, [1,HL,WL] label -> [C,C] confusion matrix of the upsampled prediction."""
  up = losses.upsample_bilinear(logits, label.shape[1:3])
  return metrics_lib.confusion_matrix_device(jnp.argmax(up, -1), label, num_classes)


def _local(variables):
  """Replicated global arrays -> this process's first device, once (not per image)."""
  return jax.device_put(jax.device_get(variables), jax.local_devices()[0])


def evaluate(config: ml_collections.ConfigDict, seg, variables, desc: str = 'eval') -> dict:
  """mIoU (and 13-class mIoU for 16-class runs) of `variables` on the target validation set."""
  variables = _local(variables)
  num_classes = config.data.num_classes
  cm = np.zeros((num_classes, num_classes), np.int64)
  for i, example in enumerate(reporting.progress(pipeline.target_val(config), desc=desc,
                                                 unit='img')):
    if config.eval.num_images and i >= config.eval.num_images:
      break
    logits = _logits(seg, variables, example['image'])
    cm += np.asarray(_confusion(logits, example['label'], num_classes))
  if jax.process_count() > 1:
    cm = np.asarray(multihost_utils.process_allgather(cm)).sum(0)
  result = metrics_lib.results_dict(cm, label_lib.class_names(num_classes))
  result['confusion_matrix'] = cm.tolist()
  return result


def image_panels(config: ml_collections.ConfigDict, seg, variables, count: int,
                 height: int = 256) -> dict:
  """A few validation panels: input | prediction | ground truth | depth | density.

  Everything is shown `height` rows tall (legible in TensorBoard for the toy's 96 rows and the
  full 760 alike): image, logits, depth and density resized bilinearly (the logits as for
  evaluation, then arg-maxed), labels nearest. Depth (inverse depth) uses each image's own
  1st-99th percentile range (`visualize.colorize_scalar`); density the fixed range [0, 255] of
  its target g(p) (METHOD §4).
  """
  variables = _local(variables)
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


def best_model_stage(workdir: str) -> str:
  """The latest training stage with a best checkpoint: self_train, else adapt."""
  for stage in ('self_train', 'adapt'):
    if checkpointing.StageCheckpoints(os.path.join(workdir, stage)).best_step() is not None:
      return stage
  raise FileNotFoundError(f'no trained model in {workdir} (run the adapt stage first)')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the best model; writes results, the table, plots and prediction panels."""
  out_dir = os.path.join(workdir, 'eval')
  seg, _ = train.build_models(config, axis_name=None)
  stage = best_model_stage(workdir)
  w, h = config.data.input_size
  abstract = jax.eval_shape(lambda: seg.init(jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3)),
                                             train=False))
  variables, meta = checkpointing.StageCheckpoints(os.path.join(workdir, stage)).restore_best(abstract)
  result = evaluate(config, seg, variables, desc=f'eval ({stage} step {meta["step"]})')
  result.update(model_stage=stage, model_step=meta['step'])
  if reporting.is_writer():
    os.makedirs(out_dir, exist_ok=True)
    model = f'{stage} step {meta["step"]}'
    with open(os.path.join(out_dir, 'per_class_iou.txt'), 'w') as f:
      f.write(f'{config.data.target} validation, {model}\n{metrics_lib.format_table(result)}\n')
    visualize.plot_class_iou(result['per_class_iou'], os.path.join(out_dir, 'per_class_iou.png'),
                             title=f'per-class IoU, {model}')
    names = label_lib.class_names(config.data.num_classes)
    visualize.plot_confusion_matrix(np.asarray(result['confusion_matrix']), names,
                                    os.path.join(out_dir, 'confusion_matrix.png'),
                                    title=f'confusion matrix (% of each true class), {model}')
    for curve_stage in ('adapt', 'self_train'):
      records = reporting.read_metrics(os.path.join(workdir, curve_stage, 'metrics.jsonl'))
      if records:
        keys = sorted({k for r in records for k in r if k.startswith('loss') or k == 'val_miou'})
        visualize.plot_curves(records, keys, os.path.join(out_dir, f'curves_{curve_stage}.png'),
                              title=f'{curve_stage} training curves')
    for name, image in image_panels(config, seg, variables, config.eval.num_panels).items():
      visualize.save_png(os.path.join(out_dir, name.replace('/', '_') + '.png'), image)
  return result
