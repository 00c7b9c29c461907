"""Data parallelism over a 1-D `data` mesh of every device of every process.

The train steps are written per device and mapped over the mesh with `jax.shard_map` inside
`jax.jit` (`make_sharded_step`); batches are split over the `data` axis and put on the devices
ahead of the step (`prefetch_to_mesh`); everything else is replicated (`replicate`).
"""

from __future__ import annotations

import collections
import functools
import itertools
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D `data` mesh over every device of every process."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, (AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n or batch_size % jax.process_count():
    raise ValueError(f'config.batch_size={batch_size} must be divisible by the number of devices '
                     f'({n}) and processes ({jax.process_count()}).')


def make_sharded_step(step_fn: Callable, mesh: Mesh, **kwargs):
  """jit(shard_map(step_fn)): state (and other leading args) replicated, batch split on `data`.

  The returned function takes (state, batch, *extra) and donates the state.
  """
  per_device = functools.partial(step_fn, axis_name=AXIS, **kwargs)

  def mapped(state, batch, *extra):
    return jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(), P(AXIS)) + (P(),) * len(extra), out_specs=(P(), P()))(state, batch, *extra)

  return jax.jit(mapped, donate_argnums=(0,))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Process-local numpy batch -> global arrays split over the `data` axis."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch_to_mesh(batches: Iterator[Any], mesh: Mesh, size: int = 2) -> Iterator[Any]:
  """`shard_batch` of each process-local batch, `size` batches ahead of the consumer.

  A batch is put on the devices (asynchronously) before the step that reads it starts, so that
  the host-to-device copy of step i+1 overlaps step i's computation: double buffering with the
  default size of 2.
  """
  queue = collections.deque()
  batches = iter(batches)

  def enqueue(n):
    for batch in itertools.islice(batches, n):
      queue.append(shard_batch(batch, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` on every device of `mesh`, from the same values in every process.

  Through the host: an array committed to one local device (a restored checkpoint) cannot be
  moved onto a mesh that spans other processes' devices.
  """
  return jax.device_put(jax.device_get(tree), NamedSharding(mesh, P()))
