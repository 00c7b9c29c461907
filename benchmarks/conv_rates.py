r"""The ResNet-101 step's largest operations, one by one: XLA (YNNPACK, Eigen) against PyTorch.

  python benchmarks/conv_rates.py                # one core: both pinned, single-threaded
  python benchmarks/conv_rates.py --threads=0    # all cores, each framework's default threads
  python benchmarks/conv_rates.py --forms        # also the 3x3 ones as matrix products in XLA

At a 321x321 input the trunk runs at a 41x41 grid (output stride 8). Timed, per operation:
forward alone, then forward with both gradients (input and weight), for
- the 3x3 convolutions of layer3 (256 channels, dilation 2) and layer4 (512, dilation 4),
  half of a step's time;
- a 1x1 convolution of layer3 as a matrix product (1024 -> 256 channels).
Both frameworks get the same shapes and the same operations (`conv_general_dilated` /
`F.conv2d`, `dot` / `@`), alternate in `--repeats` rounds of `--iters` calls, and each
operation reports its best round's time per call and the rate in GFLOP/s. `train_step.py`
times the whole iteration; this separates the kernels from the rest of it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # pylint: disable=wrong-import-position  # Imports no JAX.

GRID = 41
# name, input channels, output channels, kernel side, dilation
OPS = (('layer3 3x3, dilation 2', 256, 256, 3, 2),
       ('layer4 3x3, dilation 4', 512, 512, 3, 4),
       ('layer3 1x1 (product)', 1024, 256, 1, 1))


def conv3x3_forms():
  """A dilated 3x3 convolution written four ways, (x [1, h, w, C_in], w [3, 3, C_in, C_out], d).

  'conv' is `conv_general_dilated` (YNNPACK's kernels on CPU); the others are matrix products:
  'im2col' one product of the 9 shifted copies of x side by side; 'nine products' one product
  per tap, summed; 'taps out' one product of x with all 9 taps' kernels, whose 9 outputs are
  shifted and summed (the ASPP's form before it went back to convolutions). All compute the same
  values and gradients.
  """
  import jax
  import jax.numpy as jnp

  def conv(x, w, d):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((d, d), (d, d)), rhs_dilation=(d, d),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def taps_in(x, d):
    h, wd = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
    return [xp[:, i * d:i * d + h, j * d:j * d + wd] for i in range(3) for j in range(3)]

  def im2col(x, w, d):
    cols = jnp.concatenate(taps_in(x, d), -1)
    return (cols.reshape(-1, cols.shape[-1]) @ w.reshape(-1, w.shape[-1])).reshape(
        x.shape[:3] + w.shape[-1:])

  def nine(x, w, d):
    products = [t.reshape(-1, x.shape[-1]) @ w[i // 3, i % 3] for i, t in enumerate(taps_in(x, d))]
    return sum(products).reshape(x.shape[:3] + w.shape[-1:])

  def taps_out(x, w, d):
    (_, h, wd, c_in), c_out = x.shape, w.shape[-1]
    z = (x.reshape(-1, c_in) @ jnp.transpose(w, (2, 0, 1, 3)).reshape(c_in, 9 * c_out))
    zp = jnp.pad(z.reshape(1, h, wd, 9 * c_out), ((0, 0), (d, d), (d, d), (0, 0)))
    return sum(zp[:, (t // 3) * d:(t // 3) * d + h, (t % 3) * d:(t % 3) * d + wd,
                  t * c_out:(t + 1) * c_out] for t in range(9))

  return {'conv': conv, 'im2col': im2col, 'nine products': nine, 'taps out': taps_out}


def jax_ops(c_in, c_out, k, d, form='conv'):
  """(forward, forward + both gradients) as jitted functions of (x, w), and their arguments."""
  import jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.key(0), (1, GRID, GRID, c_in))
  w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out)) * 0.01
  if k == 1:
    def forward(x, w):
      return jnp.dot(x.reshape(-1, c_in), w[0, 0])
  else:
    conv = conv3x3_forms()[form]
    forward = lambda x, w: conv(x, w, d)
  both = jax.grad(lambda x, w: jnp.sum(forward(x, w) ** 2), argnums=(0, 1))
  return jax.jit(forward), jax.jit(both), (x, w), jax.block_until_ready


def torch_ops(c_in, c_out, k, d):
  import torch
  import torch.nn.functional as F
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(1, c_in, GRID, GRID, generator=gen)
  w = (torch.randn(c_out, c_in, k, k, generator=gen) * 0.01)
  if k == 1:
    x = x.permute(0, 2, 3, 1).reshape(-1, c_in).contiguous()
    w = w[:, :, 0, 0].t().contiguous()
    def forward(x, w):
      return x @ w
  else:
    def forward(x, w):
      return F.conv2d(x, w, padding=d, dilation=d)
  def both(x, w):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    forward(x, w).pow(2).sum().backward()
    return x.grad, w.grad
  def no_grad_forward(x, w):
    with torch.no_grad():
      return forward(x, w)
  return no_grad_forward, both, (x, w), lambda out: out


def mean_ms(fn, args, ready, iters):
  """Mean time per call of `iters` calls, in ms."""
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  ready(out)
  return 1e3 * (time.perf_counter() - start) / iters


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--threads', type=int, default=1,
                      help='1: one core, both single-threaded; N: the last N cores; 0: all')
  parser.add_argument('--iters', type=int, default=10, help='calls per round')
  parser.add_argument('--repeats', type=int, default=3, help='rounds, alternating frameworks')
  parser.add_argument('--forms', action='store_true',
                      help='also the 3x3 convolutions as matrix products (conv3x3_forms)')
  args = parser.parse_args()
  train_step.pin_to_cores(args.threads)
  if args.threads == 1:
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' ' + train_step.XLA_ONE_THREAD
  import torch  # pylint: disable=import-outside-toplevel  # After the cores are chosen.
  if args.threads:
    torch.set_num_threads(args.threads)
  print(f'{GRID}x{GRID} grid, float32, threads: {args.threads or "default"}; best of '
        f'{args.repeats} rounds of {args.iters} calls; ms per call (GFLOP/s)')
  print(f'{"operation":48s} {"XLA":>16s} {"PyTorch":>16s} {"XLA / PyTorch":>14s}')
  for name, c_in, c_out, k, d in OPS:
    flops = 2.0 * GRID * GRID * c_in * c_out * k * k
    made = {'jax': jax_ops(c_in, c_out, k, d), 'torch': torch_ops(c_in, c_out, k, d)}
    if args.forms and k == 3:
      made.update({f: jax_ops(c_in, c_out, k, d, f) for f in conv3x3_forms() if f != 'conv'})
    for part, index, passes in (('forward', 0, 1), ('forward + both gradients', 1, 3)):
      calls = {fw: (ops[index], fn_args, ready) for fw, (*ops, fn_args, ready) in made.items()}
      for fn, fn_args, ready in calls.values():
        ready(fn(*fn_args))  # Compile / warm up.
      times = {fw: float('inf') for fw in calls}
      for _ in range(args.repeats):  # Alternating frameworks.
        for fw, call in calls.items():
          times[fw] = min(times[fw], mean_ms(*call, args.iters))
      cells = {fw: f'{times[fw]:7.1f} ({passes * flops / times[fw] / 1e6:4.0f})' for fw in made}
      print(f'{name + ", " + part:48s} {cells["jax"]:>16s} {cells["torch"]:>16s} '
            f'{times["jax"] / times["torch"]:13.2f}x', flush=True)
      for form in list(made)[2:]:
        print(f'{"  XLA, as " + form:48s} {cells[form]:>16s} {"":>16s} '
              f'{times[form] / times["torch"]:13.2f}x', flush=True)


if __name__ == '__main__':
  main()
