"""The `adapt` and `self_train` stages: a resumable, data-parallel training loop.

Both stages share the loop: build the mesh and state, restore the latest checkpoint if any,
stream process-local batches from the step where the checkpoint left off, run the jitted
sharded step, log on log steps, evaluate on eval steps (keeping the best model), checkpoint.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthuda import checkpointing
from depthuda import reporting
from depthuda import train
from depthuda.errors import InputError
from depthuda.stages import evaluation
from depthuda.stages import fit_gmm


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks: checkpoint, then exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Interrupted(Exception):
  """Raised after a requested stop has been checkpointed."""


def initial_variables(config: ml_collections.ConfigDict, workdir: str, stage: str,
                      seg) -> dict | None:
  """Where a stage starts: self_train from adapt's best model, adapt from `init_from`."""
  w, h = config.data.input_size
  abstract = jax.eval_shape(lambda: seg.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, h, w, 3)), train=False))
  if stage == 'self_train':
    variables, _ = checkpointing.StageCheckpoints(os.path.join(workdir, 'adapt')).restore_best(abstract)
    return variables
  if config.init_from:
    try:
      return checkpointing.load_variables(config.init_from, abstract)
    except FileNotFoundError as e:
      raise InputError(f'config.init_from: {e}') from None
    except ValueError as e:
      raise InputError(f'config.init_from={config.init_from}: checkpoint does not match the '
                       f'model ({str(e).splitlines()[0]})') from None
  return None


def run(stage: str, config: ml_collections.ConfigDict, workdir: str,
        batches: Callable[[int], Iterator[dict]]) -> dict:
  """Trains `stage` for its configured number of steps; returns its results.json entry.

  batches(start_step) yields process-local numpy batches starting at that global step.
  """
  stage_dir = os.path.join(workdir, stage)
  num_steps = config[stage].num_steps
  mesh = train.make_mesh()
  try:
    train.check_batch_size(config.batch_size, mesh)
  except ValueError as e:
    raise InputError(str(e)) from None
  seg, disc = train.build_models(config)
  state, seg_tx, disc_tx = train.init_state(config, seg, disc,
                                            initial_variables(config, workdir, stage, seg))
  state = train.replicate(state, mesh)
  ckpts = checkpointing.StageCheckpoints(stage_dir, keep=config.keep_checkpoints)
  meta = {'step': 0, 'best_miou': -1.0, 'best_step': -1}
  if ckpts.latest_step() is not None:
    state, meta = ckpts.restore(state)
  start = int(meta['step'])

  if stage == 'adapt':
    needs_gmm = config.loss.lambda_bal_src > 0 or config.loss.lambda_bal_tgt > 0
    gmm_params = train.replicate(fit_gmm.load_params(workdir), mesh) if needs_gmm else None
    step_fn = train.make_sharded_step(train.adapt_step, mesh, seg=seg, disc=disc, seg_tx=seg_tx,
                                      disc_tx=disc_tx, config=config)
    extra = (gmm_params,)
  else:
    step_fn = train.make_sharded_step(train.self_train_step, mesh, seg=seg, seg_tx=seg_tx,
                                      config=config)
    extra = ()

  log = reporting.MetricsLog(stage_dir, start_step=start)
  stream = batches(start)
  bar = reporting.progress(total=num_steps, initial=start, desc=stage)
  try:
    with _StopRequest() as stop:
      for step in range(start, num_steps):
        state, metrics = step_fn(state, train.shard_batch(next(stream), mesh), *extra)
        done = step + 1
        bar.update(1)
        if done % config.log_every_steps == 0 or done == num_steps:
          values = jax.device_get(metrics)
          bad = reporting.check_finite(done, values)
          if bad is not None:
            raise InputError(f'{stage}: non-finite {bad} at step {done}; the last good checkpoint '
                             f'is kept in {stage_dir}/checkpoints')
          log.scalars(done, values)
          bar.set_postfix(loss=f"{float(values['loss']):.3f}")
        if done % config.eval_every_steps == 0 or done == num_steps:
          variables = {'params': state.params, 'batch_stats': state.batch_stats}
          result = evaluation.evaluate(config, seg, variables, desc=f'{stage} eval @{done}')
          log.scalars(done, {'val_miou': result['miou'],
                             **{f'val_iou/{k}': v for k, v in result['per_class_iou'].items()
                                if v is not None}})
          if config.log_images_every_steps and done % config.log_images_every_steps == 0:
            log.images(done, evaluation.image_panels(config, seg, variables, count=2))
          if result['miou'] > meta['best_miou']:
            meta.update(best_miou=result['miou'], best_step=done)
            ckpts.save_best(done, variables, {'step': done, 'miou': result['miou']})
        meta['step'] = done
        if done % config.checkpoint_every_steps == 0 or done == num_steps or stop.requested:
          ckpts.save(done, state, dict(meta), force=stop.requested)
        if stop.requested:
          raise Interrupted(f'{stage}: stopped by signal at step {done}; checkpoint saved, rerun '
                            'the same command to continue')
  finally:
    bar.close()
    ckpts.close()
    log.close()
  return {'steps': num_steps, 'best_miou': meta['best_miou'], 'best_step': meta['best_step']}


def is_complete(stage: str, config: ml_collections.ConfigDict, workdir: str) -> bool:
  results = reporting.read_results(workdir).get(stage)
  if not results or results.get('steps') != config[stage].num_steps:
    return False
  return checkpointing.StageCheckpoints(os.path.join(workdir, stage)).best_step() is not None
