"""The `adapt` and `self_train` stages: a resumable, data-parallel training loop.

Both stages share the loop: build the mesh and state, restore the latest checkpoint if any,
stream process-local batches from the step where the checkpoint left off (sharded onto the
mesh ahead of the step, `sharding.prefetch_to_mesh`), run the jitted sharded step, then the
periodic actions (`clu.periodic_actions`): log on log steps (TensorBoard and an INFO line with
the losses, learning rates, steps/s and ETA), evaluate on eval steps (keeping the best model),
image panels, one metrics.jsonl object per logged or evaluated step, checkpoint.

Faults: a run killed at any moment continues from its latest complete checkpoint, and since the
state and the data position are both restored, it logs exactly what an uninterrupted run
logs. SIGTERM or SIGINT saves a checkpoint after the current step and stops (a second signal
stops at once). The metrics of every step are checked before anything is logged or saved: a
non-finite loss or gradient stops the run naming the step and the term, so every checkpoint on
disk is good (`config.nonfinite='skip'` skips such updates instead).
"""

from __future__ import annotations

import math
import signal
from typing import Any, Callable, Iterator

import jax
from clu.periodic_actions import PeriodicCallback
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from depthuda import checkpointing
from depthuda import converted
from depthuda import fileio
from depthuda import gmm_record
from depthuda import losses
from depthuda import models
from depthuda import reporting
from depthuda import sharding
from depthuda import train
from depthuda import validation
from depthuda.errors import InputError
from depthuda.errors import Interrupted

_SKIP_WARNINGS = 10  # skipped steps reported one by one; results.json counts them all


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks: checkpoint, then exit cleanly.

  `agree()` after every step makes the flag the same in every process (each receives its own
  signals, maybe at different steps), so that all of them save the same step and stop together.
  """

  def __init__(self):
    self.signum = None  # agreed by every process
    self._received = None  # this process's
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self._received is not None:  # Asked twice: the user does not want to wait for the save.
      raise Interrupted(f'stopped by {signal.Signals(signum).name} without saving a checkpoint',
                        signum)
    self._received = signum

  def agree(self) -> None:
    """Sets `signum` to a signal some process received, or None: the same in every process."""
    if jax.process_count() == 1:
      self.signum = self._received
    else:  # one tiny collective per step, negligible beside the step itself
      received = multihost_utils.process_allgather(np.int32(self._received or 0))
      self.signum = int(np.max(received)) or None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def initial_variables(config: ml_collections.ConfigDict, workdir: str, stage: str,
                      seg) -> dict | None:
  """Where a stage starts: self_train from adapt's model (config.model_selection: its best or
  its last), adapt from `init_from` (an ImageNet conversion gives the trunk alone:
  `train.init_state` initializes the rest)."""
  abstract = models.abstract_variables(config, seg)
  if stage == 'self_train':
    with checkpointing.StageCheckpoints(fileio.Path(workdir) / 'adapt') as ckpts:
      variables, _ = ckpts.restore_model(config.model_selection, abstract)
    return variables
  if config.init_from:
    meta = converted.check_init_from(config)
    try:
      return checkpointing.load_variables(config.init_from, abstract, meta)
    except ValueError as e:  # a folder whose metadata.json does not describe its variables
      raise InputError(f'config.init_from={config.init_from}: checkpoint does not match the '
                       f'model ({str(e).splitlines()[0]})') from None
  return None


def _check_steps(stage: str, config: ml_collections.ConfigDict, pending: list[tuple[int, Any]],
                 meta: dict, ckpts: checkpointing.StageCheckpoints, bar) -> dict:
  """Fetches the metrics of the steps since the last check and handles non-finite ones.

  Returns the host values of the last step. With nonfinite='stop' the first bad step raises an
  InputError before anything of it is logged or saved; with 'skip' it is counted in meta.
  """
  fetched = jax.device_get([metrics for _, metrics in pending])
  for (step, _), values in zip(pending, fetched):
    if not values.pop('nonfinite'):
      continue
    terms = [k for k in (*train.LOSS_NAMES, 'loss_disc', 'loss')
             if k in values and not math.isfinite(float(values[k]))]
    what = ('non-finite ' + ', '.join(f'{k}={float(values[k])}' for k in terms) if terms
            else 'non-finite gradient')
    if config.nonfinite == 'stop':
      last = ckpts.latest_step()
      kept = f'step {last} in {ckpts.directory}/checkpoints' if last is not None else 'none yet'
      raise InputError(f'{stage}: {what} at step {step}; stopped (last good checkpoint: {kept}; '
                       '--config.nonfinite=skip skips such steps)')
    meta['skipped_steps'] = meta.get('skipped_steps', 0) + 1
    if meta['skipped_steps'] <= _SKIP_WARNINGS:
      bar.write(f'{stage}: {what} at step {step}; update skipped')
  return fetched[-1]


class _StepMetrics:
  """The metrics of the steps run since the last check, left on device until an action needs
  them: `values()` then fetches and checks them all (`_check_steps`), once."""

  def __init__(self, check: Callable[[list[tuple[int, Any]]], dict]):
    self._check = check
    self._pending = []
    self._values = None

  def add(self, step: int, metrics: Any) -> None:
    self._pending.append((step, metrics))

  def values(self) -> dict:
    """The host values of the latest step, every step since the last call checked."""
    if self._pending:
      self._values = self._check(self._pending)
      self._pending = []
    return self._values


def _periodic(every_steps: int, num_steps: int, callback: Callable) -> PeriodicCallback:
  """An action at every multiple of `every_steps` and at the last step (`callback(step=, t=,
  **kwargs)`)."""
  return PeriodicCallback(every_steps=every_steps, on_steps=[num_steps], callback_fn=callback)


def run(stage: str, config: ml_collections.ConfigDict, workdir: str,
        batches: Callable[[int], Iterator[dict]]) -> dict:
  """Trains `stage` for its configured number of steps; returns its results.json entry.

  batches(start_step) yields process-local numpy batches starting at that global step.
  """
  if config.nonfinite not in ('stop', 'skip'):
    raise InputError(f"config.nonfinite={config.nonfinite!r}: expected 'stop' or 'skip'")
  stage_dir = fileio.Path(workdir) / stage
  num_steps = config[stage].num_steps
  mesh = sharding.make_mesh()
  try:
    sharding.check_batch_size(config.batch_size, mesh)
  except ValueError as e:
    raise InputError(str(e)) from None
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  # Leaving the block waits for the last save.
  with checkpointing.StageCheckpoints(stage_dir, keep=config.keep_checkpoints,
                                      resume=True) as ckpts:
    return _train(stage, config, workdir, batches, mesh, seg, disc, ckpts)


def _train(stage: str, config: ml_collections.ConfigDict, workdir: str,
           batches: Callable[[int], Iterator[dict]], mesh, seg, disc,
           ckpts: checkpointing.StageCheckpoints) -> dict:
  stage_dir, num_steps = fileio.Path(workdir) / stage, config[stage].num_steps
  resuming = ckpts.latest_step() is not None
  # A resumed run overwrites the initial variables: it needs no `init_from` any more.
  state, seg_tx, disc_tx = train.init_state(
      config, seg, disc, None if resuming else initial_variables(config, workdir, stage, seg))
  state = sharding.replicate(state, mesh)
  meta = {'step': 0, 'best_miou': -1.0, 'best_step': -1, 'skipped_steps': 0}
  if resuming:
    state, meta = ckpts.restore(state)
  else:
    ckpts.discard_best_after(0)
  start = int(meta['step'])
  if start > num_steps:
    raise InputError(f'{stage}: the checkpoints in {stage_dir} are at step {start}, beyond '
                     f'{stage}.num_steps={num_steps}; raise it or use another --workdir')

  if stage == 'adapt':
    weights = losses.loss_weights(config.loss)
    needs_gmm = weights['loss_bal_src'] > 0 or weights['loss_bal_tgt'] > 0
    gmm_params = sharding.replicate(gmm_record.load_params(workdir), mesh) if needs_gmm else None
    step_fn = sharding.make_sharded_step(train.adapt_step, mesh, seg=seg, disc=disc, seg_tx=seg_tx,
                                      disc_tx=disc_tx, config=config)
    extra = (gmm_params,)
  else:
    step_fn = sharding.make_sharded_step(train.self_train_step, mesh, seg=seg, seg_tx=seg_tx,
                                      config=config)
    extra = ()

  log = reporting.MetricsLog(stage_dir, start_step=start)
  stream = sharding.prefetch_to_mesh(batches(start), mesh)
  bar = reporting.Progress(total=num_steps, initial=start, desc=stage, log_seconds=None)
  metrics = _StepMetrics(lambda pending: _check_steps(stage, config, pending, meta, ckpts, bar))

  # The periodic actions. Each gets the step just done, the state after it and the record that
  # step writes to metrics.jsonl (one object per step). Checked first, in this order: log,
  # evaluate, image panels; then the record is written; then the checkpoint is saved (a
  # resumed run keeps the lines of the steps up to its checkpoint's).
  def log_metrics(step, t, state, record):
    del t, state
    values = metrics.values()
    record.update(values)
    bar.log(' '.join(f'{k}={float(v):.4g}' for k, v in sorted(values.items())))

  def evaluate(step, t, state, record):
    del t
    record.update(metrics.values())  # every object has the step's losses
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    result = validation.evaluate(config, seg, variables, desc=f'{stage} eval @{step}')
    record.update({'val_miou': result['miou'],
                   **{f'val_iou/{k}': v for k, v in result['per_class_iou'].items()
                      if v is not None}})
    if meta['best_step'] < 0 or result['miou'] > meta['best_miou']:
      meta.update(best_miou=result['miou'], best_step=step)
      ckpts.save_best(step, variables, {'step': step, 'miou': result['miou']})

  def log_images(step, t, state, record):
    del t, record
    metrics.values()  # nothing logged of a failed step
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    log.images(step, validation.image_panels(config, seg, variables, count=2))

  def save(step, t, state, force=False):
    del t
    metrics.values()  # no checkpoint of a state after a failed step
    ckpts.save(step, state, dict(meta), force=force)

  before_record = [_periodic(config.log_every_steps, num_steps, log_metrics),
                   _periodic(config.eval_every_steps, num_steps, evaluate)]
  if config.log_images_every_steps:
    before_record.append(PeriodicCallback(every_steps=config.log_images_every_steps,
                                          callback_fn=log_images))
  checkpoint = _periodic(config.checkpoint_every_steps, num_steps, save)
  try:
    with _StopRequest() as stop:
      for step in range(start, num_steps):
        state, step_metrics = step_fn(state, next(stream), *extra)
        done = step + 1
        bar.update(1)
        stop.agree()
        metrics.add(done, step_metrics)
        record = {}
        for action in before_record:
          action(done, state=state, record=record)
        if record:
          log.scalars(done, record)
        meta['step'] = done
        if not checkpoint(done, state=state, force=stop.requested) and stop.requested:
          save(done, None, state, force=True)
        if stop.requested:
          raise Interrupted(f'{stage}: stopped by {signal.Signals(stop.signum).name} at step '
                            f'{done}; checkpoint saved, rerun the same command to continue',
                            stop.signum)
  finally:
    bar.close()
    log.close()
  entry = {'steps': num_steps, 'best_miou': meta['best_miou'], 'best_step': meta['best_step']}
  if config.nonfinite == 'skip':
    entry['skipped_steps'] = meta.get('skipped_steps', 0)
  return entry


def is_complete(stage: str, config: ml_collections.ConfigDict, workdir: str) -> bool:
  """results.json records the configured steps, and the final and best checkpoints exist."""
  results = reporting.read_results(workdir).get(stage)
  stage_dir = fileio.Path(workdir) / stage
  if not results or results.get('steps') != config[stage].num_steps:
    return False
  with checkpointing.StageCheckpoints(stage_dir) as ckpts:
    return (ckpts.latest_step() == config[stage].num_steps
            and ckpts.best_step() == results.get('best_step'))
