"""Every test process sees 4 CPU devices, so multi-device code is tested against 1 device."""

import atexit
import os
import shutil
import tempfile

# Tiny models: compile time dominates, so XLA's backend optimisations are not worth it.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# JAX's persistent compilation cache, one per test session (pytest-xdist's workers inherit it
# from the process that starts them): identical programs compile once across tests and across
# the `depthuda.main` subprocesses. A loaded program is the compiled one, so results are equal.
if 'DEPTHUDA_TEST_XLA_CACHE' not in os.environ:
  os.environ['DEPTHUDA_TEST_XLA_CACHE'] = tempfile.mkdtemp(prefix='depthuda-test-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['DEPTHUDA_TEST_XLA_CACHE'], ignore_errors=True)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.environ['DEPTHUDA_TEST_XLA_CACHE'])
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import uuid

import pytest
from etils import epath
from etils.epath import backend
from etils.epath import gpath


@epath.register_path_cls('ram://')
class _RamPath(gpath.PosixGPath):
  """epath over TensorFlow's in-memory `ram://` filesystem, which stands for an object store
  such as gs:// in tests: same process only, no network. epath knows gs://, s3://, az:// and
  hf:// by name; this adds ram:// with the backend epath gives gs:// when TensorFlow is present."""

  @property
  def _path_str(self) -> str:
    return 'ram://' + '/'.join(self.parts[1:])  # parts: ('ram:', 'bucket', ...)

  @property
  def _backend(self) -> backend.Backend:
    return backend.tf_backend


@pytest.fixture
def remote_dir():
  """A fresh directory on `ram://` (a URL, so `os` cannot reach it) as a string."""
  return f'ram://depthuda-test-{uuid.uuid4().hex[:8]}'
