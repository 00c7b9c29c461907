r"""Ablation of the method on the toy benchmark, over several seeds.

  python benchmarks/toy_ablation.py --seeds=0,1,2 --root=runs/ablation [--jobs=2] [--set=F=V ...]

Rows: source-only (adapt with the depth, density and adversarial terms off); + depth and density
losses (adversarial term off); + adversarial (the full adapt stage); + self-training (the full
pipeline). Each row's number is the best target-validation mIoU of its last stage, as the
original keeps the best evaluation. Prints a Markdown table (mean ± std over seeds) and the full
pipeline's gain over source-only, and writes both with the per-seed numbers to
<root>/ablation.json.

The three runs of a seed are independent (each fits its own GMMs where it needs them), so
--jobs runs that many at once: on a small CPU one training process per core is faster than one
process on all cores. A run that finished is not repeated (its results.json has the stage).
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np

OFF = {'source_only': ['--config.loss.lambda_depth=0', '--config.loss.lambda_bal_src=0',
                       '--config.loss.lambda_bal_tgt=0', '--config.loss.lambda_adv=0'],
       'depth_density': ['--config.loss.lambda_adv=0']}
ROWS = (('source-only', 'source_only', 'adapt'),
        ('+ depth and density losses', 'depth_density', 'adapt'),
        ('+ adversarial (full adapt)', 'full', 'adapt'),
        ('+ self-training (full pipeline)', 'full', 'eval'))


def run(workdir: str, config: str, seed: int, stages: list[str], extra: list[str]) -> None:
  for stage in stages:
    if ('eval' if stage == 'all' else stage) in _results(workdir):
      continue
    cmd = [sys.executable, '-m', 'depthuda.main', f'--config={config}', f'--workdir={workdir}',
           f'--stage={stage}', f'--config.seed={seed}', *extra]
    print('$', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)


def _results(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, 'results.json')) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}


def score(workdir: str, stage: str) -> float:
  entry = _results(workdir)[stage]
  return entry['miou'] if stage == 'eval' else entry['best_miou']


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--root', default='runs/ablation')
  parser.add_argument('--config', default='configs/toy.py')
  parser.add_argument('--jobs', type=int, default=1, help='runs at once')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='config override for every run, e.g. --set=optim.poly_horizon=1000')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  common = [f'--config.{kv}' for kv in args.set]
  runs = []
  for seed in seeds:
    base = os.path.join(args.root, f'seed{seed}')
    runs += [(os.path.join(base, 'full'), args.config, seed, ['all'], common),
             (os.path.join(base, 'source_only'), args.config, seed, ['adapt'],
              common + OFF['source_only']),
             (os.path.join(base, 'depth_density'), args.config, seed, ['fit_gmm', 'adapt'],
              common + OFF['depth_density'])]
  # Concurrent runs share the toy data safely: generating and preparing it holds a lock.
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for future in [pool.submit(run, *r) for r in runs]:
      future.result()
  scores = {name: [] for name, _, _ in ROWS}
  for seed in seeds:
    base = os.path.join(args.root, f'seed{seed}')
    for name, variant, stage in ROWS:
      scores[name].append(score(os.path.join(base, variant), stage))
  lines = ['| variant | mIoU (mean ± std) | per seed |', '|---|---|---|']
  for name, values in scores.items():
    lines.append(f'| {name} | {np.mean(values):.1f} ± {np.std(values):.1f} | '
                 + ', '.join(f'{v:.1f}' for v in values) + ' |')
  table = '\n'.join(lines)
  gains = list(np.subtract(scores[ROWS[-1][0]], scores[ROWS[0][0]]))
  print(table)
  print(f'full pipeline - source-only: {np.mean(gains):+.1f} on average ('
        + ', '.join(f'{g:+.1f}' for g in gains) + ')')
  with open(os.path.join(args.root, 'ablation.json'), 'w') as f:
    json.dump({'seeds': seeds, 'scores': scores, 'gains': gains, 'table': table}, f, indent=2)


if __name__ == '__main__':
  main()
