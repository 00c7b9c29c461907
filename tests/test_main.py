"""End to end: `python -m depthuda.main` runs every stage on configs/test.py; outputs follow
INTERFACE.md; a second `--stage=all` finds everything complete and does nothing."""

import os

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
    logged = [r for r in records if 'loss' in r]
    assert [r['step'] for r in logged] == list(range(1, results[stage]['steps'] + 1))
    for record in logged:
      assert all(isinstance(record[k], float) for k in losses), record
    assert [r['step'] for r in records if 'val_miou' in r] == [
        s for s in (4, 8) if s <= results[stage]['steps']]
  assert os.path.exists(os.path.join(workdir, 'eval', 'confusion_matrix.png'))
  assert len(os.listdir(os.path.join(workdir, 'pseudo_label', 'labels'))) == 6 + 1  # provenance


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
