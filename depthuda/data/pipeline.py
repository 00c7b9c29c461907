"""tf.data input streams for the stages: per-process batches as NumPy arrays.

Images are decoded, resized to `config.data.input_size` (W, H) (bicubic with
antialiasing, rounded to 8 bits as PIL's resize in the original), flipped RGB
-> BGR and mean-subtracted; labels and depth are resized nearest; labels are
mapped to the experiment's classes (255 = ignore); SYNTHIA depth becomes
inverse depth 65536 / (raw + 1) (METHOD §2).

Every process reads its own shard (`tfds.even_splits`) and yields
config.batch_size // jax.process_count() examples per batch. Training streams
are endless and deterministic: epoch e is shuffled with a seed drawn from
(config.seed, stream, e), and a stream started at `start_step` equals the tail
of an uninterrupted one (it skips only within the current epoch, before
decoding). An epoch has floor(shard size / batch) steps. With
`config.data.cache_decoded` decoded examples are kept in memory (the toy).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from depthuda.data import cityscapes
from depthuda.data import labels
from depthuda.data import synthia
from depthuda.data import toy
from depthuda.errors import InputError

try:  # The accelerators belong to JAX; main.py hides them first when it can.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow's devices are initialised already.
  pass

_SOURCE, _TARGET, _PSEUDO = range(3)  # stream ids: independent shuffles
_TARGET_SPLITS = {'train': 'train', 'val': 'validation', 'validation': 'validation',
                  'test': 'test'}


@contextlib.contextmanager
def _lock(tfds_dir: str):
  """Serialises toy generation and TFDS preparation among this host's processes."""
  os.makedirs(tfds_dir, exist_ok=True)
  with open(os.path.join(tfds_dir, '.depthuda.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_toy_data(config: ml_collections.ConfigDict) -> None:
  """Generates the toy datasets when config.data.toy is set and a directory is missing.

  Builds prepared from an earlier toy in data.tfds_dir are removed with it.
  """
  data = config.data
  if not data.toy or (os.path.isdir(data.source_dir) and os.path.isdir(data.target_dir)):
    return
  with _lock(data.tfds_dir):
    if os.path.isdir(data.source_dir) and os.path.isdir(data.target_dir):
      return  # another process generated it meanwhile
    toy.generate(data.source_dir, data.target_dir, seed=0, num_source=data.toy_num_source,
                 num_target_train=data.toy_num_target_train,
                 num_target_val=data.toy_num_target_val,
                 num_target_test=data.toy_num_target_test,
                 source_size=tuple(data.toy_source_size))
    for stale in ('synthia_rand_cityscapes', 'cityscapes'):
      shutil.rmtree(os.path.join(data.tfds_dir, stale), ignore_errors=True)


def _builder(config: ml_collections.ConfigDict, domain: str) -> tfds.core.DatasetBuilder:
  ensure_toy_data(config)
  data = config.data
  with _lock(data.tfds_dir):
    if domain == 'source':
      return synthia.prepare(data.source_dir, data.tfds_dir)
    if data.target != 'cityscapes':
      raise InputError(f'config.data.target={data.target!r}: only cityscapes is supported')
    return cityscapes.prepare(data.target_dir, data.tfds_dir)


def _batch_per_process(config: ml_collections.ConfigDict) -> int:
  if config.batch_size % jax.process_count():
    raise InputError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{jax.process_count()} processes')
  return config.batch_size // jax.process_count()


def _shard(split: str, drop_remainder: bool):
  """This process's part of `split`; with drop_remainder, equal parts everywhere."""
  return tfds.even_splits(split, n=jax.process_count(),
                          drop_remainder=drop_remainder)[jax.process_index()]


def _read(builder: tfds.core.DatasetBuilder, split, shuffle_seed: int | None = None
          ) -> tf.data.Dataset:
  """Examples with images still PNG-encoded; file order shuffled by `shuffle_seed`."""
  decoders = {name: tfds.decode.SkipDecoding() for name, feature in builder.info.features.items()
              if isinstance(feature, tfds.features.Image)}
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  return builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                            decoders=decoders, read_config=read_config)


def _hw(size) -> tuple[int, int]:
  width, height = size
  return int(height), int(width)


def decode_image(png: tf.Tensor, size) -> tf.Tensor:
  """PNG -> float32 [H, W, 3] at (W, H) `size`, BGR, mean-subtracted."""
  image = tf.cast(tf.io.decode_png(png, channels=3), tf.float32)
  image = tf.image.resize(image, _hw(size), method='bicubic', antialias=True)
  image = tf.clip_by_value(tf.round(image), 0, 255)
  return image[..., ::-1] - labels.MEAN_BGR


def decode_label(png: tf.Tensor, size, table: np.ndarray | None) -> tf.Tensor:
  """1-channel 8-bit PNG -> int32 [H, W], nearest-resized, mapped through `table`."""
  label = tf.image.resize(tf.io.decode_png(png, channels=1), _hw(size), method='nearest')
  label = tf.cast(label[..., 0], tf.int32)
  return label if table is None else tf.gather(tf.constant(table, tf.int32), label)


def decode_inverse_depth(png: tf.Tensor, size) -> tf.Tensor:
  """SYNTHIA 16-bit depth PNG -> float32 [H, W] inverse depth 65536 / (raw + 1)."""
  raw = tf.image.resize(tf.io.decode_png(png, channels=1, dtype=tf.uint16), _hw(size),
                        method='nearest')
  return 65536.0 / (tf.cast(raw[..., 0], tf.float32) + 1.0)


def _epoch_seed(seed: int, stream: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, stream, epoch]).generate_state(1)[0])


def _train_stream(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                  split: str, decode: Callable, stream: int, start_step: int,
                  finish: Callable | None = None) -> Iterator[dict]:
  """Endless epoch-wise shuffled batches of decode(example) (then finish(...), per epoch)."""
  batch = _batch_per_process(config)
  shard = _shard(split, drop_remainder=True)
  steps_per_epoch = builder.info.splits[shard].num_examples // batch
  if steps_per_epoch == 0:
    raise InputError(f'{builder.name} {split}: fewer images per process than the batch of {batch}')
  buffer = config.data.shuffle_buffer
  parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if config.data.cache_decoded:
    decoded = _read(builder, shard).map(decode, **parallel).cache()
    epoch_examples = lambda seed: decoded.shuffle(buffer, seed=seed)
  else:
    epoch_examples = lambda seed: _read(builder, shard, seed).shuffle(buffer, seed=seed)

  def epochs(epoch: int, step: int) -> Iterator[dict]:
    while True:
      seed = _epoch_seed(config.seed, stream, epoch)
      ds = epoch_examples(seed).skip(step * batch)
      if not config.data.cache_decoded:
        ds = ds.map(decode, **parallel)
      if finish is not None:
        ds = ds.map(finish, **parallel)
      yield from ds.batch(batch, drop_remainder=True).prefetch(2).as_numpy_iterator()
      epoch, step = epoch + 1, 0

  return epochs(*divmod(start_step, steps_per_epoch))


def source_train(config: ml_collections.ConfigDict, *, start_step: int = 0
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Endless source batches from `start_step` on.

  Yields {'image': f32 [b, H, W, 3], 'label': i32 [b, H, W] (classes, 255
  ignore), 'depth': f32 [b, H, W] inverse depth}.
  """
  size, table = config.data.input_size, labels.label_map('synthia', config.data.num_classes)
  decode = lambda ex: {'image': decode_image(ex['image'], size),
                       'label': decode_label(ex['label'], size, table),
                       'depth': decode_inverse_depth(ex['depth'], size)}
  return _train_stream(config, _builder(config, 'source'), 'train', decode, _SOURCE, start_step)


def target_train(config: ml_collections.ConfigDict, *, start_step: int = 0
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Endless target training-split batches {'image': f32 [b, H, W, 3]}."""
  size = config.data.input_size
  decode = lambda ex: {'image': decode_image(ex['image_left'], size)}
  return _train_stream(config, _builder(config, 'target'), 'train', decode, _TARGET, start_step)


def pseudo_labeled_target(config: ml_collections.ConfigDict, label_dir: str, *,
                          start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless target training batches with pseudo-labels read from `label_dir`/<name>.png.

  The PNGs hold class ids or 255 at input size (resized nearest if not).
  Yields {'image': f32 [b, H, W, 3], 'label': i32 [b, H, W]}.
  """
  builder = _builder(config, 'target')
  found = len([f for f in os.listdir(label_dir) if f.endswith('.png')]) if os.path.isdir(
      label_dir) else 0
  needed = builder.info.splits['train'].num_examples
  if found < needed:
    raise InputError(f'{label_dir} has {found} pseudo-label PNGs for {needed} target images '
                     '(run the pseudo_label stage)')
  size = config.data.input_size
  decode = lambda ex: {'image': decode_image(ex['image_left'], size), 'name': ex['image_id']}
  prefix = os.path.join(label_dir, '')
  finish = lambda ex: {'image': ex['image'], 'label': decode_label(
      tf.io.read_file(tf.strings.join([prefix, ex['name'], '.png'])), size, None)}
  return _train_stream(config, builder, 'train', decode, _PSEUDO, start_step, finish)


def _one_pass(ds: tf.data.Dataset, decode: Callable, batch: int) -> Iterator[dict]:
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for example in ds.batch(batch).prefetch(2).as_numpy_iterator():
    if 'name' in example:
      example['name'] = example['name'][0].decode()
    yield example


def target_images(config: ml_collections.ConfigDict, split: str) -> Iterator[dict]:
  """This process's share of a target split in a fixed order, one image at a time.

  Yields {'image': f32 [1, H, W, 3], 'name': str (e.g. 'aachen_000000_000019')}.
  """
  if split not in _TARGET_SPLITS:
    raise InputError(f'unknown target split {split!r}; expected one of {sorted(_TARGET_SPLITS)}')
  size = config.data.input_size
  decode = lambda ex: {'image': decode_image(ex['image_left'], size), 'name': ex['image_id']}
  ds = _read(_builder(config, 'target'), _shard(_TARGET_SPLITS[split], drop_remainder=False))
  return _one_pass(ds, decode, 1)


def target_val(config: ml_collections.ConfigDict) -> Iterator[dict]:
  """This process's share of the target validation split, one image at a time.

  Yields {'image': f32 [1, H, W, 3], 'label': i32 [1, HL, WL] classes at
  config.data.label_size (Cityscapes' own 2048x1024), 'name': str}.
  """
  size, label_size = config.data.input_size, config.data.label_size
  table = labels.label_map(config.data.target, config.data.num_classes)
  decode = lambda ex: {'image': decode_image(ex['image_left'], size),
                       'label': decode_label(ex['segmentation_label'], label_size, table),
                       'name': ex['image_id']}
  ds = _read(_builder(config, 'target'), _shard('validation', drop_remainder=False))
  return _one_pass(ds, decode, 1)


def source_grid_points(config: ml_collections.ConfigDict, *, batch_size: int | None = None
                       ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's share of the source, in a fixed order.

  Yields {'label': i32 [b, H, W] classes, 'depth': f32 [b, H, W] inverse
  depth} at input size; b = `batch_size` (default: the per-process batch),
  smaller for the last batch. Images are not decoded.
  """
  size, table = config.data.input_size, labels.label_map('synthia', config.data.num_classes)
  decode = lambda ex: {'label': decode_label(ex['label'], size, table),
                       'depth': decode_inverse_depth(ex['depth'], size)}
  ds = _read(_builder(config, 'source'), _shard('train', drop_remainder=False))
  return _one_pass(ds, decode, batch_size or _batch_per_process(config))
