"""Bad input fails early with one line naming the file or setting; earlier results stay intact.

Data and settings are checked through the library (fast); a few runs of main show what a user
sees: exit status != 0, one `depthuda: error:` line, no traceback.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from configs import test as test_config
from depthuda import checkpointing
from depthuda import converted
from depthuda import models
from depthuda import sharding
from depthuda import train
from depthuda.data import bad_files
from depthuda.data import cityscapes
from depthuda.data import pipeline
from depthuda.errors import InputError
from depthuda.stages import training
from tests import main_runs

SIZE = (8, 6)  # (W, H) of the tiny SYNTHIA images


def _png(array) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _synthia(root, count=2):
  """A valid tiny SYNTHIA-RAND-CITYSCAPES folder."""
  rng = np.random.default_rng(0)
  w, h = SIZE
  for folder in ('RGB', 'parsed_LABELS', 'Depth'):
    os.makedirs(os.path.join(root, folder))
  for i in range(count):
    files = {'RGB': rng.integers(0, 256, (h, w, 3), np.uint8),
             'parsed_LABELS': rng.integers(0, 23, (h, w), np.uint8),
             'Depth': rng.integers(0, 65536, (h, w), np.uint16)}
    for folder, array in files.items():
      with open(os.path.join(root, folder, f'{i:07d}.png'), 'wb') as f:
        f.write(_png(array))


def _config(tmp_path):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 2
  c.data = ml_collections.ConfigDict(dict(
      source='synthia', target='cityscapes', source_dir=str(tmp_path / 'synthia'),
      target_dir=str(tmp_path / 'cityscapes'), tfds_dir=str(tmp_path / 'tfds'), num_classes=7,
      input_size=SIZE, label_size=SIZE, toy=False, cache_decoded=False, shuffle_buffer=4))
  _synthia(c.data.source_dir)
  return c


def _write(path, data: bytes):
  with open(path, 'wb') as f:
    f.write(data)


def _corrupt_middle(path):
  """Scrambles the image data but keeps the PNG's header and end: only decoding finds it."""
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  for i in range(40, len(data) - 20):
    data[i] = (data[i] * 7 + 3) % 256
  _write(path, bytes(data))


def _cases():
  src = lambda *parts: os.path.join('synthia', *parts)
  w, h = SIZE
  return {
      'missing dataset root': (lambda root: shutil.rmtree(root / 'synthia'),
                               'data.source_dir=.*synthia'),
      'missing Depth folder': (lambda root: shutil.rmtree(root / src('Depth')), 'Depth/ not found'),
      'truncated image': (lambda root: _write(root / src('RGB', '0000001.png'), _png(
          np.zeros((h, w, 3), np.uint8))[:40]), src('RGB', '0000001.png') + ' is truncated'),
      'non-PNG image': (lambda root: Image.new('RGB', SIZE).save(
          root / src('RGB', '0000001.png'), format='JPEG'),
                        src('RGB', '0000001.png') + ' is not a PNG file'),
      'image without a label file': (lambda root: os.remove(root / src('parsed_LABELS',
                                                                       '0000001.png')),
                                     'lack a parsed_LABELS file.*' + src('parsed_LABELS',
                                                                         '0000001.png')),
      'label ids outside the map': (lambda root: _write(root / src('parsed_LABELS', '0000000.png'),
                                                        _png(np.full((h, w), 200, np.uint8))),
                                    src('parsed_LABELS', '0000000.png') + ': label id 200'),
      'depth of the wrong bit depth': (lambda root: _write(root / src('Depth', '0000001.png'),
                                                           _png(np.ones((h, w), np.uint8))),
                                       src('Depth', '0000001.png') + ': 8-bit PNG, expected 16'),
      'image and label sizes differ': (lambda root: _write(
          root / src('parsed_LABELS', '0000001.png'), _png(np.ones((h + 1, w), np.uint8))),
                                       '0000001.png differs in size.*RGB 8x6, parsed_LABELS 8x7'),
      'undecodable image found in tf.data': (lambda root: _corrupt_middle(
          root / src('RGB', '0000000.png')), src('RGB', '0000000.png') + ': cannot decode'),
  }


@pytest.mark.parametrize('case', list(_cases()))
def test_bad_source_data_names_the_file(case, tmp_path):
  config = _config(tmp_path)
  damage, message = _cases()[case]
  damage(tmp_path)
  with pytest.raises(InputError, match=message):
    next(pipeline.source_train(config, (5, 8)))


def _zip_without(source, dest, drop):
  with zipfile.ZipFile(source) as old, zipfile.ZipFile(dest, 'w') as new:
    for item in old.infolist():
      if not drop(item.filename):
        new.writestr(item, old.read(item.filename))


@pytest.mark.parametrize('drop, message', [
    (lambda name: '/val/' in name, r'no val images \(leftImg8bit/val/\)'),
    (lambda name: name.startswith('gtFine/train/') and '000001' in name,
     r'leftImg8bit/train/.*000001_000019_leftImg8bit.png in .* has no label')])
def test_bad_cityscapes_zips_name_the_file(drop, message, tmp_path):
  """A missing split and an image without its label, found before TFDS prepares anything."""
  main_runs.prepare_test_data()
  target = tmp_path / 'cityscapes'
  os.makedirs(target)
  for name in cityscapes.ZIPS:
    _zip_without(os.path.join(main_runs.ROOT, 'data', 'test', 'cityscapes', name),
                 target / name, drop)
  with pytest.raises(InputError, match=message):
    cityscapes.prepare(str(target), str(tmp_path / 'tfds'))
  assert not os.path.exists(tmp_path / 'tfds' / 'cityscapes')


def _adapt_config():
  config = test_config.get_config()
  config.batch_size = 1
  config.data.input_size = (48, 32)
  return config


def test_missing_or_mismatched_pretrained_checkpoint(tmp_path):
  config = _adapt_config()
  seg, _ = models.build(config, axis_name=sharding.AXIS)
  config.init_from = str(tmp_path / 'nothing')
  with pytest.raises(InputError, match=r'config.init_from=.*nothing: no converted checkpoint at'):
    training.initial_variables(config, str(tmp_path), 'adapt', seg)
  wider = config.copy_and_resolve_references()
  wider.model.width = 8
  wide_seg, _ = models.build(wider, axis_name=sharding.AXIS)
  variables = jax.jit(lambda: wide_seg.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 48, 3)),
                                            train=False))()
  layers = config.model.layers
  checkpointing.save_variables(str(tmp_path / 'wide'), variables, converted.metadata(
      converted.TRAINED, layers, 8, config.data.num_classes, source='wide.pth'))
  config.init_from = str(tmp_path / 'wide')
  with pytest.raises(InputError, match=r'config.init_from=.*wide: .*wide holds a ResNet with '
                                       r'layers \(1, 1, 1, 1\) and width 8; this config has '
                                       r'model.layers=\(1, 1, 1, 1\) and model.width=4'):
    training.initial_variables(config, str(tmp_path), 'adapt', seg)
  # A record that does not describe the variables: Orbax's shape check, still on one line.
  converted.write_metadata(str(tmp_path / 'wide'), converted.metadata(
      converted.TRAINED, layers, 4, config.data.num_classes, source='wide.pth'))
  with pytest.raises(InputError, match=r'config.init_from=.*wide: checkpoint does not match'):
    training.initial_variables(config, str(tmp_path), 'adapt', seg)


def test_unknown_nonfinite_setting(tmp_path):
  config = _adapt_config()
  config.nonfinite = 'ignore'
  with pytest.raises(InputError, match="config.nonfinite='ignore'"):
    training.run('adapt', config, str(tmp_path), lambda start: iter(()))


def test_skipped_nonfinite_step_changes_only_the_step_count():
  config = _adapt_config()
  config.nonfinite = 'skip'
  mesh = sharding.make_mesh(jax.devices()[:1])
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  state, seg_tx, _ = train.init_state(config, seg, disc)
  state = sharding.replicate(state, mesh)
  before = jax.device_get(state)
  step = sharding.make_sharded_step(train.self_train_step, mesh, seg=seg, seg_tx=seg_tx,
                                 config=config)
  w, h = config.data.input_size
  rng = np.random.default_rng(0)
  image = rng.normal(0, 50, (1, h, w, 3)).astype(np.float32)
  label = rng.integers(0, 7, (1, h, w)).astype(np.int32)
  broken = image.copy()
  broken[0, 0] = np.nan
  state, metrics = step(state, sharding.shard_batch({'image': broken, 'label': label}, mesh))
  after = jax.device_get(state)
  assert float(metrics['nonfinite']) == 1.0 and int(after.step) == 1
  jax.tree.map(np.testing.assert_array_equal, after.replace(step=before.step), before)
  state, metrics = step(state, sharding.shard_batch({'image': image, 'label': label}, mesh))
  assert float(metrics['nonfinite']) == 0.0 and int(state.step) == 2
  assert not np.array_equal(jax.device_get(state.params['conv1']['kernel']),
                            before.params['conv1']['kernel'])


def _assert_one_line_error(completed, pattern):
  assert completed.returncode not in (0, None), completed.stderr[-3000:]
  assert 'Traceback' not in completed.stderr, completed.stderr[-3000:]
  assert len(main_runs.error_lines(completed)) == 1, completed.stderr[-3000:]
  assert re.fullmatch(pattern, main_runs.error_lines(completed)[0]), completed.stderr[-3000:]


@pytest.mark.parametrize('override, pattern', [
    ('--config.adapt.num_stepz=3',
     r'depthuda: error: --config.adapt.num_stepz: no such config field '
     r'\(did you mean adapt.num_steps\?\)'),
    ('--config.batch_size=two', r"depthuda: error: flag --config.batch_size=two: .*'two'"),
    ('--config.model.bn_mode=frozn', r"depthuda: error: --config.model.bn_mode='frozn': expected "
     r"one of train, frozen \(did you mean frozen\?\)"),
    ('--config.compute_dtype=bf16', r"depthuda: error: --config.compute_dtype='bf16': expected "
     r"one of float32, bfloat16 \(did you mean bfloat16\?\)"),
    ('--config.batch_size=0', r'depthuda: error: --config.batch_size=0: expected a positive number'),
    ('--config.data.input_size=(64,)', r'depthuda: error: --config.data.input_size=\(64,\): '
     r'expected \(width, height\), positive'),
    ('--config.loss.class_weights=(1.0,2.0)', r'depthuda: error: --config.loss.class_weights has '
     r'2 entries for data.num_classes=7'),
    ('--config.loss.disc_input=entropy_dens', r"depthuda: error: --config.loss.disc_input="
     r"'entropy_dens': expected one of softmax, entropy, entropy_depth, entropy_density "
     r"\(did you mean entropy_density\?\)"),
    ('--config.pretrain.num_steps=5', r'depthuda: error: --config.pretrain.num_steps=5: a '
     r'pretrained start is made for the toy \(data.toy=True\) into init_from, which is empty')])
def test_mistyped_config_override(override, pattern, tmp_path):
  completed = main_runs.run(str(tmp_path / 'work'), override)
  _assert_one_line_error(completed, pattern)
  assert completed.returncode == 2 and not os.path.exists(tmp_path / 'work')


def _main_elsewhere(cwd, *args):
  """`python -X importtime -m depthuda.main ARGS` run in `cwd`, outside the repository."""
  env = dict(main_runs.ENV, PYTHONPATH=main_runs.ROOT)
  return subprocess.run([sys.executable, '-X', 'importtime', '-m', 'depthuda.main', *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _imported(completed) -> set[str]:
  return {line.split('|')[-1].strip() for line in completed.stderr.splitlines()
          if line.startswith('import time:')}


@pytest.mark.parametrize('body, pattern', [
    ('c.adapt.num_step = 5', r'adapt.num_step: no such config field '
                             r'\(did you mean adapt.num_steps\?\)'),
    ('c.model.bn_mode = "frozn"', r"model.bn_mode='frozn': expected one of train, frozen.*"),
    ('c.data.input_size = (0, 40)', r'data.input_size=\(0, 40\): expected \(width, height\), '
                                    r'positive'),
    ('del c.gmm["tol"]', r'gmm.tol: missing \(derive the config from configs/common.py '
                         r'get_base_config\(\)\)'),
    ('c.seed = 1 / 0', r'ZeroDivisionError: division by zero')])
def test_bad_config_file_from_another_directory(body, pattern, tmp_path):
  """A config file outside the repository imports the shipped ones (`from configs import
  test`); its mistakes are one line and exit status 2, found before JAX or TensorFlow loads."""
  path = tmp_path / 'mine' / 'exp.py'
  os.makedirs(path.parent)
  path.write_text('from configs import test\n\n\ndef get_config():\n'
                  f'  c = test.get_config()\n  {body}\n  return c\n')
  completed = _main_elsewhere(tmp_path, '--config=mine/exp.py', '--workdir=work')
  _assert_one_line_error(completed, rf'depthuda: error: --config={re.escape(str(path))}: {pattern}')
  assert completed.returncode == 2 and not os.path.exists(tmp_path / 'work')
  imported = _imported(completed)
  assert 'depthuda.config_files' in imported
  assert not imported & {'jax', 'tensorflow', 'flax', 'orbax'}, imported & {'jax', 'tensorflow'}


def test_shipped_configs_are_found_from_another_directory(tmp_path):
  """`--config=configs/toy.py` outside a checkout is the shipped toy config (a bad override
  proves it loaded); a name that is not shipped lists those that are."""
  completed = _main_elsewhere(tmp_path, '--config=configs/toy.py', '--workdir=work',
                              '--config.model.bn_mode=frozen', '--config.nonfinite=no')
  _assert_one_line_error(completed, r"depthuda: error: --config.nonfinite='no': expected one of "
                                    r'stop, skip')
  completed = _main_elsewhere(tmp_path, '--config=configs/toys.py', '--workdir=work')
  _assert_one_line_error(completed, r'depthuda: error: --config=configs/toys.py: no such file '
                                    r'\(shipped configs: .*toy.py.*\)')
  assert completed.returncode == 2 and not _imported(completed) & {'jax', 'tensorflow'}


@pytest.mark.parametrize('command, pattern', [
    (['depthuda.main', '--config=configs/test.py'],
     r'depthuda: error: .*--workdir must have a value.*'),
    (['depthuda.main', '--config=configs/test.py', '--workdir=w', 'extra'],
     r'depthuda: error: unexpected arguments: extra'),
    (['depthuda.predict', '--input=x', '--output=y', '--config=configs/test.py',
      '--config.gmm.tol=-1'], r"depthuda: error: --config.gmm.tol=-1(.0)?: expected zero or more"),
    (['depthuda.convert', '--output=out'],
     r'depthuda: error: .*--torch_checkpoint must have a value.*')])
def test_usage_errors_of_every_command(command, pattern, tmp_path):
  """main, predict and convert: one `depthuda: error:` line and exit status 2; --help exits 0."""
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=tmp_path,
                                     env=dict(main_runs.ENV, PYTHONPATH=main_runs.ROOT),
                                     capture_output=True, text=True, timeout=120)
  completed = run(*command)
  _assert_one_line_error(completed, pattern)
  assert completed.returncode == 2
  completed = run(command[0], '--help')
  assert completed.returncode == 0 and '--' + ('workdir' if 'main' in command[0] else 'output') in (
      completed.stdout), completed.stderr[-2000:]


def test_tensorflow_error_text_that_messages_are_cut_from():
  """Pins the TensorFlow message format `bad_files.tf_message` trims: a function-node prefix
  and an `[Op:...]` suffix around the reason (a TensorFlow upgrade that changes it fails here)."""
  import tensorflow as tf
  with pytest.raises(tf.errors.InvalidArgumentError) as raised:
    tf.io.decode_png(b'not a png')
  text = str(raised.value)
  assert text.startswith('{{function_node ') and text.endswith(' [Op:DecodePng]'), text
  reason = bad_files.tf_message(raised.value)
  assert reason and reason in text and '{{' not in reason and '[Op:' not in reason, reason


def _limit_file_size(kilobytes, command):
  """`command` unable to write files beyond a size (EFBIG, as a full disk gives ENOSPC)."""
  return ['bash', '-c', f'ulimit -f {kilobytes}; trap "" XFSZ; exec "$@"', 'bash', *command]


@pytest.fixture(scope='module', autouse=True)
def failing_runs(tmp_path_factory):
  """Runs of main that must fail, and one that skips its non-finite steps:
  {case: (process, workdir, before)}.

  Started with the module, side by side with the in-process tests and the shared reference
  run; the tests at the end of the module check them. Each workdir holds an earlier result that
  must survive. The adapt runs need no GMM (the density losses are off).
  """
  main_runs.start_reference(tmp_path_factory)
  root = tmp_path_factory.mktemp('failing')
  runs = {}

  def start(case, *args, wrap=lambda command: command):
    workdir = root / case
    os.makedirs(workdir)
    before = '{"fit_gmm": {"iterations": 7}}'
    (workdir / 'results.json').write_text(before)
    process = main_runs.popen(wrap(main_runs.command(str(workdir), *args)))
    runs[case] = (process, str(workdir), before)

  no_gmm = ('--config.loss.lambda_bal_src=0', '--config.loss.lambda_bal_tgt=0')
  start('nonfinite', '--stage=adapt', '--config.optim.lr=1e30',
        '--config.checkpoint_every_steps=1', '--verbosity=-1', *no_gmm)
  start('skip', '--stage=adapt', '--config.optim.lr=1e30', '--config.nonfinite=skip',
        '--config.adapt.num_steps=4', '--config.checkpoint_every_steps=1',
        '--config.keep_checkpoints=4', *no_gmm)
  start('full disk', '--stage=adapt', '--config.checkpoint_every_steps=1', *no_gmm,
        wrap=lambda command: _limit_file_size(100, command))
  start('missing dataset', '--stage=fit_gmm', '--config.data.toy=False',
        f'--config.data.source_dir={root}/nowhere')
  return runs


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(failing_runs):
  process, workdir, before = failing_runs['nonfinite']
  completed = main_runs.finish(process)
  _assert_one_line_error(completed, r'depthuda: error: adapt: non-finite loss_\w+=nan'
                         r'(, loss\w*=nan)* at step 2; stopped \(last good checkpoint: step 1 '
                         r'in .*/adapt/checkpoints; --config.nonfinite=skip skips such steps\)')
  assert main_runs.checkpoint_steps(workdir, 'adapt') == [1]
  assert [m['step'] for m in main_runs.metrics(workdir, 'adapt')] == [1]
  # --verbosity=-1: warnings and errors only, not the line of logged step 1.
  assert not re.search(r'^I\d{4} .*adapt: step 1/', completed.stderr, flags=re.M)
  assert open(os.path.join(workdir, 'results.json')).read() == before


def test_nonfinite_skip_leaves_the_state_and_runs_to_the_end(failing_runs):
  """The run that stops above, with nonfinite=skip: step 1 updates the networks (its loss is
  finite), which makes every later loss non-finite; each later step changes nothing saved but
  the step count, is reported, and counted in results.json, and the run ends normally."""
  process, workdir, before = failing_runs['skip']
  completed = main_runs.finish(process)
  assert completed.returncode == 0, completed.stderr[-3000:]
  reported = re.findall(r'adapt: non-finite (?:(?:loss\w*=(?:nan|-?inf)(?:, )?)+|gradient) '
                        r'at step (\d+); update skipped$',
                        completed.stdout + completed.stderr, flags=re.M)
  assert reported == ['2', '3', '4'], completed.stderr[-3000:]
  entry = json.loads(open(os.path.join(workdir, 'results.json')).read())['adapt']
  assert entry['steps'] == 4 and entry['skipped_steps'] == 3
  assert [m['step'] for m in main_runs.metrics(workdir, 'adapt') if 'loss' in m] == [1, 2, 3, 4]
  assert main_runs.checkpoint_steps(workdir, 'adapt') == [1, 2, 3, 4]
  states = {step: ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'adapt', 'checkpoints', str(step), 'state')) for step in (1, 2, 4)}
  assert [int(states[s].pop('step')) for s in (1, 2, 4)] == [1, 2, 4]
  # Step 1 was a real update: the momentum buffers no longer hold their initial zeros.
  traces = [np.abs(leaf).max() for path, leaf in
            jax.tree_util.tree_leaves_with_path(states[1]['opt_state'])
            if 'trace' in jax.tree_util.keystr(path)]
  assert traces and max(traces) > 0
  for step in (2, 4):
    jax.tree.map(np.testing.assert_array_equal, states[step], states[1])


def test_full_disk_is_one_line_and_keeps_earlier_results(failing_runs):
  process, workdir, before = failing_runs['full disk']
  completed = main_runs.finish(process)
  _assert_one_line_error(completed, r'depthuda: error: cannot write .*/adapt/(checkpoints|best): '
                         r'File too large')
  assert open(os.path.join(workdir, 'results.json')).read() == before


def test_missing_dataset_is_one_line_and_keeps_earlier_results(failing_runs, tmp_path):
  process, workdir, before = failing_runs['missing dataset']
  completed = main_runs.finish(process)
  _assert_one_line_error(completed, r'depthuda: error: SYNTHIA: RGB/, parsed_LABELS/ or '
                         r'GT/LABELS/, Depth/ not found in data.source_dir=.*/nowhere; .*')
  assert open(os.path.join(workdir, 'results.json')).read() == before


def test_unwritable_workdir(tmp_path):
  (tmp_path / 'file').write_text('')
  completed = main_runs.run(str(tmp_path / 'file' / 'work'), '--stage=fit_gmm')
  _assert_one_line_error(completed, r'depthuda: error: --workdir=.*/file/work is not writable '
                         r'\(Not a directory\)')
  if os.geteuid() != 0:  # root writes anywhere
    os.makedirs(tmp_path / 'readonly')
    os.chmod(tmp_path / 'readonly', 0o500)
    completed = main_runs.run(str(tmp_path / 'readonly'), '--stage=fit_gmm')
    _assert_one_line_error(completed, r'depthuda: error: --workdir=.*/readonly is not writable '
                           r'\(Permission denied\)')


def test_cityscapes_label_id_outside_the_map_names_the_file(tmp_path):
  """A labelIds PNG with an id Cityscapes does not define fails in tf.data, naming the file."""
  main_runs.prepare_test_data()
  target = tmp_path / 'cityscapes'
  os.makedirs(target)
  images, labels_zip = (os.path.join(main_runs.ROOT, 'data', 'test', 'cityscapes', name)
                        for name in cityscapes.ZIPS)
  shutil.copy(images, target / cityscapes.ZIPS[0])
  with zipfile.ZipFile(labels_zip) as old, zipfile.ZipFile(target / cityscapes.ZIPS[1], 'w') as new:
    val_labels = sorted(n for n in old.namelist()
                        if n.startswith('gtFine/val/') and n.endswith('_labelIds.png'))
    bad = val_labels[-1]
    for item in old.infolist():
      data = old.read(item.filename)
      if item.filename == bad:
        label = np.array(Image.open(io.BytesIO(data)))
        label[-1, -1] = 40  # one pixel is enough
        data = _png(label)
      new.writestr(item, data)
  config = test_config.get_config()
  config.data.target_dir = str(target)
  config.data.tfds_dir = str(tmp_path / 'tfds')
  config.data.toy = False
  name = os.path.basename(bad)
  with pytest.raises(InputError, match=re.escape(name) + r'.*label id 40 is outside the ids the dataset defines'):
    list(pipeline.target_val(config))
