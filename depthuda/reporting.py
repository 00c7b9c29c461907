"""What a stage reports: metrics.jsonl, TensorBoard events, results.json and its progress.

Only process 0 writes. On restart `metrics.jsonl` is cut back to the resumed checkpoint's step
(dropping what a killed run logged after it, including a half-written last line), so a resumed
run's file equals an uninterrupted run's line for line. Non-finite values are written as null.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterable

import jax
import numpy as np
import tqdm

from depthuda import fileio

log = logging.getLogger('depthuda')


def is_writer() -> bool:
  return jax.process_index() == 0


def _to_python(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def write_text(path: fileio.PathLike, text: str) -> None:
  """Atomic write (`fileio.write_atomic`), process 0 only: a crash or a full disk leaves the
  previous file intact."""
  if is_writer():
    fileio.write_atomic(path, text)


def write_json(path: fileio.PathLike, obj: Any) -> None:
  """Atomic JSON write, process 0 only."""
  write_text(path, json.dumps(_to_python(obj), indent=2))


def read_results(workdir: fileio.PathLike) -> dict:
  path = fileio.Path(workdir) / 'results.json'
  if not path.exists():
    return {}
  return json.loads(path.read_text())


def update_results(workdir: fileio.PathLike, stage: str, entry: dict) -> None:
  results = read_results(workdir)
  results[stage] = _to_python(entry)
  write_json(fileio.Path(workdir) / 'results.json', results)


class MetricsLog:
  """`<stage_dir>/metrics.jsonl` plus TensorBoard scalars and images under `<stage_dir>/tb`."""

  def __init__(self, stage_dir: fileio.PathLike, start_step: int = 0, tensorboard: bool = True):
    self.path = fileio.Path(stage_dir) / 'metrics.jsonl'
    self._writer = None
    if not is_writer():
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._truncate(start_step)
    if tensorboard:
      from clu import metric_writers  # Imports TensorFlow: kept out of the core modules.
      # TensorFlow's summary writer opens any path tf.io.gfile knows, gs:// included.
      self._writer = metric_writers.SummaryWriter(os.fspath(self.path.parent / 'tb'))

  def _truncate(self, start_step: int) -> None:
    """Keeps the lines of steps <= start_step: the resumed checkpoint was saved after logging
    its step, and later lines are logged again by the resumed run."""
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if _step(line) is not None and _step(line) <= start_step]
    fileio.write_atomic(self.path, ''.join(line + '\n' for line in kept))

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    if not is_writer():
      return
    values = {k: float(v) for k, v in _to_python(values).items()}
    record = {k: v if math.isfinite(v) else None for k, v in values.items()}
    # An append rewrites the whole object on a store like gs://: lines are few (one per log).
    with self.path.open('a') as f:
      f.write(json.dumps({'step': int(step), **record}, sort_keys=True) + '\n')
    if self._writer is not None:
      self._writer.write_scalars(int(step), {k: v for k, v in record.items() if v is not None})

  def images(self, step: int, images: dict[str, np.ndarray]) -> None:
    if is_writer() and self._writer is not None:
      self._writer.write_images(int(step), {k: v[None] if v.ndim == 3 else v
                                            for k, v in images.items()})

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


def _step(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a blank or half-written one."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None


def read_metrics(path: fileio.PathLike) -> list[dict]:
  path = fileio.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if _step(line) is not None]


class Progress:
  """A long loop's progress on process 0: a tqdm bar on a terminal, plain lines in a log.

  Where stderr is not a terminal (a batch job's log file), no bar is drawn: an INFO line of
  logger `depthuda` gives `<desc>: <unit> <done>/<total>, <rate> <unit>/s, ETA <h:mm:ss>` at most
  every `log_seconds`, and `<desc>: <unit> <done>/<total>, <rate> <unit>/s, done` when the loop
  ends. `log(text)` writes such a line at once, with `text` after the count (the training
  loop's losses; it passes log_seconds=None), on a terminal above the bar. The total defaults to
  len(iterable); the rate and ETA are over the steps since the last line.
  """

  def __init__(self, iterable: Iterable | None = None, total: int | None = None,
               initial: int = 0, desc: str = '', unit: str = 'step',
               log_seconds: float | None = 60.0):
    if total is None and hasattr(iterable, '__len__'):
      total = len(iterable)
    self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
    self.count = initial
    self._log_seconds = log_seconds
    self._mark = (time.perf_counter(), initial)  # (time, count) of the last line
    self._logged = True  # nothing new since the last line
    self._bar = None
    if is_writer() and sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0, smoothing=0.1)

  def __iter__(self):
    for item in self.iterable:
      yield item
      self.update(1)
    self.close()

  def update(self, n: int = 1) -> None:
    self.count += n
    self._logged = False
    if self._bar is not None:
      self._bar.update(n)
    elif (self._log_seconds is not None
          and time.perf_counter() - self._mark[0] >= self._log_seconds):
      self.log()

  def log(self, text: str = '', finished: bool = False) -> None:
    """One INFO line: the count, `text`, the rate and ETA (or `done`) since the last line."""
    if not is_writer():
      return
    now = time.perf_counter()
    rate = (self.count - self._mark[1]) / max(now - self._mark[0], 1e-9)
    self._mark, self._logged = (now, self.count), True
    done = f'{self.count}/{self.total}' if self.total is not None else f'{self.count}'
    line = f'{self.desc}: {self.unit} {done}' + (f', {text}' if text else '')
    line += f', {rate:.3g} {self.unit}/s'
    if finished:
      line += ', done'
    elif self.total is not None and rate > 0:
      line += f', ETA {_duration((self.total - self.count) / rate)}'
    if self._bar is not None:
      with self._bar.external_write_mode():
        log.info(line)
    else:
      log.info(line)

  def write(self, message: str) -> None:
    """A warning that does not break the bar."""
    if self._bar is not None:
      with self._bar.external_write_mode():
        log.warning(message)
    else:
      log.warning(message)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif not self._logged and self._log_seconds is not None:
      self.log(finished=True)


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}'


def progress(iterable: Iterable | None = None, total: int | None = None, initial: int = 0,
             desc: str = '', unit: str = 'step') -> Progress:
  """The progress of a loop with rate and ETA (silent on processes other than 0)."""
  return Progress(iterable, total=total, initial=initial, desc=desc, unit=unit)

