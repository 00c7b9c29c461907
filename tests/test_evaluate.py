"""Tests for depthuda.evaluate: confusion matrices, IoU, mIoU and the results table."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthuda import evaluate

NAMES16 = ['road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'light', 'sign',
           'vegetation', 'sky', 'person', 'rider', 'car', 'bus', 'motorcycle', 'bicycle']


def _random_maps(seed, num_classes, shape=(37, 53)):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, num_classes, size=shape)
  label[rng.random(shape) < 0.2] = 255
  pred = rng.integers(0, num_classes, size=shape)
  return pred, label


@pytest.mark.parametrize('num_classes', [7, 16])
def test_confusion_matrix_matches_sklearn(num_classes):
  sklearn_metrics = pytest.importorskip('sklearn.metrics')
  pred, label = _random_maps(num_classes, num_classes)
  valid = label != 255
  expected = sklearn_metrics.confusion_matrix(
      label[valid], pred[valid], labels=np.arange(num_classes))
  cm = evaluate.confusion_matrix(pred, label, num_classes)
  assert cm.dtype == np.int64 and cm.shape == (num_classes, num_classes)
  np.testing.assert_array_equal(cm, expected)
  device_cm = jax.jit(evaluate.confusion_matrix_device, static_argnums=2)(
      jnp.asarray(pred), jnp.asarray(label), num_classes)
  np.testing.assert_array_equal(np.asarray(device_cm), expected)


def test_confusion_matrix_drops_out_of_range_values():
  label = np.array([0, 1, 255, 2, 7, -1, 1])
  pred = np.array([0, 1, 1, 9, 0, 0, -3])
  expected = np.zeros((3, 3), np.int64)
  expected[0, 0] = expected[1, 1] = 1   # only the first two pixels count
  np.testing.assert_array_equal(evaluate.confusion_matrix(pred, label, 3), expected)
  np.testing.assert_array_equal(
      evaluate.confusion_matrix_device(jnp.asarray(pred), jnp.asarray(label), 3), expected)


def test_confusion_matrix_rows_are_labels():
  cm = evaluate.confusion_matrix(np.array([1, 1, 1]), np.array([0, 0, 1]), 2)
  np.testing.assert_array_equal(cm, [[0, 2], [0, 1]])


def test_iou_hand_example():
  # label 0 0 0 1 1 2 | pred 0 0 1 1 2 2
  label = np.array([0, 0, 0, 1, 1, 2])
  pred = np.array([0, 0, 1, 1, 2, 2])
  iou = evaluate.iou_per_class(evaluate.confusion_matrix(pred, label, 4))
  # class 0: tp 2, union 3; class 1: tp 1, union 3; class 2: tp 1, union 2; class 3 absent.
  np.testing.assert_allclose(iou[:3], [2 / 3, 1 / 3, 1 / 2])
  assert math.isnan(iou[3])
  np.testing.assert_allclose(evaluate.mean_iou(iou), (2 / 3 + 1 / 3 + 1 / 2) / 3)


def test_iou_nan_only_when_absent_from_both():
  # Class 1 predicted but never labelled: IoU 0, not NaN. Class 2 only labelled: 0.
  cm = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 0]])
  iou = evaluate.iou_per_class(cm)
  np.testing.assert_allclose(iou, [5 / 8, 0.0, 0.0])
  all_nan = evaluate.iou_per_class(np.zeros((3, 3), np.int64))
  assert np.all(np.isnan(all_nan)) and math.isnan(evaluate.mean_iou(all_nan))


def test_miou13_drops_wall_fence_pole():
  iou = np.linspace(0.1, 0.9, 16)
  iou[3:6] = 0.0
  iou[10] = np.nan
  keep = [i for i in range(16) if i not in (3, 4, 5, 10)]
  np.testing.assert_allclose(evaluate.miou13(iou), iou[keep].mean())
  with pytest.raises(ValueError):
    evaluate.miou13(np.zeros(7))


def test_results_dict_percent_json_and_table():
  pred, label = _random_maps(3, 16)
  pred[(pred == 15) | (pred == 14)] = 0
  pred[label == 15] = 15  # bicycle predicted exactly: IoU 100
  label[label == 14] = 255  # motorcycle absent from both: undefined IoU
  cm = evaluate.confusion_matrix(pred, label, 16)
  iou = evaluate.iou_per_class(cm)
  results = evaluate.results_dict(cm, NAMES16)
  assert set(results) == {'miou', 'miou13', 'per_class_iou'}
  np.testing.assert_allclose(results['miou'], 100 * np.nanmean(iou))
  np.testing.assert_allclose(results['miou13'], 100 * evaluate.miou13(iou))
  assert results['per_class_iou']['bicycle'] == pytest.approx(100.0)
  assert results['per_class_iou']['motorcycle'] is None
  assert list(results['per_class_iou']) == NAMES16
  json.loads(json.dumps(results, allow_nan=False))  # strict JSON: no NaN
  table = evaluate.format_table(results)
  lines = table.splitlines()
  assert any(line.startswith('road') for line in lines)
  assert 'mIoU13' in table and f'{results["miou"]:.2f}' in table and 'n/a' in table
  value_columns = {len(line) for line in lines if not line.startswith('-')}
  assert len(value_columns) == 1  # every row right-aligned to one width


def test_results_dict_seven_classes_has_no_miou13():
  cm = np.diag(np.arange(1, 8))
  results = evaluate.results_dict(cm, [f'c{i}' for i in range(7)])
  assert 'miou13' not in results and results['miou'] == pytest.approx(100.0)
  assert 'mIoU13' not in evaluate.format_table(results)
  with pytest.raises(ValueError):
    evaluate.results_dict(cm, ['too', 'few'])
