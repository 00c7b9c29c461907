r"""Whether the depth distribution is at work in a toy run: its heads and discriminator, measured.

  python benchmarks/toy_diagnostics.py --workdir=W     (a run of configs/toy.py; W/config.json)

The toy renders its target scenes from seeded generators, so it knows the target validation
images' true classes and depth, which Cityscapes' layout has no place for. They serve here as
diagnostics only (nothing trains on them). For the model the adapt stage hands on
(`model_selection`), over all target validation images (pixels with a class, on the feature
grid):
  depth_corr    Pearson correlation of the predicted with the true inverse depth
                (65536 / (centimetres + 1), as the source's; sky ~1);
  density_corr  Pearson correlation of the predicted density with g(density_c(x, y, z)) from the
                true class c and true inverse depth z, under the run's own GMMs (METHOD §4):
                what the density head would predict from perfect segmentation and depth;
  density_corr_pred_target  the same against the target density target the run trained on
                (its own class and depth predictions);
and from W/adapt/metrics.jsonl, the discriminator's accuracy on each logged step
(`disc_acc_src`, `disc_acc_tgt`; 0.5 is chance): its mean, and the fraction of logged steps
where the two-domain mean is more than 0.1 from chance (`disc_off_chance`).
Writes W/diagnostics.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

# Target validation scenes: generator seed of the toy's datasets and split index in
# `toy.generate` (train 0, val 1, test 2).
_DATA_SEED, _DOMAIN, _VAL = 0, 1, 1
_RENDER_SIZE = (512, 256)


def scene_index(name: str) -> int:
  """The generator index of a toy Cityscapes validation image ('lindau_000002_000019' -> 7)."""
  from depthuda.data import toy
  city, number, _ = name.split('_')
  cities = toy.CITIES['val']
  return int(number) * len(cities) + cities.index(city)


def true_grid_maps(name: str, grid_hw: tuple[int, int], num_classes: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(classes [h, w] with 255 ignore, inverse depth [h, w]) of a validation image on the grid
  (PIL's nearest rule from the rendering, as the source grids of fit_gmm)."""
  from depthuda.data import labels
  from depthuda.data import toy
  rng = np.random.default_rng([_DATA_SEED, _DOMAIN, _VAL, scene_index(name)])
  _, classes, depth = toy.render_scene(toy.target_camera(_RENDER_SIZE), toy.TARGET_STYLE, rng,
                                       ego_vehicle=True)
  table = labels.label_map('cityscapes', num_classes)
  grid_wh = (grid_hw[1], grid_hw[0])
  ids = np.asarray(Image.fromarray(toy.CITYSCAPES_IDS[classes]).resize(grid_wh, Image.NEAREST))
  raw = np.asarray(Image.fromarray(toy.raw_depth(depth).astype(np.int32)).resize(
      grid_wh, Image.NEAREST))
  return table[ids], 65536.0 / (raw.astype(np.float64) + 1.0)


def _corr(a: list[np.ndarray], b: list[np.ndarray]) -> float:
  a, b = np.concatenate(a).astype(np.float64), np.concatenate(b).astype(np.float64)
  if a.std() == 0 or b.std() == 0:
    return 0.0  # a constant prediction carries no information
  return float(np.corrcoef(a, b)[0, 1])


def discriminator_summary(records: list[dict]) -> dict:
  """Accuracy on source and target over the logged steps; 0.5 is chance."""
  logged = [r for r in records if 'disc_acc_src' in r]
  if not logged:
    return {}
  src = np.array([r['disc_acc_src'] for r in logged])
  tgt = np.array([r['disc_acc_tgt'] for r in logged])
  both = (src + tgt) / 2
  return {'disc_acc_src': float(src.mean()), 'disc_acc_tgt': float(tgt.mean()),
          'disc_off_chance': float(np.mean(np.abs(both - 0.5) > 0.1)),
          'disc_acc_curve': [[int(r['step']), float(s), float(t)]
                             for r, s, t in zip(logged, src, tgt)]}


def _truth(names: list[str], grid_hw: tuple[int, int], num_classes: int, cache: str | None
           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`true_grid_maps` of each name, rendered once per `cache` file (an .npz) if one is given."""
  from depthuda.data import toy
  key = f'v{toy.GENERATOR_VERSION}_{grid_hw[0]}x{grid_hw[1]}_{num_classes}'
  if cache and os.path.exists(cache):
    with np.load(cache) as stored:
      if f'{key}/{names[-1]}/classes' in stored:
        return {n: (stored[f'{key}/{n}/classes'], stored[f'{key}/{n}/inv_depth']) for n in names}
  truth = {n: true_grid_maps(n, grid_hw, num_classes) for n in names}
  if cache:
    arrays = {f'{key}/{n}/{part}': a for n, maps in truth.items()
              for part, a in zip(('classes', 'inv_depth'), maps)}
    tmp = cache + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)
  return truth


def diagnose(config, workdir: str, cache: str | None = None) -> dict:
  """The diagnostics of `workdir`'s adapt model (see the module docstring); `cache`: an .npz
  file keeping the validation images' true maps between calls."""
  import jax
  import jax.numpy as jnp
  from depthuda import checkpointing
  from depthuda import density
  from depthuda import fileio
  from depthuda import gmm
  from depthuda import gmm_record
  from depthuda import models
  from depthuda import reporting
  from depthuda import train
  from depthuda.data import pipeline

  seg, _ = models.build(config)
  with checkpointing.StageCheckpoints(fileio.Path(workdir) / 'adapt') as ckpts:
    variables, meta = ckpts.restore_model(config.model_selection,
                                          models.abstract_variables(config, seg))
  params = gmm_record.load_params(workdir)
  scale = config.gmm.density_scale
  predict = train.predict_fn(seg)

  @jax.jit
  def targets(seg_logits, depth_pred, classes, inv_depth):
    true = density.density_to_target(
        jnp.exp(gmm.log_density(params, density.grid_points(inv_depth), classes)), scale)
    return true, density.target_density_target(params, seg_logits, depth_pred, scale)

  pred_depth, true_depth, pred_dens, true_dens, own_dens = [], [], [], [], []
  examples = list(pipeline.target_val(config))
  grid = tuple(models.feature_grid(config))
  truth = _truth([e['name'] for e in examples], grid, config.data.num_classes, cache)
  for example in examples:
    seg_logits, dens, depth = predict(variables, example['image'])
    classes, inv_depth = truth[example['name']]
    valid = classes != 255
    true, own = targets(seg_logits, depth[..., 0], jnp.asarray(np.where(valid, classes, 0))[None],
                        jnp.asarray(inv_depth, jnp.float32)[None])
    pred_depth.append(np.asarray(depth)[0, ..., 0][valid])
    true_depth.append(inv_depth[valid])
    pred_dens.append(np.asarray(dens)[0, ..., 0][valid])
    true_dens.append(np.asarray(true)[0][valid])
    own_dens.append(np.asarray(own)[0][valid])
  result = {'model_step': int(meta['step']), 'images': len(pred_depth),
            'depth_corr': _corr(pred_depth, true_depth),
            'density_corr': _corr(pred_dens, true_dens),
            'density_corr_pred_target': _corr(pred_dens, own_dens),
            'pred_depth_mean': float(np.concatenate(pred_depth).mean()),
            'true_depth_mean': float(np.concatenate(true_depth).mean()),
            'pred_density_mean': float(np.concatenate(pred_dens).mean()),
            'true_density_mean': float(np.concatenate(true_dens).mean())}
  result.update(discriminator_summary(
      reporting.read_metrics(fileio.Path(workdir) / 'adapt' / 'metrics.jsonl')))
  return result


def load_config(workdir: str):
  """The config a run recorded in W/config.json (sequences as tuples)."""
  import ml_collections

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(value) if isinstance(value, list) else value
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(tuples(json.load(f)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--cache', default=None,
                      help='an .npz keeping the true maps of the validation images between runs')
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  result = diagnose(load_config(args.workdir), args.workdir, args.cache)
  with open(os.path.join(args.workdir, 'diagnostics.json'), 'w') as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != 'disc_acc_curve'}, indent=1))


if __name__ == '__main__':
  main()
