"""Mapillary Vistas v1.2 from a few files in its layout: resize and pad, labels, lists, errors."""

import itertools
import json
import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from depthuda.data import labels
from depthuda.data import mapillary
from depthuda.data import pipeline
from depthuda.errors import InputError

INPUT_SIZE = (64, 38)  # (W, H), the aspect of 1280x760
# (W, H) of the images: 4:3, wider than the input, the input's aspect, portrait.
TRAIN_SIZES = {'a0': (120, 90), 'b1': (160, 72), 'c2': (128, 76), 'd3': (90, 120), 'e4': (100, 75)}
VAL_SIZES = {'v0': (120, 90), 'v1': (160, 72), 'v2': (90, 120)}
MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)


def _write_jpeg(path, size, seed):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (6, 8, 3), np.uint8)  # smooth content: JPEG keeps it close
  Image.fromarray(coarse).resize(size, Image.BILINEAR).save(path, quality=95)


def _label_ids(size, seed):
  w, h = size
  ids = np.random.default_rng(seed).integers(0, 66, (h // 8 + 1, w // 8 + 1)).astype(np.uint8)
  return np.repeat(np.repeat(ids, 8, 0), 8, 1)[:h, :w]


def _write_label(path, ids, mode):
  image = Image.fromarray(ids, 'L')
  if mode == 'P':  # Vistas' own labels: a palette PNG whose indices are the label ids
    image = image.convert('P')
    image.putpalette([int(v) for v in np.random.default_rng(1).integers(0, 256, 768)])
  image.save(path)


def _make(root):
  for split, sizes in (('training', TRAIN_SIZES), ('validation', VAL_SIZES)):
    os.makedirs(os.path.join(root, split, 'images'))
    for i, (name, size) in enumerate(sizes.items()):
      _write_jpeg(os.path.join(root, split, 'images', name + '.jpg'), size, i)
  os.makedirs(os.path.join(root, 'validation', 'labels'))
  for i, (name, size) in enumerate(VAL_SIZES.items()):
    _write_label(os.path.join(root, 'validation', 'labels', name + '.png'), _label_ids(size, i),
                 'L' if i == 2 else 'P')
  with open(os.path.join(root, 'config.json'), 'w') as f:
    json.dump({'labels': [{'name': n, 'readable': n} for n in labels.MAPILLARY_LABELS]}, f)
  return root


def _config(target_dir, **data):
  c = ml_collections.ConfigDict()
  c.seed = 1
  c.batch_size = 2
  c.data = ml_collections.ConfigDict(dict(
      source='synthia', target='mapillary', source_dir='', target_dir=target_dir,
      tfds_dir=os.path.join(target_dir, 'tfds'), num_classes=7, input_size=INPUT_SIZE,
      label_size=(2048, 1024), toy=False, cache_decoded=False, shuffle_buffer=8))
  c.data.update(data)
  return c


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return _make(str(tmp_path_factory.mktemp('mapillary')))


def test_map_is_name_based():
  table = labels.label_map('mapillary', 7)
  by_name = dict(zip(labels.MAPILLARY_LABELS, table[:66]))
  assert by_name['nature--terrain'] == by_name['construction--flat--road'] == 0  # flat
  assert by_name['construction--barrier--curb'] == 1
  assert by_name['object--traffic-sign--back'] == 2 and by_name['nature--sky'] == 4
  assert by_name['human--rider--motorcyclist'] == 5 and by_name['object--vehicle--boat'] == 6
  assert by_name['void--unlabeled'] == by_name['object--bench'] == 255
  assert (table[66:] == 255).all()


@pytest.mark.parametrize('size,fit,padded', [
    ((4000, 3000), (1013, 760), (5052, 3000)),   # 4:3, narrower than the input: height fits
    ((3264, 1836), (1280, 720), (3264, 1938)),   # 16:9, wider: width fits
    ((2560, 1520), (1280, 760), (2560, 1520)),   # the input's aspect
    ((1836, 3264), (427, 760), (5497, 3264)),    # portrait
])
def test_sizes_follow_the_original(size, fit, padded):
  # fit: int() of the scaled side; padded: int() of the other side at the input's aspect.
  assert mapillary.fitted_size(*size, (1280, 760)) == fit
  assert mapillary.padded_label_size(*size, (1280, 760)) == padded


def test_validation_images_and_labels(root):
  config = _config(root)
  val = list(pipeline.target_val(config))
  assert [v['name'] for v in val] == sorted(VAL_SIZES)
  table = labels.label_map('mapillary', 7)
  for i, example in enumerate(val):
    width, height = VAL_SIZES[example['name']]
    fit_w, fit_h = mapillary.fitted_size(width, height, INPUT_SIZE)
    assert example['image'].shape == (1, 38, 64, 3) and example['image'].dtype == np.float32
    image = example['image'][0]
    # Padding is black before mean subtraction.
    assert (image[fit_h:] == -MEAN_BGR).all() and (image[:, fit_w:] == -MEAN_BGR).all()
    rgb = np.asarray(Image.open(os.path.join(root, 'validation', 'images',
                                             example['name'] + '.jpg')).convert('RGB'))
    reference = np.asarray(Image.fromarray(rgb).resize((fit_w, fit_h), Image.BICUBIC), np.float32)
    ours = (image[:fit_h, :fit_w] + MEAN_BGR)[..., ::-1]
    assert np.abs(ours - reference).max() <= 1, example['name']  # PIL's resize within rounding
    # Labels: own resolution, padded with ignore to the input's aspect; indices, not colours.
    label = example['label'][0]
    assert example['label'].dtype == np.int32
    assert label.shape[::-1] == mapillary.padded_label_size(width, height, INPUT_SIZE)
    np.testing.assert_array_equal(label[:height, :width], table[_label_ids((width, height), i)])
    assert (label[height:] == 255).all() and (label[:, width:] == 255).all()


def test_train_stream_and_resume(root):
  config = _config(root)
  full = list(itertools.islice(pipeline.target_train(config), 5))  # epochs of 2 steps
  assert all(b['image'].shape == (2, 38, 64, 3) for b in full)
  resumed = list(itertools.islice(pipeline.target_train(config, start_step=3), 2))
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_lists_choose_the_images(root, tmp_path):
  config = _config(root)
  names = lambda split: [e['name'] for e in pipeline.target_images(config, split)]
  assert names('train') == names('selftrain') == sorted(TRAIN_SIZES)  # no list files
  local = str(tmp_path / 'm')
  os.symlink(os.path.join(root, 'training'), local + '_training')
  os.makedirs(local)
  os.symlink(local + '_training', os.path.join(local, 'train'))  # the original's folder name
  os.symlink(os.path.join(root, 'validation'), os.path.join(local, 'validation'))
  with open(os.path.join(local, 'selftrain_list.txt'), 'w') as f:
    f.write('d3.jpg\nb1.jpg\n')
  with open(os.path.join(local, 'train_list.txt'), 'w') as f:
    f.write('e4\nb1\nd3\n')
  config = _config(local)
  assert names('selftrain') == ['d3', 'b1'] and names('train') == ['e4', 'b1', 'd3']
  with open(os.path.join(local, 'selftrain_list.txt'), 'a') as f:
    f.write('zz.jpg\n')
  with pytest.raises(InputError, match='selftrain_list.txt names 1 images missing.*zz.jpg'):
    names('selftrain')


def test_pseudo_labels_ignore_the_padding(root, tmp_path):
  config = _config(root)
  label_dir = tmp_path / 'labels'
  os.makedirs(label_dir)
  for k, name in enumerate(sorted(TRAIN_SIZES)):
    Image.fromarray(np.full((38, 64), k, np.uint8)).save(label_dir / f'{name}.png')
  for batch in itertools.islice(pipeline.pseudo_labeled_target(config, str(label_dir)), 3):
    for image, label in zip(batch['image'], batch['label']):
      valid = (image != -MEAN_BGR).any(-1)  # the fixture's images have no black pixels
      assert (label[~valid] == 255).all() and (label[valid] < 5).all()
      assert len(np.unique(label[valid])) == 1


def test_process_shards(root, monkeypatch):
  config = _config(root)
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    parts.append([e['name'] for e in pipeline.target_val(config)])
  assert parts == [['v0', 'v1'], ['v2']]  # as tfds.even_splits splits 3 over 2


def test_errors_name_what_is_missing(root, tmp_path):
  with pytest.raises(InputError, match=r'Mapillary Vistas: training/images .*not found in '
                                       r'data.target_dir=.*mapillary.com/dataset/vistas'):
    next(pipeline.target_train(_config(str(tmp_path / 'absent'))))
  with pytest.raises(InputError, match='num_classes'):
    next(pipeline.target_val(_config(root, num_classes=16)))
  bad = tmp_path / 'bad'
  os.makedirs(bad / 'validation' / 'labels')
  os.makedirs(bad / 'validation' / 'images')
  _write_jpeg(bad / 'validation' / 'images' / 'x.jpg', (40, 30), 0)
  with pytest.raises(InputError, match='lack a label'):
    mapillary.list_split(str(bad), 'validation')
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(bad / 'validation' / 'labels' / 'x.png')
  with pytest.raises(InputError, match='RGB PNG'):
    mapillary.list_split(str(bad), 'validation')
  with open(bad / 'config.json', 'w') as f:
    json.dump({'labels': [{'name': n} for n in labels.MAPILLARY_LABELS[:-1]]}, f)
  with pytest.raises(InputError, match='65 labels'):
    mapillary.check_label_names(str(bad))


def _varied_variables(seg, seed=0):
  """Variables of `seg` with He-scaled kernels, so that predictions vary across the image
  (the original's N(0, 0.01) init gives one class everywhere in a tiny untrained network)."""
  variables = seg.init(jax.random.PRNGKey(seed), np.zeros((1, 38, 64, 3), np.float32),
                       train=False)
  rng = np.random.default_rng(seed)

  def rescale(path, x):
    if path[-1].key != 'kernel':
      return x
    std = np.sqrt(2 / np.prod(x.shape[:-1]))
    if any(getattr(k, 'key', None) == 'classifier' for k in path):
      std *= 0.01  # logits of a few units (the mean-subtracted input spans +-128)
    return rng.normal(0, std, x.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(rescale, jax.device_get(variables))


def _reference_label(classes, protocol):
  """[h, w] classes -> the scored label, by NumPy arithmetic: 'input_size' resizes nearest
  (PIL's rule, pixel floor((i + 1/2) * scale)) with the aspect kept to fit INPUT_SIZE and pads
  it there; 'native' pads the label to INPUT_SIZE's aspect ratio. Padding is ignore (255)."""
  h, w = classes.shape
  in_w, in_h = INPUT_SIZE
  if protocol == 'input_size':
    fit_w, fit_h = (in_w, int(h * in_w / w)) if w * in_h > in_w * h else (int(w * in_h / h), in_h)
    rows = (2 * np.arange(fit_h) + 1) * h // (2 * fit_h)
    cols = (2 * np.arange(fit_w) + 1) * w // (2 * fit_w)
    out = np.full((in_h, in_w), 255, np.int64)
    out[:fit_h, :fit_w] = classes[rows[:, None], cols[None, :]]
    return out
  pad_w, pad_h = (int(in_w / in_h * h), h) if in_w * h > w * in_h else (w, int(w * in_h / in_w))
  out = np.full((max(h, pad_h), max(w, pad_w)), 255, np.int64)
  out[:h, :w] = classes
  return out


@pytest.mark.parametrize('protocol', ['input_size', 'native'])
def test_evaluation_protocols_match_a_numpy_and_sklearn_reference(root, protocol):
  import torch
  from sklearn.metrics import confusion_matrix
  from depthuda import models
  from depthuda import validation
  config = _config(root)
  config.eval = ml_collections.ConfigDict(dict(num_images=0, protocol=protocol, flip=False,
                                               scales=(1.0,)))
  seg = models.DeepLabV2Depth(num_classes=7, layers=(1, 1, 1, 1), width=4)
  variables = _varied_variables(seg)
  result = validation.evaluate(config, seg, variables)
  table = labels.label_map('mapillary', 7)
  expected = np.zeros((7, 7), np.int64)
  predicted_classes = set()
  for i, (name, size) in enumerate(VAL_SIZES.items()):
    label = _reference_label(table[_label_ids(size, i)].astype(np.int64), protocol)
    if protocol == 'input_size':
      assert label.shape == (38, 64)  # the original scores at the input size
    image = next(e for e in pipeline.target_val(config) if e['name'] == name)['image']
    logits, _, _ = seg.apply(variables, image, train=False)
    up = torch.nn.functional.interpolate(torch.from_numpy(np.array(logits)).permute(0, 3, 1, 2),
                                         size=label.shape, mode='bilinear', align_corners=True)
    pred = up[0].argmax(0).numpy()
    valid = label != 255
    expected += confusion_matrix(label[valid], pred[valid], labels=np.arange(7))
    predicted_classes.update(np.unique(pred[valid]).tolist())
  assert len(predicted_classes) > 2  # predictions vary, so the alignment is tested
  np.testing.assert_array_equal(np.asarray(result['confusion_matrix']), expected)


def test_mapillary_configs_score_as_the_original():
  from configs import common
  from configs import synthia_mapillary7
  from configs import synthia_mapillary7_small
  assert synthia_mapillary7.get_config().eval.protocol == 'input_size'
  assert synthia_mapillary7_small.get_config().eval.protocol == 'input_size'
  assert common.get_base_config().eval.protocol == 'native'  # Cityscapes: 2048x1024 labels
