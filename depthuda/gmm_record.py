"""The fitted GMMs on disk: `fit_gmm/gmm.json`, written by the fit_gmm stage, read by adapt (the
density targets, METHOD §4) and pseudo_label (the source pixel counts behind the region sizes,
METHOD §6).

The record is human-readable JSON: per class (by name) its source pixel count, the number of
grid points fitted, and the weights [K], means [K, 3] and variances [K, 3] of its mixture over
(grid column, grid row, inverse depth).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from depthuda import fileio
from depthuda import gmm
from depthuda import reporting

COORDINATES = ('x (grid column)', 'y (grid row)', 'z (inverse depth)')


def path(workdir: fileio.PathLike) -> fileio.Path:
  return fileio.Path(workdir) / 'fit_gmm' / 'gmm.json'


def make(params: gmm.GMMParams, info: dict, class_names: Sequence[str],
         pixel_counts: np.ndarray, num_points: np.ndarray,
         grid_size_hw: tuple[int, int]) -> dict:
  """The record of a fit: `params` [C, K, ...], EM's `info`, per-class counts [C]."""
  return {
      'num_components': int(params.weights.shape[-1]),
      'coordinates': list(COORDINATES),
      'grid_size_hw': list(grid_size_hw),
      'classes': {
          name: {'pixel_count': int(pixel_counts[c]), 'num_points': int(num_points[c]),
                 'weights': np.asarray(params.weights[c]).tolist(),
                 'means': np.asarray(params.means[c]).tolist(),
                 'variances': np.asarray(params.variances[c]).tolist()}
          for c, name in enumerate(class_names)},
      'iterations': int(info['iterations']),
      'mean_log_likelihood': float(info['mean_log_likelihood']),
  }


def write(workdir: fileio.PathLike, record: dict) -> None:
  """Atomically, from process 0."""
  reporting.write_json(path(workdir), record)


def read(workdir: fileio.PathLike) -> dict:
  record_path = path(workdir)
  if not record_path.exists():
    raise FileNotFoundError(f'{record_path} is missing (run the fit_gmm stage first)')
  return json.loads(record_path.read_text())


def load_params(workdir: fileio.PathLike) -> gmm.GMMParams:
  """The GMMs of every class, [C, K] and [C, K, 3] float32, in the record's class order."""
  classes = read(workdir)['classes'].values()
  stack = lambda key: jnp.asarray(np.array([c[key] for c in classes], np.float32))
  return gmm.GMMParams(weights=stack('weights'), means=stack('means'),
                       variances=stack('variances'))


def pixel_counts(workdir: fileio.PathLike) -> np.ndarray:
  """[C] source pixels of each class, in the record's class order."""
  return np.array([c['pixel_count'] for c in read(workdir)['classes'].values()])


def matches(record: dict, class_names: Sequence[str], num_components: int,
            grid_size_hw: tuple[int, int]) -> bool:
  """Whether `record` holds finite GMMs of these classes, components and grid."""
  k = num_components
  shapes = {'weights': (k,), 'means': (k, 3), 'variances': (k, 3)}
  try:
    if (list(record['classes']) != list(class_names) or record['num_components'] != k
        or record['grid_size_hw'] != list(grid_size_hw)):
      return False
    for c in record['classes'].values():
      for key, shape in shapes.items():
        values = np.asarray(c[key], np.float64)
        if values.shape != shape or not np.isfinite(values).all():
          return False
  except (KeyError, TypeError, ValueError):
    return False
  return True


def summary(record: dict) -> str:
  """A table: per class its pixel count and its heaviest component."""
  lines = [f'{"class":<14}{"pixels":>12}  mean (x, y, z) of the heaviest component']
  for name, c in record['classes'].items():
    k = int(np.argmax(c['weights']))
    mean = ', '.join(f'{v:7.2f}' for v in c['means'][k])
    lines.append(f'{name:<14}{c["pixel_count"]:>12}  ({mean})  w={c["weights"][k]:.2f}')
  return '\n'.join(lines)
