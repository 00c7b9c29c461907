"""What depthuda's commands (`main`, `predict`, `convert`) share: help, errors, logging.

Errors are one line on stderr, `depthuda: error: <what and how to fix it>`; the exit status is
2 for a bad command line or config (`USAGE`), 1 for bad input found while working (`INPUT`).
`--help` prints the command's documentation and flags and exits 0.

Logging: depthuda's own progress lines (logger `depthuda`, INFO) show by default, libraries'
INFO notes (Orbax logs every file it opens) do not. An explicit `--verbosity` applies to all:
`--verbosity=-1` leaves warnings and errors only, `--verbosity=0` adds the libraries' notes.
"""

from __future__ import annotations

import logging as std_logging
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging

from depthuda import config_files

USAGE = 2
INPUT = 1
_HELP = ('--help', '-help', '-h', '-?', '--helpshort', '-helpshort')
_HELP_FULL = ('--helpfull', '-helpfull')

log = std_logging.getLogger('depthuda')


def fail(message: str, status: int) -> NoReturn:
  """Prints `depthuda: error: <message>` on one line and exits with `status`."""
  message = ' '.join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f'depthuda: error: {message}', file=sys.stderr)
  sys.exit(status)


def exit_on_help(argv: list[str]) -> None:
  """`--help` (absl exits 1 after printing it) prints the usage and exits 0."""
  if any(arg in _HELP_FULL for arg in argv[1:]):
    app.usage(shorthelp=False, writeto_stdout=True, exitcode=0)
  if any(arg in _HELP for arg in argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)


def parse_flags(argv: list[str], config: flags.FlagHolder | None = None) -> list[str]:
  """absl's flag parsing, `--help` exiting 0 and every error one line with exit status 2.

  config: the command's `--config` flag (ml_collections' config_flags). Its file and the names
  of its `--config.<field>` overrides are checked before absl parses them, the config with the
  overrides applied after (depthuda/config_files.py).
  """
  exit_on_help(argv)
  try:
    argv, check = config_files.prepare(argv) if config is not None else (argv, None)
    rest = flags.FLAGS(argv)
    if check is not None:
      check(config.value)
    return rest
  except flags.Error as e:
    fail(str(e), USAGE)
  except config_files.ConfigError as e:
    fail(str(e), USAGE)


def configure_logging() -> None:
  """depthuda's INFO lines on, libraries' INFO notes off, unless --verbosity says otherwise."""
  if flags.FLAGS['verbosity'].present:
    log.setLevel(std_logging.NOTSET)  # the root logger's level: --verbosity
  else:
    logging.set_verbosity(logging.WARNING)
    log.setLevel(std_logging.INFO)
