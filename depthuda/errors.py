"""The one exception type for expected failures: bad input, missing files, wrong settings.

`depthuda.main` prints these as a single line (no traceback) and exits with status 1.
"""


class InputError(Exception):
  """A problem with the user's data, files or configuration; the message names the culprit."""
