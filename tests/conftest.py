"""Every test process sees 4 CPU devices, so multi-device code is tested against 1 device."""

import os

# Tiny models: compile time dominates, so XLA's backend optimisations are not worth it.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

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
