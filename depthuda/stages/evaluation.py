"""The `eval` stage: scores the model `config.model_selection` picks ('best' or 'last') of the
latest training stage, or any checkpoint a user names (`checkpointing.load_model`), with
`validation.evaluate`; writes the per-class table, plots and prediction panels.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from depthuda import checkpointing
from depthuda import evaluate as metrics_lib
from depthuda import fileio
from depthuda import models
from depthuda import reporting
from depthuda import validation
from depthuda import visualize
from depthuda.data import labels as label_lib


def _load(config: ml_collections.ConfigDict, workdir: str, seg, checkpoint: str | None
          ) -> tuple[object, dict, str]:
  """The model to score, its results.json fields and a description."""
  abstract = models.abstract_variables(config, seg)
  selection = config.model_selection
  if checkpoint:
    variables, info = checkpointing.load_model(checkpoint, selection, abstract, config)
    fields = {'model_checkpoint': info['checkpoint'], 'model_step': info['step']}
    if info['selection']:
      fields['model_selection'] = info['selection']
    return variables, fields, info['description']
  found = checkpointing.selected_model(workdir, selection, config.self_train.enabled)
  if found is None:
    raise FileNotFoundError(f'no trained model in {workdir} (run the adapt stage first, or '
                            'score a given model with --checkpoint=PATH)')
  stage = found[0]
  with checkpointing.StageCheckpoints(fileio.Path(workdir) / stage) as ckpts:
    variables, meta = ckpts.restore_model(selection, abstract)
  fields = {'model_stage': stage, 'model_step': meta['step'], 'model_selection': selection}
  return variables, fields, f'{stage} {selection} step {meta["step"]}'


def run(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None) -> dict:
  """Evaluates the selected model of `workdir`, or the one at `checkpoint`; writes results, the
  table, plots and prediction panels."""
  out_dir = fileio.Path(workdir) / 'eval'
  seg, _ = models.build(config)
  variables, fields, model = _load(config, workdir, seg, checkpoint)
  result = validation.evaluate(config, seg, variables, desc=f'eval ({model})')
  result.update(fields, **validation.settings(config))
  if reporting.is_writer():
    fileio.write_atomic(out_dir / 'per_class_iou.txt',
                        f'{config.data.target} validation, {model}\n'
                        f'{metrics_lib.format_table(result)}\n')
    visualize.plot_class_iou(result['per_class_iou'], out_dir / 'per_class_iou.png',
                             title=f'per-class IoU, {model}')
    names = label_lib.class_names(config.data.num_classes)
    visualize.plot_confusion_matrix(np.asarray(result['confusion_matrix']), names,
                                    out_dir / 'confusion_matrix.png',
                                    title=f'confusion matrix (% of each true class), {model}')
    for curve_stage in ('adapt', 'self_train'):
      records = reporting.read_metrics(fileio.Path(workdir) / curve_stage / 'metrics.jsonl')
      if records:
        keys = sorted({k for r in records for k in r if k.startswith('loss') or k == 'val_miou'})
        visualize.plot_curves(records, keys, out_dir / f'curves_{curve_stage}.png',
                              title=f'{curve_stage} training curves')
    for name, image in validation.image_panels(config, seg, variables,
                                               config.eval.num_panels).items():
      visualize.save_png(out_dir / (name.replace('/', '_') + '.png'), image)
  return result
