"""Orbax checkpoints of a training stage: the latest N for resuming, the best for evaluation.

`<stage>/checkpoints/<step>/` holds the whole `TrainState` (both networks, BN statistics, both
optimizer states, step, RNG) and a JSON `meta`: the step, which is also the data position (the
input order is a deterministic function of seed and step), and the best-model tracking
(`best_miou`, `best_step`). `<stage>/best/<step>/` holds the segmenter variables of the best
evaluation. Latest checkpoints are saved asynchronously (`close()` waits); best ones
synchronously, so a checkpoint's `best_step` always names a finished best checkpoint, and a
best checkpoint is deleted only once no checkpoint that a rerun could resume from names it.

Orbax writes a step into a temporary directory and renames it when complete, so a run killed
during a save leaves the previous checkpoints untouched and only a temporary directory behind;
a resuming run (`resume=True`) removes it.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from depthuda import converted
from depthuda import models
from depthuda.errors import InputError
from depthuda.errors import write_failure

_TMP_MARK = '.orbax-checkpoint-tmp'


class _NoSaveTracebacks(logging.logging.Filter):

  def filter(self, record):
    from_orbax = f'{os.sep}orbax{os.sep}' in record.pathname
    orphan = record.name == 'asyncio' and 'exception was never retrieved' in str(record.msg)
    return not (record.exc_info and (from_orbax or orphan))


def quiet_failed_saves() -> None:
  """For command lines: a failed write (a full disk) is raised again where a save is waited
  for, and reported there in one line. Orbax's saving thread also logs it with a traceback,
  asyncio logs the write tasks that failed with it, and TensorStore reports each pending write
  to Orbax's closed event loop: all of these go."""
  logging.get_absl_handler().addFilter(_NoSaveTracebacks())
  default_hook = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      default_hook(unraisable)

  sys.unraisablehook = hook


def _remove_unfinished(directory: str) -> None:
  """Deletes the temporary directories of saves that a killed run did not finish."""
  if not os.path.isdir(directory) or jax.process_index() != 0:
    return
  for name in os.listdir(directory):
    if _TMP_MARK in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class StageCheckpoints:
  """The checkpoints of one stage (`adapt` or `self_train`) under `directory`.

  resume: True for the run that trains the stage; it cleans up after a killed save. Readers
  (evaluation, prediction) leave it False, so they never touch a save in progress.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               resume: bool = False):
    directory = os.path.abspath(directory)
    self.directory = directory
    if resume:
      for sub in ('checkpoints', 'best'):
        _remove_unfinished(os.path.join(directory, sub))
    self._latest = ocp.CheckpointManager(
        os.path.join(directory, 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))
    self._best = ocp.CheckpointManager(
        os.path.join(directory, 'best'),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    self._resumable_best = None  # best_step of the newest finished checkpoint

  def _writing(self, what: str, call, *args, **kwargs):
    """Runs an Orbax call; a failed write (full or read-only disk) becomes an InputError."""
    try:
      return call(*args, **kwargs)
    except (OSError, ValueError) as e:
      failure = write_failure(os.path.join(self.directory, what), e)
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


def save_variables(directory: str, variables: Any, meta: dict) -> None:
  """Segmenter variables to `directory/variables` (what `config.init_from` points at), then
  their record `meta` (`converted.metadata`) to `directory/metadata.json`.

  The record is removed first and written last: a folder whose save was cut off has none,
  and so is refused as a whole rather than loaded in part.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(os.path.join(directory, converted.METADATA)):
    os.remove(os.path.join(directory, converted.METADATA))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, 'variables'), variables, force=True)
  ckptr.wait_until_finished()
  converted.write_metadata(directory, meta)


def load_variables(directory: str, abstract_variables: Any, meta: dict) -> Any:
  """Inverse of `save_variables`, once `converted.check` has returned `meta`.

  Restores exactly what the folder holds, shapes checked: for an ImageNet conversion the trunk
  of `abstract_variables` (`DeepLabV2Depth` shapes), for a trained one all of them.
  """
  if meta['kind'] == converted.IMAGENET:
    abstract_variables = models.trunk(abstract_variables)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_variables)
  return ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), 'variables'), target)
