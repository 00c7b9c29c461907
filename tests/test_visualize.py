"""Tests for depthuda.visualize: palettes, colouring, PNG files and plots."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from depthuda import visualize
from depthuda.data import labels


def test_palettes_known_colours():
  p16 = visualize.palette(16)
  assert p16.shape == (16, 3) and p16.dtype == np.uint8
  assert tuple(p16[0]) == (128, 64, 128)    # road
  assert tuple(p16[9]) == (70, 130, 180)    # sky
  assert tuple(p16[12]) == (0, 0, 142)      # car
  assert tuple(p16[15]) == (119, 11, 32)    # bicycle
  p7 = visualize.palette(7)
  assert [tuple(c) for c in p7] == [(128, 64, 128), (70, 70, 70), (153, 153, 153),
                                    (107, 142, 35), (70, 130, 180), (220, 20, 60), (0, 0, 142)]
  assert len({tuple(c) for c in p16}) == 16
  toy = visualize.palette(5)
  assert toy.shape == (5, 3) and len({tuple(c) for c in toy}) == 5
  with pytest.raises(ValueError):
    visualize.palette(40)


@pytest.mark.parametrize('num_classes', [7, 16])
def test_colorize_round_trip_and_ignore_black(num_classes):
  rng = np.random.default_rng(0)
  label = rng.integers(0, num_classes, size=(9, 11))
  label[rng.random(label.shape) < 0.2] = 255
  rgb = visualize.colorize(label, num_classes)
  assert rgb.shape == (9, 11, 3) and rgb.dtype == np.uint8
  assert np.all(rgb[label == 255] == 0)
  table = visualize.palette(num_classes)
  # Colour -> class: every valid pixel's colour identifies its class uniquely.
  matches = np.all(rgb[..., None, :] == table[None, None], axis=-1)
  decoded = np.where(matches.any(-1), matches.argmax(-1), 255)
  np.testing.assert_array_equal(decoded, label)


def test_colorize_scalar_range_and_nonfinite():
  x = np.array([[0.0, 0.5], [1.0, np.nan]])
  rgb = visualize.colorize_scalar(x)
  assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
  assert np.all(rgb[1, 1] == 0)
  # magma runs from near black to near white: brightness grows with the value.
  brightness = rgb.astype(int).sum(-1)
  assert brightness[0, 0] < brightness[0, 1] < brightness[1, 0]
  clipped = visualize.colorize_scalar(x, vmin=0.0, vmax=0.5)
  np.testing.assert_array_equal(clipped[1, 0], clipped[0, 1])
  flat = visualize.colorize_scalar(np.full((2, 2), 3.0))
  assert np.all(flat == flat[0, 0])


def test_colorize_scalar_default_range_ignores_a_few_extreme_pixels():
  """A SYNTHIA pixel at raw depth 0 (inverse depth 65,536) among depths of 1-100 does not blow
  the map out: the default range is the 1st-99th percentile of the finite values."""
  depth = np.linspace(1.0, 100.0, 400).reshape(20, 20)
  depth[3, 4] = 65536.0
  depth[5, 6] = np.nan
  low, high = np.percentile(depth[np.isfinite(depth)], [1, 99])
  np.testing.assert_array_equal(visualize.colorize_scalar(depth),
                                visualize.colorize_scalar(depth, low, high))
  rgb = visualize.colorize_scalar(depth)
  brightness = rgb.astype(int).sum(-1)
  assert brightness[-1, -1] > 500 and brightness[0, 0] < 100  # the ramp spans the colour map
  np.testing.assert_array_equal(rgb[3, 4], rgb[-1, -1])  # the outlier is clipped to the top
  assert np.all(rgb[5, 6] == 0)


def test_overlay_blends_and_keeps_ignored_pixels():
  image = np.full((4, 6, 3), 200, np.uint8)
  label = np.zeros((2, 3), np.int64)
  label[0, 0] = 255
  out = visualize.overlay(image, label, alpha=0.5, num_classes=16)
  assert out.shape == image.shape
  np.testing.assert_array_equal(out[:2, :2], 200)   # ignore, nearest-upsampled to 2x2
  np.testing.assert_array_equal(out[3, 5], np.round((np.array([128, 64, 128]) + 200) / 2))


def test_denormalize_inverts_normalization():
  rgb = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
  normalized = rgb[..., ::-1].astype(np.float32) - labels.MEAN_BGR
  np.testing.assert_array_equal(visualize.denormalize(normalized), rgb)


def test_save_png_round_trip(tmp_path):
  label = np.array([[0, 12, 255], [9, 9, 1]])
  rgb = visualize.colorize(label, 16)
  path = tmp_path / 'sub' / 'pred.png'
  visualize.save_png(path, rgb)
  read = np.asarray(Image.open(path).convert('RGB'))
  assert tuple(read[0, 0]) == (128, 64, 128)   # road
  assert tuple(read[0, 1]) == (0, 0, 142)      # car
  assert tuple(read[0, 2]) == (0, 0, 0)        # ignore
  assert tuple(read[1, 0]) == (70, 130, 180)   # sky
  assert sorted(os.listdir(path.parent)) == ['pred.png']  # no temporary file left
  gray = np.array([[0, 255], [7, 8]], np.uint8)
  visualize.save_png(path, gray)               # overwrite in place
  np.testing.assert_array_equal(np.asarray(Image.open(path)), gray)
  with pytest.raises(ValueError):
    visualize.save_png(path, np.zeros((2, 2), np.float32))


def test_panel_common_height_and_titles():
  red = np.zeros((20, 30, 3), np.uint8); red[..., 0] = 255
  blue = np.zeros((40, 20, 3), np.uint8); blue[..., 2] = 255
  strip = visualize.panel([red, blue], ['image', 'label'], gap=4)
  band = strip.shape[0] - 20
  assert band > 0 and strip.dtype == np.uint8
  assert strip.shape[1] == 30 + 4 + 10                  # blue halves to 10 wide
  assert tuple(strip[band + 10, 15]) == (255, 0, 0)
  assert tuple(strip[band + 10, 32]) == (255, 255, 255)  # gap
  assert tuple(strip[band + 10, 38]) == (0, 0, 255)
  assert (strip[:band] < 128).any()                     # some title text drawn
  plain = visualize.panel([red])
  np.testing.assert_array_equal(plain, red)


def _assert_nonblank_png(path):
  assert path.stat().st_size > 1000
  pixels = np.asarray(Image.open(path).convert('RGB'))
  assert pixels.shape[0] > 100 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def test_plot_confusion_matrix(tmp_path):
  cm = np.random.default_rng(2).integers(0, 100, size=(7, 7))
  cm[3] = 0   # a class without labels must not divide by zero
  path = tmp_path / 'cm.png'
  visualize.plot_confusion_matrix(cm, [f'class{i}' for i in range(7)], path)
  _assert_nonblank_png(path)


def test_plot_curves_from_files_and_records(tmp_path):
  for stage, scale in (('adapt', 1.0), ('self_train', 0.5)):
    (tmp_path / stage).mkdir()
    with open(tmp_path / stage / 'metrics.jsonl', 'w') as f:
      for step in range(0, 100, 10):
        f.write(json.dumps({'step': step, 'loss_seg': scale / (step + 1),
                            'loss_adv': 0.7}) + '\n')
  paths = [tmp_path / 'adapt' / 'metrics.jsonl', tmp_path / 'self_train' / 'metrics.jsonl']
  out = tmp_path / 'curves.png'
  visualize.plot_curves([str(p) for p in paths], ['loss_seg', 'loss_adv'], out)
  _assert_nonblank_png(out)
  records = [{'step': s, 'loss_seg': 1.0 / (s + 1)} for s in range(5)]
  records.append({'step': 5, 'loss_seg': float('nan')})
  out2 = tmp_path / 'records.png'
  visualize.plot_curves(records, ['loss_seg', 'missing_key'], out2)
  _assert_nonblank_png(out2)


def test_plot_class_iou_with_absent_class(tmp_path):
  path = tmp_path / 'iou.png'
  visualize.plot_class_iou({'flat': 91.2, 'construction': 36.5, 'object': None, 'nature': 61.4,
                            'sky': 73.6, 'human': 6.7, 'vehicle': 37.6}, path, title='test')
  _assert_nonblank_png(path)
  pixels = np.asarray(Image.open(path).convert('RGB')).reshape(-1, 3)
  colours = {tuple(c) for c in pixels}
  assert (128, 64, 128) in colours and (0, 0, 142) in colours  # Bars in class colours.


def test_plot_titles_and_grid_layout(tmp_path):
  records = [{'step': s, 'loss_seg': 1.0 / (s + 1), 'loss_adv': 0.7, 'val_miou': 40.0 + s}
             for s in range(20)]
  one, three = tmp_path / 'one.png', tmp_path / 'three.png'
  visualize.plot_curves(records, ['loss_seg'], one, title='adapt')
  visualize.plot_curves(records, ['loss_seg', 'loss_adv', 'val_miou'], three, title='adapt')
  width_one, height_one = Image.open(one).size
  width_three, height_three = Image.open(three).size
  assert width_three == 2 * width_one                   # Two columns of plots.
  assert height_one < height_three < 3 * height_one     # Two rows, not three.
  cm = tmp_path / 'cm.png'
  visualize.plot_confusion_matrix(np.eye(16, dtype=int) * 5, [f'c{i}' for i in range(16)], cm,
                                  title='confusion')
  _assert_nonblank_png(cm)
