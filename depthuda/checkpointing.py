"""Orbax checkpoints of a training stage: the latest N for resuming, the best for evaluation.

`<stage>/checkpoints/<step>/` holds the whole `TrainState` (both networks, BN statistics, both
optimizer states, step) and a JSON `meta`: the step, which is also the data position (the
input order is a deterministic function of seed and step), and the best-model tracking
(`best_miou`, `best_step`). `<stage>/best/<step>/` holds the segmenter variables of the best
evaluation. Latest checkpoints are saved asynchronously (`close()` waits); best ones
synchronously, so a checkpoint's `best_step` always names a finished best checkpoint, and a
best checkpoint is deleted only once no checkpoint that a rerun could resume from names it.

Orbax writes a step into a temporary directory and renames it when complete, so a run killed
during a save leaves the previous checkpoints untouched and only a temporary directory behind;
a resuming run (`resume=True`) removes it.

Which model a stage hands on (to pseudo-labelling, self-training and evaluation) is
`config.model_selection`: 'best', the best evaluation on the target validation set, as the
original chooses it, or 'last', the stage's final checkpoint. `load_model` reads any checkpoint a
user names: a stage folder, its best/ or checkpoints/ folder, one step folder in these, or a
folder written by `depthuda.convert`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from depthuda import converted
from depthuda import fileio
from depthuda import models
from depthuda.errors import InputError
from depthuda.errors import write_failure

_TMP_MARK = '.orbax-checkpoint-tmp'
MODEL_SELECTIONS = ('best', 'last')
TRAINING_STAGES_LATEST_FIRST = ('self_train', 'adapt')
_EXPECTED = ('expected a stage folder such as DIR/adapt, its best/ or checkpoints/ folder, one '
             'step folder in these, or a folder written by depthuda.convert')


class _NoSaveTracebacks(logging.logging.Filter):

  def filter(self, record):
    from_orbax = f'{os.sep}orbax{os.sep}' in record.pathname
    orphan = record.name == 'asyncio' and 'exception was never retrieved' in str(record.msg)
    return not (record.exc_info and (from_orbax or orphan))


def quiet_failed_saves() -> None:
  """For command lines: a failed write (a full disk) is raised again where a save is waited
  for, and reported there in one line. Orbax's saving thread also logs it with a traceback,
  asyncio logs the write tasks that failed with it, and TensorStore reports each pending write
  to Orbax's closed event loop: all of these go. They are recognised by the libraries' logger
  names and texts; the full-disk run of tests/test_errors.py (no traceback) pins them."""
  logging.get_absl_handler().addFilter(_NoSaveTracebacks())
  default_hook = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      default_hook(unraisable)

  sys.unraisablehook = hook


def _remove_unfinished(directory: fileio.Path) -> None:
  """Deletes the temporary directories of saves that a killed run did not finish."""
  if not directory.is_dir() or jax.process_index() != 0:
    return
  for path in directory.iterdir():
    if _TMP_MARK in path.name:
      path.rmtree(missing_ok=True)


class StageCheckpoints:
  """The checkpoints of one stage (`adapt` or `self_train`) under `directory`; a context
  manager (leaving it waits for the saves in flight and closes the Orbax managers).

  resume: True for the run that trains the stage: it creates the folders, cleans up after a
  killed save, and saves. Readers (completeness checks, evaluation, prediction) leave it False:
  they open the folders read-only, so they create nothing and never touch a save in progress.
  """

  def __init__(self, directory: fileio.PathLike, keep: int = 3, async_save: bool = True,
               resume: bool = False):
    directory = fileio.absolute(directory)  # Orbax needs an absolute path or a URL.
    self.directory = directory
    if resume:
      for sub in ('checkpoints', 'best'):
        _remove_unfinished(directory / sub)
      latest = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
      best = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    else:
      latest = best = ocp.CheckpointManagerOptions(read_only=True, create=False)
    self._latest = ocp.CheckpointManager(directory / 'checkpoints', options=latest)
    self._best = ocp.CheckpointManager(directory / 'best', options=best)
    self._resumable_best = None  # best_step of the newest finished checkpoint

  def __enter__(self) -> StageCheckpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _writing(self, what: str, call, *args, **kwargs):
    """Runs an Orbax call; a failed write (full or read-only disk) becomes an InputError."""
    try:
      return call(*args, **kwargs)
    except (OSError, ValueError) as e:
      failure = write_failure(self.directory / what, e)
      if failure is None:
        raise
      raise failure from None

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
    """Starts an asynchronous save of `state` and `meta` (which holds `best_step`)."""
    self._writing('checkpoints', self._latest.save, step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    # Orbax finished the previous save before starting this one: a rerun resumes from that
    # checkpoint at the earliest, so bests older than the one it names can go.
    self._delete_best_before(self._resumable_best)
    self._resumable_best = int(meta['best_step'])

  def _delete_best_before(self, step: int | None) -> None:
    for best in self._best.all_steps():
      if step is not None and best < step:
        self._best.delete(best)

  def restore(self, abstract_state: Any) -> tuple[Any, dict]:
    """The latest checkpoint that restores, onto the shardings of `abstract_state`.

    A checkpoint that cannot be read (damaged on disk) is deleted with a warning and the one
    before it is used; its successors would otherwise clash with the steps the resumed run
    saves. If none can be read, an InputError: they belong to a different configuration.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    steps = sorted(self._latest.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        out = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      except (ValueError, KeyError, TypeError, OSError) as e:
        failures.append(f'{self.directory}/checkpoints/{step} '
                        f'({(str(e).strip() or type(e).__name__).split(". ")[0][:300]})')
        continue
      for failure, newer in zip(failures, steps):
        logging.warning('cannot restore %s; resuming from step %d', failure, step)
        self._latest.delete(newer)
      meta = out['meta']
      self.discard_best_after(step)
      if meta['best_step'] >= 0 and meta['best_step'] not in self._best.all_steps():
        logging.warning('the best checkpoint of step %d is gone; the next evaluation saves one',
                        meta['best_step'])
        meta.update(best_step=-1, best_miou=-1.0)
      self._resumable_best = int(meta['best_step'])
      return out['state'], meta
    if failures:
      raise InputError(f'cannot restore {failures[0]}: the checkpoints were written with another '
                       'configuration; rerun with that one or use another --workdir')
    raise FileNotFoundError(f'no checkpoint in {self.directory}/checkpoints')

  def save_best(self, step: int, variables: Any, meta: dict) -> None:
    self._writing('best', self._best.save, step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)), force=True)

  def discard_best_after(self, step: int) -> None:
    """Deletes best checkpoints newer than `step`: a cut-off run saved them after the
    checkpoint that is resumed (step 0: a fresh start), and the resumed run saves them again."""
    for best in self._best.all_steps():
      if best > step:
        self._best.delete(best)

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def restore_best(self, abstract_variables: Any | None = None) -> tuple[Any, dict]:
    step = self._best.latest_step()
    if step is None:
      raise FileNotFoundError(f'no best checkpoint in {self._best.directory}')
    target = (None if abstract_variables is None else
              jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_variables))
    out = self._best.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out['variables'], out['meta']

  def best_meta(self) -> dict | None:
    step = self._best.latest_step()
    if step is None:
      return None
    return self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def model_step(self, selection: str) -> int | None:
    """The step of the model `selection` ('best' or 'last') picks; None if there is none."""
    return self.best_step() if _check_selection(selection) == 'best' else self.latest_step()

  def model_meta(self, selection: str) -> dict | None:
    """{'step': int, 'miou': float ('best' only)} of the model `selection` picks, or None."""
    if _check_selection(selection) == 'best':
      return self.best_meta()
    step = self.latest_step()
    return None if step is None else {'step': step}

  def restore_model(self, selection: str, abstract_variables: Any) -> tuple[Any, dict]:
    """The segmenter variables `selection` picks, and `model_meta`."""
    if _check_selection(selection) == 'best':
      return self.restore_best(abstract_variables)
    step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}/checkpoints')
    path = self.directory / 'checkpoints' / str(step)
    return _restore_state_variables(path, abstract_variables), {'step': step}

  def wait(self) -> None:
    self._writing('checkpoints', self._latest.wait_until_finished)
    self._best.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
      self._delete_best_before(self._resumable_best)
    finally:
      self._latest.close()
      self._best.close()


def selected_model(workdir: fileio.PathLike, selection: str, self_train: bool = True
                   ) -> tuple[str, int] | None:
  """(stage, step) of the model `selection` picks ('best' or 'last') in the latest training
  stage that holds one: self_train (unless `self_train` is False: self-training disabled), else
  adapt; None if none does. Creates nothing."""
  for stage in TRAINING_STAGES_LATEST_FIRST if self_train else ('adapt',):
    with StageCheckpoints(fileio.Path(workdir) / stage) as ckpts:
      step = ckpts.model_step(selection)
    if step is not None:
      return stage, step
  return None


def save_variables(directory: fileio.PathLike, variables: Any, meta: dict) -> None:
  """Segmenter variables to `directory/variables` (what `config.init_from` points at), then
  their record `meta` (`converted.metadata`) to `directory/metadata.json`.

  The record is removed first and written last: a folder whose save was cut off has none,
  and so is refused as a whole rather than loaded in part.
  """
  directory = fileio.absolute(directory)
  directory.mkdir(parents=True, exist_ok=True)
  if (directory / converted.METADATA).exists():
    (directory / converted.METADATA).unlink()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / 'variables', variables, force=True)
  ckptr.wait_until_finished()
  converted.write_metadata(directory, meta)


def load_variables(directory: fileio.PathLike, abstract_variables: Any, meta: dict) -> Any:
  """Inverse of `save_variables`, once `converted.check` has returned `meta`.

  Restores exactly what the folder holds, shapes checked: for an ImageNet conversion the trunk
  of `abstract_variables` (`DeepLabV2Depth` shapes), for a trained one all of them.
  """
  if meta['kind'] == converted.IMAGENET:
    abstract_variables = models.trunk(abstract_variables)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_variables)
  return ocp.StandardCheckpointer().restore(fileio.absolute(directory) / 'variables', target)


def _check_selection(selection: str) -> str:
  if selection not in MODEL_SELECTIONS:
    raise InputError(f'config.model_selection={selection!r}: expected one of {MODEL_SELECTIONS}')
  return selection


def _restore_state_variables(step_dir: fileio.Path, abstract_variables: Any) -> Any:
  """The segmenter variables (params, batch_stats) of a whole-`TrainState` step folder,
  without reading the optimizer states or the discriminator."""
  fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_variables)
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, 'sharding', None) or fallback), target)
  out = ocp.PyTreeCheckpointer().restore(
      step_dir / 'state',
      args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  return dict(out)


def _step_dirs(directory: fileio.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def load_model(path: str, selection: str, abstract_variables: Any, config: Any
               ) -> tuple[Any, dict]:
  """Segmenter variables from any checkpoint folder a user names (`--checkpoint`).

  `path`: a folder written by `depthuda.convert` (`variables/`, checked by `converted.check`
  against the `config`'s model; a trained model, not an ImageNet trunk); a step folder of a stage's
  best/ (`variables/`, `meta/`) or checkpoints/ (`state/`, whose segmenter part is read); a
  best/ or checkpoints/ folder (its latest step); or a stage folder (DIR/adapt, DIR/self_train),
  whose model `selection` picks.

  Returns:
    (variables, {'checkpoint': absolute path, 'step': int or None, 'selection': the selection
    applied or None, 'description': str}).
  """
  path = fileio.absolute(path.rstrip('/') or '/')
  if not path.is_dir():
    raise InputError(f'--checkpoint={path}: no such directory ({_EXPECTED})')
  name, parent = path.name, path.parent
  info = {'checkpoint': str(path), 'step': None, 'selection': None}
  try:
    if (path / 'variables').is_dir() and not (path / 'meta').is_dir():
      meta = converted.check(path, f'--checkpoint={path}', config.data.num_classes,
                             config.model.layers, config.model.width, trained_only=True)
      info['description'] = f'{path} (converted)'
      return load_variables(path, abstract_variables, meta), info
    if name.isdigit() and (path / 'variables').is_dir():  # best/<step>
      variables = ocp.StandardCheckpointer().restore(
          path / 'variables',
          jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_variables))
      info.update(step=int(name), description=f'{parent} step {name}')
      return variables, info
    if name.isdigit() and (path / 'state').is_dir():  # checkpoints/<step>
      info.update(step=int(name), description=f'{parent} step {name}')
      return _restore_state_variables(path, abstract_variables), info
    if name in ('best', 'checkpoints') and _step_dirs(path):
      stage_dir, selection = parent, 'best' if name == 'best' else 'last'
    elif any((path / sub).is_dir() and _step_dirs(path / sub) for sub in ('best', 'checkpoints')):
      stage_dir = path
    else:
      raise InputError(f'--checkpoint={path}: not a checkpoint ({_EXPECTED})')
    with StageCheckpoints(stage_dir) as stages:
      variables, meta = stages.restore_model(selection, abstract_variables)
  except (ValueError, KeyError, TypeError) as e:
    raise InputError(f'--checkpoint={path}: does not match the model of this config '
                     f'({(str(e).strip() or type(e).__name__).splitlines()[0][:200]})') from None
  except FileNotFoundError as e:
    raise InputError(f'--checkpoint={path}: {e}') from None
  info.update(step=meta['step'], selection=selection,
              description=f'{stage_dir} {selection} step {meta["step"]}')
  return variables, info
