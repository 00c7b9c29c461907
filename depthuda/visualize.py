"""Pictures for humans: coloured label maps, panels, confusion matrices, curves.

NumPy + PIL, and matplotlib through its object-oriented Agg canvas only (no
pyplot), so importing this module changes no global backend state and works
without a display.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import io
import json
import os
import pathlib
import tempfile
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# BGR mean subtracted from input images (METHOD §2).
IMAGE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

# Cityscapes colours of the 16 SYNTHIA classes, in class order.
CITYSCAPES16_PALETTE = np.array([
    (128, 64, 128),   # road
    (244, 35, 232),   # sidewalk
    (70, 70, 70),     # building
    (102, 102, 156),  # wall
    (190, 153, 153),  # fence
    (153, 153, 153),  # pole
    (250, 170, 30),   # traffic light
    (220, 220, 0),    # traffic sign
    (107, 142, 35),   # vegetation
    (70, 130, 180),   # sky
    (220, 20, 60),    # person
    (255, 0, 0),      # rider
    (0, 0, 142),      # car
    (0, 60, 100),     # bus
    (0, 0, 230),      # motorcycle
    (119, 11, 32),    # bicycle
], dtype=np.uint8)

# The 7 groups take the Cityscapes colour of a representative class.
CITYSCAPES7_PALETTE = np.array([
    (128, 64, 128),   # flat (road)
    (70, 70, 70),     # construction (building)
    (153, 153, 153),  # object (pole)
    (107, 142, 35),   # nature (vegetation)
    (70, 130, 180),   # sky
    (220, 20, 60),    # human (person)
    (0, 0, 142),      # vehicle (car)
], dtype=np.uint8)


def palette(num_classes: int) -> np.ndarray:
  """[num_classes, 3] uint8 RGB colours; Cityscapes for 16 and 7 classes.

  Other class counts (toy data) use matplotlib's qualitative 'tab20' colours.
  """
  if num_classes == 16:
    return CITYSCAPES16_PALETTE.copy()
  if num_classes == 7:
    return CITYSCAPES7_PALETTE.copy()
  if not 1 <= num_classes <= 20:
    raise ValueError(f'No palette for {num_classes} classes (1 to 20 supported).')
  colours = matplotlib.colormaps['tab20'].colors[:num_classes]
  return np.round(np.asarray(colours) * 255).astype(np.uint8)


def colorize(label: Any, num_classes: int = 16) -> np.ndarray:
  """[H, W] class ids -> [H, W, 3] uint8 RGB; ignore (any id outside [0, C)) is black."""
  label = np.asarray(label).astype(np.int64)
  table = np.zeros((num_classes + 1, 3), np.uint8)  # last row: black
  table[:num_classes] = palette(num_classes)
  index = np.where((label >= 0) & (label < num_classes), label, num_classes)
  return table[index]


def colorize_scalar(x: Any, vmin: float | None = None, vmax: float | None = None,
                    cmap: str = 'magma') -> np.ndarray:
  """[H, W] scalar map (depth, density, entropy) -> [H, W, 3] uint8 RGB.

  vmin / vmax default to the finite range of x; non-finite values are black.
  """
  x = np.asarray(x, np.float64)
  finite = np.isfinite(x)
  if vmin is None:
    vmin = float(x[finite].min()) if finite.any() else 0.0
  if vmax is None:
    vmax = float(x[finite].max()) if finite.any() else 1.0
  span = vmax - vmin
  scaled = np.clip((x - vmin) / span, 0.0, 1.0) if span > 0 else np.zeros_like(x)
  rgb = matplotlib.colormaps[cmap](np.where(finite, scaled, 0.0))[..., :3]
  rgb = np.round(rgb * 255).astype(np.uint8)
  rgb[~finite] = 0
  return rgb


def _resize(image: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
  return np.asarray(Image.fromarray(image).resize((width, height), resample))


def overlay(image_rgb: np.ndarray, label: Any, alpha: float = 0.5,
            num_classes: int = 16) -> np.ndarray:
  """Blends class colours over an image; ignored pixels show the image alone.

  The label map is nearest-resized to the image if their sizes differ (e.g. a
  full-resolution prediction over an input-size image).

  Args:
    image_rgb: [H, W, 3] uint8.
    label: [h, w] class ids.
    alpha: weight of the class colour.
    num_classes: C, selects the palette.

  Returns:
    [H, W, 3] uint8.
  """
  height, width = image_rgb.shape[:2]
  label = np.asarray(label)
  if label.shape != (height, width):
    label = _resize(label.astype(np.uint8), height, width, nearest=True)
  colours = colorize(label, num_classes).astype(np.float64)
  labelled = ((label >= 0) & (label < num_classes))[..., None]
  blended = (1.0 - alpha) * image_rgb + alpha * colours
  return np.where(labelled, np.round(blended), image_rgb).astype(np.uint8)


def denormalize(image_bgr_meansub: Any) -> np.ndarray:
  """Inverts the input normalization: [H, W, 3] BGR minus mean -> uint8 RGB."""
  bgr = np.asarray(image_bgr_meansub, np.float64) + np.asarray(IMAGE_MEAN_BGR)
  return np.clip(np.round(bgr), 0, 255).astype(np.uint8)[..., ::-1].copy()


def _write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes to a temporary file next to `path`, then renames it into place,
  so a reader (or a resumed run) never sees a half-written file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def save_png(path: str | os.PathLike[str], array: Any) -> None:
  """Saves [H, W] uint8/uint16 or [H, W, 3|4] uint8 as a PNG, atomically."""
  array = np.asarray(array)
  if array.dtype not in (np.uint8, np.uint16) or not (
      array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)
                          and array.dtype == np.uint8)):
    raise ValueError(f'save_png takes [H, W] uint8/uint16 or [H, W, 3|4] uint8, '
                     f'got {array.dtype} {array.shape}.')
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  _write_atomically(path, buffer.getvalue())


def panel(images: Sequence[np.ndarray], titles: Sequence[str] | None = None,
          height: int | None = None, gap: int = 4) -> np.ndarray:
  """Side-by-side strip of RGB images, all resized to one height, titled on top.

  Args:
    images: list of [H_i, W_i, 3] uint8.
    titles: optional list of captions, one per image.
    height: common height; defaults to the smallest H_i.
    gap: white pixels between images.

  Returns:
    [title band + height, sum of widths + gaps, 3] uint8.
  """
  if not images:
    raise ValueError('panel needs at least one image.')
  if titles is not None and len(titles) != len(images):
    raise ValueError(f'{len(titles)} titles for {len(images)} images.')
  height = height or min(image.shape[0] for image in images)
  resized = [
      _resize(image, height, max(1, round(image.shape[1] * height / image.shape[0])),
              nearest=False) for image in images]
  band = 18 if titles else 0
  width = sum(image.shape[1] for image in resized) + gap * (len(resized) - 1)
  canvas = Image.new('RGB', (width, band + height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  x = 0
  for index, image in enumerate(resized):
    canvas.paste(Image.fromarray(image), (x, band))
    if titles:
      draw.text((x + 2, 2), titles[index], fill=(0, 0, 0), font=font)
    x += image.shape[1] + gap
  return np.asarray(canvas)


def _save_figure(figure: Figure, path: str | os.PathLike[str]) -> None:
  buffer = io.BytesIO()
  FigureCanvasAgg(figure).print_png(buffer)
  _write_atomically(path, buffer.getvalue())


def plot_confusion_matrix(cm: Any, class_names: Sequence[str],
                          path: str | os.PathLike[str]) -> None:
  """Row-normalized confusion matrix (recall per label) as a PNG heat map."""
  cm = np.asarray(cm, np.float64)
  rows = cm.sum(axis=1, keepdims=True)
  normalized = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  size = 2.0 + 0.45 * len(class_names)
  figure = Figure(figsize=(size + 1.5, size))
  axes = figure.add_subplot()
  shown = axes.imshow(normalized, cmap='Blues', vmin=0.0, vmax=1.0)
  ticks = np.arange(len(class_names))
  axes.set_xticks(ticks, class_names, rotation=90)
  axes.set_yticks(ticks, class_names)
  axes.set_xlabel('prediction')
  axes.set_ylabel('label')
  figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04)
  figure.tight_layout()
  _save_figure(figure, path)


def _read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(sources: str | os.PathLike[str] | Iterable[Any],
                keys: Sequence[str], path: str | os.PathLike[str]) -> None:
  """Training curves: one subplot per key, value against 'step'.

  Args:
    sources: a metrics.jsonl path, a list of such paths (one line each,
      labelled by the file's parent folder, e.g. the stage), or a list of
      record dicts (one line).
    keys: metric names to plot; records without a key are skipped for it.
    path: output PNG.
  """
  if isinstance(sources, (str, os.PathLike)):
    sources = [sources]
  sources = list(sources)
  if sources and all(isinstance(s, Mapping) for s in sources):
    series = [('', sources)]
  else:
    series = [(pathlib.Path(s).parent.name, _read_jsonl(s)) for s in sources]
  figure = Figure(figsize=(5.0, 2.6 * len(keys)))
  for index, key in enumerate(keys):
    axes = figure.add_subplot(len(keys), 1, index + 1)
    for name, records in series:
      points = [(r['step'], r[key]) for r in records
                if key in r and r[key] is not None and np.isfinite(r[key])]
      if points:
        steps, values = zip(*points)
        axes.plot(steps, values, label=name or None)
    axes.set_title(key)
    axes.set_xlabel('step')
    axes.grid(alpha=0.3)
    if len(series) > 1:
      axes.legend()
  figure.tight_layout()
  _save_figure(figure, path)
