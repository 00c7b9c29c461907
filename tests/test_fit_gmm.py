"""The fit_gmm stage on SYNTHIA-layout files: what reaches the EM, and what comes out of it."""

import os

import numpy as np
from PIL import Image

from configs import test as test_config
from depthuda.data import labels
from depthuda.stages import fit_gmm

ROAD, CAR = 3, 8  # SYNTHIA class ids


def _write_synthia(root, label_ids, raw_depths):
  """SYNTHIA-RAND-CITYSCAPES layout: RGB/, parsed_LABELS/ (8-bit ids), Depth/ (16-bit raw)."""
  for folder in ('RGB', 'parsed_LABELS', 'Depth'):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  for i, (ids, raw) in enumerate(zip(label_ids, raw_depths)):
    name = f'{i:07d}.png'
    Image.fromarray(np.zeros((*ids.shape, 3), np.uint8)).save(os.path.join(root, 'RGB', name))
    Image.fromarray(ids.astype(np.uint8)).save(os.path.join(root, 'parsed_LABELS', name))
    Image.fromarray(raw.astype(np.uint16)).save(os.path.join(root, 'Depth', name))


def _config(root, size):
  c = test_config.get_config()
  c.data.toy = False
  c.data.source_dir = os.path.join(root, 'synthia')
  c.data.tfds_dir = os.path.join(root, 'tfds')
  c.data.input_size = size
  return c


def test_raw_depth_zero_reaches_the_em_as_inverse_depth_65536(tmp_path):
  """Real SYNTHIA has pixels at raw depth 0: inverse depth 65,536, float16's infinity. The
  scanned grid (and its cache in fit_gmm/, read back on a rerun) keeps them as 65,536, and so do
  the EM's points (test_gmm.py fits a component there)."""
  w, h = 160, 96  # the toy's input size: a 13x21 grid
  ids = np.full((h, w), ROAD, np.uint8)
  ids[40:, 40:120] = CAR
  raw = np.full((h, w), 1000, np.uint16)
  raw[40:, 40:80] = 0  # the left half of the car touches the camera
  raw[40:, 80:120] = 700
  _write_synthia(str(tmp_path / 'synthia'), [ids, ids[:, ::-1]], [raw, raw[:, ::-1]])
  config = _config(str(tmp_path), (w, h))
  car = labels.label_map('synthia', config.data.num_classes)[CAR]

  workdir = str(tmp_path / 'work')
  scanned = fit_gmm.cached_grid(config, workdir)
  cached = fit_gmm.cached_grid(config, workdir)  # read back from fit_gmm/grid.*.npz
  for classes, depths, _ in (scanned, cached):
    assert depths.dtype == np.float32 and np.isfinite(depths).all()
    z = depths[classes == car]
    assert z.max() == 65536.0 and np.isin(z, np.float32([65536, 65536 / 701])).all()
    points, mask = fit_gmm._points(classes, depths, config.data.num_classes)
    assert np.isfinite(points).all() and (points[car, mask[car], 2] == 65536.0).sum() > 0
    init, init_mask = fit_gmm.init_sample(classes, depths, config.data.num_classes, 0, 0, 100)
    assert np.isfinite(init).all() and (init[car, init_mask[car], 2] == 65536.0).any()


def test_grid_points_come_straight_from_the_files_by_pil_nearest(tmp_path):
  """The points come from the 1280x760 files resized straight to the grid by PIL's NEAREST (the
  labels as 8-bit, the inverse depth as a float image), as the original's density maps: also
  for a 640x320 input, whose 41x81 grid is not taken from the input-size maps."""
  rng = np.random.default_rng(0)
  ids = rng.choice([ROAD, CAR, 1, 2, 0], (760, 1280)).astype(np.uint8)  # 0: void, ignored
  raw = rng.integers(0, 3000, (760, 1280)).astype(np.uint16)
  raw[rng.random(raw.shape) < 0.1] = 0
  _write_synthia(str(tmp_path / 'synthia'), [ids], [raw])
  config = _config(str(tmp_path), (640, 320))

  classes, depths, _ = fit_gmm.collect_grid(config)
  table = labels.label_map('synthia', config.data.num_classes)
  inverse = np.float32(65536) / (raw.astype(np.float32) + 1)
  grid = lambda image: np.asarray(image.resize((81, 41), Image.NEAREST))
  np.testing.assert_array_equal(classes[0], table[grid(Image.fromarray(ids))])
  np.testing.assert_array_equal(depths[0], grid(Image.fromarray(inverse)))
  torch_rule = inverse[np.arange(41) * 760 // 41][:, np.arange(81) * 1280 // 81]
  assert (depths[0] != torch_rule).mean() > 0.5  # the test tells the two rules apart
