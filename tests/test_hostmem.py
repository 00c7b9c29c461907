"""depthuda.hostmem: freed memory stays mapped (no page faults the second time); CPU-only check."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

from depthuda import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Mallocs 256 MiB, writes every page and frees it, 3 times, as XLA's CPU runtime does with a
# step's temporaries; prints the minor page faults of the last two rounds.
_ROUNDS = r'''
import ctypes, resource, sys
from depthuda import hostmem
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
def test_freed_block_is_reused_without_page_faults_on_cpu_only_hosts():
  pages = (256 << 20) // os.sysconf('SC_PAGE_SIZE')
  # Mapped afresh each time (with transparent huge pages: fewer, larger faults).
  assert _faults(keep=False, platforms='cpu', made=False) > pages // 4
  assert _faults(keep=True, platforms='cuda', made=False) > pages // 4  # An accelerator host.
  assert _faults(keep=True, platforms='cpu', made=True) < 100


def test_cpu_only_follows_jax_platforms_then_installed_plugins(monkeypatch):
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
