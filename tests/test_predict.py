"""depthuda.predict: checkpoint lookup, preprocessing, and the PNGs it writes for any image size."""

import io
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import test as test_config
from depthuda import checkpointing
from depthuda import converted
from depthuda import losses
from depthuda import predict
from depthuda import models
from depthuda import sharding
from depthuda import train
from depthuda import visualize
from tests import main_runs
from tests.test_mapillary import _varied_variables

KINDS = ('classes', 'seg', 'overlay', 'depth', 'density')
SIZES = {'wide': (50, 30), 'odd': (97, 61), 'portrait': (33, 80)}  # (W, H)
SKY = 4  # A class of the 7-class palette.


def _save_run(workdir: pathlib.Path, config, variables, stage: str = 'adapt') -> None:
  """A workdir as `depthuda.main` leaves it: config.json and a stage's best checkpoint."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  with checkpointing.StageCheckpoints(str(workdir / stage), resume=True) as stages:
    stages.save_best(3, variables, {'step': 3, 'miou': 1.0})


def _constant_heads(variables):
  """Variables whose outputs ignore the image: class SKY, density 100, inverse depth 2."""
  params = jax.tree.map(np.array, variables['params'])
  for conv in params['classifier'].values():
    conv['kernel'][:] = 0.0
    conv['bias'][:] = 0.0
  params['classifier']['conv0']['bias'][SKY] = 10.0
  for head, value in (('density_head', 100.0), ('depth_head', 2.0)):
    params[head]['conv3']['kernel'][:] = 0.0
    params[head]['conv3']['bias'][:] = value
  return {'params': params, 'batch_stats': variables['batch_stats']}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict')
  config = test_config.get_config()
  seg, _ = models.build(config)
  w, h = config.data.input_size
  variables = jax.jit(lambda k: seg.init(k, jnp.zeros((1, h, w, 3)), train=False))(
      jax.random.PRNGKey(0))
  _save_run(root / 'run', config, variables)
  _save_run(root / 'constant', config, _constant_heads(variables), stage='self_train')
  images = root / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  for name, (width, height) in SIZES.items():
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if name == 'odd':
      image.convert('RGBA').save(images / f'{name}.png')
    elif name == 'portrait':
      image.convert('L').save(images / f'{name}.jpg')
    else:
      image.save(images / f'{name}.png')
  (images / 'notes.txt').write_text('not an image')
  return root, config


def _read(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert('RGB'))


def test_find_images_folder_glob_and_errors(setup, tmp_path):
  root, _ = setup
  assert [p.name for p in predict.find_images(str(root / 'images'))] == [
      'odd.png', 'portrait.jpg', 'wide.png']
  assert [p.name for p in predict.find_images(str(root / 'images' / '*.png'))] == [
      'odd.png', 'wide.png']
  with pytest.raises(predict.InputError, match='no images'):
    predict.find_images(str(tmp_path / 'nothing*.png'))
  (tmp_path / 'a.png').write_bytes(b'')
  (tmp_path / 'a.jpg').write_bytes(b'')
  with pytest.raises(predict.InputError, match='same outputs'):
    predict.find_images(str(tmp_path))


def test_preprocess_matches_input_pipeline():
  import tensorflow as tf
  from depthuda.data import decoding
  rng = np.random.default_rng(1)
  image = np.asarray(Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8))
                     .resize((194, 122), Image.Resampling.BILINEAR))
  png = io.BytesIO()
  Image.fromarray(image).save(png, format='PNG')
  expected = decoding.decode_image(tf.constant(png.getvalue()), (64, 40)).numpy()
  got = predict.preprocess(image, (64, 40))
  assert got.shape == expected.shape == (40, 64, 3) and got.dtype == np.float32
  # Both are bicubic with antialiasing rounded to 8 bits; PIL and TF differ by <= 1 level.
  assert np.abs(got - expected).max() <= 1.0
  assert np.abs(got - expected).mean() < 0.5


def test_predict_writes_every_map_at_the_input_size(setup, tmp_path):
  root, config = setup
  seg, variables, source = predict.load_model(config, workdir=str(root / 'run'))
  assert source.endswith('adapt best step 3')
  paths = predict.find_images(str(root / 'images'))
  predict.predict_images(config, seg, variables, paths, str(tmp_path), batch_size=2)
  assert sorted(os.listdir(tmp_path)) == sorted(f'{n}_{k}.png' for n in SIZES for k in KINDS)
  table = visualize.palette(config.data.num_classes)
  for name, (width, height) in SIZES.items():
    for kind in KINDS:
      assert Image.open(tmp_path / f'{name}_{kind}.png').size == (width, height), (name, kind)
    classes = np.asarray(Image.open(tmp_path / f'{name}_classes.png'))
    assert classes.max() < config.data.num_classes
    colours = _read(tmp_path / f'{name}_seg.png')
    np.testing.assert_array_equal(colours, table[classes])
    original = np.asarray(Image.open(next(p for p in paths if p.stem == name)).convert('RGB'))
    np.testing.assert_array_equal(_read(tmp_path / f'{name}_overlay.png'),
                                  visualize.overlay(original, classes, 0.5, 7))
  # The classes are the model's own: logits at the input size, upsampled to the image, argmax.
  original = np.asarray(Image.open(root / 'images' / 'odd.png').convert('RGB'))
  logits, _, _ = seg.apply(variables, predict.preprocess(original, config.data.input_size)[None],
                           train=False)
  expected = np.asarray(losses.upsample_bilinear(logits, original.shape[:2])[0].argmax(-1))
  classes = np.asarray(Image.open(tmp_path / 'odd_classes.png'))
  assert (classes == expected).mean() > 0.999


def test_predict_splits_each_batch_over_the_devices(setup, tmp_path, monkeypatch):
  """--batch_size=2 on 4 devices: batches of 4 images, one per device."""
  root, config = setup
  seg, variables, _ = predict.load_model(config, workdir=str(root / 'run'))
  seen, predict_fn = [], train.predict_fn

  def recording(module):
    forward = predict_fn(module)

    def call(variables, images):
      seen.append((images.shape[0], images.sharding))
      return forward(variables, images)
    return call

  monkeypatch.setattr(train, 'predict_fn', recording)
  predict.predict_images(config, seg, variables, predict.find_images(str(root / 'images')),
                         str(tmp_path), batch_size=2)
  devices = set(jax.local_devices())
  assert len(devices) == 4 and seen
  for size, split in seen:
    assert size == 4 and split.device_set == devices and split.spec[0] == sharding.AXIS


def test_rendered_pngs_of_a_known_model(setup, tmp_path):
  root, config = setup
  seg, variables, source = predict.load_model(config, workdir=str(root / 'constant'))
  assert 'self_train best step 3' in source
  path = root / 'images' / 'wide.png'
  predict.predict_images(config, seg, variables, [path], str(tmp_path))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'wide_classes.png')), SKY)
  seg_png = _read(tmp_path / 'wide_seg.png')
  assert np.all(seg_png == (70, 130, 180))  # Cityscapes' sky.
  original = np.asarray(Image.open(path).convert('RGB')).astype(float)
  np.testing.assert_allclose(_read(tmp_path / 'wide_overlay.png'),
                             np.round((original + (70, 130, 180)) / 2), atol=0.5)
  density = _read(tmp_path / 'wide_density.png')
  colour = visualize.colorize_scalar(np.full((1, 1), 100.0), 0.0, 255.0, cmap='viridis')[0, 0]
  assert np.all(density == colour)


def _cli(*args, cwd):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run([sys.executable, '-m', 'depthuda.predict', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_missing_model_is_a_clear_error_and_creates_nothing(setup, tmp_path):
  _, config = setup
  with pytest.raises(predict.InputError, match='no trained model'):
    predict.load_model(config, workdir=str(tmp_path))
  with pytest.raises(predict.InputError, match='not a checkpoint'):
    predict.load_model(config, checkpoint=str(tmp_path))
  assert not os.listdir(tmp_path)


def test_command_line_and_one_line_errors(setup, tmp_path):
  root, _ = setup
  run = _cli(f'--workdir={root / "constant"}', f'--input={root / "images" / "w*.png"}',
             f'--output={tmp_path / "out"}', cwd=tmp_path)
  assert run.returncode == 0, run.stderr
  assert sorted(os.listdir(tmp_path / 'out')) == [f'wide_{k}.png' for k in sorted(KINDS)]
  # README's second form: a checkpoint folder with its config, a recursive glob, a batch size.
  run = _cli(f'--checkpoint={root / "constant" / "self_train"}',
             f'--config={os.path.join(main_runs.ROOT, "configs", "test.py")}',
             f'--input={root}/**/*.jpg', f'--output={tmp_path / "out2"}', '--batch_size=2',
             cwd=tmp_path)
  assert run.returncode == 0, run.stderr
  assert sorted(os.listdir(tmp_path / 'out2')) == [f'portrait_{k}.png' for k in sorted(KINDS)]
  run = _cli(f'--workdir={root / "run"}', f'--input={tmp_path / "none"}',
             f'--output={tmp_path / "x"}', cwd=tmp_path)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1].startswith('depthuda: error: no images')
  assert 'Traceback' not in run.stderr


def test_checkpoint_paths_stage_best_and_converted(setup, tmp_path):
  root, config = setup
  _, reference, _ = predict.load_model(config, workdir=str(root / 'run'))
  checkpointing.save_variables(str(tmp_path), reference, converted.metadata(
      converted.TRAINED, config.model.layers, config.model.width, config.data.num_classes,
      source='trained.pth'))
  for path in (root / 'run' / 'adapt', root / 'run' / 'adapt' / 'best', tmp_path):
    _, variables, _ = predict.load_model(config, checkpoint=str(path))
    jax.tree.map(np.testing.assert_array_equal, variables, reference)


def test_mapillary_config_fits_and_pads_as_training(setup, tmp_path):
  """A Mapillary config: images keep their aspect and are padded as the input pipeline does;
  the outputs of the whole padded input come back cropped to each image."""
  import tensorflow as tf
  import torch
  from depthuda.data import decoding
  root, config = setup
  config = config.copy_and_resolve_references()
  config.data.target = 'mapillary'
  rng = np.random.default_rng(2)
  for width, height in ((97, 30), (33, 80), (64, 40)):  # wider, taller, the input's aspect
    rgb = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
                     .resize((width, height), Image.Resampling.BILINEAR))
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format='JPEG', quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert('RGB'))
    expected, _ = decoding.decode_padded_image(tf.constant(jpeg.getvalue()), (64, 40))
    got = predict.preprocess(decoded, (64, 40), keep_aspect=True)
    assert np.abs(got - expected.numpy()).max() <= 1.0, (width, height)
  seg, _, _ = predict.load_model(config, workdir=str(root / 'run'))
  variables = _varied_variables(seg)  # predictions that vary across the image
  path = root / 'images' / 'wide.png'  # 50x30, wider than the input: padded at the bottom
  predict.predict_images(config, seg, variables, [path], str(tmp_path))
  original = np.asarray(Image.open(path).convert('RGB'))
  logits, _, _ = seg.apply(variables, predict.preprocess(original, (64, 40), True)[None],
                           train=False)
  # The padded input covers 50*40/64 = 31.25 image rows: 31, truncated as for labels.
  up = torch.nn.functional.interpolate(torch.from_numpy(np.array(logits)).permute(0, 3, 1, 2),
                                       size=(31, 50), mode='bilinear', align_corners=True)
  classes = np.asarray(Image.open(tmp_path / 'wide_classes.png'))
  assert classes.shape == (30, 50)
  assert len(np.unique(classes)) > 2
  assert (classes == up[0].argmax(0).numpy()[:30]).mean() > 0.999
