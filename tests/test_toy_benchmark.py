"""benchmarks/toy_diagnostics.py and toy_ablation.py's statistics: what the toy benchmark's
tables are computed from."""

import os
import sys

import numpy as np
import pytest

import main_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import toy_ablation  # pylint: disable=wrong-import-position
import toy_diagnostics  # pylint: disable=wrong-import-position


def test_true_maps_are_those_of_the_written_validation_images():
  """The re-rendered classes of each validation image equal its written label on the grid
  (PIL's nearest rule from the 2048x1024 file), so scene indices and renderer agree."""
  from configs import test as test_config
  from depthuda.data import pipeline
  main_runs.prepare_test_data()
  config = test_config.get_config()
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    examples = list(pipeline.target_val(config))
  finally:
    os.chdir(cwd)
  assert len(examples) == config.data.toy_num_target_val
  grid = (13, 21)
  for example in examples:
    label = example['label'][0]
    rows = np.floor((np.arange(grid[0]) + 0.5) * label.shape[0] / grid[0]).astype(int)
    cols = np.floor((np.arange(grid[1]) + 0.5) * label.shape[1] / grid[1]).astype(int)
    classes, inv_depth = toy_diagnostics.true_grid_maps(example['name'], grid, 7)
    np.testing.assert_array_equal(classes, label[rows][:, cols])
    sky = classes == 4
    assert sky.any() and np.allclose(inv_depth[sky], 65536 / 65536)
    ground = classes == 0
    assert (inv_depth[ground] > 6.5).all()  # the flat classes lie within 100 m


def test_discriminator_summary_counts_steps_off_chance():
  records = [{'step': 20, 'disc_acc_src': 0.5, 'disc_acc_tgt': 0.5},
             {'step': 40, 'disc_acc_src': 0.9, 'disc_acc_tgt': 0.7},
             {'step': 40, 'val_miou': 50.0},
             {'step': 60, 'disc_acc_src': 0.2, 'disc_acc_tgt': 0.6}]
  summary = toy_diagnostics.discriminator_summary(records)
  assert summary['disc_off_chance'] == pytest.approx(1 / 3)  # only step 40's mean, 0.8
  assert summary['disc_acc_src'] == pytest.approx(1.6 / 3)
  assert summary['disc_acc_curve'] == [[20, 0.5, 0.5], [40, 0.9, 0.7], [60, 0.2, 0.6]]
  assert toy_diagnostics.discriminator_summary([{'step': 1, 'loss_seg': 1.0}]) == {}


def test_t_interval_of_paired_differences():
  # mean 3, sample std sqrt(2.5), t(0.975, 4 d.o.f.) = 2.776445: half-width 1.963243.
  mean, half = toy_ablation.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  assert mean == 3.0 and half == pytest.approx(1.963243, rel=1e-6)
  assert toy_ablation.t_interval(np.subtract([2.0, 3.0], [2.0, 3.0])) == (0.0, 0.0)


def test_one_ulp_learning_rate_is_the_next_float32():
  lr = np.float32(toy_ablation.ULP_LR)
  assert lr > np.float32(1e-2) and np.nextafter(np.float32(1e-2), np.float32(1)) == lr
  assert float(lr) == toy_ablation.ULP_LR  # survives the cast to float32 in the schedule


def test_tables_and_chart_from_finished_runs(tmp_path):
  """summarise/markdown/chart on runs whose results are known: every row's mean and paired
  differences, the one-ulp noise floor, the diagnostics, and a PNG."""
  import json
  seeds = [0, 1, 2]
  bench = toy_ablation.Bench(type('Args', (), {'root': str(tmp_path), 'config': 'c', 'set': []}))
  score = {'source_only': 40.0, 'softmax': 41.0, 'entropy': 42.0, 'entropy_depth': 42.5,
           'full': 44.0, 'no_density': 43.0, 'no_bal_tgt': 43.5, 'one_ulp': 44.5,
           'no_prior': 45.0}
  for s in seeds:
    for run, base in score.items():
      os.makedirs(bench.workdir(s, run))
      results = {'adapt': {'best_miou': base + s}}
      if run in toy_ablation.SELF_TRAINED:
        results['self_train'] = {'best_miou': base + 2 + 2 * s}
      with open(os.path.join(bench.workdir(s, run), 'results.json'), 'w') as f:
        json.dump(results, f)
      with open(os.path.join(bench.workdir(s, run), 'diagnostics.json'), 'w') as f:
        json.dump({'depth_corr': 0.9, 'density_corr': 0.6 + s / 10,
                   'density_corr_pred_target': 0.8, 'disc_acc_src': 0.7, 'disc_acc_tgt': 0.6,
                   'disc_off_chance': 0.5}, f)
  summary = toy_ablation.summarise(bench, seeds)
  rows = summary['rows']
  assert rows['source-only']['mean_ci'] == (41.0, pytest.approx(2.484, abs=1e-3))
  # The adapt rows move with the seed as source-only does: their paired differences are exact.
  assert rows['D sees entropy (AdvEnt)']['minus source-only'] == (2.0, 0.0)
  assert rows['method: entropy x density, adapt']['minus D sees entropy (AdvEnt)'] == (2.0, 0.0)
  full = rows['method + self-training (full pipeline)']['minus source-only']
  assert full[0] == pytest.approx(7.0) and full[1] > 0  # 46, 48, 50 against 40, 41, 42
  assert summary['noise']['one_ulp_minus_method'] == (0.5, 0.0)
  assert summary['diagnostics']['full']['density_corr'] == pytest.approx(0.7)
  table = toy_ablation.markdown(summary)
  assert '| method + self-training (full pipeline) | 48.0 ± ' in table
  assert '| full | 0.90 | 0.70 | 0.80 | 0.70 | 0.60 | 50% |' in table
  toy_ablation.chart(summary, str(tmp_path / 'figures' / 'chart.png'))
  with open(tmp_path / 'figures' / 'chart.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
