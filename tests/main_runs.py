"""`python -m depthuda.main` in subprocesses, shared by the end-to-end, resume and error tests.

Each run pays 10-25 s of imports and compilation on 2 CPU cores, so the tests share one
reference run of the whole pipeline (`reference_workdir`), start independent runs side by side,
and share JAX's persistent compilation cache (loading a compiled step gives the same program,
so results are unchanged). Runs use configs/test.py with `ARGS`: 8 adapt steps, each logged, a
checkpoint every 2.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from depthuda import fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device (the test config's batch of 2 needs a divisor); XLA's backend optimisations
# cost more compile time than they save on the tiny test model.
# JAX's persistent compilation cache, shared by the session's processes (tests/conftest.py).
_CACHE = os.environ.get('DEPTHUDA_TEST_XLA_CACHE')
if not _CACHE:
  _CACHE = tempfile.mkdtemp(prefix='depthuda-test-xla-cache-')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
ENV = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
           XLA_FLAGS='--xla_force_host_platform_device_count=1 '
                     '--xla_backend_optimization_level=0',
           JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
ARGS = ('--config.adapt.num_steps=8', '--config.checkpoint_every_steps=2',
        '--config.log_every_steps=1', '--config.eval_every_steps=4',
        '--config.log_images_every_steps=0')
# Seconds one run may take; DEPTHUDA_TEST_TIMEOUT gives more on a busy machine.
TIMEOUT = int(os.environ.get('DEPTHUDA_TEST_TIMEOUT', '300'))
# The runs shared by the session (reference, learned) run beside the test processes, each of
# which may be compiling: on 2 cores under `make test` they get about a third of the machine.
SHARED_TIMEOUT = 4 * TIMEOUT


def command(workdir: str, *args: str, config: str = 'configs/test.py') -> list[str]:
  return [sys.executable, '-m', 'depthuda.main', f'--config={config}', f'--workdir={workdir}',
          *ARGS, *args]


_started = []


@atexit.register
def _stop_leftovers():
  """Runs a failed test left behind end with the session; the shared reference run, which
  other processes of the session may wait for, is waited for first."""
  if 'waiter' in _reference:
    _reference['waiter'].join(timeout=SHARED_TIMEOUT + 60)
  for process in _started:
    if process.poll() is None:
      process.kill()


def popen(args: list[str]) -> subprocess.Popen:
  """Starts a command in the repository root; stdout and stderr are captured as text."""
  process = subprocess.Popen(args, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
  _started.append(process)
  return process


def start(workdir: str, *args: str) -> subprocess.Popen:
  """Starts main on `workdir`."""
  return popen(command(workdir, *args))


def finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
  out, err = process.communicate(timeout=timeout)
  return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(workdir: str, *args: str) -> subprocess.CompletedProcess:
  return finish(start(workdir, *args))


def wait_until(condition, process: subprocess.Popen, timeout: float = TIMEOUT) -> None:
  """Polls `condition()` until it holds; fails if `process` ends or time runs out first."""
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f'the run ended first:\n{finish(process).stderr[-3000:]}')
    if time.monotonic() > deadline:
      process.kill()
      raise AssertionError('timed out')
    time.sleep(0.05)


def metrics(workdir: str, stage: str) -> list[dict]:
  path = os.path.join(workdir, stage, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def checkpoint_steps(workdir: str, stage: str, kind: str = 'checkpoints') -> list[int]:
  path = os.path.join(workdir, stage, kind)
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def results(workdir: str) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def error_lines(completed: subprocess.CompletedProcess) -> list[str]:
  """The lines depthuda itself wrote to stderr (progress bars and library notes aside)."""
  return [line for line in completed.stderr.splitlines() if line.startswith('depthuda:')]


def copy_stages(source: str, dest: str, stages: tuple[str, ...]) -> str:
  """A new workdir holding `stages` of `source`: their folders and results.json entries."""
  os.makedirs(dest)
  for stage in stages:
    shutil.copytree(os.path.join(source, stage), os.path.join(dest, stage))
  entries = {k: v for k, v in results(source).items() if k in stages}
  with open(os.path.join(dest, 'results.json'), 'w') as f:
    json.dump(entries, f)
  return dest


_reference = {}


def prepare_test_data() -> None:
  """Generates and prepares the test config's toy datasets (once), before runs share them.

  Runs started side by side would otherwise all find the data absent; and tests that read the
  generated files directly need them whatever ran before.
  """
  if _reference.get('data_ready'):
    return
  from configs import test as test_config
  from depthuda import models
  from depthuda.data import pipeline
  config = test_config.get_config()
  cwd = os.getcwd()
  os.chdir(ROOT)  # The config's data paths are relative to the repository root.
  try:
    next(iter(pipeline.source_grid_points(config, models.feature_grid(config))))
    next(iter(pipeline.target_val(config)))
  finally:
    os.chdir(cwd)
  _reference['data_ready'] = True


def _shared_dir(tmp_path_factory) -> str:
  """A folder every process of the test session sees: pytest-xdist gives each worker its own
  base temp folder, all under one parent."""
  base = tmp_path_factory.getbasetemp()
  return str(base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base)


def _finish_and_record(process: subprocess.Popen, path: str) -> None:
  """Waits for `process` and writes its outcome to `path`, also when it runs out of time (then
  killed), so that every process waiting for the record learns the outcome at once."""
  try:
    completed = finish(process, timeout=SHARED_TIMEOUT)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate()
    completed = subprocess.CompletedProcess(
        process.args, -9, out, f'{err}\n(killed: still running after {SHARED_TIMEOUT} s; '
        'DEPTHUDA_TEST_TIMEOUT gives more on a busy machine)')
  except BaseException as e:  # pylint: disable=broad-except
    completed = subprocess.CompletedProcess(process.args, -1, '', f'waiting failed: {e!r}')
  fileio.write_atomic(path, json.dumps({'returncode': completed.returncode,
                                        'stdout': completed.stdout, 'stderr': completed.stderr}))


def start_reference(tmp_path_factory) -> None:
  """Starts the reference run of `--stage=all` in the background, once per test session: the
  first process of the session to ask runs it; the others wait for its record."""
  prepare_test_data()
  if 'workdir' in _reference:
    return
  workdir = os.path.join(_shared_dir(tmp_path_factory), 'reference')
  with fileio.local_lock(workdir + '.lock'):
    owner = not os.path.exists(workdir)
    if owner:
      os.makedirs(workdir)
  _reference['workdir'] = workdir
  if owner:
    process = start(workdir)
    _reference['waiter'] = threading.Thread(
        target=_finish_and_record, args=(process, workdir + '.json'), daemon=True)
    _reference['waiter'].start()


def reference_run(tmp_path_factory) -> subprocess.CompletedProcess:
  """The finished reference run (waited for)."""
  start_reference(tmp_path_factory)
  if 'completed' not in _reference:
    record = _reference['workdir'] + '.json'
    deadline = time.monotonic() + SHARED_TIMEOUT + 60  # The owner's waiter records even a kill.
    while not os.path.exists(record):
      assert time.monotonic() < deadline, 'the reference run did not finish in time'
      time.sleep(0.2)
    with open(record) as f:
      _reference['completed'] = subprocess.CompletedProcess([], **json.load(f))
  completed = _reference['completed']
  assert completed.returncode == 0, completed.stderr[-3000:]
  return completed


def reference_workdir(tmp_path_factory) -> str:
  """A workdir where `--stage=all` ran to the end."""
  reference_run(tmp_path_factory)
  return _reference['workdir']


# The run that shows learning: long enough for the target mIoU to rise well above chance and
# for the pseudo-labels to keep pixels (so self-training has a loss), still short: 48 adapt
# steps with the learning rate decaying to zero over them, then 12 self-training steps, a
# checkpoint every 4 steps, evaluations at steps 16, 32, 48 of adapt and at the end of each
# stage; the networks twice the test config's width (at width 4 the target mIoU moved between
# 15 and 23 with rounding alone).
LEARN_ARGS = ('--config.adapt.num_steps=48', '--config.optim.poly_horizon=48',
              '--config.eval_every_steps=16', '--config.checkpoint_every_steps=4',
              '--config.self_train.num_steps=12', '--config.model.width=8',
              '--config.model.disc_ndf=8')


def learned_workdir(tmp_path_factory) -> str:
  """A workdir where `--stage=all` ran with LEARN_ARGS (the GMM copied from the reference run);
  run once per test session, by the first process to ask."""
  if 'learned' not in _reference:
    workdir = os.path.join(_shared_dir(tmp_path_factory), 'learned')
    with fileio.local_lock(workdir + '.lock'):
      if not os.path.exists(workdir + '.done'):
        shutil.rmtree(workdir, ignore_errors=True)
        copy_stages(reference_workdir(tmp_path_factory), workdir, ('fit_gmm',))
        completed = finish(start(workdir, *LEARN_ARGS), timeout=SHARED_TIMEOUT)
        assert completed.returncode == 0, completed.stderr[-3000:]
        open(workdir + '.done', 'w').close()
    _reference['learned'] = workdir
  return _reference['learned']
