"""Evaluation (depthuda/validation.py): test-time augmentation (flipped and rescaled views, their
softmax averaged), evaluation split over devices, and the prediction and pseudo-labelling
programs."""

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
from depthuda import sharding
from depthuda import train
from depthuda import validation
from depthuda.data import pipeline
from depthuda.errors import InputError
from depthuda.stages import pseudo_label
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
  view_list = validation.views(_eval_config(flip, scales))
  logits = validation.view_logits(seg, variables, image, view_list)
  return np.asarray(validation.mean_probabilities(logits, tuple(f for _, f in view_list), size))


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
  assert validation.views(_eval_config(False, (1.0,))) == ((1.0, False),)
  assert validation.views(_eval_config(True, (0.5, 1))) == (
      (0.5, False), (0.5, True), (1.0, False), (1.0, True))
  for scales in ((), (0.0,), ('1',)):
    with pytest.raises(InputError, match='config.eval.scales'):
      validation.views(_eval_config(False, scales))
  with pytest.raises(InputError, match='config.eval.flip'):
    validation.views(_eval_config('yes', (1.0,)))


def test_without_augmentation_the_scores_are_the_plain_arg_max(monkeypatch):
  """scales=(1.0,), flip=False: the counts of the arg-max of the logits upsampled to the labels
  exactly, as before test-time augmentation existed (no softmax in between)."""
  main_runs.prepare_test_data()
  monkeypatch.chdir(main_runs.ROOT)  # the test config's data paths are relative to it
  config = test_config.get_config()
  assert tuple(config.eval.scales) == (1.0,) and config.eval.flip is False  # the defaults
  seg = models.DeepLabV2Depth(num_classes=7, layers=(1, 1, 1, 1), width=4)
  variables = _varied_variables(seg)
  result = validation.evaluate(config, seg, variables)
  cm = np.zeros((7, 7), np.int64)
  for example in pipeline.target_val(config, config.eval.protocol):
    logits, _, _ = seg.apply(variables, example['image'], train=False)
    up = losses.upsample_bilinear(logits.astype(np.float32), example['label'].shape[1:])
    cm += metrics_lib.confusion_matrix(np.asarray(up).argmax(-1), example['label'], 7)
  np.testing.assert_array_equal(np.asarray(result['confusion_matrix']), cm)
  config.eval.flip = True
  assert np.asarray(validation.evaluate(config, seg, variables)['confusion_matrix']).sum() == (
      cm.sum())


def test_split_over_devices_equals_one_device_and_uses_the_variables_in_place(monkeypatch):
  """One image per device (3 images on 2 devices: one batch padded) gives the one-device
  counts exactly, with test-time augmentation; variables already on the mesh reach the network
  as they are (no copy through the host)."""
  main_runs.prepare_test_data()
  monkeypatch.chdir(main_runs.ROOT)
  config = test_config.get_config()
  config.eval.flip = True
  seg = models.DeepLabV2Depth(num_classes=7, layers=(1, 1, 1, 1), width=4)
  variables = _varied_variables(seg)
  seen, logits = [], validation._logits
  def spy(seg, variables, images, scale, flip):
    seen.append((variables, images.shape[0]))
    return logits(seg, variables, images, scale, flip)
  monkeypatch.setattr(validation, '_logits', spy)
  counts = {}
  for n in (1, 2):
    mesh = sharding.make_mesh(jax.devices()[:n])
    placed = validation.on_mesh(variables, mesh)
    seen.clear()
    counts[n] = validation.evaluate(config, seg, placed, mesh=mesh)['confusion_matrix']
    assert {batch for _, batch in seen} == {n}
    for used, _ in seen:
      assert all(a is b for a, b in zip(jax.tree.leaves(used), jax.tree.leaves(placed)))
  assert counts[2] == counts[1] and np.sum(counts[1]) > 0


def test_prediction_compiles_once_across_calls(model):
  """Image panels and `depthuda.predict` get `train.predict_fn` per call: one compilation for
  all of them (the module's trace counted by a side effect)."""
  seg, variables, image = model
  traces = []
  class Counted(type(seg)):
    def __call__(self, *args, **kwargs):
      traces.append(1)
      return super().__call__(*args, **kwargs)
  counted = Counted(num_classes=7, layers=(1, 1, 1, 1), width=4)
  first = [np.asarray(x) for x in train.predict_fn(counted)(variables, image)]
  for _ in range(2):
    again = train.predict_fn(counted)(variables, image)
  assert len(traces) == 1
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)


def test_pseudo_labels_take_the_weights_as_an_argument(model):
  """pseudo_label's jitted function holds no weights as constants, and other weights of the
  same model reuse its compilation."""
  seg, variables, image = model
  traced = pseudo_label.confident.trace(seg, variables, image, HW, 0.5)
  # Constants: the resize matrices (hundreds of entries), not the ~94,000 weights.
  weights = sum(np.size(x) for x in jax.tree.leaves(variables))
  assert sum(np.size(c) for c in traced.jaxpr.consts) < weights / 20
  a = np.asarray(pseudo_label.confident(seg, variables, image, HW, 0.5))[0]
  size = pseudo_label.confident._cache_size()
  b = np.asarray(pseudo_label.confident(seg, _varied_variables(seg, seed=1), image, HW, 0.5))
  assert pseudo_label.confident._cache_size() == size and not np.array_equal(a, b)
  logits, _, _ = seg.apply(variables, image, train=False)
  probs = softmax(_resize(logits, HW), axis=-1)[0]
  clear = np.abs(probs.max(-1) - 0.5) > 1e-5  # rounding decides pixels at the threshold
  want = np.where(probs.max(-1) >= 0.5, probs.argmax(-1), 255)
  np.testing.assert_array_equal(a[clear], want[clear])
