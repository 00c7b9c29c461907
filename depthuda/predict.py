r"""Segmentation, depth and density maps for your own images with a trained model.

  python -m depthuda.predict --workdir=runs/toy --input=photos/ --output=predictions/
  python -m depthuda.predict --checkpoint=pretrained/city --config=configs/synthia_city.py \
      --input='streets/**/*.jpg' --output=predictions/

`--workdir=DIR` takes the model of a finished run that its evaluation takes (config.model_selection:
the best or the last of self_train if that stage ran, else of adapt) and the config the run saved as DIR/config.json (`--config` overrides it).
`--checkpoint=PATH` takes a stage folder (DIR/adapt, DIR/self_train), its best/ or checkpoints/
folder, one step folder in these, or a folder written by `python -m depthuda.convert`; it needs
`--config`.

`--input` is a folder (every image directly in it), an image file or a glob pattern (`**`
recurses). Each image is resized to `config.data.input_size` as the training input is (bicubic
with antialiasing, rounded to 8 bits, RGB -> BGR, mean subtracted; PIL's resize here, within one
gray level of the tf.data pipeline's; for a Mapillary config with its aspect kept and padded with
black); the network's outputs are upsampled bilinearly (align corners, as in evaluation) back to
the image's own size (the padding's share cropped off). For an input NAME.EXT the output folder
receives
  NAME_classes.png   class ids, 8-bit gray (the format of the pseudo-labels)
  NAME_seg.png       class colours (the dataset palette)
  NAME_overlay.png   class colours blended over the image
  NAME_depth.png     predicted inverse depth, magma colour map (bright = near), scaled to the
                     image's 1st-99th percentile
  NAME_density.png   predicted density score g(p) in [0, 255], viridis, a fixed range
No TensorFlow: images are read with PIL, the network runs on JAX's default device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import functools
import glob
import json
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from depthuda import checkpointing
from depthuda import cli
from depthuda import fileio
from depthuda import losses
from depthuda import models
from depthuda import reporting
from depthuda import train
from depthuda import validation
from depthuda import visualize
from depthuda.data import labels
from depthuda.data import mapillary
from depthuda.errors import InputError

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm')
DENSITY_RANGE = (0.0, 255.0)  # g(p) = 255 (1 - exp(-s p)) (METHOD §4).

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config; with --workdir defaults to DIR/config.json.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run: its best model and config.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'A stage folder (DIR/adapt), its best/ or checkpoints/ folder, a '
    'step folder in these, or a converted checkpoint folder; needs --config.')
_INPUT = flags.DEFINE_string('input', None, 'Image folder, image file or glob pattern.')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the PNGs (created if needed).')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 8,
    'Images per forward pass, split over the devices (rounded up to a whole number per device).')
flags.mark_flags_as_required(['input', 'output'])


def config_from_workdir(workdir: str):
  """The ConfigDict a run saved as DIR/config.json (tuples come back as lists)."""
  if not fileio.Path(workdir).is_dir():
    raise InputError(f'no such workdir: {workdir}')
  path = fileio.Path(workdir) / 'config.json'
  if not path.is_file():
    raise InputError(f'no config at {path}; pass --config=configs/<experiment>.py')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _selection(config) -> str:
  # A config.json of a run from before model_selection existed: its best model.
  return config.get('model_selection', 'best')


def load_model(config, *, workdir: str | None = None, checkpoint: str | None = None
               ) -> tuple[Any, Any, str]:
  """The segmenter, its restored variables and a description of where they came from."""
  if (workdir is None) == (checkpoint is None):
    raise InputError('give exactly one of --workdir and --checkpoint')
  seg, _ = models.build(config)
  abstract = models.abstract_variables(config, seg)
  if checkpoint is not None:
    variables, info = checkpointing.load_model(checkpoint, _selection(config), abstract, config)
    return seg, variables, info['description']
  if not fileio.Path(workdir).is_dir():
    raise InputError(f'no such workdir: {workdir}')
  selection = _selection(config)
  found = checkpointing.selected_model(workdir, selection)
  if found is None:
    raise InputError(f'no trained model in {workdir}: neither {workdir}/self_train nor '
                     f'{workdir}/adapt holds a checkpoint (run the adapt stage first)')
  stage_dir = fileio.Path(workdir) / found[0]
  with checkpointing.StageCheckpoints(stage_dir) as stages:
    variables, meta = stages.restore_model(selection, abstract)
  return seg, variables, f'{stage_dir} {selection} step {meta["step"]}'


def find_images(pattern: str) -> list[pathlib.Path]:
  """Image files named by a folder, a file or a glob pattern, sorted."""
  if os.path.isdir(pattern):
    paths = [p for p in pathlib.Path(pattern).iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
  elif os.path.isfile(pattern):
    paths = [pathlib.Path(pattern)]
  else:
    paths = [pathlib.Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not paths:
    raise InputError(f'no images at --input={pattern} (a folder of {"/".join(IMAGE_SUFFIXES)} '
                     f'files, an image file or a glob pattern)')
  paths = sorted(paths)
  seen: dict[str, pathlib.Path] = {}
  for path in paths:
    if path.stem in seen:
      raise InputError(f'{seen[path.stem]} and {path} would write the same outputs '
                       f'({path.stem}_*.png); predict them into different folders')
    seen[path.stem] = path
  return paths


def read_rgb(path: pathlib.Path) -> np.ndarray:
  """[H, W, 3] uint8 RGB, upright as the camera's EXIF orientation says."""
  try:
    with Image.open(path) as image:
      return np.asarray(ImageOps.exif_transpose(image).convert('RGB'))
  except (UnidentifiedImageError, OSError) as e:
    raise InputError(f'cannot read image {path}: {e}') from None


def preprocess(image_rgb: np.ndarray, input_size: Sequence[int],
               keep_aspect: bool = False) -> np.ndarray:
  """[H, W, 3] uint8 RGB -> float32 [h, w, 3] BGR minus the mean at (w, h) = `input_size`.

  PIL's bicubic resize (antialiased when shrinking, 8-bit output) is the original's; the
  tf.data pipeline rounds its own bicubic resize to 8 bits to follow it. With `keep_aspect`
  (Mapillary), the image is resized to fit with its aspect kept and padded at the bottom or
  right with black, as the input pipeline does (`mapillary.fitted_size`).
  """
  width, height = (int(v) for v in input_size)
  fitted = (mapillary.fitted_size(image_rgb.shape[1], image_rgb.shape[0], (width, height))
            if keep_aspect else (width, height))
  resized = np.asarray(Image.fromarray(image_rgb).resize(fitted, Image.Resampling.BICUBIC))
  padded = np.zeros((height, width, 3), np.uint8)
  padded[:fitted[1], :fitted[0]] = resized
  return padded[..., ::-1].astype(np.float32) - labels.MEAN_BGR


def _keeps_aspect(config) -> bool:
  """Mapillary's images are fitted and padded (METHOD §2); the other targets' are stretched."""
  return config.data.target == 'mapillary'


@functools.lru_cache(maxsize=None)
def _to_image_size(size: tuple[int, int], padded: tuple[int, int]):
  """Jitted: grid outputs of one image -> class ids and maps at `size` (H, W).

  The outputs cover the whole (padded) input: they are upsampled to `padded` (H', W'), `size`
  with the padding's share added, and cropped to `size` at the top left.
  """

  def finish(logits, density, depth):
    up = lambda x: losses.upsample_bilinear(x[None].astype(jnp.float32),
                                            padded)[0, :size[0], :size[1]]
    return (jnp.argmax(up(logits), -1).astype(jnp.uint8), up(density)[..., 0],
            up(depth)[..., 0])

  return jax.jit(finish)


def _batches(paths: Sequence[pathlib.Path], batch_size: int, input_size: Sequence[int],
             keep_aspect: bool
             ) -> Iterator[tuple[list[pathlib.Path], list[np.ndarray], np.ndarray]]:
  """Chunks of (paths, original RGB images, preprocessed batch padded to `batch_size`)."""
  for start in range(0, len(paths), batch_size):
    chunk = list(paths[start:start + batch_size])
    originals = [read_rgb(p) for p in chunk]
    batch = np.stack([preprocess(image, input_size, keep_aspect) for image in originals])
    if len(chunk) < batch_size:  # One batch shape: no recompilation for the last batch.
      batch = np.concatenate([batch, np.zeros((batch_size - len(chunk),) + batch.shape[1:],
                                              batch.dtype)])
    yield chunk, originals, batch


def write_outputs(output_dir: fileio.PathLike, name: str, image_rgb: np.ndarray,
                  classes: np.ndarray, density: np.ndarray, depth: np.ndarray,
                  num_classes: int) -> None:
  """The five PNGs of one image; every array is [H, W] at the image's size."""
  out = lambda kind: fileio.Path(output_dir) / f'{name}_{kind}.png'
  visualize.save_png(out('classes'), classes)
  visualize.save_png(out('seg'), visualize.colorize(classes, num_classes))
  visualize.save_png(out('overlay'), visualize.overlay(image_rgb, classes, 0.5, num_classes))
  visualize.save_png(out('depth'), visualize.colorize_scalar(depth, cmap='magma'))
  visualize.save_png(out('density'), visualize.colorize_scalar(density, *DENSITY_RANGE,
                                                               cmap='viridis'))


def predict_images(config, seg, variables, paths: Sequence[pathlib.Path],
                   output_dir: fileio.PathLike, batch_size: int = 8, desc: str = 'predict') -> None:
  """Runs the segmenter over `paths` in batches and writes five PNGs per image."""
  if batch_size < 1:
    raise InputError(f'--batch_size must be positive, got {batch_size}')
  if not paths:
    raise InputError('no images to predict')
  fileio.Path(output_dir).mkdir(parents=True, exist_ok=True)
  forward = train.predict_fn(seg)
  # Each batch is split over this process's devices: a whole number of images per device.
  variables, split = validation.local_split(variables)
  per_device = -(-min(batch_size, len(paths)) // split.num_devices)
  batch_size = per_device * split.num_devices
  num_classes = config.data.num_classes
  keep_aspect = _keeps_aspect(config)
  bar = reporting.progress(total=len(paths), desc=desc, unit='img')

  def finish(chunk, originals, outputs):
    for i, (path, image) in enumerate(zip(chunk, originals)):
      grid = [x[i] for x in outputs]
      height, width = image.shape[:2]
      padded = (mapillary.padded_label_size(width, height, tuple(config.data.input_size))[::-1]
                if keep_aspect else (height, width))
      classes, density, depth = jax.device_get(_to_image_size((height, width), padded)(*grid))
      write_outputs(output_dir, path.stem, image, classes, density, depth, num_classes)
      bar.update()

  pending = None
  for chunk, originals, batch in _batches(paths, batch_size, config.data.input_size,
                                          keep_aspect):
    # Dispatched asynchronously: overlaps the writing below.
    outputs = forward(variables, jax.device_put(batch, split))
    if pending is not None:
      finish(*pending)
    pending = (chunk, originals, outputs)
  finish(*pending)
  bar.close()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', cli.USAGE)
  cli.configure_logging()
  try:
    config = _CONFIG.value
    if _WORKDIR.value is None and _CHECKPOINT.value is None:
      raise InputError('give --workdir=DIR (a training run) or --checkpoint=PATH')
    if config is None:
      if _WORKDIR.value is None:
        raise InputError('--checkpoint needs --config=configs/<experiment>.py')
      config = config_from_workdir(_WORKDIR.value)
    paths = find_images(_INPUT.value)
    seg, variables, source = load_model(config, workdir=_WORKDIR.value,
                                        checkpoint=_CHECKPOINT.value)
    predict_images(config, seg, variables, paths, _OUTPUT.value, _BATCH_SIZE.value,
                   desc=f'predict ({source})')
  except (InputError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
    cli.fail(str(e), cli.INPUT)
  print(f'depthuda: wrote {5 * len(paths)} PNGs for {len(paths)} images to {_OUTPUT.value}',
        file=sys.stderr)


if __name__ == '__main__':
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config=_CONFIG))
