"""The `fit_gmm` stage: per-class depth-distribution GMMs on the source set (METHOD §4).

Every source label map and inverse-depth map goes to the feature grid straight from its file's
resolution by PIL's nearest rule, as the original's (`decoding.decode_source_maps`); the pixel
counts are taken at input size. Each cell of class c gives a point (x = column, y = row,
z = inverse depth). The grid is kept compactly (uint8 class, float32 depth per cell) and EM
streams it in chunks, so the points of the whole source set never exist as one array. float32,
not float16: SYNTHIA's raw depth 0 is inverse depth 65,536, float16's infinity, and the
original's GMMs have components there. The result, `fit_gmm/gmm.json` (`gmm_record`), is
human-readable and also holds the per-class source pixel counts that set the pseudo-label region
sizes (METHOD §6).

The scanned grid is kept in `fit_gmm/grid.*.npz` and the EM state after every iteration in
`fit_gmm/em_state.npz` until the GMMs are written: a run cut off during EM reads neither the
source set nor repeats the finished iterations, and (EM being deterministic given the grid and
the seed) writes the GMMs an uninterrupted run would.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from depthuda import fileio
from depthuda import gmm_record
from depthuda import gmm_streaming
from depthuda import models
from depthuda import reporting
from depthuda.data import labels as label_lib
from depthuda.data import pipeline

_CHUNK_IMAGES = 64
_INIT_POINTS_PER_CLASS = 20_000
# How the grid is made, in the keys of the saved grid and EM state: a grid scanned another way
# (the torch rule from input-size maps, float16 depth, as earlier versions did) is not reused.
_GRID_FORMAT = 'PIL nearest from the files; float32 depth'


def collect_grid(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """This process's source shard on the grid: classes [n,h,w] u8, depth [n,h,w] f32, counts [C]."""
  num_classes = config.data.num_classes
  classes, depths = [], []
  counts = np.zeros(num_classes, np.int64)
  for batch in reporting.progress(pipeline.source_grid_points(config, models.feature_grid(config)),
                                  desc='fit_gmm: scan', unit='batch'):
    label = batch['label']
    counts += np.bincount(label[label < num_classes].ravel(), minlength=num_classes)
    classes.append(batch['label_grid'].astype(np.uint8))
    depths.append(batch['depth_grid'].astype(np.float32))
  return np.concatenate(classes), np.concatenate(depths), counts


def _grid_cache(workdir: fileio.PathLike) -> fileio.Path:
  return (fileio.Path(workdir) / 'fit_gmm'
          / f'grid.{jax.process_index()}-of-{jax.process_count()}.npz')


def _load_keyed(path: fileio.Path, key: str) -> dict[str, np.ndarray] | None:
  """The arrays `_save_keyed` wrote at `path` under `key`; None if none, unreadable (cut off
  while written) or saved for another key."""
  try:
    with np.load(io.BytesIO(path.read_bytes())) as saved:
      if str(saved['key']) == key:
        return {name: saved[name] for name in saved.files if name != 'key'}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    pass
  return None


def _save_keyed(path: fileio.Path, key: str, what: str, arrays: dict[str, np.ndarray]) -> None:
  """Atomic `np.savez` of `arrays` under `key`. It only saves time on a rerun, so a failure (a
  full disk) is a warning, not a reason to stop the fit."""
  try:
    fileio.write_npz(path, key=np.array(key), **arrays)
  except OSError as e:
    logging.warning('fit_gmm: could not keep %s in %s (%s)', what, path, e)


def cached_grid(config: ml_collections.ConfigDict, workdir: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`collect_grid`, kept in fit_gmm/ (atomically) and reused while it matches the config."""
  path = _grid_cache(workdir)
  key = json.dumps({'source_dir': os.fspath(fileio.absolute(config.data.source_dir)),
                    'grid_format': _GRID_FORMAT, 'input_size': list(config.data.input_size),
                    'num_classes': config.data.num_classes,
                    'grid_size_hw': list(models.feature_grid(config))}, sort_keys=True)
  cache = _load_keyed(path, key)
  if cache is not None:
    return cache['classes'], cache['depths'], cache['counts']
  classes, depths, counts = collect_grid(config)
  _save_keyed(path, key, 'the scanned grid',
              {'classes': classes, 'depths': depths, 'counts': counts})
  return classes, depths, counts


def _cell_points(cells: np.ndarray, depths: np.ndarray) -> np.ndarray:
  """(column, row, inverse depth) [len(cells), 3] of flat indices into depths [n, h, w]."""
  _, h, w = depths.shape
  return np.stack([cells % w, cells // w % h, depths.reshape(-1)[cells]], -1).astype(np.float32)


def _pad(per_class: list[np.ndarray], size: int | None = None, dtype=np.float32):
  """Per-class arrays [n_c, ...] -> one zero-padded [C, size, ...] array and its mask [C, size]."""
  size = size or max(1, max(len(p) for p in per_class))
  out = np.zeros((len(per_class), size, *per_class[0].shape[1:]), dtype)
  mask = np.zeros((len(per_class), size), bool)
  for c, p in enumerate(per_class):
    out[c, :len(p)], mask[c, :len(p)] = p, True
  return out, mask


def _points(classes: np.ndarray, depths: np.ndarray, num_classes: int):
  """Grid cells -> padded per-class points [C,N,3] and mask [C,N]."""
  flat = classes.reshape(-1)
  return _pad([_cell_points(np.flatnonzero(flat == c), depths) for c in range(num_classes)])


def _cell_keys(cells: np.ndarray, seed: int) -> np.ndarray:
  """A pseudo-random uint32 per global cell index (SplitMix64's finaliser, top 32 bits)."""
  with np.errstate(over='ignore'):
    z = cells.astype(np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
  return (z >> np.uint64(32)).astype(np.uint32)


def _smallest(keys: np.ndarray, cells: np.ndarray, count: int) -> np.ndarray:
  """Indices of the `count` smallest (key, cell) pairs, in that order (cells < 2**32)."""
  order = (keys.astype(np.uint64) << np.uint64(32)) | cells.astype(np.uint64)
  idx = np.argpartition(order, count - 1)[:count] if len(order) > count else np.arange(len(order))
  return idx[np.argsort(order[idx])]


def sample_candidates(classes: np.ndarray, depths: np.ndarray, num_classes: int,
                      first_image: int, seed: int, per_class: int) -> tuple[np.ndarray, ...]:
  """This process's offer for the EM's initial sample: per class, its `per_class` cells with the
  smallest pseudo-random keys of their global index (this process holds images first_image,
  first_image + 1, ...). Returns points [C, M, 3], mask [C, M], cell ids and keys [C, M]."""
  _, h, w = classes.shape
  flat = classes.reshape(-1)
  points, cell_ids, key_ids = [], [], []
  for c in range(num_classes):
    idx = np.flatnonzero(flat == c)
    cells = np.int64(first_image) * h * w + idx
    keys = _cell_keys(cells, seed)
    pick = _smallest(keys, cells, per_class)
    idx, cells, keys = idx[pick], cells[pick], keys[pick]
    points.append(_cell_points(idx, depths))
    cell_ids.append(cells.astype(np.int32))
    key_ids.append(keys)
  points, mask = _pad(points, per_class)
  return (points, mask, _pad(cell_ids, per_class, np.int32)[0],
          _pad(key_ids, per_class, np.uint32)[0])


def choose_sample(points, mask, cell_ids, key_ids, per_class: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """From candidates [C, N, ...] (several processes' offers, concatenated along N), the
  `per_class` with the smallest keys per class, in key order: points [C, M, 3], mask [C, M]."""
  chosen = []
  for c in range(points.shape[0]):
    valid = np.flatnonzero(mask[c])
    chosen.append(points[c, valid[_smallest(key_ids[c, valid], cell_ids[c, valid], per_class)]])
  return _pad(chosen)


def init_sample(classes: np.ndarray, depths: np.ndarray, num_classes: int, first_image: int,
                seed: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
  """The EM's initial sample: per class, the `per_class` cells of the whole source set with the
  smallest pseudo-random keys of their global index, as points [C, M, 3] and mask [C, M].

  It depends only on the data and the seed, not on how the source set is split over processes:
  every process offers candidates, and all choose the same ones from the gathered offers.
  """
  offer = sample_candidates(classes, depths, num_classes, first_image, seed, per_class)
  if jax.process_count() > 1:  # [P, C, M, ...] -> [C, P * M, ...]
    offer = [np.concatenate(list(np.asarray(multihost_utils.process_allgather(x))), 1)
             for x in offer]
  return choose_sample(*offer, per_class)


def _em_state_path(workdir: fileio.PathLike) -> fileio.Path:
  return fileio.Path(workdir) / 'fit_gmm' / 'em_state.npz'


def _em_key(config: ml_collections.ConfigDict, counts: np.ndarray) -> str:
  """What an EM state depends on: a saved state with another key is not resumed."""
  g = config.gmm
  return json.dumps({'source_dir': os.fspath(fileio.absolute(config.data.source_dir)),
                     'grid_format': _GRID_FORMAT, 'input_size': list(config.data.input_size),
                     'seed': config.seed,
                     'num_classes': config.data.num_classes, 'num_components': g.num_components,
                     'tol': g.tol, 'var_floor': g.var_floor,
                     'pixel_counts': np.asarray(counts).tolist()}, sort_keys=True)


def _load_em_state(workdir: str, key: str) -> gmm_streaming.EMState | None:
  saved = _load_keyed(_em_state_path(workdir), key)
  return None if saved is None else gmm_streaming.EMState.from_arrays(saved)


def _save_em_state(workdir: str, key: str, state: gmm_streaming.EMState) -> None:
  if reporting.is_writer():
    _save_keyed(_em_state_path(workdir), key, 'the EM state', state.to_arrays())


def _sum_over_processes(stats):
  if jax.process_count() == 1:
    return stats
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x)).sum(0), stats)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  num_classes = config.data.num_classes
  classes, depths, counts = cached_grid(config, workdir)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  first_image = 0
  if jax.process_count() > 1:
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(classes))))
    first_image = int(sizes[:jax.process_index()].sum())
  init_points, init_mask = init_sample(classes, depths, num_classes, first_image, config.seed,
                                       _INIT_POINTS_PER_CLASS)

  def chunks():
    for i in range(0, len(classes), _CHUNK_IMAGES):
      yield _points(classes[i:i + _CHUNK_IMAGES], depths[i:i + _CHUNK_IMAGES], num_classes)

  g = config.gmm
  key = _em_key(config, counts)
  resume = _load_em_state(workdir, key)
  if jax.process_count() > 1:  # every process resumes from the same iteration, or none does
    seen = multihost_utils.process_allgather(np.int32(resume.iteration if resume else -1))
    resume = resume if len(set(np.asarray(seen).tolist())) == 1 else None
  if resume is not None and reporting.is_writer():
    print(f'fit_gmm: continuing EM after iteration {resume.iteration}')
  bar = reporting.progress(total=g.max_iters, initial=resume.iteration if resume else 0,
                           desc='fit_gmm: EM', unit='iter')
  params, info = gmm_streaming.fit_streaming(
      chunks, init_points, init_mask, num_components=g.num_components, seed=config.seed,
      max_iters=g.max_iters, tol=g.tol, var_floor=g.var_floor, reduce_fn=_sum_over_processes,
      progress=lambda *_: bar.update(1), resume=resume,
      on_iteration=lambda state: _save_em_state(workdir, key, state))
  bar.close()
  names = label_lib.class_names(num_classes)
  num_points = np.bincount(classes.ravel()[classes.ravel() < num_classes], minlength=num_classes)
  if jax.process_count() > 1:
    num_points = np.asarray(multihost_utils.process_allgather(num_points)).sum(0)
  record = gmm_record.make(params, info, names, counts, num_points, models.feature_grid(config))
  gmm_record.write(workdir, record)
  for path in (_grid_cache(workdir), _em_state_path(workdir)):
    if path.exists() and (path != _em_state_path(workdir) or reporting.is_writer()):
      path.unlink()
  if reporting.is_writer():
    print(gmm_record.summary(record))
  return {'iterations': record['iterations'],
          'mean_log_likelihood': record['mean_log_likelihood'],
          'pixel_counts': {n: record['classes'][n]['pixel_count'] for n in names}}


def is_complete(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """results.json has the stage and gmm.json holds finite GMMs of the configured shape."""
  if 'fit_gmm' not in reporting.read_results(workdir):
    return False
  try:
    record = gmm_record.read(workdir)
  except (FileNotFoundError, ValueError):
    return False
  return gmm_record.matches(record, label_lib.class_names(config.data.num_classes),
                            config.gmm.num_components, models.feature_grid(config))
