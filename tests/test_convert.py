"""Parity with a PyTorch model built like the original, and the checkpoint conversion."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from depthuda import models
from depthuda import predict
from depthuda import sharding
from depthuda import train
from depthuda.errors import InputError
from depthuda.stages import training
from tests import main_runs

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


def _imagenet_file(state_dict):
  """The ImageNet file's layout: `Scale.` names, the trunk, and an old `layer5` classifier of
  another class count (11 here)."""
  imagenet = {f'Scale.{k}': v for k, v in state_dict.items()
              if not k.startswith(('layer6', 'enc', 'dec'))}
  channels = WIDTH * 32
  imagenet.update({f'Scale.layer5.conv2d_list.{i}.weight': np.ones((11, channels, 3, 3))
                   for i in range(4)})
  imagenet.update({f'Scale.layer5.conv2d_list.{i}.bias': np.ones(11) for i in range(4)})
  return imagenet


def test_imagenet_file_gives_the_trunk_alone(state_dict):
  converted = models.from_torch_state_dict(_imagenet_file(state_dict), NUM_CLASSES)
  trained = models.from_torch_state_dict(state_dict, NUM_CLASSES)
  assert not set(models.HEADS) & set(converted['params'])
  jax.tree.map(np.testing.assert_array_equal, converted, models.trunk(trained))
  # The class count is no property of a trunk.
  jax.tree.map(np.testing.assert_array_equal, converted,
               models.from_torch_state_dict(_imagenet_file(state_dict)))
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


def test_trained_num_classes_read_off_the_classifier(state_dict):
  whole = models.from_torch_state_dict(state_dict)
  assert whole['params']['classifier']['conv0']['kernel'].shape[-1] == NUM_CLASSES
  with pytest.raises(ValueError, match=r'classifier \(layer6.*\) has 3 classes, not '
                                       r'num_classes=4'):
    models.from_torch_state_dict(state_dict, NUM_CLASSES + 1)


def _convert(*args):
  return subprocess.run([sys.executable, '-m', 'depthuda.convert', *args], capture_output=True,
                        text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)))


def _config(num_classes, init_from):
  """configs/test.py with the architecture of the torch model here."""
  config = test_config.get_config()
  config.model.layers = LAYERS
  config.model.width = WIDTH
  config.data.num_classes = num_classes
  config.data.input_size = (48, 32)
  config.init_from = str(init_from)
  return config


@pytest.fixture(scope='module')
def conversions(torch_model, state_dict, tmp_path_factory):
  """{'imagenet': DIR, 'trained': DIR} written by the converter's command line, side by side."""
  root = tmp_path_factory.mktemp('conversions')
  torch.save({'model': torch_model.state_dict(), 'optimizer': {}}, root / 'trained.pth')
  torch.save({k: torch.from_numpy(np.asarray(v, np.float32))
              for k, v in _imagenet_file(state_dict).items()}, root / 'imagenet.pth')
  runs = {kind: main_runs.popen([sys.executable, '-m', 'depthuda.convert',
                                 f'--torch_checkpoint={root / kind}.pth',
                                 f'--output={root / kind}'])
          for kind in ('imagenet', 'trained')}
  for kind, run in runs.items():
    result = main_runs.finish(run)
    assert result.returncode == 0, result.stderr
    assert 'width 4' in result.stdout
  return {kind: root / kind for kind in runs}


def test_convert_cli(conversions, state_dict, tmp_path):
  trained = json.loads((conversions['trained'] / 'metadata.json').read_text())
  assert trained == {'kind': 'trained', 'num_classes': NUM_CLASSES, 'layers': list(LAYERS),
                     'width': WIDTH, 'source': str(conversions['trained']) + '.pth'}
  imagenet = json.loads((conversions['imagenet'] / 'metadata.json').read_text())
  assert imagenet == {'kind': 'imagenet', 'layers': list(LAYERS), 'width': WIDTH,
                      'source': str(conversions['imagenet']) + '.pth'}
  restored = ocp.StandardCheckpointer().restore(conversions['trained'] / 'variables')
  jax.tree.map(np.testing.assert_array_equal, restored,
               models.from_torch_state_dict(state_dict, NUM_CLASSES))

  # A mismatch is one line naming the fix, exit status 1, no traceback.
  result = _convert(f'--torch_checkpoint={conversions["trained"]}.pth',
                    f'--output={tmp_path / "bad"}', f'--num_classes={NUM_CLASSES + 1}')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1
  assert lines[0].startswith('depthuda: error: ') and 'has 3 classes, not num_classes=4' in lines[0]
  assert not (tmp_path / 'bad').exists()


def _initial_variables(config):
  """What the adapt stage starts from, and what a run without `init_from` starts from."""
  seg, _ = models.build(config, axis_name=sharding.AXIS)
  loaded = training.initial_variables(config, '', 'adapt', seg)
  return train.init_segmenter(config, seg, loaded), seg


@pytest.mark.parametrize('num_classes', [16, 7])
def test_imagenet_conversion_starts_any_class_count(conversions, state_dict, num_classes):
  """The trunk exactly as in the file, the classifier and heads as a fresh seeded init."""
  config = _config(num_classes, conversions['imagenet'])
  variables, seg = _initial_variables(config)
  fresh = train.init_segmenter(config, seg)
  # The reference trunk: the torch arrays, laid out as the parity tests check.
  trained = models.from_torch_state_dict(state_dict, NUM_CLASSES)
  np.testing.assert_array_equal(variables['params']['conv1']['kernel'],
                                state_dict['conv1.weight'].transpose(2, 3, 1, 0))
  jax.tree.map(np.testing.assert_array_equal, models.trunk(variables), models.trunk(trained))
  assert variables['params']['classifier']['conv0']['kernel'].shape[-1] == num_classes
  for head in models.HEADS:
    jax.tree.map(np.testing.assert_array_equal, variables['params'][head], fresh['params'][head])
  assert not np.array_equal(variables['params']['layer1_0']['conv1']['kernel'],
                            fresh['params']['layer1_0']['conv1']['kernel'])


def test_trained_conversion_loads_whole(conversions, state_dict):
  variables, _ = _initial_variables(_config(NUM_CLASSES, conversions['trained']))
  jax.tree.map(np.testing.assert_array_equal, variables,
               models.from_torch_state_dict(state_dict, NUM_CLASSES))


def test_prediction_needs_a_trained_conversion(conversions):
  config = _config(NUM_CLASSES, '')
  with pytest.raises(InputError, match=r'holds an ImageNet trunk without a trained classifier'):
    predict.load_model(config, checkpoint=str(conversions['imagenet']))


def test_init_from_mismatches_cli(conversions, tmp_path):
  """Each mismatch stops `depthuda.main` at once: exit status 1 and one line naming the fix."""
  old = tmp_path / 'old'  # converted before folders recorded what they hold
  shutil.copytree(conversions['trained'], old)
  os.remove(old / 'metadata.json')
  layers = '--config.model.layers=(1,1,2,1)'
  cases = {
      'no converted checkpoint at .*nothing/variables; .*python -m depthuda.convert':
          (tmp_path / 'nothing', layers),
      'old has no metadata.json .*convert the .pth again': (old, layers),
      'holds a trained 3-class model; this config has 7 classes .*or an ImageNet conversion':
          (conversions['trained'], layers),
      r'holds a ResNet with layers \(1, 1, 2, 1\) and width 4; this config has '
      r'model.layers=\(1, 1, 1, 1\)': (conversions['imagenet'],),
  }
  runs = {message: main_runs.popen(
      [sys.executable, '-m', 'depthuda.main', '--config=configs/test.py',
       f'--workdir={tmp_path / f"run{i}"}', f'--config.init_from={init_from}', *args])
          for i, (message, (init_from, *args)) in enumerate(cases.items())}
  for message, run in runs.items():
    result = main_runs.finish(run)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('depthuda: error: config.init_from='), lines[0]
    assert re.search(message, lines[0]), lines[0]


def test_adapt_run_starts_from_the_imagenet_trunk(conversions, tmp_path):
  """`depthuda.main --config.init_from=<ImageNet conversion>`: the first checkpoint of adapt
  holds the file's trunk (weights and BatchNorm statistics) exactly, and the classifier and the
  depth and density heads of a run without init_from (a fresh init from the seed). Every loss
  weight and the weight decay 0 and BatchNorm frozen: a step changes nothing of the segmenter,
  so step 1 shows step 0."""
  still = ('--stage=adapt', '--config.adapt.num_steps=1', '--config.checkpoint_every_steps=1',
           f'--config.model.layers={LAYERS}'.replace(' ', ''), '--config.optim.weight_decay=0',
           '--config.model.bn_mode=frozen',
           *(f'--config.loss.lambda_{term}=0' for term in ('seg', 'depth', 'bal_src', 'bal_tgt',
                                                            'adv')))
  runs = {name: main_runs.start(str(tmp_path / name), *still, f'--config.init_from={init_from}')
          for name, init_from in (('imagenet', conversions['imagenet']), ('scratch', ''))}
  state = {}
  for name, process in runs.items():
    completed = main_runs.finish(process)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert main_runs.checkpoint_steps(str(tmp_path / name), 'adapt') == [1]
    state[name] = ocp.StandardCheckpointer().restore(tmp_path / name / 'adapt' / 'checkpoints' /
                                                     '1' / 'state')
  file = ocp.StandardCheckpointer().restore(conversions['imagenet'] / 'variables')
  loaded, scratch = state['imagenet'], state['scratch']
  assert set(loaded['params']) == set(file['params']) | set(models.HEADS)
  for collection in ('params', 'batch_stats'):
    for name, value in file[collection].items():
      jax.tree.map(np.testing.assert_array_equal, loaded[collection][name], value)
  assert loaded['params']['classifier']['conv0']['kernel'].shape[-1] == 7  # the toy's classes
  for head in models.HEADS:
    jax.tree.map(np.testing.assert_array_equal, loaded['params'][head], scratch['params'][head])
  assert not np.array_equal(file['params']['conv1']['kernel'],
                            scratch['params']['conv1']['kernel'])  # the trunk is not the seed's
