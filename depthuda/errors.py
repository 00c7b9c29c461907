"""The exceptions for expected failures: bad input, missing files, wrong settings, a stop signal.

`depthuda.main` prints these as a single line (no traceback): an `InputError` exits with status
1, an `Interrupted` run with 128 + the signal number, as a shell reports a killed command.
"""

from __future__ import annotations

import os
import re


class InputError(Exception):
  """A problem with the user's data, files or configuration; the message names the culprit."""


class Interrupted(Exception):
  """SIGTERM or SIGINT stopped the run (after saving a checkpoint where a stage keeps one)."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


def write_failure(path: str | os.PathLike[str], error: BaseException) -> InputError | None:
  """An InputError naming `path` if `error` is a failed write (disk full, no permission, ...).

  Orbax reports the operating system's error inside a ValueError from TensorStore
  ("... [os_error_code='28']"); plain OSErrors carry errno. A full disk cannot be checked for
  up front; tests/test_errors.py (the full-disk run) pins the TensorStore text.
  """
  code = getattr(error, 'errno', None) if isinstance(error, OSError) else None
  if code is None:
    match = re.search(r"os_error_code='(\d+)'", str(error))
    code = int(match.group(1)) if match else None
  if code is None:
    return None
  return InputError(f'cannot write {path}: {os.strerror(code)}')
