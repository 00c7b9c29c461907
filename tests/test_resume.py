"""Faults and resumption: a killed, a signalled and an uninterrupted run log the same metrics;
pseudo_label and fit_gmm continue where they stopped; half-written files are never used."""

import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import test as test_config
from depthuda import checkpointing
from depthuda import gmm_streaming
from depthuda import models
from depthuda import pseudo
from depthuda import reporting
from depthuda import sharding
from depthuda.data import pipeline
from depthuda.errors import InputError
from depthuda.stages import fit_gmm
from depthuda.stages import pseudo_label
from tests import main_runs


def _read(path):
  with tf.io.gfile.GFile(os.fspath(path)) as f:  # local or remote (ram://)
    return f.read()


def test_killed_and_signalled_runs_log_what_an_uninterrupted_run_logs(tmp_path_factory,
                                                                        tmp_path):
  """SIGKILL mid-run, then SIGTERM, then run to the end: metrics.jsonl equals the reference's
  byte for byte; so does that of a second uninterrupted run (determinism)."""
  reference = main_runs.reference_workdir(tmp_path_factory)
  repeat = main_runs.copy_stages(reference, str(tmp_path / 'repeat'), ('fit_gmm',))
  cut = main_runs.copy_stages(reference, str(tmp_path / 'cut'), ('fit_gmm',))
  repeat_run = main_runs.start(repeat, '--stage=adapt')

  killed = main_runs.start(cut, '--stage=adapt')
  main_runs.wait_until(lambda: any(m['step'] >= 3 for m in main_runs.metrics(cut, 'adapt')),
                       killed)
  killed.kill()
  killed.wait()
  logged = max(m['step'] for m in main_runs.metrics(cut, 'adapt'))

  stopped = main_runs.start(cut, '--stage=adapt')  # signalled as soon as it logs a new step
  main_runs.wait_until(lambda: any(m['step'] > logged for m in main_runs.metrics(cut, 'adapt')),
                       stopped)
  stopped.send_signal(signal.SIGTERM)
  completed = main_runs.finish(stopped)
  assert completed.returncode == 128 + signal.SIGTERM, completed.stderr[-3000:]
  assert 'Traceback' not in completed.stderr
  (line,) = main_runs.error_lines(completed)
  step = int(re.fullmatch(r'depthuda: adapt: stopped by SIGTERM at step (\d+); checkpoint '
                          r'saved, rerun the same command to continue', line)[1])
  assert main_runs.checkpoint_steps(cut, 'adapt')[-1] == step < 8

  completed = main_runs.run(cut, '--stage=adapt')
  assert completed.returncode == 0, completed.stderr[-3000:]
  completed = main_runs.finish(repeat_run)
  assert completed.returncode == 0, completed.stderr[-3000:]
  expected = _read(os.path.join(reference, 'adapt', 'metrics.jsonl'))
  assert len(expected.splitlines()) == 8  # one object per step, evaluations included
  for workdir in (cut, repeat):
    assert _read(os.path.join(workdir, 'adapt', 'metrics.jsonl')) == expected
    assert main_runs.results(workdir)['adapt'] == main_runs.results(reference)['adapt']
    assert main_runs.checkpoint_steps(workdir, 'adapt', 'best') == main_runs.checkpoint_steps(
        reference, 'adapt', 'best')
    assert not [n for n in os.listdir(os.path.join(workdir, 'adapt', 'checkpoints'))
                if not n.isdigit()]  # no unfinished save left behind


def test_killed_self_train_logs_what_an_uninterrupted_run_logs(tmp_path_factory, tmp_path):
  """SIGKILL during self_train once its first checkpoint is on disk, then rerun: the resumed
  run ends with the metrics, results and best checkpoint of the uninterrupted run (the learning
  run's self_train, whose pseudo-labels keep pixels, so every step has a loss to follow)."""
  learned = main_runs.learned_workdir(tmp_path_factory)
  cut = main_runs.copy_stages(learned, str(tmp_path / 'cut'),
                              ('fit_gmm', 'adapt', 'pseudo_label'))
  killed = main_runs.start(cut, '--stage=self_train', *main_runs.LEARN_ARGS)
  main_runs.wait_until(lambda: main_runs.checkpoint_steps(cut, 'self_train'), killed)
  killed.kill()  # SIGKILL: nothing of the run's own cleanup happens
  killed.wait()
  assert killed.returncode == -signal.SIGKILL
  assert 'self_train' not in main_runs.results(cut)  # killed before the end
  saved = main_runs.checkpoint_steps(cut, 'self_train')
  assert saved and saved[-1] < 12, saved
  logged = [m['step'] for m in main_runs.metrics(cut, 'self_train')]
  assert 0 < max(logged) < 12, logged

  completed = main_runs.run(cut, '--stage=self_train', *main_runs.LEARN_ARGS)
  assert completed.returncode == 0, completed.stderr[-3000:]
  expected = _read(os.path.join(learned, 'self_train', 'metrics.jsonl'))
  assert len(expected.splitlines()) == 12  # one object per step, the final evaluation included
  assert _read(os.path.join(cut, 'self_train', 'metrics.jsonl')) == expected
  assert main_runs.results(cut)['self_train'] == main_runs.results(learned)['self_train']
  assert main_runs.checkpoint_steps(cut, 'self_train', 'best') == main_runs.checkpoint_steps(
      learned, 'self_train', 'best')


@pytest.fixture
def labelled_workdir(tmp_path_factory, tmp_path):
  """A workdir with fit_gmm and adapt done (pseudo_label still to run)."""
  reference = main_runs.reference_workdir(tmp_path_factory)
  workdir = main_runs.copy_stages(reference, str(tmp_path / 'work'), ('fit_gmm', 'adapt'))
  config = test_config.get_config()
  config.adapt.num_steps = 8
  return config, workdir


class _Killed(BaseException):
  """Stands for SIGKILL in in-process tests: nothing after it runs."""


def _read_bytes(path):
  with open(path, 'rb') as f:
    return f.read()


def _counting_spatial_prior(monkeypatch, kill_after=None):
  """Replaces pseudo.spatial_prior by a wrapper that counts its calls (and dies at one)."""
  calls, spatial_prior = [], pseudo.spatial_prior

  def counted(labels, *args, **kwargs):
    if len(calls) == kill_after:
      raise _Killed
    calls.append(labels)
    return spatial_prior(labels, *args, **kwargs)

  monkeypatch.setattr(pseudo, 'spatial_prior', counted)
  return calls


def test_pseudo_label_continues_where_it_stopped(labelled_workdir, tmp_path, monkeypatch):
  config, workdir = labelled_workdir
  clean = main_runs.copy_stages(workdir, str(tmp_path / 'clean'), ('fit_gmm', 'adapt'))
  summary = pseudo_label.run(config, clean)
  out, clean_out = pseudo_label.label_dir(workdir), pseudo_label.label_dir(clean)

  with monkeypatch.context() as patch:
    _counting_spatial_prior(patch, kill_after=3)  # killed while labelling the fourth image
    with pytest.raises(_Killed):
      pseudo_label.run(config, workdir)
  done = sorted(n for n in os.listdir(out) if n.endswith('.png'))
  assert len(done) == 3 and not [n for n in os.listdir(out) if n.endswith('.tmp')]
  # What a killed writer could leave: a stray temporary file and a cut-off PNG.
  with open(os.path.join(out, f'.{done[0]}.x.tmp'), 'wb') as f:
    f.write(b'\x89PNG')
  damaged = _read_bytes(os.path.join(out, done[1]))
  with open(os.path.join(out, done[1]), 'wb') as f:
    f.write(damaged[:len(damaged) // 2])
  assert not pseudo_label.is_complete(config, workdir)

  calls = _counting_spatial_prior(monkeypatch)
  assert pseudo_label.run(config, workdir) == summary
  assert len(calls) == 6 - 3 + 1  # the rest and the damaged one
  assert sorted(os.listdir(out)) == sorted(os.listdir(clean_out))
  for name in os.listdir(out):
    assert _read_bytes(os.path.join(out, name)) == _read_bytes(os.path.join(clean_out, name))

  reporting.update_results(workdir, 'pseudo_label', summary)
  assert pseudo_label.is_complete(config, workdir)
  config.pseudo.threshold = 0.5  # other settings: the labels are stale, not reused
  assert not pseudo_label.is_complete(config, workdir)
  calls.clear()
  pseudo_label.run(config, workdir)
  assert len(calls) == 6


def test_pseudo_labels_are_predicted_one_image_per_device(labelled_workdir, monkeypatch):
  """pseudo_label splits its batches over this process's 4 devices, and labels each image as
  one device labelling it alone does."""
  config, workdir = labelled_workdir
  seen, confident = [], pseudo_label.confident

  def recorded(seg, variables, images, *args):
    seen.append(images.sharding)
    return confident(seg, variables, images, *args)

  monkeypatch.setattr(pseudo_label, 'confident', recorded)
  pseudo_label.run(config, workdir)
  devices = set(jax.local_devices())
  assert len(devices) == 4 and seen
  for split in seen:
    assert split.device_set == devices and split.spec[0] == sharding.AXIS

  seg, _ = models.build(config)
  with checkpointing.StageCheckpoints(os.path.join(workdir, 'adapt')) as ckpts:
    variables, _ = ckpts.restore_model(config.model_selection,
                                       models.abstract_variables(config, seg))
  variables = jax.device_put(variables, jax.local_devices()[0])
  sizes = pseudo_label.region_sizes(config, workdir)
  w, h = config.data.input_size
  examples = list(pipeline.target_images(config, 'selftrain'))
  assert len(examples) % 4  # a padded last batch
  for example in examples:
    alone = np.asarray(confident(seg, variables, example['image'], (h, w),
                                 float(config.pseudo.threshold)))[0]
    with Image.open(os.path.join(pseudo_label.label_dir(workdir),
                                 example['name'] + '.png')) as png:
      np.testing.assert_array_equal(np.asarray(png), pseudo_label.refine(alone, sizes, config))


def test_fit_gmm_resumes_without_scanning_again(tmp_path, remote_dir, monkeypatch):
  """The cut-off run's workdir is on ram://, a URL as gs:// is: the scan cache and the EM state
  are kept there too."""
  config = test_config.get_config()
  fit_gmm.run(config, str(tmp_path / 'clean'))
  expected = _read(tmp_path / 'clean' / 'fit_gmm' / 'gmm.json')

  fit_streaming = gmm_streaming.fit_streaming
  iterations = []

  def killed_after_two(*args, **kwargs):  # killed during EM, after its second iteration
    def progress(step, loglik):
      iterations.append(step)
      if step == 2:
        raise _Killed
    return fit_streaming(*args, **{**kwargs, 'progress': progress})

  workdir = f'{remote_dir}/cut'
  with monkeypatch.context() as patch:
    patch.setattr(gmm_streaming, 'fit_streaming', killed_after_two)
    with pytest.raises(_Killed):
      fit_gmm.run(config, workdir)
  assert not fit_gmm.is_complete(config, workdir)
  assert sorted(tf.io.gfile.listdir(f'{workdir}/fit_gmm')) == ['em_state.npz', 'grid.0-of-1.npz']
  monkeypatch.setattr(fit_gmm, 'collect_grid', lambda *a: pytest.fail('scanned again'))

  def counting(*args, **kwargs):
    progress = kwargs['progress']
    return fit_streaming(*args, **{**kwargs, 'progress': lambda *a: (iterations.append(a[0]),
                                                                     progress(*a))})

  monkeypatch.setattr(gmm_streaming, 'fit_streaming', counting)
  entry = fit_gmm.run(config, workdir)
  assert iterations[:3] == [1, 2, 3]  # EM went on from iteration 2, not from the start
  assert _read(f'{workdir}/fit_gmm/gmm.json') == expected
  # The scan cache and the EM state are gone.
  assert tf.io.gfile.listdir(f'{workdir}/fit_gmm') == ['gmm.json']
  assert not os.path.exists('ram:')
  reporting.update_results(workdir, 'fit_gmm', entry)
  assert fit_gmm.is_complete(config, workdir)
  config.gmm.num_components = 3
  assert not fit_gmm.is_complete(config, workdir)


def test_checkpoints_survive_a_killed_save(tmp_path):
  """An unfinished save is ignored and removed; best checkpoints saved after the resumed
  checkpoint are dropped (the resumed run saves them again)."""
  state = {'w': jnp.arange(4.0)}
  ckpts = checkpointing.StageCheckpoints(str(tmp_path), resume=True)
  ckpts.save_best(2, state, {'step': 2, 'miou': 1.0})
  ckpts.save(2, state, {'step': 2, 'best_miou': 1.0, 'best_step': 2})
  ckpts.save_best(4, {'w': state['w'] + 1}, {'step': 4, 'miou': 2.0})
  ckpts.close()
  shutil.copytree(tmp_path / 'checkpoints' / '2', tmp_path / 'checkpoints' /
                  '6.orbax-checkpoint-tmp-1234')  # killed while saving step 6

  ckpts = checkpointing.StageCheckpoints(str(tmp_path), resume=True)
  assert ckpts.latest_step() == 2
  assert os.listdir(tmp_path / 'checkpoints') == ['2']
  restored, meta = ckpts.restore(state)
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert meta == {'step': 2, 'best_miou': 1.0, 'best_step': 2}
  assert ckpts.best_step() == 2
  ckpts.save_best(4, {'w': state['w'] + 2}, {'step': 4, 'miou': 3.0})
  ckpts.save(4, state, {'step': 4, 'best_miou': 3.0, 'best_step': 4})
  ckpts.close()
  assert main_runs.checkpoint_steps(str(tmp_path), '.', 'best') == [4]

  with pytest.raises(InputError, match=r'checkpoints/4 \(Requested shape: \(8,\) is not '
                     r'compatible .*written with another configuration'):
    checkpointing.StageCheckpoints(str(tmp_path), resume=True).restore({'w': jnp.zeros(8)})
  shutil.rmtree(tmp_path / 'checkpoints' / '4' / 'state')  # damaged on disk
  ckpts = checkpointing.StageCheckpoints(str(tmp_path), resume=True)
  assert ckpts.restore(state)[1]['step'] == 2 and ckpts.latest_step() == 2


def test_metrics_log_restarts_at_the_resumed_step(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('{"loss": 1.0, "step": 1}\n{"loss": 2.0, "step": 2}\n{"step": 2, "val_miou": 5.0}\n'
            '{"loss": 3.0, "step": 3}\n{"loss": 4.0, "st')  # killed while writing step 4
  log = reporting.MetricsLog(str(tmp_path), start_step=2, tensorboard=False)
  log.scalars(3, {'loss': np.float32(7.0), 'loss_seg': float('nan')})
  assert _read(tmp_path / 'metrics.jsonl') == (
      '{"loss": 1.0, "step": 1}\n{"loss": 2.0, "step": 2}\n{"step": 2, "val_miou": 5.0}\n'
      '{"loss": 7.0, "loss_seg": null, "step": 3}\n')
