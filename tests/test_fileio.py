"""The path layer: atomic writes on local and remote paths, and a workdir that is a URL.

`ram://` (TensorFlow's in-memory filesystem, see conftest.py) stands for gs://: a URL that `os`
cannot reach. Files are checked through `tf.io.gfile`, independently of `fileio`.
"""

import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import test as test_config
from depthuda import checkpointing
from depthuda import fileio
from depthuda import reporting
from depthuda import stages
from depthuda import visualize
from tests import main_runs

STAGES = ('fit_gmm', 'adapt', 'pseudo_label', 'self_train', 'eval')


@pytest.fixture(params=['local', 'remote'])
def directory(request, tmp_path, remote_dir):
  return str(tmp_path) if request.param == 'local' else remote_dir


def _read(path) -> bytes:
  with tf.io.gfile.GFile(os.fspath(path), 'rb') as f:
    return f.read()


def _no_local_scheme_folder():
  return not os.path.exists('ram:')


def test_write_atomic_text_bytes_npz_png(directory):
  root = fileio.Path(directory)
  fileio.write_atomic(root / 'a' / 'b' / 'note.txt', 'first')
  fileio.write_atomic(root / 'a' / 'b' / 'note.txt', 'second ü')
  assert _read(f'{directory}/a/b/note.txt') == 'second ü'.encode()
  fileio.write_atomic(root / 'raw.bin', b'\x00\x01')
  assert _read(f'{directory}/raw.bin') == b'\x00\x01'

  arrays = {'x': np.arange(6.0).reshape(2, 3), 'key': np.array('k')}
  fileio.write_npz(root / 'arrays.npz', **arrays)
  with np.load(io.BytesIO(_read(f'{directory}/arrays.npz'))) as saved:
    assert sorted(saved.files) == ['key', 'x']
    np.testing.assert_array_equal(saved['x'], arrays['x'])
    assert str(saved['key']) == 'k'

  label = np.random.default_rng(0).integers(0, 7, (5, 9), np.uint8)
  visualize.save_png(root / 'labels' / 'l.png', label)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(_read(
      f'{directory}/labels/l.png')))), label)
  assert sorted(n.rstrip('/') for n in tf.io.gfile.listdir(directory)) == [
      'a', 'arrays.npz', 'labels', 'raw.bin']  # no temporary file left
  assert _no_local_scheme_folder()


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(directory, monkeypatch):
  path = fileio.Path(directory) / 'results.json'
  fileio.write_atomic(path, '{"old": 1}')

  def broken_rename(self, target):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(type(path), 'replace', broken_rename)
  with pytest.raises(OSError):
    fileio.write_atomic(path, '{"new": 2}')
  assert _read(path) == b'{"old": 1}'
  assert [p.name for p in fileio.Path(directory).iterdir()] == ['results.json']


def test_temporary_names():
  assert fileio.is_temporary('.x.png.0123abcd.tmp')
  assert not fileio.is_temporary('x.png') and not fileio.is_temporary('.hidden')


def test_absolute_keeps_urls_and_resolves_local_paths():
  assert os.fspath(fileio.absolute('gs://bucket/run')) == 'gs://bucket/run'
  assert os.fspath(fileio.absolute('runs/x')) == os.path.join(os.getcwd(), 'runs', 'x')


def test_reports_on_a_remote_workdir(remote_dir):
  """results.json, metrics.jsonl (appended, then cut back on a resume) and TensorBoard events."""
  reporting.update_results(remote_dir, 'adapt', {'steps': np.int64(4)})
  reporting.update_results(remote_dir, 'eval', {'miou': 1.5})
  assert json.loads(_read(f'{remote_dir}/results.json')) == {'adapt': {'steps': 4},
                                                               'eval': {'miou': 1.5}}
  log = reporting.MetricsLog(f'{remote_dir}/adapt')
  for step in (1, 2, 3):
    log.scalars(step, {'loss_seg': step / 2})
  log.images(3, {'panel': np.zeros((4, 6, 3), np.uint8)})
  log.close()
  assert _read(f'{remote_dir}/adapt/metrics.jsonl').decode().splitlines() == [
      json.dumps({'loss_seg': s / 2, 'step': s}, sort_keys=True) for s in (1, 2, 3)]
  (events,) = tf.io.gfile.glob(f'{remote_dir}/adapt/tb/events.out.tfevents.*')
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events) for v in e.summary.value}
  assert tags == {'loss_seg', 'panel'}

  log = reporting.MetricsLog(f'{remote_dir}/adapt', start_step=2, tensorboard=False)
  log.scalars(3, {'loss_seg': 9.0})
  assert [r['loss_seg'] for r in reporting.read_metrics(f'{remote_dir}/adapt/metrics.jsonl')] == [
      0.5, 1.0, 9.0]
  assert _no_local_scheme_folder()


def _files(root: str) -> set[str]:
  """Relative paths of the files under `root` (local or remote); event files by kind only."""
  found = set()
  for directory, _, names in tf.io.gfile.walk(root):
    for name in names:
      relative = os.path.relpath(os.path.join(directory, name), root) if '://' not in root else (
          os.path.join(directory, name)[len(root) + 1:])
      found.add(re.sub(r'events\.out\.tfevents\..*', 'events', relative))
  return found


def test_stages_write_every_output_to_a_remote_workdir(tmp_path_factory, tmp_path, remote_dir,
                                                       monkeypatch):
  """pseudo_label and eval on a ram:// workdir, in this process (the other stages copied from
  the reference run): the workdir holds every file that the reference run's local workdir
  holds, and nothing is written to a local folder. Elsewhere on ram://: training's files in
  test_reports_on_a_remote_workdir, self-training's input in
  test_pipeline.test_pseudo_labeled_target, fit_gmm in
  test_resume.test_fit_gmm_resumes_without_scanning_again.

  Orbax writes arrays through TensorStore, which can write local files and gs:// but has no
  ram:// driver: here the checkpoints alone go to a local folder.
  """
  reference = main_runs.reference_workdir(tmp_path_factory)
  local = tmp_path / 'checkpoints'
  for stage in ('adapt', 'self_train'):
    shutil.copytree(os.path.join(reference, stage), local / stage,
                    ignore=shutil.ignore_patterns('tb', 'metrics.jsonl'))
    tf.io.gfile.makedirs(f'{remote_dir}/{stage}')
    tf.io.gfile.copy(os.path.join(reference, stage, 'metrics.jsonl'),
                     f'{remote_dir}/{stage}/metrics.jsonl')
  for stage in ('fit_gmm', 'adapt', 'self_train'):
    reporting.update_results(remote_dir, stage, main_runs.results(reference)[stage])
  tf.io.gfile.makedirs(f'{remote_dir}/fit_gmm')
  tf.io.gfile.copy(os.path.join(reference, 'fit_gmm', 'gmm.json'),
                   f'{remote_dir}/fit_gmm/gmm.json')
  stage_checkpoints = checkpointing.StageCheckpoints

  class LocalCheckpoints(stage_checkpoints):
    def __init__(self, directory, *args, **kwargs):
      super().__init__(os.fspath(directory).replace(remote_dir, str(local)), *args, **kwargs)

  monkeypatch.setattr(checkpointing, 'StageCheckpoints', LocalCheckpoints)
  config = test_config.get_config()
  config.adapt.num_steps = 8  # as main_runs.ARGS
  ran = [stage for stage in STAGES if stages.run(stage, config, remote_dir)]

  assert ran == ['pseudo_label', 'eval']
  assert set(json.loads(_read(f'{remote_dir}/results.json'))) == set(STAGES)
  # config.json is main's (through fileio.write_atomic); importing a CLI here would clash with
  # the flags of the one other tests import.
  elsewhere = re.compile(r'(adapt|self_train)/(checkpoints/|best/|tb/)|config\.json')
  assert _files(remote_dir) == {f for f in _files(reference) if not elsewhere.match(f)}
  assert sorted(os.listdir(local)) == ['adapt', 'self_train']
  assert _no_local_scheme_folder()
