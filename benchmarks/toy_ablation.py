r"""The method against its ablations on the toy benchmark, over seeds, with confidence intervals.

  python benchmarks/toy_ablation.py --seeds=0,1,2,3,4 --jobs=2
      [--root=runs/toy_ablation] [--out=benchmarks] [--set=FIELD=VALUE ...]

Every row is configs/toy.py from the pretrained start (depthuda/pretrain.py, made once and
shared) with one switch changed from the method; each switch is one `--config.` override:

  source-only            adapt with the depth, density and adversarial terms off
  D sees softmax         loss.disc_input=softmax (AdaptSegNet)
  D sees entropy         loss.disc_input=entropy (AdvEnt): the entropy-only row
  D sees entropy x depth loss.disc_input=entropy_depth (DADA-style)
  method, adapt          loss.disc_input=entropy_density (the default); self-training off
  no density losses      loss.density_losses=False
  no target density loss loss.lambda_bal_tgt=0 (the source density loss kept)
  no spatial prior       pseudo.spatial_prior=False, then self-training
  method, full pipeline  adapt, pseudo-labels, self-training

Rows without self-training run with self_train.enabled=False (their score is the adapt
stage's). Statistics: each row's mean over seeds with a 95% t-interval, and paired differences
(same seed, so the same GMMs, pretrained trunk and data order) against source-only and against
the entropy-only row, with 95% t-intervals over seeds. The noise floor: the method's adapt
stage rerun with the learning rate one float32 ulp higher (`one-ulp`, on the first two seeds),
and the spread of one row over seeds.

Settings that make rows separable on 2 CPU cores (`BENCH`): 200 target validation images
instead of 40, and each stage scored once, on its last model (`model_selection=last`, one
evaluation at the end): the poly schedule reaches zero there, and choosing the best of several
evaluations on the scoring set would add its own noise and bias. The toy's datasets for these
settings live under --root, so `make demo`'s are left alone.

Writes <out>/toy_ablation.json (every number), <out>/toy_ablation.md (the tables, as printed)
and <out>/figures/toy_ablation.png (means and paired differences with their intervals). Runs
go in <root>/seed<S>/<row>; a finished stage is not run again, so an interrupted benchmark
continues where it stopped. --jobs runs that many at once (one per core is fastest).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import numpy as np

# The benchmark's settings on top of configs/toy.py (see the docstring).
BENCH = ('data.toy_num_target_val=200', 'model_selection=last', 'eval_every_steps=1000000',
         'checkpoint_every_steps=1000000', 'log_images_every_steps=0', 'log_every_steps=20')
SOURCE_ONLY = ('loss.lambda_depth=0', 'loss.lambda_bal_src=0', 'loss.lambda_bal_tgt=0',
               'loss.lambda_adv=0')
NO_SELF_TRAIN = ('self_train.enabled=False',)
# A one-ulp change: the float32 learning rate just above 1e-2 (configs/toy.py's).
ULP_LR = float(np.nextafter(np.float32(1e-2), np.float32(1)))
# run -> its overrides; every run is fit_gmm (copied from the seed's own) + adapt.
RUNS = {
    'source_only': SOURCE_ONLY + NO_SELF_TRAIN,
    'softmax': ('loss.disc_input=softmax',) + NO_SELF_TRAIN,
    'entropy': ('loss.disc_input=entropy',) + NO_SELF_TRAIN,
    'entropy_depth': ('loss.disc_input=entropy_depth',) + NO_SELF_TRAIN,
    'no_density': ('loss.density_losses=False',) + NO_SELF_TRAIN,
    'no_bal_tgt': ('loss.lambda_bal_tgt=0',) + NO_SELF_TRAIN,
    'one_ulp': (f'optim.lr={ULP_LR!r}',) + NO_SELF_TRAIN,
    'full': (),
    'no_prior': ('pseudo.spatial_prior=False',),  # self-trains from full's adapt stage
}
SELF_TRAINED = ('full', 'no_prior')
ULP_SEEDS = 2  # the one-ulp rerun: on the first two seeds
# (row, run, stage scored)
ROWS = (('source-only', 'source_only', 'adapt'),
        ('D sees softmax (AdaptSegNet)', 'softmax', 'adapt'),
        ('D sees entropy (AdvEnt)', 'entropy', 'adapt'),
        ('D sees entropy x depth (DADA-style)', 'entropy_depth', 'adapt'),
        ('method: entropy x density, adapt', 'full', 'adapt'),
        ('method without density losses', 'no_density', 'adapt'),
        ('method without the target density loss', 'no_bal_tgt', 'adapt'),
        ('method + self-training, no spatial prior', 'no_prior', 'self_train'),
        ('method + self-training (full pipeline)', 'full', 'self_train'))
BASELINES = ('source-only', 'D sees entropy (AdvEnt)')
DIAGNOSED = ('source_only', 'softmax', 'entropy', 'entropy_depth', 'full', 'no_density',
             'no_bal_tgt')


def _results(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, 'results.json')) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}


class Bench:
  """The runs of one benchmark: where they go and how each is started."""

  def __init__(self, args):
    self.root, self.config = args.root, args.config
    data = os.path.join(args.root, 'data')
    self.common = [f'--config.{kv}' for kv in BENCH + (
        f'data.target_dir={data}/cityscapes', f'data.tfds_dir={data}/tfds')] + [
            f'--config.{kv}' for kv in args.set]

  def workdir(self, seed: int, run: str) -> str:
    return os.path.join(self.root, f'seed{seed}', run)

  def main(self, seed: int, run: str, stage: str, extra=()) -> None:
    """`depthuda.main --stage=stage` on the run, unless results.json has the stage."""
    workdir = self.workdir(seed, run)
    if stage in _results(workdir):
      return
    cmd = [sys.executable, '-m', 'depthuda.main', f'--config={self.config}',
           f'--workdir={workdir}', f'--stage={stage}', f'--config.seed={seed}', *self.common,
           *(f'--config.{kv}' for kv in extra)]
    print('$', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def copy_stages(self, seed: int, source: str, run: str, stages: tuple[str, ...]) -> None:
    """Gives `run` the finished `stages` of `source` (same seed, so the same outputs)."""
    src, dst = self.workdir(seed, source), self.workdir(seed, run)
    results = _results(dst)
    for stage in stages:
      if stage in results:
        continue
      shutil.rmtree(os.path.join(dst, stage), ignore_errors=True)
      shutil.copytree(os.path.join(src, stage), os.path.join(dst, stage))
      results[stage] = _results(src)[stage]
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)

  def pretrain(self) -> None:
    cmd = [sys.executable, '-m', 'depthuda.pretrain', f'--config={self.config}', *self.common]
    print('$', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def gmm(self, seed: int) -> None:
    self.main(seed, 'gmm', 'fit_gmm')

  def adapt(self, seed: int, run: str) -> None:
    self.copy_stages(seed, 'gmm', run, ('fit_gmm',))
    self.main(seed, run, 'adapt', RUNS[run])
    if run in DIAGNOSED and not os.path.exists(
        os.path.join(self.workdir(seed, run), 'diagnostics.json')):
      subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                   'toy_diagnostics.py'),
                      f'--workdir={self.workdir(seed, run)}',
                      f'--cache={os.path.join(self.root, "data", "val_truth.npz")}'], check=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def self_train(self, seed: int, run: str) -> None:
    if run != 'full':
      self.copy_stages(seed, 'full', run, ('fit_gmm', 'adapt'))
    for stage in ('pseudo_label', 'self_train'):
      self.main(seed, run, stage, RUNS[run])


def t_interval(values) -> tuple[float, float]:
  """(mean, half-width of its 95% t-interval over the values)."""
  from scipy import stats
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float(values.mean()), float('nan')
  half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
  return float(values.mean()), float(half)


def _fmt(mean: float, half: float, sign: bool = False) -> str:
  return f'{mean:+.1f} ± {half:.1f}' if sign else f'{mean:.1f} ± {half:.1f}'


def summarise(bench: Bench, seeds: list[int]) -> dict:
  """Scores, intervals, differences, noise floor and diagnostics of the finished runs."""
  scores = {row: [_results(bench.workdir(s, run))[stage]['best_miou'] for s in seeds]
            for row, run, stage in ROWS}
  summary = {'seeds': seeds, 'scores': scores, 'rows': {}}
  for row, values in scores.items():
    entry = {'mean_ci': t_interval(values), 'std': float(np.std(values, ddof=1))
             if len(values) > 1 else float('nan')}
    for base in BASELINES:
      entry[f'minus {base}'] = t_interval(np.subtract(values, scores[base]))
    summary['rows'][row] = entry
  method = scores['method: entropy x density, adapt']
  ulp = [_results(bench.workdir(s, 'one_ulp'))['adapt']['best_miou'] for s in seeds[:ULP_SEEDS]]
  pairs = [abs(a - b) for i, a in enumerate(method) for b in method[i + 1:]]
  summary['noise'] = {
      'one_ulp_scores': ulp, 'method_scores': method[:ULP_SEEDS],
      'one_ulp_minus_method': t_interval(np.subtract(ulp, method[:ULP_SEEDS])),
      'one_ulp_abs_diff_mean': float(np.mean(np.abs(np.subtract(ulp, method[:ULP_SEEDS])))),
      'two_seeds_abs_diff_mean': float(np.mean(pairs)) if pairs else float('nan')}
  diagnostics = {}
  for run in DIAGNOSED:
    found = []
    for s in seeds:
      path = os.path.join(bench.workdir(s, run), 'diagnostics.json')
      if os.path.exists(path):
        with open(path) as f:
          found.append(json.load(f))
    keys = ('depth_corr', 'density_corr', 'density_corr_pred_target', 'disc_acc_src',
            'disc_acc_tgt', 'disc_off_chance')
    diagnostics[run] = {k: float(np.mean([d[k] for d in found])) for k in keys
                        if found and all(k in d for d in found)}
    if found and 'disc_acc_curve' in found[0]:
      diagnostics[run]['disc_acc_curve_seed0'] = found[0]['disc_acc_curve']
  summary['diagnostics'] = diagnostics
  return summary


def markdown(summary: dict) -> str:
  seeds = summary['seeds']
  lines = [f'Target-validation mIoU, seeds {", ".join(map(str, seeds))} (mean ± 95% t-interval; '
           'differences paired by seed).', '',
           '| row | mIoU | − source-only | − entropy-only | per seed |', '|---|---|---|---|---|']
  for row, entry in summary['rows'].items():
    lines.append(f'| {row} | {_fmt(*entry["mean_ci"])} | '
                 f'{_fmt(*entry["minus source-only"], sign=True)} | '
                 f'{_fmt(*entry["minus D sees entropy (AdvEnt)"], sign=True)} | '
                 + ', '.join(f'{v:.1f}' for v in summary['scores'][row]) + ' |')
  noise = summary['noise']
  lines += ['', 'Noise floor (the method\'s adapt stage): learning rate one float32 ulp higher '
            f'{_fmt(*noise["one_ulp_minus_method"], sign=True)} '
            f'(mean |difference| {noise["one_ulp_abs_diff_mean"]:.1f}; per seed '
            + ', '.join(f'{a:.1f} vs {b:.1f}' for a, b in zip(noise['one_ulp_scores'],
                                                              noise['method_scores']))
            + '); two seeds: mean '
            f'|difference| {noise["two_seeds_abs_diff_mean"]:.1f}.', '',
            '| run (adapt stage) | depth corr | density corr (true) | density corr (own target) '
            '| D acc source | D acc target | D off chance |', '|---|---|---|---|---|---|---|']
  for run, d in summary['diagnostics'].items():
    if 'depth_corr' in d:
      disc = (f'{d["disc_acc_src"]:.2f} | {d["disc_acc_tgt"]:.2f} | {d["disc_off_chance"]:.0%}'
              if 'disc_acc_src' in d else '– | – | –')
      lines.append(f'| {run} | {d["depth_corr"]:.2f} | {d["density_corr"]:.2f} | '
                   f'{d["density_corr_pred_target"]:.2f} | {disc} |')
  lines += ['', 'Diagnostics: means over seeds, on target validation (true depth and labels from '
            'the toy\'s renderer; benchmarks/toy_diagnostics.py). D off chance: share of logged '
            'steps whose mean accuracy over both domains is more than 0.1 from 0.5.']
  return '\n'.join(lines)


def chart(summary: dict, path: str) -> None:
  """Two panels: each row's mean, and its paired difference to source-only, with intervals."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  rows = list(summary['rows'])
  fig = Figure(figsize=(11, 4.8))
  FigureCanvasAgg(fig)
  y = np.arange(len(rows))[::-1]
  for i, (key, title) in enumerate((('mean_ci', 'target-validation mIoU'),
                                    ('minus source-only', 'paired difference to source-only'))):
    ax = fig.add_subplot(1, 2, i + 1)
    means = [summary['rows'][r][key][0] for r in rows]
    # One seed has no interval: its bars are drawn without one.
    halves = [0.0 if np.isnan(summary['rows'][r][key][1]) else summary['rows'][r][key][1]
              for r in rows]
    ax.barh(y, means, xerr=halves, color='tab:blue', alpha=0.7, capsize=3)
    ax.set_yticks(y, rows if i == 0 else [''] * len(rows), fontsize=8)
    ax.set_title(title + ' (95% t-interval)', fontsize=9)
    if i == 0:
      ax.set_xlim(min(m - h for m, h in zip(means, halves)) - 2,
                  max(m + h for m, h in zip(means, halves)) + 1)
    else:
      ax.axvline(0, color='k', lw=0.8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', default='0,1,2,3,4')
  parser.add_argument('--root', default='runs/toy_ablation')
  parser.add_argument('--out', default='benchmarks', help='where the tables and chart go')
  parser.add_argument('--config', default='configs/toy.py')
  parser.add_argument('--jobs', type=int, default=2, help='runs at once')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='config override for every run, e.g. --set=adapt.num_steps=300')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  bench = Bench(args)
  bench.pretrain()  # once, shared by every run; reused when current

  # Seed after seed, so that a benchmark cut short leaves whole seeds (`--seeds=` of those
  # summarises them): each seed's GMM, its adapt runs (the method's first: self-training and
  # the no-prior row start from it), the one-ulp rerun, then its self-training rows.
  adapt_runs = [r for r in RUNS if r not in ('no_prior', 'one_ulp')]  # no_prior: full's adapt
  adapt_runs.sort(key=lambda r: r != 'full')
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = []
    for s in seeds:
      gmm = pool.submit(bench.gmm, s)
      full = pool.submit(lambda s=s, gmm=gmm: (gmm.result(), bench.adapt(s, 'full')))
      futures.append(full)
      futures += [pool.submit(lambda s=s, r=r, gmm=gmm: (gmm.result(), bench.adapt(s, r)))
                  for r in adapt_runs[1:] + ['one_ulp'] * (s in seeds[:ULP_SEEDS])]
      futures += [pool.submit(lambda s=s, r=r, full=full: (full.result(), bench.self_train(s, r)))
                  for r in SELF_TRAINED]
    for future in futures:
      future.result()
  summary = summarise(bench, seeds)
  table = markdown(summary)
  summary['table'] = table
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'toy_ablation.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(args.out, 'toy_ablation.md'), 'w') as f:
    f.write(table + '\n')
  chart(summary, os.path.join(args.out, 'figures', 'toy_ablation.png'))
  print(table)


if __name__ == '__main__':
  main()
