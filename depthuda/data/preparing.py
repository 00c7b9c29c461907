"""One-off TFDS preparation, announced: what is prepared, where, and roughly how long, then
TFDS's own progress bars (which depthuda keeps off otherwise: main.py disables them)."""

from __future__ import annotations

import contextlib
import sys

import tensorflow_datasets as tfds


@contextlib.contextmanager
def announced(what: str, where: str, num_images: int, seconds_per_image: float):
  """Prints one line before a `download_and_prepare` of `num_images` and shows its bars.

  `seconds_per_image` is a rough figure for one CPU core and a local disk (README, Datasets).
  """
  minutes = max(1, round(num_images * seconds_per_image / 60))
  print(f'depthuda: preparing {what} ({num_images:,} images) into {where}, once; '
        f'roughly {minutes} min (an estimate), later runs reuse it', file=sys.stderr, flush=True)
  tfds.display_progress_bar(True)
  try:
    yield
  finally:
    tfds.display_progress_bar(False)
