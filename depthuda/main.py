r"""depthuda's command line: the whole pipeline, or one stage of it.

  python -m depthuda.main --config=configs/synthia_city.py --workdir=DIR [--stage=STAGE] \
      [--config.<field>=<value> ...]

Stages, in order: fit_gmm (per-class depth GMMs on the source), adapt (adversarial adaptation
with depth and density losses), pseudo_label, self_train, eval. `--stage=all` (the default) runs
each stage whose outputs are not complete yet and resumes a cut-off one from its checkpoint.
Most used config fields: batch_size, seed, init_from, data.source_dir, data.target_dir,
adapt.num_steps, self_train.num_steps, loss.lambda_{seg,depth,bal_src,bal_tgt,adv},
model.bn_mode, compute_dtype, checkpoint_every_steps, log_every_steps, eval_every_steps.
Outputs: DIR/results.json, DIR/<stage>/metrics.jsonl, DIR/eval/*.png, TensorBoard in DIR/*/tb.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_STAGES = ('fit_gmm', 'adapt', 'pseudo_label', 'self_train', 'eval')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_STAGE = flags.DEFINE_enum('stage', 'all', ('all',) + _STAGES,
                           'Stage to run; `all` runs every incomplete stage in order.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False,
    'Join a multi-process run with jax.distributed.initialize(). SLURM and Cloud TPU pods are '
    'detected by JAX; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.')
flags.mark_flags_as_required(['config', 'workdir'])


def _initialize_distributed(jax) -> None:
  kwargs = {}
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:
    kwargs = dict(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                  num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                  process_id=int(os.environ['JAX_PROCESS_ID']))
  if os.environ.get('JAX_PLATFORMS') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax  # After flag parsing, so --help is fast.
  if _MULTIHOST.value:
    _initialize_distributed(jax)
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')  # The input pipeline must not take GPU memory.
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # One-off dataset preparation; our own bars show the stages.
  from depthuda import stages
  from depthuda import reporting
  from depthuda.errors import InputError
  from depthuda.stages import training

  config, workdir = _CONFIG.value, _WORKDIR.value
  logging.set_verbosity(logging.WARNING)
  try:
    os.makedirs(workdir, exist_ok=True)
    if reporting.is_writer():
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    for stage in (_STAGES if _STAGE.value == 'all' else (_STAGE.value,)):
      stages.run(stage, config, workdir)
  except training.Interrupted as e:
    print(f'depthuda: {e}', file=sys.stderr)
    sys.exit(130)
  except (InputError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
    print(f'depthuda: error: {e}', file=sys.stderr)
    sys.exit(1)
  except OSError as e:
    print(f'depthuda: error: {e.strerror or e}: {e.filename or ""}'.rstrip(': '), file=sys.stderr)
    sys.exit(1)
  if reporting.is_writer() and _STAGE.value in ('all', 'eval'):
    from depthuda import evaluate
    results = reporting.read_results(workdir)
    if 'eval' in results:
      print(evaluate.format_table(results['eval']))


if __name__ == '__main__':
  app.run(main)
