"""Orbax checkpoints of a training stage: the latest N for resuming, the best for evaluation.

`<stage>/checkpoints/<step>/` holds the whole `TrainState` (both networks, BN statistics, both
optimizer states, step, RNG) and a JSON `meta` (the data position is the step itself: the input
order is a deterministic function of seed and step; best-model tracking). `<stage>/best/` holds
the segmenter variables of the best evaluation. Saves are asynchronous; `close()` waits.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class StageCheckpoints:
  """The checkpoints of one stage (`adapt` or `self_train`) under `directory`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    directory = os.path.abspath(directory)
    self._latest = ocp.CheckpointManager(
        os.path.join(directory, 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))
    self._best = ocp.CheckpointManager(
        os.path.join(directory, 'best'),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
    self._latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores onto the shardings of `abstract_state` (a state or its `jax.eval_shape`)."""
    step = self._latest.latest_step() if step is None else step
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def save_best(self, step: int, variables: Any, meta: dict) -> None:
    self._best.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                                  meta=ocp.args.JsonSave(meta)), force=True)

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
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._latest.close()
    self._best.close()


def save_variables(directory: str, variables: Any) -> None:
  """Segmenter variables to `directory/variables` (what `config.init_from` points at)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(os.path.abspath(directory), 'variables'), variables, force=True)
  ckptr.wait_until_finished()


def load_variables(directory: str, abstract_variables: Any | None = None) -> Any:
  """Inverse of `save_variables`; a one-line error if nothing is there."""
  path = os.path.join(os.path.abspath(directory), 'variables')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no converted checkpoint at {path} (write one with '
                            f'`python -m depthuda.convert --torch_checkpoint=IN.pth --output={directory}`)')
  target = (None if abstract_variables is None else
            jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_variables))
  return ocp.StandardCheckpointer().restore(path, target)
