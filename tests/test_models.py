"""Shapes, sizes and initialization of the networks (PyTorch parity is in test_convert.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthuda import models
from depthuda.models.resnet import max_pool_ceil

HEADS = ('classifier', 'density_head', 'depth_head')


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def resnet101():
  model = models.DeepLabV2Depth(num_classes=16)
  variables = jax.eval_shape(
      lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False),
      jax.random.PRNGKey(0))
  return model, variables


def test_resnet101_parameter_count(resnet101):
  _, variables = resnet101
  params = variables['params']
  assert _count(params) == 50_628_992  # METHOD §3; BN running statistics not included
  assert _count({k: v for k, v in params.items() if k not in HEADS}) == 42_500_160
  assert set(variables) == {'params', 'batch_stats'}
  assert set(params['layer3_22']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3'}
  assert set(params['layer4_0']) > {'downsample_conv', 'downsample_bn'}


@pytest.mark.parametrize('size, grid', [((760, 1280), (96, 161)), ((320, 640), (41, 81))])
def test_resnet101_output_grid(resnet101, size, grid):
  model, variables = resnet101
  images = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
  for train in (False, True):
    seg, density, depth = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=train, mutable=['batch_stats'])[0],
        variables, images)
    assert seg.shape == (2, *grid, 16) and seg.dtype == jnp.float32
    assert density.shape == depth.shape == (2, *grid, 1)


@pytest.mark.parametrize('side, expected', [(36, 19), (37, 19), (5, 3), (4, 3), (3, 2)])
def test_max_pool_ceil_size(side, expected):
  # PyTorch MaxPool2d(3, 2, 1, ceil_mode=True) output sides.
  assert max_pool_ceil(jnp.zeros((1, side, side, 1))).shape[1] == expected


def test_max_pool_ceil_values():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1) - 100.0  # all negative
  out = max_pool_ceil(x)[0, :, :, 0]
  # Windows start at -1, 1, 3; the last one covers only row/column 3 (padding never wins).
  np.testing.assert_array_equal(out, np.array([[5, 7, 7], [13, 15, 15], [13, 15, 15]]) - 100.0)


def test_frozen_mask(resnet101):
  _, variables = resnet101
  mask = models.frozen_mask(variables['params'])
  assert mask['bn1'] == {'scale': True, 'bias': True}
  assert mask['layer2_0']['downsample_bn'] == {'scale': True, 'bias': True}
  assert mask['layer2_0']['conv2'] == {'kernel': False}
  assert mask['classifier']['conv0'] == {'kernel': False, 'bias': False}
  frozen = _count([p for p, m in zip(jax.tree.leaves(variables['params']),
                                      jax.tree.leaves(mask)) if m])
  assert frozen == _count(variables['batch_stats'])  # scale, bias as large as mean, var


def test_tiny_forward_and_init():
  model = models.DeepLabV2Depth(num_classes=5, layers=(1, 1, 1, 1), width=4,
                                dtype=jnp.bfloat16)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 40, 56, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
  kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(variables['params'])
             if path[-1].key == 'kernel']
  assert all(k.dtype == jnp.float32 for k in kernels)
  assert abs(np.std(np.concatenate([np.ravel(k) for k in kernels])) - 0.01) < 0.001
  (seg, density, depth), updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, images)
  assert seg.shape == (1, 6, 8, 5) and seg.dtype == jnp.float32
  assert np.all(np.isfinite(seg)) and np.all(np.isfinite(depth))
  # Batch statistics moved the running ones (momentum 0.1 toward the batch).
  assert not np.allclose(updates['batch_stats']['bn1']['mean'], 0.0)
  with pytest.raises(ValueError, match='bn_mode'):
    models.DeepLabV2Depth(num_classes=5, bn_mode='eval').init(
        jax.random.PRNGKey(0), images, train=False)


def test_head_biases_keep_pytorch_default_init():
  """Classifier and head biases ~ U(+-1/sqrt(fan_in)), fan_in = C_in kh kw (PyTorch's Conv2d
  default, which the original keeps); their conv weights ~ N(0, 0.01)."""
  stats = pytest.importorskip('scipy.stats')
  model = models.DeepLabV2Depth(num_classes=32, layers=(1, 1, 1, 1), width=8)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)['params'])
  params = init(jax.random.PRNGKey(0))
  c4 = 8 * 32  # layer4 channels
  biases = {'classifier': ([params['classifier'][f'conv{i}']['bias'] for i in range(4)], c4 * 9)}
  for head in ('density_head', 'depth_head'):
    p = params[head]
    biases[f'{head}/conv1'] = ([p['conv1']['bias']], c4)
    biases[f'{head}/conv2'] = ([p['conv2']['bias']], 64 * 9)
    biases[f'{head}/conv3'] = ([p['conv3']['bias']], 64)
  for name, (leaves, fan_in) in biases.items():
    values = np.concatenate([np.ravel(b) for b in leaves]).astype(np.float64)
    bound = 1 / math.sqrt(fan_in)
    assert np.max(np.abs(values)) <= bound, name
    assert np.max(np.abs(values)) > bound / 2, name
    assert stats.kstest(values, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3, name
  kernels = np.concatenate([np.ravel(params[h][c]['kernel']) for h in ('density_head', 'depth_head')
                            for c in ('conv1', 'conv2', 'conv3')]
                           + [np.ravel(params['classifier'][f'conv{i}']['kernel'])
                              for i in range(4)])
  assert stats.kstest(kernels[:20_000], stats.norm(0, 0.01).cdf).pvalue > 1e-3
  again, other = init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(1))
  bias = lambda p: p['depth_head']['conv2']['bias']
  np.testing.assert_array_equal(bias(again), bias(params))
  assert not np.allclose(bias(other), bias(params))


def test_discriminator_shapes_and_init():
  disc = models.Discriminator(ndf=8)
  x = jnp.zeros((2, 64, 96, 5))
  params = jax.jit(disc.init)(jax.random.PRNGKey(0), x)['params']
  assert disc.apply({'params': params}, x).shape == (2, 2, 3, 1)
  for i, cin in enumerate((5, 8, 16, 32, 64)):
    bound = 1 / math.sqrt(cin * 16)
    for leaf in params[f'conv{i + 1}'].values():
      assert np.max(np.abs(leaf)) <= bound
  kernel = params['conv4']['kernel']  # 4*4*32*64 draws: close to the uniform's std
  assert abs(np.std(kernel) - 1 / math.sqrt(32 * 16 * 3)) < 0.05 / math.sqrt(32 * 16 * 3)


def test_discriminator_parity():
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  channels = (5, 8, 16, 32, 64, 1)
  layers = []
  for cin, cout in zip(channels[:-1], channels[1:]):
    layers += [torch.nn.Conv2d(cin, cout, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2)]
  reference = torch.nn.Sequential(*layers[:-1])
  convs = [m for m in reference if isinstance(m, torch.nn.Conv2d)]
  params = {f'conv{i + 1}': {'kernel': c.weight.detach().numpy().transpose(2, 3, 1, 0),
                             'bias': c.bias.detach().numpy()} for i, c in enumerate(convs)}
  x = np.random.default_rng(0).normal(size=(2, 64, 96, 5)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  actual = models.Discriminator(ndf=8).apply({'params': params}, x)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))
