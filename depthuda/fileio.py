"""Every file of a workdir goes through this path layer, so `--workdir=gs://bucket/run` works.

Paths are `etils.epath.Path`, what Orbax uses for the checkpoints: a local path goes through
`os`, a URL (`gs://`, `s3://`) through `tf.io.gfile` (or fsspec where TensorFlow is absent).

`write_atomic` writes a temporary sibling, then renames it onto the target. On a local or
POSIX filesystem the rename is atomic: a reader (a resumed run) sees the old file or the new
one, never a half-written one, and a run killed while writing leaves the old file and a
`.<name>.<random>.tmp` behind. On an object store a rename is a copy and a delete, not atomic;
an object still only appears once its upload is complete, so a reader never sees a part of a
file there either, but a run killed between the copy and the delete leaves the temporary
object next to the complete target.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import uuid

import numpy as np
from etils import epath

Path = epath.Path
PathLike = epath.PathLike


def is_url(path: PathLike) -> bool:
  """`gs://bucket/x` and the like: paths that `os` must not touch."""
  return '://' in os.fspath(path)


def absolute(path: PathLike) -> Path:
  """A local path made absolute (Orbax and cache keys need one); a URL as it is."""
  return Path(path) if is_url(path) else Path(os.path.abspath(path))


def write_atomic(path: PathLike, data: bytes | str) -> None:
  """Writes `data` (text as UTF-8) to `path` through a temporary sibling and a rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # A unique name: processes writing the same file never share a temporary one.
  tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:12]}.tmp'
  try:
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_npz(path: PathLike, **arrays: np.ndarray) -> None:
  """`np.savez` of `arrays` to `path`, atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_atomic(path, buffer.getvalue())


def is_temporary(name: str) -> bool:
  """Whether a file name is one of `write_atomic`'s temporary files."""
  return name.startswith('.') and name.endswith('.tmp')


@contextlib.contextmanager
def local_lock(path: str):
  """Holds an exclusive lock on the local file `path` (created with its folder), serialising the
  block among this host's processes."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
