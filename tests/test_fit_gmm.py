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


def test_raw_depth_zero_gives_inverse_depth_65536_and_finite_gmms(tmp_path, monkeypatch):
  """Real SYNTHIA has pixels at raw depth 0 (inverse depth 65,536, float16's inf): they reach
  the EM as 65,536 and the class's GMM has a finite component there, as the original's."""
  w, h = 160, 96  # the toy's input size: a 13x21 grid
  ids = np.full((h, w), ROAD, np.uint8)
  ids[40:, 40:120] = CAR
  raw = np.full((h, w), 1000, np.uint16)
  raw[40:, 40:80] = 0  # the left half of the car touches the camera
  raw[40:, 80:120] = 700
  _write_synthia(str(tmp_path / 'synthia'), [ids, ids[:, ::-1]], [raw, raw[:, ::-1]])
  config = _config(str(tmp_path), (w, h))

  classes, depths, counts = fit_gmm.collect_grid(config)
  car = labels.label_map('synthia', config.data.num_classes)[CAR]
  assert depths.dtype == np.float32 and np.isfinite(depths).all()
  z = depths[classes == car]
  assert z.max() == 65536.0 and np.isin(z, np.float32([65536, 65536 / 701])).all()

  config.gmm.max_iters = 3
  monkeypatch.setattr(fit_gmm, 'collect_grid', lambda _: (classes, depths, counts))
  fit_gmm.run(config, str(tmp_path / 'work'))
  params = fit_gmm.load_params(str(tmp_path / 'work'))
  for x in (params.weights, params.means, params.variances):
    assert np.isfinite(np.asarray(x)).all()
  means, weights = np.asarray(params.means[car]), np.asarray(params.weights[car])
  near = np.abs(means[:, 2] - 65536.0) < 1.0
  assert near.any() and weights[near].sum() > 0.3
