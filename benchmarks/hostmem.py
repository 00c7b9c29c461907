"""Host memory for CPU timings: freed memory stays mapped for the next training step.

XLA's CPU runtime takes a step's temporaries from malloc as one block (2.6 GB for a 321x321
ResNet-101 adaptation step). glibc serves blocks that large with a fresh mmap and unmaps them
when they are freed, so every step page-faults its whole working set in again: 630,000 minor
faults and 1.2-2.5 s of system time per step on two cores; the step ran up to 12% slower for
it (`RESULTS.md`, section 1). With one malloc arena that neither maps large blocks separately
nor returns freed memory to the system, the block is reused from one step to the next without
a fault.

A tuning of CPU timings, not part of depthuda: `train_step.py` and `profile_step.py` make the
settings (`configure`) before they import JAX (a thread keeps the arena it first allocated
from), only where JAX can only run on the CPU; on GPU and TPU hosts the step's temporaries
live on the device. With one arena the threads of a small run wait on each other:
`configs/test.py`'s whole pipeline took 8% longer (58-61 s against 48-61 s, four runs each).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def cpu_only() -> bool:
  """True if JAX will run on the CPU alone: JAX_PLATFORMS is 'cpu', or no accelerator plugin
  (a `jax_plugins` module or entry point, or libtpu) is installed. Imports nothing heavy."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms == 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return False
  if importlib.util.find_spec('jax_plugins') is not None:
    return False
  return not importlib.metadata.entry_points(group='jax_plugins')


def keep_freed_memory_mapped() -> bool:
  """One malloc arena, no separate mappings for large blocks, no trimming (glibc's mallopt).

  Returns True if glibc took the settings; False where the C library is not glibc. Threads
  that have allocated already keep their arenas: call this before JAX starts.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc only
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # -1 disables trimming altogether (the threshold is read as an unsigned size).
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def configure(keep_freed_memory: bool = True) -> bool:
  """`keep_freed_memory_mapped()` where `cpu_only()`, before JAX is imported. Returns whether
  the settings were made."""
  return keep_freed_memory and cpu_only() and keep_freed_memory_mapped()
