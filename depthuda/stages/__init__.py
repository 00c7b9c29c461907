"""The pipeline's stages, in order: fit_gmm -> adapt -> pseudo_label -> self_train -> eval.

Each stage is `run(config, workdir) -> dict` (its entry in results.json) and
`is_complete(config, workdir) -> bool` (its outputs exist and match the config). With
`config.self_train.enabled` off, pseudo_label and self_train are skipped and eval scores the adapt
stage's model. Stages import
the input pipeline (TensorFlow); the core modules do not.
"""

from __future__ import annotations

import ml_collections

from depthuda import checkpointing
from depthuda import fileio
from depthuda import models
from depthuda import reporting
from depthuda import validation
from depthuda.data import pipeline
from depthuda.stages import evaluation
from depthuda.stages import fit_gmm
from depthuda.stages import pseudo_label
from depthuda.stages import training

SELF_TRAINING = ('pseudo_label', 'self_train')  # the stages self_train.enabled=False skips


def _adapt_batches(config, start):
  source = pipeline.source_train(config, models.feature_grid(config), start_step=start)
  target = pipeline.target_train(config, start_step=start)
  for src, tgt in zip(source, target):
    yield {'source': src, 'target': tgt}


def _adapt(config, workdir):
  return training.run('adapt', config, workdir, lambda start: _adapt_batches(config, start))


def _self_train(config, workdir):
  labels = pseudo_label.label_dir(workdir)
  return training.run('self_train', config, workdir,
                      lambda start: pipeline.pseudo_labeled_target(config, labels, start_step=start))


def _eval_complete(config, workdir):
  """results.json has an evaluation, with the current eval settings, of the model that
  config.model_selection picks now."""
  entry = reporting.read_results(workdir).get('eval')
  if not entry or any(entry.get(k) != v for k, v in validation.settings(config).items()):
    return False
  selection = config.model_selection
  found = checkpointing.selected_model(workdir, selection, config.self_train.enabled)
  return (found is not None and entry.get('model_selection') == selection
          and (entry.get('model_stage'), entry.get('model_step')) == found)


_RUN = {'fit_gmm': fit_gmm.run, 'adapt': _adapt, 'pseudo_label': pseudo_label.run,
        'self_train': _self_train, 'eval': evaluation.run}
_COMPLETE = {'fit_gmm': fit_gmm.is_complete,
             'adapt': lambda c, w: training.is_complete('adapt', c, w),
             'pseudo_label': pseudo_label.is_complete,
             'self_train': lambda c, w: training.is_complete('self_train', c, w),
             'eval': _eval_complete}


def is_complete(stage: str, config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether `stage`'s outputs in `workdir` exist and match `config`; reads, never writes."""
  return _COMPLETE[stage](config, workdir)


def run(stage: str, config: ml_collections.ConfigDict, workdir: str, force: bool = False) -> bool:
  """Runs one stage unless its outputs are complete; returns whether it ran."""
  if stage in SELF_TRAINING and not config.self_train.enabled:
    if reporting.is_writer():
      print(f'{stage}: skipped (self_train.enabled=False)')
    return False
  if not force and is_complete(stage, config, workdir):
    if reporting.is_writer():
      print(f'{stage}: complete, skipped')
    return False
  (fileio.Path(workdir) / stage).mkdir(parents=True, exist_ok=True)
  entry = _RUN[stage](config, workdir)
  reporting.update_results(workdir, stage, entry)
  return True


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, checkpoint: str) -> None:
  """The `eval` stage on the model at `checkpoint` (`checkpointing.load_model`), always run:
  its results replace the `eval` entry of `workdir`'s results.json."""
  (fileio.Path(workdir) / 'eval').mkdir(parents=True, exist_ok=True)
  reporting.update_results(workdir, 'eval', evaluation.run(config, workdir, checkpoint))
