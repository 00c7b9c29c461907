"""The procedural toy: file layouts, geometry, label ids, determinism, atomic writes."""

import io
import json
import os
import zipfile

import numpy as np
from PIL import Image
import pytest

from depthuda.data import toy

SOURCE_SIZE = (64, 38)
TARGET_SIZE = (256, 128)
SYNTHIA_IDS = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 17, 19, 21, 22}
CITYSCAPES_IDS = {1, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 28, 32, 33}


def _generate(root, seed=0):
  toy.generate(os.path.join(root, 'src'), os.path.join(root, 'tgt'), seed=seed, num_source=3,
               num_target_train=4, num_target_val=3, num_target_test=2,
               source_size=SOURCE_SIZE, target_size=TARGET_SIZE)
  return os.path.join(root, 'src'), os.path.join(root, 'tgt')


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  return _generate(str(tmp_path_factory.mktemp('toy')))


def _png(data):
  return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def test_source_layout(dirs):
  src, _ = dirs
  assert sorted(os.listdir(src)) == ['Depth', 'RGB', 'parsed_LABELS', toy.MANIFEST]
  names = ['0000000.png', '0000001.png', '0000002.png']
  for folder, mode in (('RGB', 'RGB'), ('parsed_LABELS', 'L'), ('Depth', 'I;16')):
    assert sorted(os.listdir(os.path.join(src, folder))) == names
    for name in names:
      image = _png(os.path.join(src, folder, name))
      assert image.mode == mode and image.size == SOURCE_SIZE, (folder, image.mode)


def test_target_zips_in_cityscapes_layout(dirs):
  _, tgt = dirs
  assert sorted(os.listdir(tgt)) == ['gtFine_trainvaltest.zip', 'leftImg8bit_trainvaltest.zip',
                                    toy.MANIFEST]
  expected = {
      'train': ['aachen_000000_000019', 'aachen_000001_000019', 'bremen_000000_000019',
                'zurich_000000_000019'],
      'val': ['frankfurt_000000_000019', 'lindau_000000_000019', 'munster_000000_000019'],
      'test': ['berlin_000000_000019', 'bielefeld_000000_000019'],
  }
  images = zipfile.ZipFile(os.path.join(tgt, 'leftImg8bit_trainvaltest.zip'))
  labels = zipfile.ZipFile(os.path.join(tgt, 'gtFine_trainvaltest.zip'))
  want_images, want_labels = {'README'}, {'README'}
  for split, ids in expected.items():
    for image_id in ids:
      city = image_id.split('_')[0]
      want_images.add(f'leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png')
      want_labels.add(f'gtFine/{split}/{city}/{image_id}_gtFine_labelIds.png')
  assert set(images.namelist()) == want_images
  assert set(labels.namelist()) == want_labels
  for name in sorted(want_images - {'README'}):
    image = _png(images.read(name))
    label = _png(labels.read(name.replace('leftImg8bit', 'gtFine', 1).replace(
        '_leftImg8bit', '_gtFine_labelIds')))
    assert image.mode == 'RGB' and image.size == (2048, 1024)
    assert label.mode == 'L' and label.size == (2048, 1024)
    ids = set(np.unique(np.asarray(label)).tolist())
    if '/test/' in name:  # Cityscapes' test labels are unlabeled (0) or ego vehicle (1)
      assert ids <= {0, 1}
    else:
      assert ids <= CITYSCAPES_IDS and {7, 23, 1} <= ids, ids


def test_source_label_ids_and_depth_match_the_geometry(dirs):
  src, _ = dirs
  cam = toy.source_camera(SOURCE_SIZE)
  rows = np.arange(SOURCE_SIZE[1])[:, None] * np.ones(SOURCE_SIZE[0])
  for name in os.listdir(os.path.join(src, 'RGB')):
    ids = np.asarray(_png(os.path.join(src, 'parsed_LABELS', name)))
    raw = np.asarray(_png(os.path.join(src, 'Depth', name))).astype(np.int64)
    assert set(np.unique(ids).tolist()) <= SYNTHIA_IDS
    assert (raw[ids == 1] == 65535).all() and (raw[ids != 1] < 65535).all()
    # Visible ground: depth (cm) = f * h / (row + 0.5 - horizon).
    ground = np.isin(ids, (3, 4, 22))
    assert ground.sum() > 100
    expected = np.round(100 * cam.focal * cam.height_m / (rows[ground] + 0.5 - cam.horizon))
    np.testing.assert_array_equal(raw[ground], expected)
    assert (rows[ground] > cam.horizon).all()


def test_every_class_and_the_domain_gap_appear():
  seen = {'source': set(), 'target': set()}
  colours = {}
  for domain, cam, style in (
      ('source', toy.source_camera((160, 95)), toy.SOURCE_STYLE),
      ('target', toy.target_camera((256, 128)), toy.TARGET_STYLE)):
    for i in range(40):
      rgb, classes, depth = toy.render_scene(cam, style, np.random.default_rng([1, i]),
                                             ego_vehicle=domain == 'target')
      assert rgb.dtype == np.uint8 and rgb.shape == (cam.height, cam.width, 3)
      assert depth.shape == classes.shape and (depth > 0).all()
      seen[domain] |= set(np.unique(classes).tolist())
      colours.setdefault(domain, []).append(rgb[classes == toy.CLASSES.index('road')])
  everything = set(range(len(toy.CLASSES)))
  assert seen['source'] == everything - {toy.CLASSES.index('ego')}
  assert seen['target'] == everything
  # The road's colour differs between domains (appearance shift).
  source_road, target_road = (np.concatenate(colours[d]).mean(0) for d in ('source', 'target'))
  assert np.abs(source_road - target_road).max() > 10


def test_domains_share_the_ground_depth_of_each_feature_grid_row():
  """The method's premise: at the toy's input (160x96, a 13-row grid) both domains see the
  ground at the same depth in each grid row (PIL's nearest rule from either rendering), within
  5%, below the horizon's row."""
  grid_rows = 13
  source, target = toy.source_camera((320, 190)), toy.target_camera((512, 256))
  compared = 0
  for r in range(grid_rows):
    rows = [int((r + 0.5) * cam.height / grid_rows) for cam in (source, target)]
    if any(v < cam.horizon + 1 for v, cam in zip(rows, (source, target))):
      continue
    depths = [cam.ground_depth(np.float64(v)) for v, cam in zip(rows, (source, target))]
    assert abs(depths[1] / depths[0] - 1) < 0.05, (r, depths)
    compared += 1
  assert compared >= 6


def test_deterministic_by_seed(dirs, tmp_path):
  again = _generate(str(tmp_path / 'same'))
  other = _generate(str(tmp_path / 'other'), seed=1)
  for folder in ('RGB', 'parsed_LABELS', 'Depth'):
    for name in os.listdir(os.path.join(dirs[0], folder)):
      read = lambda root: open(os.path.join(root, folder, name), 'rb').read()
      assert read(dirs[0]) == read(again[0])
  first = zipfile.ZipFile(os.path.join(dirs[1], 'leftImg8bit_trainvaltest.zip'))
  second = zipfile.ZipFile(os.path.join(again[1], 'leftImg8bit_trainvaltest.zip'))
  for name in first.namelist():
    assert first.read(name) == second.read(name)
  assert (open(os.path.join(dirs[0], 'RGB', '0000000.png'), 'rb').read()
          != open(os.path.join(other[0], 'RGB', '0000000.png'), 'rb').read())


def test_cut_off_run_leaves_no_dataset(tmp_path, monkeypatch):
  calls = []
  render = toy.render_scene

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return render(*args, **kwargs)

  monkeypatch.setattr(toy, 'render_scene', failing)
  with pytest.raises(KeyboardInterrupt):
    _generate(str(tmp_path))
  assert os.listdir(tmp_path) == []  # neither the dataset nor its temporary folder
  monkeypatch.setattr(toy, 'render_scene', render)
  src, tgt = _generate(str(tmp_path))
  assert len(os.listdir(os.path.join(src, 'RGB'))) == 3 and os.path.isdir(tgt)


def test_existing_directories_are_kept(tmp_path):
  os.makedirs(tmp_path / 'src')
  _generate(str(tmp_path))
  assert os.listdir(tmp_path / 'src') == []  # not written here (no manifest): never touched
  assert len(os.listdir(tmp_path / 'tgt')) == 3


def test_target_size_must_divide_cityscapes(tmp_path):
  with pytest.raises(ValueError, match='divide'):
    toy.generate(str(tmp_path / 's'), str(tmp_path / 't'), num_source=1, num_target_train=1,
                 num_target_val=1, num_target_test=1, target_size=(300, 150))


def test_changed_settings_rewrite_only_what_changed(tmp_path):
  src, tgt = _generate(str(tmp_path))
  source_png = os.path.join(src, 'RGB', '0000000.png')
  before = os.stat(source_png).st_mtime_ns
  assert toy.generate(src, tgt, num_source=3, num_target_train=4, num_target_val=3,
                      num_target_test=2, source_size=SOURCE_SIZE, target_size=TARGET_SIZE) == []
  written = toy.generate(src, tgt, num_source=3, num_target_train=4, num_target_val=5,
                         num_target_test=2, source_size=SOURCE_SIZE, target_size=TARGET_SIZE)
  assert written == [tgt]
  assert os.stat(source_png).st_mtime_ns == before  # the source was not rewritten
  names = zipfile.ZipFile(os.path.join(tgt, 'gtFine_trainvaltest.zip')).namelist()
  assert sum('/val/' in n and n.endswith('labelIds.png') for n in names) == 5
  with open(os.path.join(src, toy.MANIFEST)) as f:
    manifest = json.load(f)
  manifest['generator_version'] -= 1  # as if written by an older generator
  with open(os.path.join(src, toy.MANIFEST), 'w') as f:
    json.dump(manifest, f)
  assert toy.generate(src, tgt, num_source=3, num_target_train=4, num_target_val=5,
                      num_target_test=2, source_size=SOURCE_SIZE,
                      target_size=TARGET_SIZE) == [src]
