r"""One adaptation iteration: depthuda's jitted `adapt_step` against the original's PyTorch loop.

  python benchmarks/train_step.py --height=321 --width=321 --layers=101 --steps=3     # CPU
  python benchmarks/train_step.py --height=760 --width=1280 --layers=101 --dtype=bfloat16
  python benchmarks/train_step.py --layers=tiny --height=97 --width=97                # smoke test

An iteration is METHOD §5 for batch 1 source + 1 target: both forward passes, the five segmenter
losses, the segmenter update and the discriminator update. depthuda runs the production path,
`sharding.make_sharded_step` on a one-device mesh; the baseline is `torch_reference.py`, PyTorch
eager as the original trains. Each framework lives in its own worker process (so the peak memory
is its own), set up once; the parent then alternates single iterations between the two, so
both see the same machine load, and reports medians.

Reported: depthuda's compile time (XLA) and first iteration, the median iteration time, peak
memory during the timed iterations (CPU: the process's peak resident set, reset after setup, so
XLA's compiler and PyTorch's first-call caches are not counted; GPU: the device allocator's peak),
the median minor page faults and system CPU time per iteration (the cost of memory the
allocator maps afresh each iteration; `GLIBC_TUNABLES` set in the shell reaches both workers),
and the step's FLOPs from XLA's cost analysis of the compiled step with the achieved rate (and
the model FLOPs utilisation where the device's peak is known or --peak_tflops is given). The
same FLOP count serves both frameworks, which compute the same iteration. On a CPU-only host
the depthuda worker keeps freed host memory mapped (`hostmem.py`; --system_malloc leaves it
out); the PyTorch worker runs on the C library's defaults. No TensorFlow is imported, so this runs where only JAX and PyTorch
are installed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS = {'101': (3, 4, 23, 3), '50': (3, 4, 6, 3), '18ish': (2, 2, 2, 2), 'tiny': (1, 1, 1, 1)}
# Dense tensor-core peaks per chip in TFLOP/s, (bfloat16, float32 as TF32): both frameworks run
# float32 convolutions as TF32 on these GPUs by default (XLA's default precision, cuDNN's
# allow_tf32). Vendor datasheet figures (SXM parts).
PEAK_TFLOPS = {'H200': (989.0, 495.0), 'H100': (989.0, 495.0), 'A100': (312.0, 156.0)}
_REPLY = '@@'
XLA_ONE_THREAD = '--xla_cpu_multi_thread_eigen=false'  # XLA CPU's Eigen ops on the calling thread.


def _reply(obj: dict) -> None:
  print(_REPLY + json.dumps(obj), flush=True)


def _proc_status(key: str) -> int:
  """A field of /proc/self/status in bytes (VmRSS, VmHWM), 0 where there is none."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(key + ':'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _peak_rss() -> int:
  return _proc_status('VmHWM') or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class JaxSession:
  """depthuda's production step: jit(shard_map(adapt_step)) on a one-device mesh."""

  def __init__(self, args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from configs import common
    from depthuda import gmm, models, sharding, train
    self.jax = jax
    config = common.get_base_config()
    config.data.input_size = (args.width, args.height)
    config.model.layers = LAYERS.get(args.layers) or tuple(int(n) for n in args.layers.split(','))
    config.model.width = args.base_width
    config.compute_dtype = args.dtype
    if args.source_only:
      config.loss.lambda_adv = config.loss.lambda_bal_tgt = 0.0
    self.device = jax.local_devices()[0]
    mesh = sharding.make_mesh([self.device])
    seg, disc = models.build(config, axis_name=sharding.AXIS)
    state, seg_tx, disc_tx = train.init_state(config, seg, disc)
    self.state = sharding.replicate(state, mesh)
    rng = np.random.default_rng(0)
    c, h, w = config.data.num_classes, args.height, args.width
    label = rng.integers(0, c, (1, h, w)).astype(np.int32)
    label[:, : h // 10] = 255
    depth = rng.uniform(1, 60, (1, h, w)).astype(np.float32)
    rows, cols = (np.floor((np.arange(m) + 0.5) * n / m).astype(int)  # the PIL rule
                  for n, m in zip((h, w), models.feature_grid(config)))
    self.batch = sharding.shard_batch({
        'source': {'image': rng.normal(0, 50, (1, h, w, 3)).astype(np.float32), 'label': label,
                   'depth': depth, 'label_grid': label[:, rows][:, :, cols],
                   'depth_grid': depth[:, rows][:, :, cols]},
        'target': {'image': rng.normal(0, 50, (1, h, w, 3)).astype(np.float32)}}, mesh)
    k = config.gmm.num_components
    self.gmm_params = sharding.replicate(gmm.GMMParams(
        weights=jnp.full((c, k), 1.0 / k),
        means=jnp.asarray(rng.uniform([0, 0, 1], [w / 8, h / 8, 60], (c, k, 3)), jnp.float32),
        variances=jnp.asarray(rng.uniform([20, 10, 5], [800, 300, 400], (c, k, 3)), jnp.float32)),
        mesh)
    step = sharding.make_sharded_step(train.adapt_step, mesh, seg=seg, disc=disc, seg_tx=seg_tx,
                                   disc_tx=disc_tx, config=config)
    start = time.perf_counter()  # Tracing, lowering and XLA's compilation.
    lowered = step.lower(self.state, self.batch, self.gmm_params)
    self.step_fn = lowered.compile()
    self.info = {'compile_s': time.perf_counter() - start}
    # FLOPs of the compiled step; the backend-independent count of the lowered program where
    # the backend counts none (library calls it cannot see into).
    flops = {}
    for stage, source in (('compiled', self.step_fn), ('lowered', lowered)):
      try:
        cost = source.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[stage] = float(cost.get('flops', 0.0))
      except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
        flops[stage] = 0.0
    self.info['flops_compiled'], self.info['flops_lowered'] = flops['compiled'], flops['lowered']
    self.info['flops'] = flops['compiled'] if flops['compiled'] > 0.5 * flops['lowered'] else (
        flops['lowered'])
    memory = self.step_fn.memory_analysis()
    if memory is not None:
      self.info['xla_temp_bytes'] = int(memory.temp_size_in_bytes)
      self.info['xla_argument_bytes'] = int(memory.argument_size_in_bytes)
    self.info['params'] = sum(x.size for x in jax.tree.leaves(state.params))
    self.info['device_kind'] = self.device.device_kind
    self.profile_dir = args.profile_dir

  def step(self) -> None:
    self.state, metrics = self.step_fn(self.state, self.batch, self.gmm_params)
    self.jax.block_until_ready((self.state, metrics))
    self.metrics = metrics

  def profile(self) -> None:
    if self.profile_dir:
      with self.jax.profiler.trace(self.profile_dir):
        self.step()

  def reset_peak_memory(self) -> None:
    pass  # XLA's allocator keeps no resettable peak; the state is allocated before setup ends.

  def peak_device_bytes(self) -> int | None:
    stats = self.device.memory_stats() if self.device.platform != 'cpu' else None
    return None if not stats else int(stats.get('peak_bytes_in_use', 0))


class TorchSession:
  """The original's loop in PyTorch eager (torch_reference.AdaptationIteration)."""

  def __init__(self, args):
    import torch
    from configs import common
    import torch_reference
    self.torch = torch
    self.cuda = torch.cuda.is_available() and args.torch_device != 'cpu'
    layers = LAYERS.get(args.layers) or tuple(int(n) for n in args.layers.split(','))
    self.iteration = torch_reference.AdaptationIteration(
        16, layers, args.base_width, args.height, args.width, 'cuda' if self.cuda else 'cpu',
        bf16=args.dtype == 'bfloat16', class_weights=common.CLASS_WEIGHTS_16)
    self.info = {'torch_threads': torch.get_num_threads(),
                 'params': sum(p.numel() for p in self.iteration.model.parameters())}

  def step(self) -> None:
    self.iteration.step()
    self.iteration.synchronize()

  def profile(self) -> None:
    pass

  def reset_peak_memory(self) -> None:
    if self.cuda:
      self.torch.cuda.reset_peak_memory_stats()

  def peak_device_bytes(self) -> int | None:
    return int(self.torch.cuda.max_memory_allocated()) if self.cuda else None


def pin_to_cores(threads: int) -> None:
  """Runs this process on the last `threads` cores (0: all), the same ones for every worker."""
  if threads and hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[-threads:])


def worker(args) -> None:
  """Sets up one framework, then serves `step` / `done` commands read from stdin."""
  pin_to_cores(args.threads)  # Neither worker runs more threads at once than the other.
  if args.worker == 'jax':
    import hostmem  # pylint: disable=import-outside-toplevel
    hostmem.configure(not args.system_malloc)  # Before JAX starts its threads.
    import jax  # pylint: disable=unused-import
  else:
    import torch
    if args.threads:
      torch.set_num_threads(args.threads)
  rss_imports = _proc_status('VmRSS')
  session = (JaxSession if args.worker == 'jax' else TorchSession)(args)
  if args.compile_only:
    _reply({'event': 'ready', **session.info})
    return
  start = time.perf_counter()
  session.step()  # Warm-up: the first call (PyTorch's allocator and kernel caches).
  session.info['first_step_s'] = time.perf_counter() - start
  session.profile()
  # Hand freed heap (XLA's compiler, PyTorch's first call) back to the OS before the peak is
  # reset, so the peak counts what the iterations keep and use.
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
  session.info.update(setup_peak_rss=_peak_rss(), rss_after_setup=_proc_status('VmRSS'),
                      rss_after_imports=rss_imports,
                      tensorflow_imported='tensorflow' in sys.modules)
  session.info['peak_reset'] = _reset_peak_rss()
  session.reset_peak_memory()
  _reply({'event': 'ready', **session.info})
  for line in sys.stdin:
    if line.strip() == 'step':
      before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      session.step()
      seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
      _reply({'time': seconds, 'page_faults': after.ru_minflt - before.ru_minflt,
              'system_s': after.ru_stime - before.ru_stime})
    elif line.strip() == 'done':
      _reply({'peak_rss': _peak_rss(), 'peak_device_bytes': session.peak_device_bytes()})
      return


class Worker:
  """The parent's handle on a worker process."""

  def __init__(self, name: str, argv: list[str], threads: int):
    env = dict(os.environ)
    # Two frameworks share the device: JAX must not reserve most of its memory up front.
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    if name == 'jax' and threads == 1:
      env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + ' ' + XLA_ONE_THREAD
    self.name = name
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f'--worker={name}']
                                 + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)

  def request(self, command: str | None = None) -> dict:
    if command:
      self.proc.stdin.write(command + '\n')
      self.proc.stdin.flush()
    for line in self.proc.stdout:
      if line.startswith(_REPLY):
        return json.loads(line[len(_REPLY):])
      sys.stderr.write(line)
    raise RuntimeError(f'{self.name} worker exited with status {self.proc.wait()}')


def _fmt(value, scale=1.0, digits=2) -> str:
  return '-' if value is None else f'{value / scale:.{digits}f}'


def compile_only(args, info: dict) -> None:
  """Prints what XLA reports for the compiled step without running it."""
  print(f'adapt step, {args.height}x{args.width}, ResNet blocks '
        f'{LAYERS.get(args.layers) or args.layers}, width {args.base_width}, {args.dtype}, '
        f'batch 1 source{"" if args.source_only else " + 1 target"}, compiled for '
        f'{info["device_kind"]}, not run')
  arguments, temporaries = (info.get(k, 0) / 2**30 for k in ('xla_argument_bytes',
                                                             'xla_temp_bytes'))
  print(f'compile {info["compile_s"]:.1f} s; {info["flops"] / 1e12:.3f} TFLOP per iteration '
        f'(XLA cost analysis); parameters {info["params"]:,}')
  print(f'XLA buffers: arguments (state, batch, GMMs) {arguments:.2f} GiB + '
        f'temporaries {temporaries:.2f} GiB = {arguments + temporaries:.2f} GiB')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'date': time.strftime('%Y-%m-%d'), 'jax': info}, f, indent=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--height', type=int, default=321)
  parser.add_argument('--width', type=int, default=321)
  parser.add_argument('--layers', default='101',
                      help=f'ResNet blocks per layer: one of {sorted(LAYERS)} or e.g. 3,4,6,3')
  parser.add_argument('--base_width', type=int, default=64, help='stem channels (64: ResNet)')
  parser.add_argument('--steps', type=int, default=3, help='timed iterations per framework')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--frameworks', default='jax,torch')
  parser.add_argument('--threads', type=int, default=0,
                      help='CPU: N pins both workers to the same N cores and gives PyTorch N '
                           'intra-op threads (1: XLA Eigen single-threaded too); 0 keeps the '
                           'defaults (every core)')
  parser.add_argument('--torch_device', default='auto', choices=('auto', 'cpu'))
  parser.add_argument('--peak_tflops', type=float, default=0.0,
                      help='device peak for the MFU (default: known GPUs by name)')
  parser.add_argument('--profile_dir', default='', help='jax.profiler trace of one depthuda step')
  parser.add_argument('--json', default='', help='also write the results to this file')
  parser.add_argument('--system_malloc', action='store_true',
                      help="depthuda on the C library's default malloc settings, as "
                           'depthuda.main runs (hostmem.py left out)')
  parser.add_argument('--compile_only', action='store_true',
                      help="depthuda's step compiled, not run: compile time, FLOPs and XLA's "
                           'temporaries (a full-resolution estimate on a CPU)')
  parser.add_argument('--source_only', action='store_true',
                      help='depthuda without the target pass (no adversarial or target density '
                           'loss): with --compile_only, what one domain holds')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args, _ = parser.parse_known_args()
  if args.worker:
    return worker(args)

  if args.source_only and not args.compile_only:
    parser.error('--source_only is for --compile_only (the PyTorch reference has no such mode)')
  argv = [a for a in sys.argv[1:] if not a.startswith('--json')]
  if args.compile_only:
    jax_worker = Worker('jax', argv, args.threads)
    compile_only(args, jax_worker.request())
    return jax_worker.proc.wait()
  names = [n for n in args.frameworks.split(',') if n]
  ready, times = {}, {n: [] for n in names}
  faults, system = {n: [] for n in names}, {n: [] for n in names}
  workers = {}
  for name in names:  # Set up one at a time: compiling and the other's warm-up don't overlap.
    workers[name] = Worker(name, argv, args.threads)
    ready[name] = workers[name].request()
  for _ in range(args.steps):
    for name in names:
      reply = workers[name].request('step')
      times[name].append(reply['time'])
      faults[name].append(reply['page_faults'])
      system[name].append(reply['system_s'])
  done = {name: workers[name].request('done') for name in names}
  for w in workers.values():
    w.proc.wait()

  results = {'args': vars(args), 'host': platform.node(), 'cpus': os.cpu_count(),
             'date': time.strftime('%Y-%m-%d'), 'frameworks': {}}
  flops = ready.get('jax', {}).get('flops')
  kind = ready.get('jax', {}).get('device_kind', '')
  peak = args.peak_tflops or next((v[args.dtype != 'bfloat16'] for k, v in PEAK_TFLOPS.items()
                                   if k in kind), 0.0)
  for name in names:
    med = statistics.median(times[name])
    peak_mem = done[name]['peak_device_bytes'] or done[name]['peak_rss']
    rate = flops / med / 1e12 if flops else None
    results['frameworks'][name] = dict(
        ready[name], **done[name], times=times[name], median_s=med, tflops_per_s=rate,
        page_faults=statistics.median(faults[name]), system_s=statistics.median(system[name]),
        mfu=rate / peak if rate and peak else None, peak_memory_bytes=peak_mem)

  layers = LAYERS.get(args.layers) or args.layers
  print(f'\nadapt iteration, {args.height}x{args.width}, ResNet blocks {layers}, width '
        f'{args.base_width}, {args.dtype}, batch 1 source + 1 target; {kind or "?"}, '
        f'{os.cpu_count()} CPUs, threads {args.threads or "default"}; median of {args.steps}')
  fw = results['frameworks']
  rows = [('compile (s)', lambda r: _fmt(r.get('compile_s'))),
          ('first iteration (s)', lambda r: _fmt(r['first_step_s'])),
          ('iteration, median (s)', lambda r: _fmt(r['median_s'], digits=3)),
          ('peak memory in iterations (MiB)', lambda r: _fmt(r['peak_memory_bytes'], 2**20, 0)),
          ('XLA temporaries (MiB)', lambda r: _fmt(r.get('xla_temp_bytes'), 2**20, 0)),
          ('page faults per iteration', lambda r: f'{int(r["page_faults"]):,}'),
          ('system CPU time per iteration (s)', lambda r: _fmt(r['system_s'])),
          ('resident after imports (MiB)', lambda r: _fmt(r['rss_after_imports'], 2**20, 0)),
          ('parameters', lambda r: f'{r["params"]:,}'),
          ('achieved TFLOP/s', lambda r: _fmt(r['tflops_per_s'], digits=3)),
          ('MFU', lambda r: _fmt(r['mfu'] and 100 * r['mfu'], digits=1))]
  print(f'{"":34}' + ''.join(f'{"depthuda" if n == "jax" else "PyTorch":>18}' for n in names))
  for label, fmt in rows:
    print(f'{label:34}' + ''.join(f'{fmt(fw[n]):>18}' for n in names))
  for n in names:
    print(f'{"depthuda" if n == "jax" else "PyTorch"} iterations (s): '
          + ' '.join(f'{t:.2f}' for t in fw[n]['times']))
  if flops:
    print(f'step FLOPs (XLA cost analysis): {flops / 1e12:.3f} TFLOP')
  if len(names) == 2:
    ratio = fw['jax']['median_s'] / fw['torch']['median_s']
    mem = fw['jax']['peak_memory_bytes'] / fw['torch']['peak_memory_bytes']
    results['time_ratio'], results['memory_ratio'] = ratio, mem
    print(f'depthuda / PyTorch: time {ratio:.2f}x, peak memory {mem:.2f}x')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
