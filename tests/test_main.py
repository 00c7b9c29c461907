"""End to end: `python -m depthuda.main` runs every stage on configs/test.py; outputs follow
INTERFACE.md; a second `--stage=all` finds everything complete and does nothing."""

import glob
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests import main_runs

STAGES = ('fit_gmm', 'adapt', 'pseudo_label', 'self_train', 'eval')
LOSSES = {'adapt': ('loss_seg', 'loss_depth', 'loss_bal_src', 'loss_bal_tgt', 'loss_adv',
                    'loss_disc'),
          'self_train': ('loss_seg',)}


def test_all_stages_write_the_documented_outputs(tmp_path_factory):
  completed = main_runs.reference_run(tmp_path_factory)
  workdir = main_runs.reference_workdir(tmp_path_factory)
  assert 'mIoU' in completed.stdout  # the table at the end
  results = main_runs.results(workdir)
  assert set(results) == set(STAGES)
  evaluation = results['eval']
  assert isinstance(evaluation['miou'], float) and 0 <= evaluation['miou'] <= 100
  assert 'miou13' not in evaluation  # a 7-class run
  names = ('flat', 'construction', 'object', 'nature', 'sky', 'human', 'vehicle')
  assert list(evaluation['per_class_iou']) == list(names)
  assert all(v is None or isinstance(v, float) for v in evaluation['per_class_iou'].values())
  assert results['adapt']['steps'] == 8 and results['self_train']['steps'] == 4
  assert all(isinstance(results[s]['steps'], int) for s in LOSSES)
  assert results['pseudo_label']['images'] == 6
  for stage, losses in LOSSES.items():
    records = main_runs.metrics(workdir, stage)
    assert all(isinstance(r['step'], int) for r in records)
    # One object per logged step: an evaluation's scores join the step's losses.
    assert [r['step'] for r in records] == sorted({r['step'] for r in records})
    logged = [r for r in records if 'loss' in r]
    assert [r['step'] for r in logged] == list(range(1, results[stage]['steps'] + 1))
    for record in logged:
      assert all(isinstance(record[k], float) for k in losses), record
    assert [r['step'] for r in records if 'val_miou' in r] == [
        s for s in (4, 8) if s <= results[stage]['steps']]
  for name in ('confusion_matrix', 'per_class_iou', 'curves_adapt', 'curves_self_train'):
    plot = np.asarray(Image.open(os.path.join(workdir, 'eval', f'{name}.png')).convert('RGB'))
    assert min(plot.shape[:2]) > 100 and len(np.unique(plot.reshape(-1, 3), axis=0)) > 4, name
  for stage, losses in LOSSES.items():
    tags = _tensorboard_tags(os.path.join(workdir, stage, 'tb'))
    assert set(losses) | {'lr', 'val_miou'} <= tags, (stage, tags)
    assert {f'val_iou/{name}' for name in names} <= tags
  assert {'lr_disc', 'disc_acc_src', 'disc_acc_tgt'} <= _tensorboard_tags(
      os.path.join(workdir, 'adapt', 'tb'))
  assert len(os.listdir(os.path.join(workdir, 'pseudo_label', 'labels'))) == 6 + 1  # provenance


def test_log_file_gets_one_plain_line_per_log_step(tmp_path_factory):
  """stderr not a terminal (a batch job's log): no progress-bar redraws; an INFO line per
  logged step with the step, every loss, the learning rate, the rate and the ETA; every other
  long phase ends with its count against its total."""
  stderr = main_runs.reference_run(tmp_path_factory).stderr
  assert '\r' not in stderr and '%|' not in stderr
  lines = [line.split('] ', 1)[1] for line in stderr.splitlines()
           if line.startswith('I') and '] ' in line]
  number = r'-?[\d.]+(?:e[-+]\d+)?|nan|inf'
  for stage, losses in LOSSES.items():
    steps = main_runs.results(main_runs.reference_workdir(tmp_path_factory))[stage]['steps']
    logged = [line for line in lines if line.startswith(f'{stage}: step ')]
    assert [int(re.match(rf'{stage}: step (\d+)/{steps}, ', line)[1]) for line in logged] == list(
        range(1, steps + 1)), logged
    for line in logged:
      fields = dict(re.findall(rf'(\w+)=({number})\b', line))
      assert set(losses) | {'loss', 'lr'} <= set(fields), line
      assert re.search(r', [\d.e+-]+ step/s, (ETA \d+:\d\d:\d\d|done)$', line), line
  for phase in (r'fit_gmm: scan: batch (\d+)/\1', r'fit_gmm: EM: iter \d+/20',
                r'pseudo_label: img 6/6', r'adapt eval @4: img 3/3',
                r'eval \(self_train best step \d+\): img 3/3'):
    assert any(re.match(phase + r', [\d.e+-]+ \w+/s, done$', line) for line in lines), (phase, lines)


def _tensorboard_tags(directory: str) -> set[str]:
  import tensorflow as tf
  tags = set()
  for path in glob.glob(os.path.join(directory, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  return tags


def test_help_lists_stages_and_common_fields():
  completed = subprocess.run([sys.executable, '-m', 'depthuda.main', '--help'], cwd=main_runs.ROOT,
                             env=main_runs.ENV, capture_output=True, text=True, timeout=120)
  assert completed.returncode == 0 and 'Traceback' not in completed.stderr
  for word in ('fit_gmm', 'adapt', 'pseudo_label', 'self_train', 'eval', '--workdir',
               'batch_size', 'init_from', 'data.source_dir', 'adapt.num_steps'):
    assert word in completed.stdout, word


def test_second_run_of_all_does_no_work(tmp_path_factory):
  workdir = main_runs.reference_workdir(tmp_path_factory)

  def snapshot():
    files = {}
    for root, _, names in os.walk(workdir):
      for name in names:
        if name != 'config.json':
          stat = os.stat(os.path.join(root, name))
          files[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns)
    return files

  before = snapshot()
  completed = main_runs.run(workdir)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert [line for line in completed.stdout.splitlines() if line.endswith('complete, skipped')] == [
      f'{stage}: complete, skipped' for stage in STAGES]
  assert snapshot() == before


def test_tensorboard_image_panels_are_written(tmp_path):
  """What `log_images_every_steps` logs: a panel per validation image, readable as an image."""
  import tensorflow as tf
  from depthuda import reporting
  panel = np.zeros((8, 12, 3), np.uint8)
  panel[:, 6:] = (255, 0, 0)
  log = reporting.MetricsLog(str(tmp_path))
  log.images(40, {'val/0': panel})
  log.close()
  (path,) = glob.glob(str(tmp_path / 'tb' / 'events.out.tfevents.*'))
  found = [(event.step, value) for event in tf.compat.v1.train.summary_iterator(path)
           for value in event.summary.value if value.tag == 'val/0']
  (step, value), = found
  assert step == 40 and value.metadata.plugin_data.plugin_name == 'images'
  width, height, png = tf.make_ndarray(value.tensor)[:3]
  assert (int(width), int(height)) == (12, 8)
  np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), panel)


def test_eval_scores_a_given_checkpoint_and_the_last_model(tmp_path_factory, tmp_path):
  """`--stage=eval --checkpoint=PATH` scores a model into a fresh workdir as the eval stage
  scores a run's own; `model_selection=last` scores the final checkpoint."""
  reference = main_runs.reference_workdir(tmp_path_factory)
  results = main_runs.results(reference)
  given = main_runs.start(str(tmp_path / 'given'), '--stage=eval',
                          f'--checkpoint={reference}/self_train/best')
  last = main_runs.start(main_runs.copy_stages(reference, str(tmp_path / 'last'),
                                               ('adapt', 'self_train')),
                         '--stage=eval', '--config.model_selection=last')
  wrong = main_runs.start(str(tmp_path / 'wrong'), '--stage=eval',
                          f'--checkpoint={reference}/pseudo_label')
  # Self-training off: `all` skips pseudo_label and self_train, and eval scores adapt's model
  # although the workdir holds a self-trained one.
  no_self_train = main_runs.start(
      main_runs.copy_stages(reference, str(tmp_path / 'no_st'),
                            ('fit_gmm', 'adapt', 'pseudo_label', 'self_train')),
      '--config.self_train.enabled=False')
  completed = main_runs.finish(given)
  assert completed.returncode == 0, completed.stderr[-3000:]
  scored = main_runs.results(str(tmp_path / 'given'))['eval']
  expected = results['eval']
  assert (expected['model_stage'], expected['model_selection']) == ('self_train', 'best')
  assert (expected['protocol'], expected['flip'], expected['scales']) == ('native', False, [1.0])
  for key in ('miou', 'per_class_iou', 'confusion_matrix', 'model_step', 'protocol'):
    assert scored[key] == expected[key], key
  assert scored['model_checkpoint'] == os.path.join(reference, 'self_train', 'best')
  assert sorted(os.listdir(tmp_path / 'given' / 'eval')) == sorted(
      n for n in os.listdir(os.path.join(reference, 'eval')) if not n.startswith('curves'))
  # The best model is the one of the best validation mIoU logged in training.
  val = {r['step']: r['val_miou'] for r in main_runs.metrics(reference, 'self_train')
         if 'val_miou' in r}
  assert expected['model_step'] == max(val, key=val.get)
  assert expected['miou'] == pytest.approx(val[expected['model_step']], abs=1e-9)
  completed = main_runs.finish(last)
  assert completed.returncode == 0, completed.stderr[-3000:]
  scored = main_runs.results(str(tmp_path / 'last'))['eval']
  assert (scored['model_stage'], scored['model_step'], scored['model_selection']) == (
      'self_train', 4, 'last')
  assert scored['miou'] == pytest.approx(val[4], abs=1e-9)
  completed = main_runs.finish(wrong)
  assert completed.returncode == 1
  assert main_runs.error_lines(completed) == [
      f'depthuda: error: --checkpoint={reference}/pseudo_label: not a checkpoint (expected a '
      'stage folder such as DIR/adapt, its best/ or checkpoints/ folder, one step folder in '
      'these, or a folder written by depthuda.convert)']
  completed = main_runs.finish(no_self_train)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert 'pseudo_label: skipped (self_train.enabled=False)' in completed.stdout
  assert 'self_train: skipped (self_train.enabled=False)' in completed.stdout
  scored = main_runs.results(str(tmp_path / 'no_st'))['eval']
  adapt = main_runs.results(reference)['adapt']
  assert (scored['model_stage'], scored['model_step']) == ('adapt', adapt['best_step'])
  assert scored['miou'] == pytest.approx(adapt['best_miou'], abs=1e-9)
  completed = main_runs.run(str(tmp_path / 'all'), f'--checkpoint={reference}/adapt')
  assert completed.returncode == 2 and 'needs --stage=eval' in completed.stderr
