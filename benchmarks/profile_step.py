r"""Where one adaptation iteration spends its time: a jax.profiler trace, aggregated.

  python benchmarks/profile_step.py --height=321 --width=321 --layers=101 --threads=1
  python benchmarks/profile_step.py --layers=tiny --height=97 --width=97 --base_width=16

Builds the step exactly as `train_step.py` does (production `train.adapt_step`, one-device mesh),
runs it twice, then traces one more iteration and prints:
- op time by XLA op kind and output shape (fusions named by XLA, e.g. `ynn_fusion` for
  YNNPACK's, `dot` for Eigen's GEMMs, `copy_*`/`transpose_*` for layout changes), from the
  trace's events matched to the optimized HLO;
- op time by the depthuda source file that emitted the op (the HLO's stack frames): the model,
  the losses, the density targets and GMM, the optimizers;
so that a slow op can be traced back to the line that wrote it. `--threads=1` pins the process
to one core and runs XLA single-threaded, as `train_step.py --threads=1` does. The trace is
kept under --trace_dir for TensorBoard's profile plugin.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# Source files, by path fragment, in the order they are tried (innermost frame first).
GROUPS = (('density targets, GMM', ('depthuda/density.py', 'depthuda/gmm.py')),
          ('losses', ('depthuda/losses.py',)),
          ('model', ('depthuda/models/',)),
          ('optimizers', ('/optax/',)))


def parse_hlo(text: str):
  """Instruction -> stack frame ids (a fusion's include those of its body) and frame chains."""
  tables = {'FileNames': {}, 'FileLocations': {}, 'StackFrames': {}}
  section, computation = None, None
  frames_of_computation = collections.defaultdict(set)
  frames_of_op, calls, shape_of = collections.defaultdict(set), {}, {}
  for line in text.splitlines():
    if line in tables:
      section = line
      continue
    if section:
      m = re.match(r'(\d+) (.*)', line)
      if m:
        tables[section][int(m.group(1))] = m.group(2)
        continue
      section = None
    m = re.match(r'(?:ENTRY )?%?([\w.-]+) \(', line)
    if m and not line.startswith(' '):
      computation = m.group(1)
      continue
    m = re.match(r'\s*(?:ROOT )?%([\w.-]+) = (\S+?)(?:\{[^}]*\})? ', line)
    if not m:
      continue
    name = m.group(1)
    shape_of[name] = m.group(2)
    frame = re.search(r'stack_frame_id=(\d+)', line)
    if frame:
      frames_of_computation[computation].add(int(frame.group(1)))
      frames_of_op[name].add(int(frame.group(1)))
    called = re.search(r'calls=%([\w.-]+)', line)
    if called:
      calls[name] = called.group(1)
  files = {i: s.strip('"') for i, s in tables['FileNames'].items()}
  location_file = {i: int(re.search(r'file_name_id=(\d+)', s).group(1))
                   for i, s in tables['FileLocations'].items()}
  stack = {}
  for i, s in tables['StackFrames'].items():
    location = int(re.search(r'file_location_id=(\d+)', s).group(1))
    parent = int(re.search(r'parent_frame_id=(\d+)', s).group(1))
    stack[i] = (files.get(location_file.get(location), '?'), parent - 1)  # parent is 1-based

  def source_files(op: str) -> list[str]:
    out = []
    for frame in frames_of_op.get(op, set()) | frames_of_computation.get(calls.get(op), set()):
      seen = set()
      while frame in stack and frame not in seen:
        seen.add(frame)
        path, frame = stack[frame]
        out.append(path)
    return out

  return shape_of, source_files


def group_of(paths: list[str]) -> str:
  if not paths:  # Ops XLA built itself; on CPU mostly the convolutions' kernel gradients.
    return 'no call stack recorded (convolution kernel gradients, layout copies)'
  for group, fragments in GROUPS:
    if any(f in p for p in paths for f in fragments):
      return group
  return 'other'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--height', type=int, default=321)
  parser.add_argument('--width', type=int, default=321)
  parser.add_argument('--layers', default='101')
  parser.add_argument('--base_width', type=int, default=64)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--threads', type=int, default=0,
                      help='N: the last N cores (1: XLA single-threaded too); 0: all')
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--trace_dir', default='/tmp/depthuda_profile')
  args = parser.parse_args()
  import train_step  # pylint: disable=import-outside-toplevel  # Imports no JAX.
  train_step.pin_to_cores(args.threads)
  if args.threads == 1:
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' ' + train_step.XLA_ONE_THREAD
  import hostmem  # pylint: disable=import-outside-toplevel
  hostmem.configure()  # As train_step.py, before JAX starts its threads.
  import jax  # pylint: disable=import-outside-toplevel  # After XLA_FLAGS is set.

  session = train_step.JaxSession(argparse.Namespace(**vars(args), profile_dir='',
                                                    source_only=False))
  print(f'compile {session.info["compile_s"]:.1f} s')
  for _ in range(2):
    start = time.perf_counter()
    session.step()
    print(f'iteration {time.perf_counter() - start:.3f} s')
  shutil.rmtree(args.trace_dir, ignore_errors=True)
  with jax.profiler.trace(args.trace_dir):
    start = time.perf_counter()
    session.step()
    print(f'traced iteration {time.perf_counter() - start:.3f} s')

  shape_of, source_files = parse_hlo(session.step_fn.as_text())
  trace = glob.glob(os.path.join(args.trace_dir, '**', '*.xplane.pb'), recursive=True)[0]
  by_op, count, by_group = collections.Counter(), collections.Counter(), collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(trace).planes:
    for line in plane.lines:
      if line.name == 'python':
        continue
      for event in line.events:
        if event.name not in shape_of:  # Executor and wait events, not ops.
          continue
        key = (re.sub(r'\.\d+$', '', event.name), shape_of[event.name])
        by_op[key] += event.duration_ns
        count[key] += 1
        by_group[group_of(source_files(event.name))] += event.duration_ns
  total = sum(by_op.values())
  print(f'\nop time {total / 1e9:.3f} s (all threads; one core with --threads=1)')
  print(f'{"s":>8} {"share":>6} {"calls":>5}  op, output shape')
  for (op, shape), ns in by_op.most_common(args.top):
    print(f'{ns / 1e9:8.3f} {100 * ns / total:5.1f}% {count[op, shape]:5d}  {op} {shape}')
  print('\nby source (the first group whose files are on the op\'s call stack):')
  for group, ns in by_group.most_common():
    print(f'{ns / 1e9:8.3f} {100 * ns / total:6.2f}%  {group}')


if __name__ == '__main__':
  main()
