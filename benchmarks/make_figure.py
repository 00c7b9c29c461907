"""The README's method figure: target validation images with what the best model predicts.

  python benchmarks/make_figure.py --workdir=runs/toy        # -> benchmarks/figures/toy_method.png
  python benchmarks/make_figure.py --workdir=runs/city --output=city_method.png --num_images=4

One row per image: the input, the predicted classes, the ground truth, the predicted inverse
depth and the predicted density score g(p) (colour bars give their values), and a class legend.
The model is the run's best (self_train if that stage ran, else adapt), as `depthuda.predict`
picks it, with the config the run saved as DIR/config.json. Run from the repository root
(dataset paths in configs are relative to it).
"""

import argparse
import os

import jax.numpy as jnp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
import numpy as np

from depthuda import losses
from depthuda import predict
from depthuda import train
from depthuda import visualize
from depthuda.data import labels as label_lib
from depthuda.data import pipeline


def collect_rows(config, seg, variables, num_images: int) -> list[dict[str, np.ndarray]]:
  """The first `num_images` target validation images, everything at the input size."""
  forward = train.predict_fn(seg)
  rows = []
  for example in pipeline.target_val(config):
    if len(rows) == num_images:
      break
    size = example['image'].shape[1:3]
    logits, density, depth = (
        np.asarray(losses.upsample_bilinear(jnp.asarray(x, jnp.float32), size))[0]
        for x in forward(variables, example['image']))
    label = example['label'][0]
    # Nearest-resized from the label size: output row i reads input row i * in // out.
    label = label[np.arange(size[0]) * label.shape[0] // size[0]][
        :, np.arange(size[1]) * label.shape[1] // size[1]]
    rows.append(dict(image=visualize.denormalize(example['image'][0]),
                     prediction=logits.argmax(-1), label=label,
                     depth=depth[..., 0], density=density[..., 0]))
  return rows


def draw(rows: list[dict[str, np.ndarray]], num_classes: int, title: str, path: str) -> None:
  names = label_lib.class_names(num_classes)
  height, width = rows[0]['image'].shape[:2]
  # Inches: five equal panels, room on the right of the last two for their colour bars.
  panel_w, gap_w, bar_w = 2.4, 0.15, 0.75
  panel_h, title_h, legend_h, top_h = panel_w * height / width, 0.3, 0.5, 0.45
  fig_w = 5 * panel_w + 2 * gap_w + 2 * bar_w + 0.2
  fig_h = top_h + len(rows) * (panel_h + title_h) + legend_h
  figure = Figure(figsize=(fig_w, fig_h))
  columns = ('image', 'prediction', 'ground truth', 'inverse depth (predicted)',
             'density g(p) (predicted)')
  lefts = [0.1, 0.1 + panel_w + gap_w, 0.1 + 2 * (panel_w + gap_w)]
  lefts += [lefts[2] + panel_w + gap_w, lefts[2] + 2 * panel_w + gap_w + bar_w]
  for r, row in enumerate(rows):
    bottom = fig_h - top_h - (r + 1) * (panel_h + title_h) + 0.05
    axes = [figure.add_axes((left / fig_w, bottom / fig_h, panel_w / fig_w, panel_h / fig_h))
            for left in lefts]
    low, high = np.percentile(row['depth'], [1, 99])
    axes[0].imshow(row['image'])
    axes[1].imshow(visualize.colorize(row['prediction'], num_classes), interpolation='nearest')
    axes[2].imshow(visualize.colorize(row['label'], num_classes), interpolation='nearest')
    shown = [axes[3].imshow(row['depth'], cmap='magma', vmin=low, vmax=high),
             axes[4].imshow(row['density'], cmap='viridis', vmin=0.0, vmax=255.0)]
    for ax, image in zip(axes[3:], shown):
      bar = figure.colorbar(image, cax=ax.inset_axes((1.03, 0.0, 0.05, 1.0)))
      bar.ax.tick_params(labelsize=7)
    for ax, column in zip(axes, columns):
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(column, fontsize=10)
  legend = [Patch(facecolor=colour / 255.0, edgecolor='black', label=name)
            for name, colour in zip(names, visualize.palette(num_classes))]
  legend.append(Patch(facecolor='black', label='ignored'))
  figure.legend(handles=legend, loc='lower center', ncol=len(legend), fontsize=9, frameon=False)
  figure.suptitle(title, fontsize=11, y=1 - 0.12 / fig_h, va='top')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(figure).print_png(path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a finished training run')
  parser.add_argument('--output', default='benchmarks/figures/toy_method.png')
  parser.add_argument('--num_images', type=int, default=3)
  args = parser.parse_args()
  config = predict.config_from_workdir(args.workdir)
  seg, variables, source = predict.load_model(config, workdir=args.workdir)
  rows = collect_rows(config, seg, variables, args.num_images)
  data = 'toy benchmark' if config.data.toy else f'{config.data.source} \u2192 {config.data.target}'
  title = f'{data}: target validation images, best model ({source})'
  draw(rows, config.data.num_classes, title, args.output)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
