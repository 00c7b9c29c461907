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
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from depthuda import fileio
from depthuda.data.labels import MEAN_BGR

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

  vmin / vmax default to the 1st and 99th percentiles of the finite values, so that a few
  extreme pixels (SYNTHIA's raw depth 0 is inverse depth 65,536 where the rest is ~1-100) are
  clipped instead of turning the rest black; non-finite values are black.
  """
  x = np.asarray(x, np.float64)
  finite = np.isfinite(x)
  low, high = np.percentile(x[finite], [1, 99]) if finite.any() else (0.0, 1.0)
  vmin = float(low) if vmin is None else vmin
  vmax = float(high) if vmax is None else vmax
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
  bgr = np.asarray(image_bgr_meansub, np.float64) + MEAN_BGR.astype(np.float64)
  return np.clip(np.round(bgr), 0, 255).astype(np.uint8)[..., ::-1].copy()


def save_png(path: fileio.PathLike, array: Any) -> None:
  """Saves [H, W] uint8/uint16 or [H, W, 3|4] uint8 as a PNG, atomically."""
  array = np.asarray(array)
  if array.dtype not in (np.uint8, np.uint16) or not (
      array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)
                          and array.dtype == np.uint8)):
    raise ValueError(f'save_png takes [H, W] uint8/uint16 or [H, W, 3|4] uint8, '
                     f'got {array.dtype} {array.shape}.')
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  fileio.write_atomic(path, buffer.getvalue())


def panel(images: Sequence[np.ndarray], titles: Sequence[str] | None = None,
          height: int | None = None, gap: int = 4) -> np.ndarray:
  """Side-by-side strip of RGB images, all resized to one height, titled on top.

  Args:
    images: list of [H_i, W_i, 3] uint8. Pass label maps already at `height`
      (resized nearest): the resize here is bilinear and would blend class colours.
    titles: optional list of captions, one per image.
    height: common height; defaults to the smallest H_i.
    gap: white pixels between images.

  Returns:
    [title band + height, sum of widths + gaps, 3] uint8; captions are
    max(11, height // 16) pixels tall.
  """
  if not images:
    raise ValueError('panel needs at least one image.')
  if titles is not None and len(titles) != len(images):
    raise ValueError(f'{len(titles)} titles for {len(images)} images.')
  height = height or min(image.shape[0] for image in images)
  resized = [
      _resize(image, height, max(1, round(image.shape[1] * height / image.shape[0])),
              nearest=False) for image in images]
  font_size = max(11, height // 16)
  band = font_size + 8 if titles else 0
  width = sum(image.shape[1] for image in resized) + gap * (len(resized) - 1)
  canvas = Image.new('RGB', (width, band + height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=font_size)
  x = 0
  for index, image in enumerate(resized):
    canvas.paste(Image.fromarray(image), (x, band))
    if titles:
      draw.text((x + 3, 3), titles[index], fill=(0, 0, 0), font=font)
    x += image.shape[1] + gap
  return np.asarray(canvas)


def _save_figure(figure: Figure, path: fileio.PathLike) -> None:
  buffer = io.BytesIO()
  FigureCanvasAgg(figure).print_png(buffer)
  fileio.write_atomic(path, buffer.getvalue())


def plot_confusion_matrix(cm: Any, class_names: Sequence[str],
                          path: fileio.PathLike, title: str | None = None) -> None:
  """Row-normalized confusion matrix (recall per label) as a PNG heat map.

  Every cell is written out in percent; rows without labels stay empty.
  """
  cm = np.asarray(cm, np.float64)
  rows = cm.sum(axis=1, keepdims=True)
  normalized = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  num_classes = len(class_names)
  size = 2.5 + 0.5 * num_classes
  figure = Figure(figsize=(size + 1.5, size + 0.4))
  axes = figure.add_subplot()
  shown = axes.imshow(normalized, cmap='Blues', vmin=0.0, vmax=1.0)
  font = 9 if num_classes <= 10 else 7
  for (row, col), value in np.ndenumerate(normalized):
    if rows[row, 0] > 0:
      axes.text(col, row, f'{100 * value:.0f}', ha='center', va='center', fontsize=font,
                color='white' if value > 0.5 else 'black')
  ticks = np.arange(num_classes)
  axes.set_xticks(ticks, class_names, rotation=45, ha='right', rotation_mode='anchor')
  axes.set_yticks(ticks, class_names)
  axes.set_xlabel('predicted class')
  axes.set_ylabel('true class')
  axes.set_title(title or 'confusion matrix')
  bar = figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04)
  bar.set_label('fraction of the true class\'s pixels')
  figure.tight_layout()
  _save_figure(figure, path)


def plot_class_iou(per_class_iou: Mapping[str, float | None], path: fileio.PathLike,
                   title: str | None = None) -> None:
  """Horizontal bars of per-class IoU (percent), in the classes' palette colours.

  Args:
    per_class_iou: {class name: IoU in percent, or None for a class absent from
      labels and predictions}, in class-id order (as `evaluate.results_dict`).
    path: output PNG.
    title: figure title; the mean over the present classes is added to it.
  """
  names = list(per_class_iou)
  values = [per_class_iou[n] for n in names]
  present = [v for v in values if v is not None]
  mean = float(np.mean(present)) if present else float('nan')
  colours = palette(len(names)) / 255.0 if len(names) <= 20 else None
  figure = Figure(figsize=(6.0, 1.0 + 0.32 * len(names)))
  axes = figure.add_subplot()
  positions = np.arange(len(names))
  axes.barh(positions, [0.0 if v is None else v for v in values], color=colours,
            edgecolor='black', linewidth=0.5)
  for position, value in zip(positions, values):
    text = 'n/a' if value is None else f'{value:.1f}'
    axes.text((value or 0.0) + 1.0, position, text, va='center', fontsize=8)
  axes.axvline(mean, color='gray', linestyle='--', linewidth=1)
  axes.set_yticks(positions, names)
  axes.invert_yaxis()
  axes.set_xlim(0, 105)
  axes.set_xlabel('IoU (%)')
  axes.set_title(f'{title or "per-class IoU"} (mIoU {mean:.1f})')
  axes.grid(axis='x', alpha=0.3)
  figure.tight_layout()
  _save_figure(figure, path)


def _read_jsonl(path: fileio.PathLike) -> list[dict[str, Any]]:
  with fileio.Path(path).open() as f:
    return [json.loads(line) for line in f if line.strip()]


def _smooth(values: Sequence[float], weight: float) -> np.ndarray:
  """Exponential moving average (TensorBoard's smoothing), debiased at the start."""
  out, average, norm = [], 0.0, 0.0
  for value in values:
    average = weight * average + (1 - weight) * value
    norm = weight * norm + (1 - weight)
    out.append(average / norm)
  return np.asarray(out)


def plot_curves(sources: fileio.PathLike | Iterable[Any],
                keys: Sequence[str], path: fileio.PathLike,
                title: str | None = None, smoothing: float = 0.6) -> None:
  """Training curves: one subplot per key (two columns), value against 'step'.

  Series of 10 or more points are drawn faint as logged, with an exponential
  moving average (weight `smoothing`) on top.

  Args:
    sources: a metrics.jsonl path, a list of such paths (one line each,
      labelled by the file's parent folder, e.g. the stage), or a list of
      record dicts (one line).
    keys: metric names to plot; records without a key are skipped for it.
    path: output PNG.
    title: figure title.
    smoothing: moving-average weight in [0, 1); 0 draws the raw values only.
  """
  if isinstance(sources, (str, os.PathLike)):
    sources = [sources]
  sources = list(sources)
  if sources and all(isinstance(s, Mapping) for s in sources):
    series = [('', sources)]
  else:
    series = [(fileio.Path(s).parent.name, _read_jsonl(s)) for s in sources]
  columns = 1 if len(keys) == 1 else 2
  grid_rows = -(-len(keys) // columns)
  figure = Figure(figsize=(5.0 * columns, 0.5 + 2.6 * grid_rows))
  colours = matplotlib.colormaps['tab10'].colors
  for index, key in enumerate(keys):
    axes = figure.add_subplot(grid_rows, columns, index + 1)
    for number, (name, records) in enumerate(series):
      colour = colours[number % len(colours)]
      points = [(r['step'], r[key]) for r in records
                if key in r and r[key] is not None and np.isfinite(r[key])]
      if not points:
        continue
      steps, values = zip(*points)
      if smoothing > 0 and len(values) >= 10:
        axes.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
        axes.plot(steps, _smooth(values, smoothing), color=colour, label=name or None)
      else:
        axes.plot(steps, values, color=colour, marker='.' if len(values) < 10 else None,
                  label=name or None)
    axes.set_title(f'{key} (%)' if 'miou' in key else key)
    axes.set_xlabel('step')
    axes.grid(alpha=0.3)
    if len(series) > 1:
      axes.legend()
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  _save_figure(figure, path)
