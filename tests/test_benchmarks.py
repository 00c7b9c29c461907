"""The benchmark scripts run end to end at tiny sizes (their numbers are for benchmarks/RESULTS.md);
hostmem.py, their CPU malloc tuning, does what it says.

`benchmarks/gpu.sh` is run on a GPU host, possibly once: rehearsing it here, at a tiny size on
the CPU, keeps a broken flag or import from costing that run.
"""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import hostmem  # pylint: disable=wrong-import-position


def _run(command, env=None, timeout=300):
  result = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result.stdout


def test_gpu_script_rehearsed_on_cpu_writes_both_precisions(tmp_path):
  # The script's caps fit the GPU run; on a busy 2-core machine the rehearsal's compilation
  # alone can take longer (a train-step run passed its 135 s under a load of 7).
  out = _run(['bash', 'benchmarks/gpu.sh', str(tmp_path)],
             env={'HEIGHT': '49', 'WIDTH': '65', 'LAYERS': 'tiny', 'BASE_WIDTH': '8',
                  'STEPS': '2', 'PYTHON': sys.executable, 'STEP_TIMEOUT': '900',
                  'DENSITY_TIMEOUT': '300'}, timeout=2400)
  assert 'no CUDA' in out  # The rehearsal ran on the CPU.
  for dtype in ('float32', 'bfloat16'):
    with open(tmp_path / f'train_step_{dtype}.json') as f:
      results = json.load(f)
    assert results['args']['dtype'] == dtype and results['args']['height'] == 49
    jax_run, torch_run = results['frameworks']['jax'], results['frameworks']['torch']
    assert len(jax_run['times']) == len(torch_run['times']) == 2
    assert jax_run['params'] == torch_run['params'] > 0  # The same networks.
    assert jax_run['flops'] > 0 and results['time_ratio'] > 0
    assert not jax_run['tensorflow_imported']  # The GPU host has no TensorFlow.
  density = dict(line.rsplit(None, 1) for line in
                 (tmp_path / 'density.log').read_text().splitlines()[1:])
  assert float(density['ratio loop / jitted'].rstrip('x')) > 1
  assert float(density['max |difference| (0-255 scale)']) < 1e-2  # Against the per-pixel loop.


def test_profile_step_attributes_the_step_to_source_files(tmp_path):
  out = _run([sys.executable, 'benchmarks/profile_step.py', '--layers=tiny', '--height=49',
              '--width=65', '--base_width=8', '--top=5', f'--trace_dir={tmp_path}'])
  share = {}
  for line in out.split('by source')[1].splitlines()[1:]:
    seconds, percent, group = line.split(maxsplit=2)
    share[group] = float(percent.rstrip('%'))
  assert abs(sum(share.values()) - 100) < 0.1
  assert share['model'] > 50  # The network dominates even at this size.
  assert 'density targets, GMM' in share and 'losses' in share


def test_compile_only_counts_more_for_two_domains_than_one(tmp_path):
  def compiled(*flags):
    out = _run([sys.executable, 'benchmarks/train_step.py', '--layers=tiny', '--height=49',
                '--width=65', '--base_width=8', '--compile_only', f'--json={tmp_path}/r.json',
                *flags])
    assert 'XLA buffers: arguments' in out
    with open(tmp_path / 'r.json') as f:
      return json.load(f)['jax']
  both, one = compiled(), compiled('--source_only')
  # The target pass adds a segmenter pass and, at this tiny width, a larger discriminator's.
  assert both['flops'] > 2 * one['flops'] > 0
  assert one['xla_temp_bytes'] < both['xla_temp_bytes']
  assert one['params'] == both['params']


def test_gmm_benchmark_fits_like_sklearn_in_memory_and_streamed():
  out = _run([sys.executable, 'benchmarks/gmm_fit.py', '--num_classes=2',
              '--points_per_class=3000', '--repeats=1'])
  rows = {line[:34].strip(): line[34:].split() for line in out.splitlines()[2:-1]}
  ours, theirs = (float(v) for v in rows['mean loglik per point'])
  assert abs(ours - theirs) < 0.01 and float(rows['max |loglik diff| over classes'][0]) < 0.01
  iterations = rows['EM iterations (max over classes)']
  assert iterations[0] == iterations[1] == rows['EM iterations streamed (max)'][0]
  assert float(rows['EM streamed in 4 chunks (s)'][0]) > 0
  assert out.splitlines()[-1].startswith('speedup, sklearn with its defaults / depthuda')


def test_conv_rates_forms_are_the_same_convolution():
  """conv_rates.py --forms times a dilated 3x3 convolution written as matrix products: each
  form gives the convolution's values and both gradients."""
  import conv_rates  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (1, 9, 11, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  forms = conv_rates.conv3x3_forms()
  for d in (1, 2, 4):
    loss = lambda f, x, w: (f(x, w, d) * np.arange(5)).sum() ** 2
    expected = jax.value_and_grad(loss, argnums=(1, 2))(forms['conv'], x, w)
    for name, form in forms.items():
      got = jax.value_and_grad(loss, argnums=(1, 2))(form, x, w)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3, err_msg=f'{name}, dilation {d}')


# Mallocs 256 MiB, writes every page and frees it, 3 times, as XLA's CPU runtime does with a
# step's temporaries; prints the minor page faults of the last two rounds.
_ROUNDS = r'''
import ctypes, resource, sys
sys.path.insert(0, 'benchmarks')
import hostmem
assert hostmem.configure(sys.argv[1] == 'keep') == (sys.argv[2] == 'made')
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 256 << 20
def round_trip():
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def _faults(keep: bool, platforms: str, made: bool) -> int:
  out = subprocess.run([sys.executable, '-c', _ROUNDS, 'keep' if keep else 'system',
                        'made' if made else 'not made'], cwd=ROOT, capture_output=True, text=True,
                       check=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': platforms})
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_hostmem_reuses_a_freed_block_without_page_faults_on_cpu_only_hosts():
  pages = (256 << 20) // os.sysconf('SC_PAGE_SIZE')
  # Mapped afresh each time (with transparent huge pages: fewer, larger faults).
  assert _faults(keep=False, platforms='cpu', made=False) > pages // 4
  assert _faults(keep=True, platforms='cuda', made=False) > pages // 4  # An accelerator host.
  assert _faults(keep=True, platforms='cpu', made=True) < 100


def test_hostmem_cpu_only_follows_jax_platforms_then_installed_plugins(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert hostmem.cpu_only()
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert not hostmem.cpu_only()
  monkeypatch.delenv('JAX_PLATFORMS')
  found = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name: object() if name == 'jax_plugins' else found(name))
  assert not hostmem.cpu_only()
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  monkeypatch.setattr(importlib.metadata, 'entry_points', lambda group: ['cuda'])
  assert not hostmem.cpu_only()
  monkeypatch.setattr(importlib.metadata, 'entry_points', lambda group: [])
  assert hostmem.cpu_only()


def test_loss_gradients_reach_only_the_parts_each_term_trains(tmp_path_factory):
  """benchmarks/loss_gradients.py on the test config: each weighted term's gradient reaches
  exactly the parts METHOD §5 says it trains. The density losses move the density head and the
  trunk only: their targets take the class from the classifier's argmax and, on the target, z
  from the depth head's output, detached (without that stop-gradient the target density loss
  reaches the depth head, and this test fails). D's input is entropy x density, so the
  adversarial term moves the classifier and the density head."""
  import main_runs  # pylint: disable=import-outside-toplevel
  import loss_gradients  # pylint: disable=import-outside-toplevel
  from configs import test as test_config  # pylint: disable=import-outside-toplevel
  workdir = main_runs.reference_workdir(tmp_path_factory)
  config = test_config.get_config()
  reaches = {name: {part for part, norm in norms.items() if norm > 0}
             for name, (_, norms) in loss_gradients.term_gradients(config, workdir).items()}
  assert reaches == {'loss_seg': {'trunk', 'classifier'},
                     'loss_depth': {'trunk', 'depth_head'},
                     'loss_bal_src': {'trunk', 'density_head'},
                     'loss_bal_tgt': {'trunk', 'density_head'},
                     'loss_adv': {'trunk', 'classifier', 'density_head'}}
