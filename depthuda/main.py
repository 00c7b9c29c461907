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
`--stage=eval --checkpoint=PATH` scores a given model (a stage folder, its best/ or a step folder,
or a folder written by depthuda.convert) into DIR without training anything.

The config and its overrides are checked against configs/common.py's base config before any
work (depthuda/config_files.py). Progress: bars on a terminal, else an INFO line per logged
training step and per minute of the other long phases; `--verbosity=-1` hides them.

Exit status: 0 done; 1 bad input (data, files, settings), with a one-line message naming the
culprit; 2 a bad command line or config file; 128 + N stopped by signal N (SIGTERM: 143,
Ctrl-C: 130), after saving a checkpoint.
"""

import functools
import os
import signal
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from depthuda import cli
from depthuda import fileio
from depthuda.errors import InputError
from depthuda.errors import Interrupted

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
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None,
    'With --stage=eval: score this model instead of the run\'s own: a stage folder (DIR/adapt, '
    'DIR/self_train; config.model_selection picks its model), its best/ or checkpoints/ folder, '
    'one step folder in these, or a folder written by depthuda.convert.')
flags.mark_flags_as_required(['config', 'workdir'])


def _raise_interrupted(signum, frame):
  del frame
  name = signal.Signals(signum).name
  raise Interrupted(f'stopped by {name}; rerun the same command to continue', signum)


def _write_config(workdir: str, config) -> None:
  """DIR/config.json, written atomically (every process checks that it can write DIR)."""
  try:
    fileio.write_atomic(fileio.Path(workdir) / 'config.json',
                        config.to_json_best_effort(indent=2, sort_keys=True))
  except OSError as e:
    raise InputError(f'--workdir={workdir} is not writable ({e.strerror or e})') from None


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', cli.USAGE)
  if _CHECKPOINT.value is not None and _STAGE.value != 'eval':
    cli.fail(f'--checkpoint={_CHECKPOINT.value} needs --stage=eval (it scores a given model)',
             cli.USAGE)
  for sig in (signal.SIGTERM, signal.SIGINT):  # Stages that checkpoint replace these.
    signal.signal(sig, _raise_interrupted)
  cli.configure_logging()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ notes and warnings
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    _write_config(workdir, config)  # Before the slow imports: a bad workdir fails at once.
    adapt_checkpoints = fileio.Path(workdir) / 'adapt' / 'checkpoints'
    needs_init = (_STAGE.value in ('all', 'adapt') and config.init_from
                  and not (adapt_checkpoints.is_dir() and any(adapt_checkpoints.iterdir())))
    if needs_init and not config.pretrain.num_steps:
      # So is a wrong init_from, which adapt (not resumed) would meet after the GMM fit.
      from depthuda import converted
      converted.check_init_from(config)
    import jax  # After flag parsing, so --help is fast.
    if _MULTIHOST.value:
      _initialize_distributed(jax)
    if needs_init and config.pretrain.num_steps:  # the toy's pretrained start, made on first use
      from depthuda import pretrain
      pretrain.ensure(config)
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()  # Our bars show the stages; data/preparing.py shows its own.
    from depthuda import checkpointing
    from depthuda import reporting
    from depthuda import stages
    checkpointing.quiet_failed_saves()

    if _CHECKPOINT.value is not None:
      stages.evaluate_checkpoint(config, workdir, _CHECKPOINT.value)
    else:
      for stage in (_STAGES if _STAGE.value == 'all' else (_STAGE.value,)):
        stages.run(stage, config, workdir)
  except Interrupted as e:
    print(f'depthuda: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except InputError as e:
    cli.fail(str(e), cli.INPUT)
  except OSError as e:
    cli.fail(f'{e.strerror}: {e.filename}' if e.strerror and e.filename else str(e), cli.INPUT)
  if reporting.is_writer() and _STAGE.value in ('all', 'eval'):
    from depthuda import evaluate
    results = reporting.read_results(workdir)
    if 'eval' in results:
      print(evaluate.format_table(results['eval']))


def _initialize_distributed(jax) -> None:
  kwargs = {}
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:
    kwargs = dict(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                  num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                  process_id=int(os.environ['JAX_PROCESS_ID']))
  if os.environ.get('JAX_PLATFORMS') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # Its preemption notifier would take SIGTERM from our handlers and only log it; the training
  # loop agrees on stopping across processes itself (stages/training.py).
  jax.config.update('jax_enable_preemption_service', False)
  jax.distributed.initialize(**kwargs)


if __name__ == '__main__':
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config=_CONFIG))
