"""Naming the file behind a decoding failure inside tf.data.

tf.data's errors say what failed, not in which example. `naming_failures` wraps a stream of
batches: on a failure it decodes the examples again one at a time until one fails, and raises
an InputError naming that example's file (an image that does not decode, or a label with ids
outside the dataset's). Only a failing run pays for the search.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator

import ml_collections
import tensorflow as tf

from depthuda.data import cityscapes
from depthuda.data import synthia
from depthuda.errors import InputError


def _text(value) -> str:
  value = value.numpy() if hasattr(value, 'numpy') else value
  return value.decode() if isinstance(value, bytes) else str(value)


def example_file(config: ml_collections.ConfigDict, example: dict, key: str | None,
                  finish_dir: str | None = None) -> str:
  """The file that feature `key` of `example` was read from, for error messages (key None:
  the file that `finish` reads from `finish_dir`, else the example as a whole)."""
  name = _text(example['name'] if 'name' in example else example['image_id'])
  if key is None and finish_dir:
    return os.path.join(finish_dir, name + '.png')
  if 'depth' in example:  # SYNTHIA
    folder = synthia.find_folders(config.data.source_dir).get(key, '*')
    return os.path.join(config.data.source_dir, folder, name + '.png')
  if 'image_left' in example:  # Cityscapes, read from its zips
    images_zip, labels_zip = (os.path.join(config.data.target_dir, z) for z in cityscapes.ZIPS)
    if key == 'segmentation_label':
      return f'{name}_gtFine_labelIds.png in {labels_zip}'
    return f'{name}_leftImg8bit.png in {images_zip}'
  return _text(example[key]) if key else name  # examples that are file paths


def tf_message(error: Exception) -> str:
  """The first line of a TensorFlow error, without its op and function decorations (the
  format is pinned by tests/test_errors.py)."""
  message = str(getattr(error, 'message', error)).strip()
  if 'Summarized data: ' in message:  # a failed tf.debugging.Assert: its data is the message
    parts = message.split('Summarized data: ', 1)[1].splitlines()
    return ' '.join(re.sub(r"^b'(.*)'$", r'\1', part.strip()) for part in parts)
  message = message.splitlines()[0]
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', message)
  return re.sub(r'\s*\[(Op:|\[).*$', '', message)


def _find_bad_file(examples: tf.data.Dataset, decode: Callable,
                   file_of: Callable[[dict, str | None], str]) -> str | None:
  """Decodes `examples` one at a time until one fails; names its file and the error."""
  for example in examples:
    try:
      decode(example)
      continue
    except (tf.errors.OpError, InputError) as e:
      error = tf_message(e)
    for key, value in example.items():
      if value.dtype != tf.string or key in ('name', 'image_id'):
        continue
      raw = value.numpy()
      path = raw.decode('utf-8', 'replace') if len(raw) < 4096 else ''
      try:
        tf.io.decode_image(tf.io.read_file(path) if os.path.isfile(path) else value,
                           expand_animations=False)
      except tf.errors.OpError as e:
        return f'{file_of(example, key)}: cannot decode the image ({tf_message(e)})'
    # A label id check failed (decode_label): the label file is the one to name.
    key = next((k for k in example if 'label' in k), None) if 'label id' in error else None
    return f'{file_of(example, key)}: {error}'
  return None


def naming_failures(batches: Iterator[dict], examples: tf.data.Dataset, decode: Callable,
                  file_of: Callable[[dict, str | None], str]) -> Iterator[dict]:
  """`batches`, with a decoding failure inside tf.data raised as an InputError naming the file.

  tf.data's error does not say which example failed: after one, the examples are decoded
  again one at a time until it recurs (only a failing run pays for the search).
  """
  try:
    yield from batches
  except tf.errors.OpError as e:
    found = _find_bad_file(examples, decode, file_of)
    raise InputError(found or f'cannot read the data: {tf_message(e)}') from None
