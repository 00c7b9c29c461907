"""Tests for depthuda.losses: closed forms, NumPy references and PyTorch parity."""

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from depthuda import losses

WEIGHTS16 = np.array([0.327, 0.313, 0.206, 22.427, 22.558, 5.811, 155.643, 59.528, 0.586,
                      0.882, 1.423, 12.871, 1.488, 3.955, 29.164, 27.563], np.float32)


def _numpy_bilinear(x, out_h, out_w):
  """Direct align_corners=True bilinear resize: four neighbours per output pixel."""
  _, in_h, in_w, _ = x.shape
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]), np.float64)
  for i in range(out_h):
    sy = i * (in_h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = int(math.floor(sy)); y1 = min(y0 + 1, in_h - 1); fy = sy - y0
    for j in range(out_w):
      sx = j * (in_w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = int(math.floor(sx)); x1 = min(x0 + 1, in_w - 1); fx = sx - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


@pytest.mark.parametrize('in_hw,out_hw', [((4, 5), (9, 13)), ((3, 3), (3, 3)),
                                          ((5, 7), (2, 3)), ((1, 4), (3, 8)),
                                          ((4, 4), (1, 1))])
def test_upsample_bilinear_matches_direct_lerp(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  got = np.asarray(jax.jit(losses.upsample_bilinear, static_argnums=1)(x, out_hw))
  np.testing.assert_allclose(got, _numpy_bilinear(x, *out_hw), atol=1e-5)


def test_upsample_bilinear_corners_and_constant():
  x = np.random.default_rng(1).normal(size=(1, 6, 9, 2)).astype(np.float32)
  y = np.asarray(losses.upsample_bilinear(x, (41, 57)))
  for (a, b), (c, d) in [((0, 0), (0, 0)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0)),
                         ((-1, -1), (-1, -1))]:
    np.testing.assert_allclose(y[0, a, b], x[0, c, d], atol=1e-6)
  const = losses.upsample_bilinear(jnp.full((1, 3, 4, 1), 2.5), (10, 10))
  np.testing.assert_allclose(const, 2.5, atol=1e-6)


def test_upsample_bilinear_large_output_shape():
  x = jnp.ones((1, 96, 161, 2), jnp.bfloat16)
  y = jax.jit(losses.upsample_bilinear, static_argnums=1)(x, (1024, 2048))
  assert y.shape == (1, 1024, 2048, 2) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y[0, ::97, ::113]), 1.0, atol=1e-6)


def test_upsample_bilinear_matches_torch():
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(2).normal(size=(2, 7, 11, 4)).astype(np.float32)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=(30, 45), mode='bilinear',
      align_corners=True).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(losses.upsample_bilinear(x, (30, 45)), expected, atol=1e-5)


def _ce_inputs(seed, num_classes=16, ignore_fraction=0.3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3.0, size=(2, 5, 6, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(2, 5, 6)).astype(np.int32)
  labels[rng.random(labels.shape) < ignore_fraction] = 255
  return logits, labels


def test_weighted_cross_entropy_matches_numpy():
  logits, labels = _ce_inputs(3)
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  valid = labels != 255
  nll = -np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  w = WEIGHTS16[np.where(valid, labels, 0)] * valid
  expected_weighted = (w * nll).sum() / w.sum()
  expected_plain = nll[valid].mean()
  got_weighted = losses.weighted_cross_entropy(logits, labels, WEIGHTS16)
  got_plain = losses.weighted_cross_entropy(logits, labels, None)
  np.testing.assert_allclose(got_weighted, expected_weighted, rtol=1e-5)
  np.testing.assert_allclose(got_plain, expected_plain, rtol=1e-5)


def test_weighted_cross_entropy_closed_form():
  # Two classes, logits (0, 0): every pixel costs log 2 whatever the weights.
  logits = jnp.zeros((1, 1, 3, 2))
  labels = jnp.array([[[0, 1, 255]]])
  np.testing.assert_allclose(
      losses.weighted_cross_entropy(logits, labels, jnp.array([1.0, 9.0])), math.log(2),
      rtol=1e-6)
  # Pixel 0 costs log(1 + e), pixel 1 costs log(1 + e^-1); weights 1 and 3.
  logits = jnp.array([[[[0.0, 1.0], [0.0, 1.0]]]])
  labels = jnp.array([[[0, 1]]])
  expected = (math.log(1 + math.e) + 3 * math.log(1 + math.exp(-1))) / 4
  np.testing.assert_allclose(
      losses.weighted_cross_entropy(logits, labels, jnp.array([1.0, 3.0])), expected,
      rtol=1e-6)


def test_weighted_cross_entropy_matches_torch():
  torch = pytest.importorskip('torch')
  logits, labels = _ce_inputs(4)
  to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  for weight in (WEIGHTS16, None):
    criterion = torch.nn.CrossEntropyLoss(
        weight=None if weight is None else torch.from_numpy(weight), ignore_index=255)
    expected = criterion(to_torch(logits), torch.from_numpy(labels).long()).item()
    got = losses.weighted_cross_entropy(logits, labels, weight)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_weighted_cross_entropy_all_ignored_is_zero_with_finite_grad():
  logits, _ = _ce_inputs(5)
  labels = np.full(logits.shape[:3], 255, np.int32)
  loss, grad = jax.value_and_grad(losses.weighted_cross_entropy)(logits, labels, WEIGHTS16)
  assert float(loss) == 0.0
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0.0)


def test_weighted_cross_entropy_bfloat16_and_extreme_logits():
  logits, labels = _ce_inputs(6)
  logits = logits * 1e4  # huge margins: log-sum-exp must not overflow
  loss, grad = jax.value_and_grad(losses.weighted_cross_entropy)(
      jnp.asarray(logits, jnp.bfloat16), labels, WEIGHTS16)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad, np.float32)))


def _numpy_berhu(pred, target):
  d = np.abs(pred.astype(np.float64) - target)
  c = 0.2 * d.max()
  return np.where(d <= c, d, (d ** 2 + c ** 2) / (2 * c)).mean()


def test_berhu_matches_numpy_and_closed_form():
  rng = np.random.default_rng(7)
  pred = rng.normal(size=(2, 8, 9)).astype(np.float32)
  target = rng.normal(size=(2, 8, 9)).astype(np.float32)
  np.testing.assert_allclose(losses.berhu(pred, target), _numpy_berhu(pred, target), rtol=1e-5)
  # d = (10, 1, 3): c = 2, so 1 stays linear; 10 -> (100 + 4) / 4 = 26, 3 -> (9 + 4) / 4.
  d = jnp.array([10.0, -1.0, 3.0])
  np.testing.assert_allclose(losses.berhu(d, jnp.zeros(3)), (26 + 1 + 13 / 4) / 3, rtol=1e-6)
  # d = (5, 1): c = 1 and |d| == c takes the linear branch; 5 -> (25 + 1) / 2.
  np.testing.assert_allclose(losses.berhu(jnp.array([5.0, 1.0]), jnp.zeros(2)),
                             (13.0 + 1.0) / 2, rtol=1e-6)


def test_berhu_gradient_treats_c_as_constant():
  pred = jnp.array([10.0, -1.0, 3.0])
  grad = jax.grad(losses.berhu)(pred, jnp.zeros(3))
  # d/dd of |d| is sign(d); of (d^2 + c^2)/(2c) with c fixed is d/c; then / n.
  np.testing.assert_allclose(grad, np.array([10 / 2, -1.0, 3 / 2]) / 3, rtol=1e-6)


def test_berhu_zero_difference_is_zero_and_finite():
  x = jnp.ones((2, 3, 3))
  loss, grad = jax.value_and_grad(losses.berhu)(x, x)
  assert float(loss) == 0.0 and np.all(np.isfinite(grad))


def test_berhu_with_an_inverse_depth_of_65536():
  """One SYNTHIA pixel at raw depth 0 (inverse depth 65,536) sets c for the whole batch, as in
  the original: every other pixel is then in the linear regime. Loss and gradient stay finite
  and match float64."""
  rng = np.random.default_rng(3)
  pred = rng.uniform(0, 100, (2, 8, 9)).astype(np.float32)
  target = rng.uniform(1, 100, (2, 8, 9)).astype(np.float32)
  target[1, 4, 5] = 65536.0
  loss, grad = jax.value_and_grad(losses.berhu)(jnp.asarray(pred), jnp.asarray(target))
  np.testing.assert_allclose(loss, _numpy_berhu(pred, target), rtol=1e-6)
  d = pred.astype(np.float64) - target
  c = 0.2 * np.abs(d).max()
  expected = np.where(np.abs(d) <= c, np.sign(d), d / c) / d.size
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, expected, rtol=1e-5)


def test_bce_with_logits_closed_form_and_stability():
  np.testing.assert_allclose(losses.bce_with_logits(jnp.zeros((3, 4)), 1.0), math.log(2),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.bce_with_logits(jnp.array([2.0]), 0.0),
                             math.log(1 + math.exp(2.0)), rtol=1e-6)
  big = jnp.array([1e4, -1e4])
  loss, grad = jax.value_and_grad(losses.bce_with_logits)(big, 0.0)
  np.testing.assert_allclose(loss, 1e4 / 2, rtol=1e-6)
  assert np.all(np.isfinite(grad))


def test_bce_with_logits_matches_torch():
  torch = pytest.importorskip('torch')
  logits = np.random.default_rng(8).normal(scale=5, size=(2, 4, 5, 1)).astype(np.float32)
  for target in (0.0, 1.0):
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.full(logits.shape, target)).item()
    np.testing.assert_allclose(losses.bce_with_logits(logits, target), expected, rtol=1e-5)


def test_entropy_map_values_and_edge_cases():
  # Uniform over C classes: each channel is (1/C) * log2(C) / log2(C) = 1/C.
  np.testing.assert_allclose(losses.entropy_map(jnp.zeros((2, 3, 4))), 0.25, rtol=1e-6)
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(2, 3, 3, 7)).astype(np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(losses.entropy_map(logits), -p * np.log2(p) / np.log2(7),
                             rtol=1e-5, atol=1e-7)
  # A saturated softmax has p = 0 entries: the map and its gradient stay finite.
  peaked = jnp.array([[1e4, 0.0, -1e4]])
  ent = losses.entropy_map(peaked)
  grad = jax.grad(lambda z: losses.entropy_map(z).sum())(peaked)
  assert np.all(np.isfinite(ent)) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(ent, 0.0, atol=1e-6)
  with pytest.raises(ValueError):
    losses.entropy_map(jnp.zeros((3, 1)))


@pytest.mark.parametrize('loss_name', ['weighted_cross_entropy', 'berhu', 'bce_with_logits'])
def test_losses_over_a_device_axis_match_one_device(loss_name):
  """With axis_name, each device's loss (and gradient) is that of the global batch."""
  if jax.device_count() < 2:
    pytest.skip('needs 2 devices (tests/conftest.py asks XLA for 4 CPU devices)')
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  logits, labels = _ce_inputs(10)
  labels[0, :4] = 255  # devices hold different numbers of valid pixels
  depth = np.random.default_rng(11).normal(size=logits.shape[:3]).astype(np.float32)
  depth[1] *= 10       # the largest |d| sits on the second device only
  data = {
      'weighted_cross_entropy': (logits, labels),
      'berhu': (logits[..., 0], depth),
      'bce_with_logits': (logits, np.float32(1.0)),
  }[loss_name]

  def loss(scale, first, second, axis_name=None):
    kwargs = {'axis_name': axis_name}
    if loss_name == 'weighted_cross_entropy':
      kwargs['class_weights'] = WEIGHTS16
    return getattr(losses, loss_name)(scale * first, second, **kwargs)

  scale = jnp.float32(1.3)
  expected = jax.value_and_grad(loss)(scale, *data)
  second_spec = P('data') if np.ndim(data[1]) else P()
  sharded = jax.jit(jax.shard_map(
      lambda s, a, b: jax.value_and_grad(loss)(s, a, b, 'data'), mesh=mesh,
      in_specs=(P(), P('data'), second_spec), out_specs=(P(), P())))
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  got = sharded(put(scale, P()), put(data[0], P('data')), put(data[1], second_spec))
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], expected[1], rtol=1e-5)


@pytest.mark.parametrize('mode', losses.DISC_INPUTS)
def test_discriminator_input_matches_its_closed_form(mode):
  """Each `loss.disc_input` mode against NumPy: softmax, -p log2 p / log2 C, and that times the
  upsampled depth or density (align-corners bilinear, `_numpy_bilinear`)."""
  rng = np.random.default_rng(12)
  seg = rng.normal(scale=2, size=(2, 3, 4, 5)).astype(np.float32)
  density = rng.uniform(0, 255, (2, 3, 4, 1)).astype(np.float32)
  depth = rng.uniform(1, 300, (2, 3, 4, 1)).astype(np.float32)
  up = _numpy_bilinear(seg, 7, 9)
  p = np.exp(up - up.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  entropy = -p * np.log2(p) / np.log2(5)
  expected = {'softmax': p, 'entropy': entropy,
              'entropy_depth': entropy * _numpy_bilinear(depth, 7, 9),
              'entropy_density': entropy * _numpy_bilinear(density, 7, 9)}[mode]
  got = losses.discriminator_input(mode, jnp.asarray(seg), jnp.asarray(density),
                                   jnp.asarray(depth), (7, 9))
  assert got.shape == (2, 7, 9, 5)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match='entropy_density'):
    losses.discriminator_input('density', seg, density, depth, (7, 9))


def test_loss_weights_drop_the_density_terms_when_switched_off():
  class Loss:
    lambda_seg, lambda_depth, lambda_bal_src, lambda_bal_tgt, lambda_adv = 1.0, 0.5, 0.25, 2, 3
    density_losses = True
  on = {'loss_seg': 1.0, 'loss_depth': 0.5, 'loss_bal_src': 0.25, 'loss_bal_tgt': 2.0,
        'loss_adv': 3.0}
  assert losses.loss_weights(Loss) == on
  Loss.density_losses = False
  assert losses.loss_weights(Loss) == dict(on, loss_bal_src=0.0, loss_bal_tgt=0.0)
