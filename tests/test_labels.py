"""Label tables against METHOD §2, written out independently here."""

import numpy as np
import pytest

from depthuda.data import labels

# (dataset id, class) pairs as listed in METHOD §2; every other id is ignored.
EXPECTED = {
    ('synthia', 16): [
        (3, 0), (4, 1), (2, 2), (21, 3), (5, 4), (7, 5), (15, 6), (9, 7),
        (6, 8), (1, 9), (10, 10), (17, 11), (8, 12), (19, 13), (12, 14),
        (11, 15)],
    ('synthia', 7): [
        (3, 0), (4, 0), (22, 0), (2, 1), (5, 1), (7, 2), (9, 2), (15, 2),
        (6, 3), (1, 4), (10, 5), (8, 6), (11, 6)],
    ('cityscapes', 16): [
        (7, 0), (8, 1), (11, 2), (12, 3), (13, 4), (17, 5), (19, 6), (20, 7),
        (21, 8), (23, 9), (24, 10), (25, 11), (26, 12), (28, 13), (32, 14),
        (33, 15)],
    ('cityscapes', 7): [
        (7, 0), (8, 0), (11, 1), (12, 1), (13, 1), (17, 2), (19, 2), (20, 2),
        (21, 3), (22, 3), (23, 4), (24, 5), (25, 5), (26, 6), (27, 6), (28, 6),
        (29, 6), (30, 6), (31, 6), (32, 6), (33, 6)],
    # Vistas v1.2 indices: flat = bike lane 7, crosswalk 8, curb cut 9, parking 10,
    # pedestrian area 11, rail track 12, road 13, service lane 14, sidewalk 15, zebra marking
    # 23, general marking 24, terrain 29; construction = curb 2, fence 3, guard rail 4,
    # barrier 5, wall 6, bridge 16, building 17, tunnel 18; object = pothole 43 ... traffic
    # sign front 50; vegetation 30; sky 27; person and riders 19-22; vehicles 52-62.
    ('mapillary', 7): (
        [(i, 0) for i in (7, 8, 9, 10, 11, 12, 13, 14, 15, 23, 24, 29)]
        + [(i, 1) for i in (2, 3, 4, 5, 6, 16, 17, 18)]
        + [(i, 2) for i in range(43, 51)] + [(30, 3), (27, 4)]
        + [(i, 5) for i in range(19, 23)] + [(i, 6) for i in range(52, 63)]),
}


@pytest.mark.parametrize('dataset,num_classes', sorted(EXPECTED))
def test_every_entry(dataset, num_classes):
  table = labels.label_map(dataset, num_classes)
  assert table.shape == (256,) and table.dtype == np.uint8
  expected = dict(EXPECTED[(dataset, num_classes)])
  for dataset_id in range(256):
    assert table[dataset_id] == expected.get(dataset_id, 255), dataset_id
  # Every class is reachable.
  assert set(expected.values()) == set(range(num_classes))


def test_ignored_ids():
  # Terrain, truck and train are ignored in the 16-class Cityscapes protocol.
  for dataset_id in (0, 22, 27, 31):
    assert labels.label_map('cityscapes', 16)[dataset_id] == 255
  assert labels.label_map('cityscapes', 7)[22] == 3  # terrain -> nature


def test_names_weights_mean():
  assert labels.class_names(16) == (
      'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'light',
      'sign', 'vegetation', 'sky', 'person', 'rider', 'car', 'bus',
      'motorcycle', 'bicycle')
  assert labels.class_names(7) == (
      'flat', 'construction', 'object', 'nature', 'sky', 'human', 'vehicle')
  np.testing.assert_allclose(labels.class_weights(16), [
      0.327, 0.313, 0.206, 22.427, 22.558, 5.811, 155.643, 59.528, 0.586,
      0.882, 1.423, 12.871, 1.488, 3.955, 29.164, 27.563])
  np.testing.assert_allclose(
      labels.class_weights(7), [0.349, 0.462, 11.576, 1.325, 1.993, 3.216,
                                3.192])
  np.testing.assert_allclose(
      labels.MEAN_BGR, [104.00698793, 116.66876762, 122.67891434], rtol=1e-7)
  assert [labels.CLASS_NAMES_16[i] for i in labels.CLASSES_13] == [
      'road', 'sidewalk', 'building', 'light', 'sign', 'vegetation', 'sky',
      'person', 'rider', 'car', 'bus', 'motorcycle', 'bicycle']


def test_mapillary_label_names():
  names = labels.MAPILLARY_LABELS
  assert len(names) == len(set(names)) == 66
  assert names[0] == 'animal--bird' and names[65] == 'void--unlabeled'
  assert (names[13], names[27], names[29], names[55]) == (
      'construction--flat--road', 'nature--sky', 'nature--terrain', 'object--vehicle--car')


def test_unknown_map_raises():
  with pytest.raises(ValueError, match='mapillary'):
    labels.label_map('mapillary', 16)
  # Returned tables are copies: editing one does not change the module's.
  table = labels.label_map('synthia', 16)
  table[3] = 7
  assert labels.label_map('synthia', 16)[3] == 0
