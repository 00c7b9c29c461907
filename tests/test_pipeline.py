"""Input pipeline on a tiny generated toy: TFDS builders, values, order, resumption, shards."""

import itertools
import os
import re

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from depthuda.data import cityscapes
from depthuda.data import decoding
from depthuda.data import labels
from depthuda.data import pipeline
from depthuda.data import synthia
from depthuda.errors import InputError

SOURCE_SIZE = (64, 38)  # = input size, so source images are not resampled
GRID = (7, 11)  # (h, w) of the label and depth grids (any size will do for the pipeline)


def _config(root, **data):
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.batch_size = 2
  c.data = ml_collections.ConfigDict(dict(
      source='synthia', target='cityscapes', source_dir=os.path.join(root, 'synthia'),
      target_dir=os.path.join(root, 'cityscapes'), tfds_dir=os.path.join(root, 'tfds'),
      num_classes=16, input_size=SOURCE_SIZE, label_size=(2048, 1024), toy=True,
      cache_decoded=False, shuffle_buffer=16, toy_num_source=6, toy_num_target_train=4,
      toy_num_target_val=3, toy_num_target_test=2, toy_source_size=SOURCE_SIZE))
  c.data.update(data)
  return c


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  c = _config(str(tmp_path_factory.mktemp('data')))
  pipeline.ensure_toy_data(c)
  return c


def _take(stream, n):
  return list(itertools.islice(stream, n))


def _source_reference(config):
  """NumPy reference of every source example: BGR mean-subtracted image, classes, inverse depth,
  and classes and inverse depth on the GRID, resized from the files by PIL's NEAREST (the
  inverse depth as a float image, as the original)."""
  root, table = config.data.source_dir, labels.label_map('synthia', 16)
  refs = []
  on_grid = lambda image: np.asarray(image.resize(GRID[::-1], Image.NEAREST))
  inverse = lambda raw: np.float32(65536) / (raw.astype(np.float32) + 1)
  for name in sorted(os.listdir(os.path.join(root, 'RGB'))):
    rgb = np.asarray(Image.open(os.path.join(root, 'RGB', name)), np.float32)
    ids = Image.open(os.path.join(root, 'parsed_LABELS', name))
    depth = inverse(np.asarray(Image.open(os.path.join(root, 'Depth', name))))
    refs.append((rgb[..., ::-1] - np.array([104.00698793, 116.66876762, 122.67891434],
                                           np.float32),
                 table[np.asarray(ids)].astype(np.int32), depth,
                 table[on_grid(ids)].astype(np.int32), on_grid(Image.fromarray(depth))))
  return refs


def test_builders_read_the_toy(config):
  src = synthia.prepare(config.data.source_dir, config.data.tfds_dir)
  assert src.info.splits['train'].num_examples == 6
  example = next(iter(src.as_dataset(split='train')))
  assert example['image'].shape == (38, 64, 3) and example['label'].shape == (38, 64, 1)
  assert example['depth'].dtype.name == 'uint16' and len(example['name'].numpy()) == 7
  tgt = cityscapes.prepare(config.data.target_dir, config.data.tfds_dir)
  assert {s: tgt.info.splits[s].num_examples for s in ('train', 'validation', 'test')} == {
      'train': 4, 'validation': 3, 'test': 2}
  example = next(iter(tgt.as_dataset(split='validation')))
  assert example['image_left'].shape == (1024, 2048, 3)
  assert example['segmentation_label'].shape == (1024, 2048, 1)


def test_changed_toy_settings_regenerate_and_rebuild(tmp_path):
  c = _config(str(tmp_path), toy_num_target_val=2)
  pipeline.ensure_toy_data(c)
  assert cityscapes.prepare(c.data.target_dir, c.data.tfds_dir).info.splits[
      'validation'].num_examples == 2
  c.data.toy_num_target_val = 3  # the prepared TFDS build goes with the old zips
  pipeline.ensure_toy_data(c)
  assert cityscapes.prepare(c.data.target_dir, c.data.tfds_dir).info.splits[
      'validation'].num_examples == 3
  assert synthia.prepare(c.data.source_dir, c.data.tfds_dir).info.splits[
      'train'].num_examples == 6


def test_source_batches_match_numpy(config):
  refs = _source_reference(config)
  seen = []
  for batch in _take(pipeline.source_train(config, GRID), 3):  # one epoch: 6 images, batch 2
    assert batch['image'].shape == (2, 38, 64, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (2, 38, 64) and batch['label'].dtype == np.int32
    assert batch['depth'].shape == (2, 38, 64) and batch['depth'].dtype == np.float32
    assert batch['label_grid'].shape == (2, *GRID) and batch['label_grid'].dtype == np.int32
    assert batch['depth_grid'].shape == (2, *GRID) and batch['depth_grid'].dtype == np.float32
    for i, image in enumerate(batch['image']):
      match = [k for k, ref in enumerate(refs) if np.array_equal(image, ref[0])]
      assert len(match) == 1  # exact BGR mean subtraction
      ref = refs[match[0]]
      np.testing.assert_array_equal(batch['label'][i], ref[1])  # label map applied
      np.testing.assert_array_equal(batch['depth'][i], ref[2])  # inverse depth
      np.testing.assert_array_equal(batch['label_grid'][i], ref[3])
      np.testing.assert_array_equal(batch['depth_grid'][i], ref[4])
      seen.append(match[0])
  assert sorted(seen) == list(range(6))  # each image once per epoch


@pytest.mark.parametrize('cache_decoded', [False, True])
def test_resume_equals_the_tail(config, cache_decoded):
  c = config.copy_and_resolve_references()
  c.data.cache_decoded = cache_decoded
  c.data.shuffle_buffer = 4  # smaller than the data: the buffered shuffle matters
  full = _take(pipeline.source_train(c, GRID), 8)  # epochs of 3 steps
  for start in (2, 4):
    resumed = _take(pipeline.source_train(c, GRID, start_step=start), 8 - start)
    for a, b in zip(full[start:], resumed):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  # Epochs are reshuffled.
  epoch = lambda e: np.concatenate([b['depth'] for b in full[3 * e:3 * e + 3]])
  assert not np.array_equal(epoch(0), epoch(1))
  target = _take(pipeline.target_train(c), 4)  # 4 images: 2 steps per epoch
  np.testing.assert_array_equal(target[3]['image'],
                                next(pipeline.target_train(c, start_step=3))['image'])


def test_target_streams(config):
  (batch,) = _take(pipeline.target_train(config), 1)
  assert batch['image'].shape == (2, 38, 64, 3) and batch['image'].dtype == np.float32
  bgr_mean = np.array(labels.MEAN_BGR)
  assert (batch['image'] >= -bgr_mean - 1e-3).all() and (batch['image'] <= 255 - bgr_mean).all()
  val = list(pipeline.target_val(config))
  assert [v['name'] for v in val] == [v['name'] for v in pipeline.target_val(config)]
  assert {v['name'].split('_')[0] for v in val} == {'frankfurt', 'lindau', 'munster'}
  for example in val:
    assert example['image'].shape == (1, 38, 64, 3)
    assert example['label'].shape == (1, 1024, 2048) and example['label'].dtype == np.int32
    values = set(np.unique(example['label']).tolist())
    assert values <= set(range(16)) | {255} and 0 in values and 255 in values
  names = [e['name'] for e in pipeline.target_images(config, 'train')]
  assert len(names) == 4 and names == [e['name'] for e in pipeline.target_images(config, 'train')]
  assert names == [e['name'] for e in pipeline.target_images(config, 'selftrain')]
  assert len(list(pipeline.target_images(config, 'test'))) == 2


def test_source_grid_points(config):
  batches = list(pipeline.source_grid_points(config, GRID, batch_size=4))
  assert [b['label'].shape for b in batches] == [(4, 38, 64), (2, 38, 64)]
  refs = _source_reference(config)
  depths = np.concatenate([b['depth'] for b in batches])
  assert sorted(int(np.argmin([np.abs(d - r[2]).max() for r in refs])) for d in depths) == list(
      range(6))


@pytest.mark.parametrize('in_hw, out_hw', [((760, 1280), (96, 161)), ((760, 1280), (41, 81)),
                                           ((320, 640), (41, 81)), ((13, 17), (5, 40)),
                                           ((3, 6), (141, 148)), ((2, 2), (7, 83))])
def test_resize_nearest_pil_matches_pil(in_hw, out_hw):
  """The grid rule is PIL's NEAREST on 8-bit ('L') and float ('F') images, the original's label
  and inverse-depth maps: floor((i + 1/2) in / out) as PIL accumulates it; not torch's
  floor(i in / out), which differs at most of these sizes."""
  rng = np.random.default_rng(0)
  labels_u8 = rng.integers(0, 256, in_hw).astype(np.uint8)
  inverse_depth = 65536 / (rng.integers(0, 65536, in_hw).astype(np.float32) + 1)
  for array in (labels_u8, inverse_depth):
    expected = np.asarray(Image.fromarray(array).resize(out_hw[::-1], Image.NEAREST))
    got = decoding.resize_nearest_pil(tf.constant(array[..., None]), out_hw)
    np.testing.assert_array_equal(got.numpy()[..., 0], expected)
  for n, m in zip(in_hw, out_hw):
    expected = np.asarray(Image.fromarray(np.arange(n, dtype=np.int32)[None]).resize(
        (m, 1), Image.NEAREST))[0]
    np.testing.assert_array_equal(decoding.pil_nearest_indices(n, m), expected)
  torch_rule = lambda n, m: np.floor(np.arange(m) * n / m).astype(np.int64)
  if in_hw == (760, 1280):
    assert all((decoding.pil_nearest_indices(n, m) != torch_rule(n, m)).all()
               for n, m in zip(in_hw, out_hw))


def test_process_shards_partition_the_data(config, monkeypatch):
  names = {}
  for index in range(2):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    names[index] = [e['name'] for e in pipeline.target_val(config)]
  assert not set(names[0]) & set(names[1]) and len(names[0]) + len(names[1]) == 3


@pytest.mark.parametrize('stream', ['source', 'target'])
def test_training_batches_do_not_depend_on_the_number_of_processes(config, monkeypatch, stream):
  """Process p of P gets rows [p*b, (p+1)*b) of the batch one process reads (b = batch / P), at
  every step and across epochs, also when started at a later step: N hosts train on the same
  examples in the same order as one."""
  make = lambda start: (pipeline.source_train(config, GRID, start_step=start) if stream == 'source'
                        else pipeline.target_train(config, start_step=start))
  steps = 5  # more than one epoch of the fixture's splits
  whole = _take(make(0), steps)
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    parts.append(_take(make(0), steps))
    later = _take(make(3), 2)
    for got, want in zip(later, parts[-1][3:]):
      np.testing.assert_array_equal(got['image'], want['image'])
  for step, batch in enumerate(whole):
    for key, value in batch.items():
      assert parts[0][step][key].shape[0] == 1
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), value,
          err_msg=f'{key} at step {step}')


def test_pseudo_labeled_target(config, remote_dir):
  """The labels are in the workdir: on ram://, a URL as gs:// is, read by tf.io."""
  label_dir = f'{remote_dir}/labels'
  with pytest.raises(InputError, match='pseudo-label'):
    pipeline.pseudo_labeled_target(config, label_dir)
  tf.io.gfile.makedirs(label_dir)
  images = {}
  for k, example in enumerate(pipeline.target_images(config, 'train')):
    images[k] = example['image'][0]
    label = np.full((38, 64), k, np.uint8)
    label[:5] = 255
    with tf.io.gfile.GFile(f"{label_dir}/{example['name']}.png", 'wb') as f:
      Image.fromarray(label).save(f, format='PNG')
  for batch in _take(pipeline.pseudo_labeled_target(config, label_dir), 3):
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (2, 38, 64)
    for image, label in zip(batch['image'], batch['label']):
      (k,) = [k for k, ref in images.items() if np.array_equal(ref, image)]
      assert (label[5:] == k).all() and (label[:5] == 255).all()


def test_missing_inputs_name_the_culprit(tmp_path):
  # One line each: what is missing, where it was looked for, how to obtain it.
  c = _config(str(tmp_path), toy=False)
  with pytest.raises(InputError, match=r'^SYNTHIA: RGB/, parsed_LABELS/ or GT/LABELS/, Depth/ '
                                       r'not found in data.source_dir=/.*synthia-dataset.net'
                                       r'[^\n]*$'):
    next(pipeline.source_train(c, GRID))
  with pytest.raises(InputError, match=r'^Cityscapes: leftImg8bit_trainvaltest.zip and '
                                       r'gtFine_trainvaltest.zip not found in data.target_dir=/'
                                       r'.*cityscapes-dataset.com[^\n]*$'):
    next(pipeline.target_train(c))
  with pytest.raises(InputError, match='expected cityscapes or mapillary'):
    next(pipeline.target_train(_config(str(tmp_path), toy=False, target='kitti')))
  for field in ('source_dir', 'target_dir', 'tfds_dir'):
    c = _config(str(tmp_path), toy=False)
    c.data[field] = 'gs://bucket/data'
    with pytest.raises(InputError, match=rf'^data.{field}=gs://bucket/data: dataset folders '
                                         r'must be local paths;[^\n]*gcsfuse[^\n]*$'):
      next(pipeline.source_train(c, GRID) if field != 'target_dir' else pipeline.target_train(c))
  assert not os.path.exists('gs:')


def test_synthia_builder_reads_the_archive_as_unpacked(tmp_path, capsys):
  """SYNTHIA-RAND-CITYSCAPES as it unpacks: RGB/, Depth/Depth/ (depth in three identical 16-bit
  channels), GT/LABELS/ (16-bit, the id in the first channel), GT/COLOR/ (unused)."""
  import tensorflow as tf
  rng = np.random.default_rng(0)
  depth = rng.integers(0, 65536, (5, 7), np.uint16)
  ids = rng.integers(0, 23, (5, 7), np.uint16)
  rgba = rng.integers(0, 256, (5, 7, 4), np.uint8)
  src = tmp_path / 'RAND_CITYSCAPES'
  for folder in ('RGB', 'Depth/Depth', 'GT/LABELS', 'GT/COLOR'):
    os.makedirs(src / folder)
  Image.fromarray(rgba).save(src / 'RGB' / '0000000.png')
  Image.fromarray(rgba).save(src / 'GT' / 'COLOR' / '0000000.png')
  instances = rng.integers(0, 65536, (5, 7), np.uint16)  # the second channel: instance ids
  for folder, array in (('Depth/Depth', np.stack([depth] * 3, -1)),
                        ('GT/LABELS', np.stack([ids, instances, 0 * ids], -1))):
    (src / folder / '0000000.png').write_bytes(tf.io.encode_png(array).numpy())
  builder = synthia.prepare(str(src), str(tmp_path / 'tfds'))
  # Preparation says what it does before it starts, once.
  assert re.search(r'^depthuda: preparing SYNTHIA-RAND-CITYSCAPES \(1 images\) into '
                   f'{builder.data_dir}, once; roughly 1 min', capsys.readouterr().err, re.M)
  synthia.prepare(str(src), str(tmp_path / 'tfds'))
  assert 'preparing' not in capsys.readouterr().err
  example = next(iter(builder.as_dataset(split='train')))
  np.testing.assert_array_equal(example['depth'][..., 0], depth)
  np.testing.assert_array_equal(example['label'][..., 0], ids)
  np.testing.assert_array_equal(example['image'], rgba[..., :3])


@pytest.mark.parametrize('shape', [(38, 64), (40, 64), (38, 70), (19, 32)])
def test_resize_is_skipped_only_where_it_is_the_identity(shape):
  image = tf.constant(np.random.default_rng(0).integers(0, 256, shape + (3,)), tf.uint8)
  resized = tf.image.resize(tf.cast(image, tf.float32), (38, 64), method='bicubic', antialias=True)
  reference = tf.clip_by_value(tf.round(resized), 0, 255)
  got = tf.function(decoding.resize_bicubic)(image, (38, 64))
  np.testing.assert_array_equal(got.numpy(), reference.numpy())
