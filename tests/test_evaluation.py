"""The eval stage's test-time augmentation: flipped and rescaled views, their softmax averaged."""

import jax
import ml_collections
import numpy as np
import pytest
from scipy.special import softmax
import torch

from configs import test as test_config
from depthuda import evaluate as metrics_lib
from depthuda import losses
from depthuda import models
from depthuda.data import pipeline
from depthuda.errors import InputError
from depthuda.stages import evaluation
from tests import main_runs
from tests.test_mapillary import _varied_variables

HW = (38, 64)  # odd strides: the network alone is not mirror-symmetric at this size


def _eval_config(flip, scales):
  return ml_collections.ConfigDict(dict(eval=dict(flip=flip, scales=scales)))


def _resize(x, size):
  """[1, h, w, C] -> [1, H, W, C], PyTorch's bilinear resize with align_corners=True."""
  out = torch.nn.functional.interpolate(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2),
                                        size=size, mode='bilinear', align_corners=True)
  return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope='module')
def model():
  seg = models.DeepLabV2Depth(num_classes=7, layers=(1, 1, 1, 1), width=4)
  image = np.random.default_rng(0).normal(0, 60, (1,) + HW + (3,)).astype(np.float32)
  return seg, _varied_variables(seg), image


def _probabilities(seg, variables, image, flip, scales, size):
  view_list = evaluation.views(_eval_config(flip, scales))
  logits = evaluation.view_logits(seg, variables, image, view_list)
  return np.asarray(evaluation.mean_probabilities(logits, tuple(f for _, f in view_list), size))


@pytest.mark.parametrize('scales', [(1.0,), (0.75, 1.0, 1.5)])
def test_averaged_softmax_equals_the_manual_computation(model, scales):
  seg, variables, image = model
  size = (50, 70)  # an evaluation size other than the input's
  expected = 0.0
  for scale in scales:
    scaled = _resize(image, (round(HW[0] * scale), round(HW[1] * scale)))
    for flip in (False, True):
      view = scaled[:, :, ::-1] if flip else scaled
      logits, _, _ = seg.apply(variables, np.ascontiguousarray(view), train=False)
      probs = softmax(_resize(logits, size), axis=-1)
      expected = expected + (probs[:, :, ::-1] if flip else probs)
  expected = expected / (2 * len(scales))
  got = _probabilities(seg, variables, image, True, scales, size)
  np.testing.assert_allclose(got, expected, atol=2e-6)


def test_flip_averaging_is_mirror_equivariant(model):
  seg, variables, image = model
  mirrored = np.ascontiguousarray(image[:, :, ::-1])
  plain = _probabilities(seg, variables, image, False, (1.0,), HW)
  plain_mirrored = _probabilities(seg, variables, mirrored, False, (1.0,), HW)
  assert np.abs(plain_mirrored - plain[:, :, ::-1]).max() > 1e-3  # the network alone is not
  tta = _probabilities(seg, variables, image, True, (1.0,), HW)
  tta_mirrored = _probabilities(seg, variables, mirrored, True, (1.0,), HW)
  np.testing.assert_allclose(tta_mirrored, tta[:, :, ::-1], rtol=0, atol=1e-7)
  np.testing.assert_array_equal(tta_mirrored.argmax(-1), tta[:, :, ::-1].argmax(-1))


def test_views_and_their_errors():
  assert evaluation.views(_eval_config(False, (1.0,))) == ((1.0, False),)
  assert evaluation.views(_eval_config(True, (0.5, 1))) == (
      (0.5, False), (0.5, True), (1.0, False), (1.0, True))
  for scales in ((), (0.0,), ('1',)):
    with pytest.raises(InputError, match='config.eval.scales'):
      evaluation.views(_eval_config(False, scales))
  with pytest.raises(InputError, match='config.eval.flip'):
    evaluation.views(_eval_config('yes', (1.0,)))


def test_without_augmentation_the_scores_are_the_plain_arg_max(monkeypatch):
  """scales=(1.0,), flip=False: the counts of the arg-max of the logits upsampled to the labels
  exactly, as before test-time augmentation existed (no softmax in between)."""
  main_runs.prepare_test_data()
  monkeypatch.chdir(main_runs.ROOT)  # the test config's data paths are relative to it
  config = test_config.get_config()
  assert tuple(config.eval.scales) == (1.0,) and config.eval.flip is False  # the defaults
  seg = models.DeepLabV2Depth(num_classes=7, layers=(1, 1, 1, 1), width=4)
  variables = _varied_variables(seg)
  result = evaluation.evaluate(config, seg, variables)
  cm = np.zeros((7, 7), np.int64)
  for example in pipeline.target_val(config, config.eval.protocol):
    logits, _, _ = seg.apply(variables, example['image'], train=False)
    up = losses.upsample_bilinear(logits.astype(np.float32), example['label'].shape[1:])
    cm += metrics_lib.confusion_matrix(np.asarray(up).argmax(-1), example['label'], 7)
  np.testing.assert_array_equal(np.asarray(result['confusion_matrix']), cm)
  config.eval.flip = True
  assert np.asarray(evaluation.evaluate(config, seg, variables)['confusion_matrix']).sum() == (
      cm.sum())
