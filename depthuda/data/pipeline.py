"""tf.data input streams for the stages: per-process batches as NumPy arrays.

Examples are decoded at `config.data.input_size` by `depthuda.data.decoding` (METHOD §2).

Mapillary Vistas (config.data.target='mapillary') is read in place from its folders
(`depthuda.data.mapillary`): images are resized to fit the input size with their aspect kept and
padded with black; validation labels are padded with ignore as the evaluation protocol says
(`target_val`); the padding of a pseudo-labelled image is ignored in self-training.

Training streams yield config.batch_size // jax.process_count() examples per batch and do not
depend on the number of processes: every process reads the whole split in the same shuffled
order, and process p decodes only rows [p*b, (p+1)*b) of each global batch (the filter comes
before decoding, so each image is decoded by one process). N hosts thus train on the batches one
host would. They are endless and deterministic: epoch e is shuffled with a seed drawn from
(config.seed, stream, e), and a stream started at `start_step` equals the tail of an
uninterrupted one (it skips only within the current epoch, before decoding). An epoch has
floor(split size / config.batch_size) steps. With `config.data.cache_decoded` decoded examples
are kept in memory (the toy). One-pass streams (evaluation, pseudo-labels, the GMM grid) read
disjoint shards instead (`tfds.even_splits`, or equal parts of a file list).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from depthuda import fileio
from depthuda.data import bad_files
from depthuda.data import cityscapes
from depthuda.data import decoding
from depthuda.data import labels
from depthuda.data import mapillary
from depthuda.data import synthia
from depthuda.data import toy
from depthuda.errors import InputError

try:  # The accelerators belong to JAX: the input pipeline must not take GPU memory.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow's devices are initialised already.
  pass

_SOURCE, _TARGET, _PSEUDO = range(3)  # stream ids: independent shuffles
# Public split names -> ours. 'selftrain': the images pseudo-labelled and self-trained on.
_TARGET_SPLITS = {'train': 'train', 'selftrain': 'selftrain', 'val': 'validation',
                  'validation': 'validation', 'test': 'test'}
_CITYSCAPES_SPLITS = {'train': 'train', 'selftrain': 'train', 'validation': 'validation',
                      'test': 'test'}


def _lock(tfds_dir: str):
  """Serialises toy generation and TFDS preparation among this host's processes."""
  return fileio.local_lock(os.path.join(tfds_dir, '.depthuda.lock'))


def _check_local_roots(data: ml_collections.ConfigDict) -> None:
  """The dataset folders are read through the local filesystem (`os`, file locks), unlike the
  workdir: a URL there would become a local folder named `gs:`."""
  for field in ('source_dir', 'target_dir', 'tfds_dir'):
    if fileio.is_url(data[field]):
      raise InputError(f'data.{field}={data[field]}: dataset folders must be local paths; copy '
                       'the data to a local disk or mount the bucket (gcsfuse)')


def ensure_toy_data(config: ml_collections.ConfigDict) -> None:
  """Generates the toy datasets when config.data.toy is set and a directory is missing or was
  written for other settings (`toy.generate`). Every reader of the datasets calls it first, so
  it also checks that their folders are local.

  Builds prepared from an earlier toy in data.tfds_dir are removed with it.
  """
  data = config.data
  _check_local_roots(data)
  if not data.toy:
    return
  with _lock(data.tfds_dir):
    written = toy.generate(
        data.source_dir, data.target_dir, seed=0, num_source=data.toy_num_source,
        num_target_train=data.toy_num_target_train, num_target_val=data.toy_num_target_val,
        num_target_test=data.toy_num_target_test, source_size=tuple(data.toy_source_size))
    if data.source_dir in written:
      shutil.rmtree(os.path.join(data.tfds_dir, 'synthia_rand_cityscapes'), ignore_errors=True)
    if data.target_dir in written:
      shutil.rmtree(os.path.join(data.tfds_dir, 'cityscapes'), ignore_errors=True)


def _source_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  ensure_toy_data(config)
  with _lock(config.data.tfds_dir):
    return synthia.prepare(config.data.source_dir, config.data.tfds_dir)


@dataclasses.dataclass(frozen=True)
class _Examples:
  """A split, or this process's share of it: examples still encoded (TFDS) or as file paths."""
  description: str
  num_examples: int  # read by this process
  total: int         # in the whole split
  read: Callable[[int | None], tf.data.Dataset]  # shuffle seed (None: stored order) -> examples


@dataclasses.dataclass(frozen=True)
class _Target:
  """A target dataset: its splits and how to decode one of its examples."""
  examples: Callable[[str, bool], _Examples]  # (split, whole): all of it, or this process's part
  # example -> (f32 [H, W, 3] at input size, i32 [2] rows and columns not padded)
  image: Callable[[dict], tuple[tf.Tensor, tf.Tensor]]
  # (example, table, eval protocol) -> i32 [HL, WL] classes
  label: Callable[[dict, np.ndarray, str], tf.Tensor]
  name: Callable[[dict], tf.Tensor]


def _target(config: ml_collections.ConfigDict) -> _Target:
  ensure_toy_data(config)
  data = config.data
  size = data.input_size
  if data.target == 'cityscapes':
    with _lock(data.tfds_dir):
      builder = cityscapes.prepare(data.target_dir, data.tfds_dir)
    return _Target(
        examples=lambda split, whole: _tfds_examples(builder, _CITYSCAPES_SPLITS[split], whole),
        image=lambda ex: (decoding.decode_image(ex['image_left'], size), tf.constant(decoding.hw(size))),
        label=lambda ex, table, protocol: decoding.decode_label(
            ex['segmentation_label'], size if protocol == 'input_size' else data.label_size,
            table, labels.CITYSCAPES_IDS),
        name=lambda ex: ex['image_id'])
  if data.target == 'mapillary':
    mapillary.check_label_names(data.target_dir)
    return _Target(
        examples=lambda split, whole: _file_examples(
            f'Mapillary Vistas {split}', mapillary.list_split(data.target_dir, split), whole),
        image=lambda ex: decoding.decode_padded_image(tf.io.read_file(ex['image']), size),
        label=lambda ex, table, protocol: decoding.decode_padded_label(
            tf.io.read_file(ex['label']), size, table, protocol),
        name=lambda ex: ex['name'])
  raise InputError(f'config.data.target={data.target!r}: expected cityscapes or mapillary')


def _batch_per_process(config: ml_collections.ConfigDict) -> int:
  if config.batch_size % jax.process_count():
    raise InputError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{jax.process_count()} processes')
  return config.batch_size // jax.process_count()


def _shard(split: str, whole: bool):
  """All of `split` (training streams), or this process's part of it (one-pass streams)."""
  count, index = (1, 0) if whole else (jax.process_count(), jax.process_index())
  return tfds.even_splits(split, n=count)[index]


def _read(builder: tfds.core.DatasetBuilder, split, shuffle_seed: int | None = None
          ) -> tf.data.Dataset:
  """Examples with images still PNG-encoded; file order shuffled by `shuffle_seed`."""
  decoders = {name: tfds.decode.SkipDecoding() for name, feature in builder.info.features.items()
              if isinstance(feature, tfds.features.Image)}
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  return builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                            decoders=decoders, read_config=read_config)


def _tfds_examples(builder: tfds.core.DatasetBuilder, split: str, whole: bool) -> _Examples:
  shard = _shard(split, whole)
  splits = builder.info.splits
  return _Examples(f'{builder.name} {split}', splits[shard].num_examples,
                   splits[split].num_examples, functools.partial(_read, builder, shard))


def _file_examples(description: str, examples: list[mapillary.Example], whole: bool
                   ) -> _Examples:
  """All of `examples`, or with `whole` False this process's contiguous part of them, split as
  `tfds.even_splits` splits."""
  count, index = (1, 0) if whole else (jax.process_count(), jax.process_index())
  size, extra = divmod(len(examples), count)
  start = index * size + min(index, extra)
  mine = examples[start:start + size + (index < extra)]
  columns = {key: tf.constant([getattr(e, key) for e in mine], tf.string)
             for key in ('name', 'image', 'label')}

  def read(shuffle_seed: int | None) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(columns)
    return ds if shuffle_seed is None else ds.shuffle(max(len(mine), 1), seed=shuffle_seed)

  return _Examples(description, len(mine), len(examples), read)


def _epoch_seed(seed: int, stream: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, stream, epoch]).generate_state(1)[0])


def _train_stream(config: ml_collections.ConfigDict, examples: _Examples, decode: Callable,
                  stream: int, start_step: int, finish: Callable | None = None,
                  finish_dir: str | None = None) -> Iterator[dict]:
  """Endless epoch-wise shuffled batches of decode(example) (then finish(...), per epoch).

  finish_dir: where `finish` reads files, to name them in errors.
  """
  batch, global_batch = _batch_per_process(config), config.batch_size
  steps_per_epoch = examples.num_examples // global_batch
  if steps_per_epoch == 0:
    raise InputError(f'{examples.description}: {examples.num_examples} images, fewer than the '
                     f'batch of {global_batch}')
  first = jax.process_index() * batch  # this process's rows of each global batch
  mine = lambda i, _: tf.math.logical_and(i % global_batch >= first,
                                          i % global_batch < first + batch)
  buffer = config.data.shuffle_buffer
  parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if config.data.cache_decoded:
    decoded = examples.read(None).map(decode, **parallel).cache()
    epoch_examples = lambda seed: decoded.shuffle(buffer, seed=seed)
  else:
    epoch_examples = lambda seed: examples.read(seed).shuffle(buffer, seed=seed)

  def epochs(epoch: int, step: int) -> Iterator[dict]:
    while True:
      seed = _epoch_seed(config.seed, stream, epoch)
      ds = epoch_examples(seed).skip(step * global_batch).take(
          (steps_per_epoch - step) * global_batch)  # whole global batches only
      if jax.process_count() > 1:
        ds = ds.enumerate().filter(mine).map(lambda _, example: example)
      if not config.data.cache_decoded:
        ds = ds.map(decode, **parallel)
      if finish is not None:
        ds = ds.map(finish, **parallel)
      yield from ds.batch(batch, drop_remainder=True).prefetch(2).as_numpy_iterator()
      epoch, step = epoch + 1, 0

  full = decode if finish is None else lambda ex: finish(decode(ex))
  return bad_files.naming_failures(
      epochs(*divmod(start_step, steps_per_epoch)), examples.read(None), full,
      functools.partial(bad_files.example_file, config, finish_dir=finish_dir))


def _source_maps(config: ml_collections.ConfigDict, grid_hw: tuple[int, int]) -> Callable:
  """example -> its label and depth at input size and on the grid (`decode_source_maps`)."""
  size, table = config.data.input_size, labels.label_map('synthia', config.data.num_classes)
  return lambda ex: decoding.decode_source_maps(ex['label'], ex['depth'], size, tuple(grid_hw),
                                                table)


def source_train(config: ml_collections.ConfigDict, grid_hw: tuple[int, int], *,
                 start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless source batches from `start_step` on.

  Yields {'image': f32 [b, H, W, 3], 'label': i32 [b, H, W] (classes, 255 ignore),
  'depth': f32 [b, H, W] inverse depth, 'label_grid': i32 [b, h, w], 'depth_grid': f32 [b, h, w]}
  with (h, w) = `grid_hw`, the segmenter's feature grid (`decoding.decode_source_maps`).
  """
  maps = _source_maps(config, grid_hw)
  decode = lambda ex: {'image': decoding.decode_image(ex['image'], config.data.input_size),
                       **maps(ex)}
  examples = _tfds_examples(_source_builder(config), 'train', whole=True)
  return _train_stream(config, examples, decode, _SOURCE, start_step)


def target_train(config: ml_collections.ConfigDict, *, start_step: int = 0
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Endless target training-split batches {'image': f32 [b, H, W, 3]}."""
  target = _target(config)
  decode = lambda ex: {'image': target.image(ex)[0]}
  return _train_stream(config, target.examples('train', True), decode, _TARGET, start_step)


def pseudo_labeled_target(config: ml_collections.ConfigDict, label_dir: fileio.PathLike, *,
                          start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of the self-training images with pseudo-labels from `label_dir`/<name>.png.

  The PNGs hold class ids or 255 at input size (resized nearest if not); pixels of an image's
  padding (Mapillary) are ignored. Yields {'image': f32 [b, H, W, 3], 'label': i32 [b, H, W]}.
  """
  target = _target(config)
  examples = target.examples('selftrain', True)
  label_dir = fileio.Path(label_dir)  # In the workdir, perhaps remote: tf.io reads it too.
  found = len([p for p in label_dir.iterdir() if p.suffix == '.png']) if label_dir.is_dir() else 0
  if found < examples.total:
    raise InputError(f'{label_dir} has {found} pseudo-label PNGs for {examples.total} target '
                     'images (run the pseudo_label stage)')
  size = config.data.input_size

  def decode(ex):
    image, valid = target.image(ex)
    return {'image': image, 'valid': valid, 'name': target.name(ex)}

  prefix = os.fspath(label_dir) + '/'
  finish = lambda ex: {'image': ex['image'], 'label': decoding.mask_padding(decoding.decode_label(
      tf.io.read_file(tf.strings.join([prefix, ex['name'], '.png'])), size, None), ex['valid'])}
  return _train_stream(config, examples, decode, _PSEUDO, start_step, finish, os.fspath(label_dir))


class _Pass:
  """The batches of one pass, which know their number (progress totals and ETAs)."""

  def __init__(self, batches: Iterator[dict], length: int):
    self._batches, self._length = batches, length

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    return next(self._batches)

  def __len__(self) -> int:
    return self._length


def _one_pass(config: ml_collections.ConfigDict, examples: _Examples, decode: Callable,
              batch: int) -> _Pass:
  stored = examples.read(None)
  ds = stored.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def batches():
    for example in bad_files.naming_failures(ds.batch(batch).prefetch(2).as_numpy_iterator(),
                                             stored, decode,
                                             functools.partial(bad_files.example_file, config)):
      if 'name' in example:
        example['name'] = example['name'][0].decode()
      yield example

  return _Pass(batches(), -(-examples.num_examples // batch))


def target_images(config: ml_collections.ConfigDict, split: str) -> Iterator[dict]:
  """This process's share of a target split in a fixed order, one image at a time.

  `split`: 'train', 'selftrain' (the images to pseudo-label: Cityscapes' train split, or
  Mapillary's self-training list), 'val'/'validation' or 'test'.
  Yields {'image': f32 [1, H, W, 3], 'name': str (e.g. 'aachen_000000_000019')}.
  """
  if split not in _TARGET_SPLITS:
    raise InputError(f'unknown target split {split!r}; expected one of {sorted(_TARGET_SPLITS)}')
  target = _target(config)
  decode = lambda ex: {'image': target.image(ex)[0], 'name': target.name(ex)}
  return _one_pass(config, target.examples(_TARGET_SPLITS[split], False), decode, 1)


EVAL_PROTOCOLS = ('input_size', 'native')


def target_val(config: ml_collections.ConfigDict, protocol: str = 'native') -> Iterator[dict]:
  """This process's share of the target validation split, one image at a time.

  Yields {'image': f32 [1, H, W, 3], 'label': i32 [1, HL, WL] classes, 'name': str}. The labels
  follow the evaluation `protocol` (METHOD §7): 'native' keeps Cityscapes' at
  config.data.label_size (its own 2048x1024) and Mapillary's at their own resolution, padded
  with ignore to the input's aspect ratio (HL, WL vary); 'input_size' resizes them nearest to
  the input size as the image is (Mapillary: aspect kept, padded with ignore).
  """
  if protocol not in EVAL_PROTOCOLS:
    raise InputError(f'config.eval.protocol={protocol!r}: expected one of {EVAL_PROTOCOLS}')
  target = _target(config)
  try:
    table = labels.label_map(config.data.target, config.data.num_classes)
  except ValueError as e:
    raise InputError(f'config.data.num_classes: {e}') from None
  decode = lambda ex: {'image': target.image(ex)[0], 'label': target.label(ex, table, protocol),
                       'name': target.name(ex)}
  return _one_pass(config, target.examples('validation', False), decode, 1)


def source_grid_points(config: ml_collections.ConfigDict, grid_hw: tuple[int, int], *,
                       batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's share of the source, in a fixed order.

  Yields the label and depth maps of `source_train` ('label', 'depth' at input size,
  'label_grid', 'depth_grid' on the (h, w) = `grid_hw` grid); b = `batch_size` (default: the
  per-process batch), smaller for the last batch. Images are not decoded.
  """
  decode = _source_maps(config, grid_hw)
  examples = _tfds_examples(_source_builder(config), 'train', whole=False)
  return _one_pass(config, examples, decode, batch_size or _batch_per_process(config))
