"""Parity with a PyTorch model built like the original, and the checkpoint conversion."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from depthuda import models

torch = pytest.importorskip('torch')
nn = torch.nn

LAYERS = (1, 1, 2, 1)
WIDTH = 4
NUM_CLASSES = 3
# conv1 gives 36x52 (even sides), where ceil-mode pooling gives 19x27 and floor mode 18x26.
IMAGE_SHAPE = (2, 72, 104, 3)


class TorchBottleneck(nn.Module):
  """The original's Bottleneck: stride on conv1, padding = dilation on conv2."""

  def __init__(self, inplanes, planes, stride, dilation, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchClassifier(nn.Module):
  def __init__(self, inplanes, num_classes):
    super().__init__()
    self.conv2d_list = nn.ModuleList(
        nn.Conv2d(inplanes, num_classes, 3, padding=d, dilation=d) for d in (6, 12, 18, 24))

  def forward(self, x):
    return sum(conv(x) for conv in self.conv2d_list)


class TorchDeepLab(nn.Module):
  """The original's model with its parameter names (plus the unused enc4_4 and dec4)."""

  def __init__(self, layers, width, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    inplanes = width
    for i, (blocks, stride, dilation) in enumerate(zip(layers, (1, 2, 1, 1), (1, 1, 2, 4))):
      planes = width * 2**i
      downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
      modules = [TorchBottleneck(inplanes, planes, stride, dilation, downsample)]
      modules += [TorchBottleneck(planes * 4, planes, 1, dilation, None)
                  for _ in range(blocks - 1)]
      setattr(self, f'layer{i + 1}', nn.Sequential(*modules))
      inplanes = planes * 4
    self.layer6 = TorchClassifier(inplanes, num_classes)
    for prefix in ('enc4', 'enc5'):
      setattr(self, f'{prefix}_1', nn.Conv2d(inplanes, 8 * width, 1))
      setattr(self, f'{prefix}_2', nn.Conv2d(8 * width, 8 * width, 3, padding=1))
      setattr(self, f'{prefix}_3', nn.Conv2d(8 * width, 2 * width, 1))
    self.enc4_4 = nn.Conv2d(2 * width, 1, 1)
    self.dec4 = nn.Conv2d(2 * width, inplanes, 1)
    for m in self.modules():
      if isinstance(m, nn.BatchNorm2d):  # statistics and affine far from the identity
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.5, 0.5)

  def head(self, prefix, x):
    x = torch.relu(getattr(self, f'{prefix}_1')(x))
    x = torch.relu(getattr(self, f'{prefix}_2')(x))
    return getattr(self, f'{prefix}_3')(x).mean(dim=1, keepdim=True)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.layer6(x), self.head('enc4', x), self.head('enc5', x)


@pytest.fixture(scope='module')
def torch_model():
  torch.manual_seed(0)
  torch.set_num_threads(1)
  return TorchDeepLab(LAYERS, WIDTH, NUM_CLASSES)


@pytest.fixture(scope='module')
def state_dict(torch_model):
  return {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).normal(size=IMAGE_SHAPE).astype(np.float32)


def _model(**kwargs):
  return models.DeepLabV2Depth(num_classes=NUM_CLASSES, layers=LAYERS, width=WIDTH, **kwargs)


def _torch_forward(torch_model, images, train):
  torch_model.train(train)
  with torch.no_grad():
    outputs = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return [o.numpy().transpose(0, 2, 3, 1) for o in outputs]


def _assert_close(actual, expected, tol=1e-5):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert error <= tol, error


def test_infer_architecture(state_dict):
  assert models.infer_architecture(state_dict) == (LAYERS, WIDTH)


def test_eval_parity(torch_model, state_dict, images):
  variables = models.from_torch_state_dict(state_dict, NUM_CLASSES)
  outputs = jax.jit(lambda v, x: _model().apply(v, x, train=False))(variables, images)
  expected = _torch_forward(torch_model, images, train=False)
  assert outputs[0].shape == (2, 10, 14, NUM_CLASSES)  # ceil-mode pooling: 19x27 after it
  for actual, want in zip(outputs, expected):
    _assert_close(actual, want)


def test_train_mode_parity(state_dict, images):
  # A fresh copy: train mode updates the running statistics.
  torch.manual_seed(0)
  torch_model = TorchDeepLab(LAYERS, WIDTH, NUM_CLASSES)
  variables = models.from_torch_state_dict(state_dict, NUM_CLASSES)
  outputs, updates = jax.jit(lambda v, x: _model().apply(v, x, train=True,
                                                         mutable=['batch_stats']))(variables,
                                                                                   images)
  expected = _torch_forward(torch_model, images, train=True)
  for actual, want in zip(outputs, expected):
    _assert_close(actual, want)
  trained = models.from_torch_state_dict(
      {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, NUM_CLASSES)
  new_stats = updates['batch_stats']
  _assert_close(new_stats['layer4_0']['bn2']['mean'],
                trained['batch_stats']['layer4_0']['bn2']['mean'])
  # Flax updates the running variance with the biased batch variance, PyTorch with the
  # unbiased one: a relative difference of 0.1 / (n - 1), n = 2*10*14 cells here.
  _assert_close(new_stats['layer4_0']['bn2']['var'],
                trained['batch_stats']['layer4_0']['bn2']['var'], tol=1e-3)
  # 'frozen' mode keeps using the running statistics in training.
  frozen = _model(bn_mode='frozen').apply(variables, images, train=True)
  _assert_close(frozen[0], _model().apply(variables, images, train=False)[0], tol=0)


def test_imagenet_naming(state_dict):
  """`Scale.` keys, the old `layer5` classifier skipped, heads N(0, 0.01) from the seed."""
  backbone = {f'Scale.{k}': v for k, v in state_dict.items()
              if not k.startswith(('layer6', 'enc', 'dec'))}
  backbone.update({f'Scale.layer5.conv2d_list.{i}.{leaf}': np.zeros(3)
                   for i in range(4) for leaf in ('weight', 'bias')})
  converted = models.from_torch_state_dict(backbone, NUM_CLASSES, seed=3)
  other_seed = models.from_torch_state_dict(backbone, NUM_CLASSES, seed=4)
  trained = models.from_torch_state_dict(state_dict, NUM_CLASSES)
  for name in ('classifier', 'density_head', 'depth_head'):
    for conv, leaves in converted['params'][name].items():
      assert abs(np.std(leaves['kernel']) - 0.01) < 0.001
      assert not np.any(leaves['bias'])
      assert not np.array_equal(leaves['kernel'], other_seed['params'][name][conv]['kernel'])
    del converted['params'][name], trained['params'][name]
  jax.tree.map(np.testing.assert_array_equal, converted, trained)


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.update({'layer2.0.conv4.weight': np.zeros(1)}), 'layer2.0.conv4.weight'),
    (lambda sd: sd.pop('layer3.1.bn2.running_var'), 'layer3.1.bn2.running_var'),
    (lambda sd: sd.pop('enc5_2.bias'), 'enc5_2.bias'),
    (lambda sd: sd.update({'layer1.0.conv2.weight': np.zeros((4, 4, 1, 1))}),
     'layer1.0.conv2.weight (4, 4, 1, 1) (model expects (4, 4, 3, 3))'),
])
def test_bad_state_dict(state_dict, change, message):
  broken = dict(state_dict)
  change(broken)
  with pytest.raises(ValueError, match=re.escape(message)):
    models.from_torch_state_dict(broken, NUM_CLASSES)


def test_wrong_num_classes(state_dict):
  with pytest.raises(ValueError, match=r'layer6.conv2d_list.0.weight \(3,'):
    models.from_torch_state_dict(state_dict, NUM_CLASSES + 1)


def _convert(*args):
  return subprocess.run([sys.executable, '-m', 'depthuda.convert', *args], capture_output=True,
                        text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_convert_cli(torch_model, state_dict, tmp_path):
  path = tmp_path / 'trained.pth'
  torch.save({'model': torch_model.state_dict(), 'optimizer': {}}, path)
  result = _convert(f'--torch_checkpoint={path}', f'--output={tmp_path / "out"}',
                    f'--num_classes={NUM_CLASSES}')
  assert result.returncode == 0, result.stderr
  assert 'width 4' in result.stdout
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'out' / 'variables')
  jax.tree.map(np.testing.assert_array_equal, restored,
               models.from_torch_state_dict(state_dict, NUM_CLASSES))

  # A mismatch is one line naming the key, exit status 1, no traceback.
  result = _convert(f'--torch_checkpoint={path}', f'--output={tmp_path / "bad"}')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ') and 'layer6.conv2d_list.0.weight' in lines[-1]
