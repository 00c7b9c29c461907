"""Train state, optimizers and the jit-compiled, data-parallel train steps (METHOD §5, §6).

One adaptation iteration (`adapt_step`) runs the source and target forward passes, the five
loss terms, and updates the segmenter and the discriminator from the same pre-step parameters.
`self_train_step` is the pseudo-label cross-entropy step. The loss terms are the module-level
`source_loss`, `target_loss`, `discriminator_loss` and `self_train_loss`. Both steps are written
per device and mapped over the `data` axis of a mesh with `jax.shard_map` inside `jax.jit`
(`sharding.make_sharded_step`): every loss is reduced over the global batch (sums and maxima over the
axis), so each device holds the global loss. Gradients are taken with respect to a
device-varying view of the parameters (`_per_device`), which gives each device's share, and
summed over the axis with one explicit `psum` (`_sum_over_devices`): the global gradient, in
both steps and for both networks. BatchNorm running statistics are averaged with `lax.pmean`.
N devices give the single-device result.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from depthuda import density
from depthuda import gmm as gmm_lib
from depthuda import losses
from depthuda import models
from depthuda.sharding import AXIS

LOSS_NAMES = ('loss_seg', 'loss_depth', 'loss_bal_src', 'loss_bal_tgt', 'loss_adv')


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a plain pytree (optax transforms stay outside)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any


def poly_schedule(base_lr: float, power: float, horizon: int) -> optax.Schedule:
  """lr (1 - i / horizon)^power, the original's `adjust_learning_rate`."""
  return optax.polynomial_schedule(base_lr, 0.0, power, horizon)


def _schedule(config: ml_collections.ConfigDict, base_lr: float) -> optax.Schedule:
  """config.optim's poly schedule from `base_lr` (the segmenter's `lr` or D's `disc_lr`)."""
  return poly_schedule(base_lr, config.optim.poly_power, config.optim.poly_horizon)


def segmenter_optimizer(config: ml_collections.ConfigDict, frozen: Any) -> optax.GradientTransformation:
  """SGD with momentum and L2 added to the gradient (PyTorch's weight_decay), one lr for all.

  BatchNorm affine parameters are frozen (METHOD §3): their updates are zero.
  """
  o = config.optim
  sgd = optax.chain(
      optax.add_decayed_weights(o.weight_decay),
      optax.sgd(_schedule(config, o.lr), momentum=o.momentum))
  labels = jax.tree.map(lambda f: 'frozen' if f else 'train', frozen)
  return optax.multi_transform({'train': sgd, 'frozen': optax.set_to_zero()}, labels)


def discriminator_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  return optax.adam(_schedule(config, o.disc_lr), b1=o.disc_b1, b2=o.disc_b2, eps=1e-8)


def _init_keys(config: ml_collections.ConfigDict) -> jax.Array:
  """The keys of a fresh run: [segmenter init, discriminator init].

  The seed's key is split three ways and the third is unused: the split fixes the initial
  networks of each seed, which the results recorded per seed depend on.
  """
  return jax.random.split(jax.random.PRNGKey(config.seed), 3)[:2]


# Jitted: eager init compiles every random draw separately (slow on CPU). Equal modules share
# one compilation.
@functools.partial(jax.jit, static_argnums=0)
def _seeded_init(seg: nn.Module, key: jax.Array, images: jax.Array) -> dict:
  return seg.init(key, images, train=False)


def init_segmenter(config: ml_collections.ConfigDict, seg: nn.Module,
                   variables: dict | None = None) -> dict:
  """The segmenter variables a fresh run starts from: the seeded init, or `variables` from a
  converted checkpoint (the whole segmenter, or an ImageNet trunk over the seeded init)."""
  if variables is not None and set(models.HEADS) <= set(variables['params']):
    return variables
  w, h = config.data.input_size
  fresh = _seeded_init(seg, _init_keys(config)[0], jnp.zeros((1, h, w, 3), jnp.float32))
  if variables is None:
    return fresh
  # The original initializes the whole network, then loads the ImageNet trunk over it.
  return flax.traverse_util.unflatten_dict({**flax.traverse_util.flatten_dict(fresh),
                                            **flax.traverse_util.flatten_dict(variables)})


def init_state(config: ml_collections.ConfigDict, seg: nn.Module, disc: nn.Module,
               variables: dict | None = None) -> tuple[TrainState, optax.GradientTransformation,
                                                       optax.GradientTransformation]:
  """Fresh train state (segmenter variables as `init_segmenter`)."""
  w, h = config.data.input_size
  _, k_disc = _init_keys(config)
  variables = init_segmenter(config, seg, variables)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  disc_params = jax.jit(disc.init)(k_disc, jnp.zeros((1, h, w, config.data.num_classes),
                                                     jnp.float32))
  seg_tx = segmenter_optimizer(config, models.frozen_mask(params))
  disc_tx = discriminator_optimizer(config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=seg_tx.init(params), disc_params=disc_params,
                     disc_opt_state=disc_tx.init(disc_params))
  return state, seg_tx, disc_tx


def _forward(seg: nn.Module, params, batch_stats, images, train_bn: bool):
  """Segmenter forward; returns outputs and the (possibly) updated BN statistics."""
  variables = {'params': params, 'batch_stats': batch_stats}
  if train_bn:
    outputs, updates = seg.apply(variables, images, train=True, mutable=['batch_stats'])
    return outputs, updates['batch_stats']
  return seg.apply(variables, images, train=True), batch_stats


def _guard_nonfinite(config: ml_collections.ConfigDict, state: TrainState,
                     new_state: TrainState, metrics: dict, grads: Any
                     ) -> tuple[TrainState, jax.Array]:
  """(state after the step, 1.0 if a loss or gradient was not finite else 0.0).

  With config.nonfinite == 'skip' such a step changes nothing but the step count (so the data
  position still advances); otherwise ('stop') the caller stops the run.
  """
  values = [v for k, v in metrics.items() if k.startswith('loss')]
  finite = jnp.all(jnp.isfinite(jnp.stack(values))) & jnp.isfinite(optax.tree.norm(grads))
  if config.nonfinite == 'skip':
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = new_state.replace(step=state.step + 1)
  return new_state, 1.0 - finite.astype(jnp.float32)


def _weighted_sum(config: ml_collections.ConfigDict, terms: dict) -> jax.Array:
  """sum of weight * loss over `terms` (`losses.loss_weights`: config.loss's lambdas)."""
  weights = losses.loss_weights(config.loss)
  return sum(weights[name] * value for name, value in terms.items())


def _uses_target(config: ml_collections.ConfigDict) -> bool:
  weights = losses.loss_weights(config.loss)
  return weights['loss_adv'] > 0 or weights['loss_bal_tgt'] > 0


def _uses_discriminator(config: ml_collections.ConfigDict) -> bool:
  return losses.loss_weights(config.loss)['loss_adv'] > 0


def source_loss(params, batch_stats, src: dict, gmm_params: gmm_lib.GMMParams | None, *,
                seg: nn.Module, config: ml_collections.ConfigDict, axis_name: str | None):
  """The source terms of METHOD §5 on this device's share of the source batch.

  loss_seg (weighted cross-entropy), loss_depth (berHu on the inverse depth) and loss_bal_src
  (berHu of the density against its GMM target). Returns (their weighted sum, (terms, BN
  statistics, {'disc_src': D's input for the source images} when D is trained)).
  """
  lam = config.loss
  size = src['image'].shape[1:3]
  class_weights = None if lam.class_weights is None else jnp.asarray(lam.class_weights, jnp.float32)
  (seg_s, dens_s, dep_s), stats = _forward(seg, params, batch_stats, src['image'],
                                           config.model.bn_mode == 'train')
  seg_s, dens_s, dep_s = (x.astype(jnp.float32) for x in (seg_s, dens_s, dep_s))
  terms = {}
  terms['loss_seg'] = losses.weighted_cross_entropy(
      losses.upsample_bilinear(seg_s, size), src['label'], class_weights, axis_name=axis_name)
  terms['loss_depth'] = losses.berhu(
      losses.upsample_bilinear(dep_s, size)[..., 0], src['depth'], axis_name=axis_name)
  if losses.loss_weights(lam)['loss_bal_src'] > 0:
    src_target = density.source_density_target(
        gmm_params, jax.lax.stop_gradient(seg_s), src['label_grid'], src['depth_grid'],
        config.gmm.density_scale)
    terms['loss_bal_src'] = losses.berhu(dens_s[..., 0], src_target, axis_name=axis_name)
  else:
    terms['loss_bal_src'] = jnp.zeros(())
  aux = ({'disc_src': jax.lax.stop_gradient(
      losses.discriminator_input(lam.disc_input, seg_s, dens_s, dep_s, size))}
         if _uses_discriminator(config) else {})
  return _weighted_sum(config, terms), (terms, stats, aux)


def target_loss(params, batch_stats, images: jax.Array, disc_params,
                gmm_params: gmm_lib.GMMParams | None, *, seg: nn.Module, disc: nn.Module,
                config: ml_collections.ConfigDict, axis_name: str | None):
  """The target terms of METHOD §5 on this device's share of the target images.

  loss_bal_tgt (berHu of the density against the GMM target of the predicted class and depth)
  and loss_adv (D's BCE towards the source label 0). D's parameters are read, not
  differentiated. Returns (their weighted sum, (terms, BN statistics, {'disc_tgt': D's input
  for the target images} when D is trained)).
  """
  lam = config.loss
  (seg_t, dens_t, dep_t), stats = _forward(seg, params, batch_stats, images,
                                           config.model.bn_mode == 'train')
  seg_t, dens_t, dep_t = (x.astype(jnp.float32) for x in (seg_t, dens_t, dep_t))
  terms, aux = {}, {}
  if losses.loss_weights(lam)['loss_bal_tgt'] > 0:
    tgt_target = density.target_density_target(
        gmm_params, jax.lax.stop_gradient(seg_t), jax.lax.stop_gradient(dep_t[..., 0]),
        config.gmm.density_scale)
    terms['loss_bal_tgt'] = losses.berhu(dens_t[..., 0], tgt_target, axis_name=axis_name)
  else:
    terms['loss_bal_tgt'] = jnp.zeros(())
  if _uses_discriminator(config):
    d_tgt = losses.discriminator_input(lam.disc_input, seg_t, dens_t, dep_t, images.shape[1:3])
    aux['disc_tgt'] = jax.lax.stop_gradient(d_tgt)
    terms['loss_adv'] = losses.bce_with_logits(disc.apply(disc_params, d_tgt), 0.0, axis_name)
  else:
    terms['loss_adv'] = jnp.zeros(())
  return _weighted_sum(config, terms), (terms, stats, aux)


def discriminator_loss(disc_params, disc_src: jax.Array, disc_tgt: jax.Array, *,
                       disc: nn.Module, axis_name: str | None):
  """BCE(D(src), 0) + BCE(D(tgt), 1) over the global batch; aux: this device's accuracies."""
  out_s = disc.apply(disc_params, disc_src)
  out_t = disc.apply(disc_params, disc_tgt)
  loss = (losses.bce_with_logits(out_s, 0.0, axis_name)
          + losses.bce_with_logits(out_t, 1.0, axis_name))
  acc_s = jnp.mean((out_s < 0).astype(jnp.float32))
  acc_t = jnp.mean((out_t > 0).astype(jnp.float32))
  return loss, (acc_s, acc_t)


def _per_device(params, axis_name: str | None):
  """`params` as a device-varying value: the gradient with respect to it is this device's."""
  return params if axis_name is None else jax.lax.pcast(params, axis_name, to='varying')


def _sum_over_devices(grads, axis_name: str | None):
  """The global gradient: the per-device gradients summed over the data axis."""
  return grads if axis_name is None else jax.lax.psum(grads, axis_name)


def adapt_step(state: TrainState, batch: dict, gmm_params: gmm_lib.GMMParams | None, *,
               seg: nn.Module, disc: nn.Module, seg_tx, disc_tx,
               config: ml_collections.ConfigDict, axis_name: str | None = AXIS):
  """One iteration of METHOD §5 on this device's share of the batch.

  batch: {'source': {'image' [b,H,W,3], 'label' [b,H,W], 'depth' [b,H,W],
                     'label_grid' [b,h,w], 'depth_grid' [b,h,w] (on the feature grid)},
          'target': {'image' [b,H,W,3]}}.
  gmm_params may be None when both density losses are off (e.g. source-only training).
  Returns the new state and a dict of scalars (averaged over devices).
  """
  use_disc = _uses_discriminator(config)
  # Two gradients, source then target, summed: the gradient of the summed loss, since each
  # domain's BatchNorm uses its own batch statistics. The barrier makes the target pass wait for
  # the whole source gradient; XLA keeps that order through scheduling on GPU and TPU, so the
  # source activations are freed before the target's exist, as in the original's two
  # backward() calls (about half the activation memory). XLA's CPU pipeline drops the barrier
  # before scheduling, where it changes nothing.
  params = _per_device(state.params, axis_name)
  (total, (terms, new_stats, aux)), grads = jax.value_and_grad(source_loss, has_aux=True)(
      params, state.batch_stats, batch['source'], gmm_params, seg=seg, config=config,
      axis_name=axis_name)
  if _uses_target(config):
    grads, new_stats, tgt_images = jax.lax.optimization_barrier(
        (grads, new_stats, batch['target']['image']))
    (total_t, (terms_t, new_stats, aux_t)), grads_t = jax.value_and_grad(
        target_loss, has_aux=True)(params, new_stats, tgt_images, state.disc_params, gmm_params,
                                   seg=seg, disc=disc, config=config, axis_name=axis_name)
    grads = jax.tree.map(jnp.add, grads, grads_t)
    total, terms, aux = total + total_t, {**terms, **terms_t}, {**aux, **aux_t}
  else:
    terms['loss_bal_tgt'] = terms['loss_adv'] = jnp.zeros(())
  metrics = dict(terms, loss=total)
  grads = _sum_over_devices(grads, axis_name)
  if axis_name is not None:
    new_stats = jax.lax.pmean(new_stats, axis_name)
  updates, opt_state = seg_tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  metrics['loss_disc'] = jnp.zeros(())
  if use_disc:
    # D's inputs carry no gradient back to the segmenter (stopped in the losses above).
    (metrics['loss_disc'], (metrics['disc_acc_src'], metrics['disc_acc_tgt'])), d_grads = (
        jax.value_and_grad(discriminator_loss, has_aux=True)(
            _per_device(state.disc_params, axis_name), aux['disc_src'], aux['disc_tgt'],
            disc=disc, axis_name=axis_name))
    d_grads = _sum_over_devices(d_grads, axis_name)
    d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, disc_params)
    disc_params = optax.apply_updates(disc_params, d_updates)

  metrics['lr'] = _schedule(config, config.optim.lr)(state.step)
  if use_disc:
    metrics['lr_disc'] = _schedule(config, config.optim.disc_lr)(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                            opt_state=opt_state, disc_params=disc_params,
                            disc_opt_state=disc_opt_state)
  grads = (grads, d_grads) if use_disc else grads
  new_state, metrics['nonfinite'] = _guard_nonfinite(config, state, new_state, metrics, grads)
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  return new_state, metrics


def self_train_loss(params, batch_stats, batch: dict, *, seg: nn.Module,
                    config: ml_collections.ConfigDict, axis_name: str | None):
  """Unweighted cross-entropy of the pseudo-labels (METHOD §6); aux: the BN statistics."""
  (seg_t, _, _), stats = _forward(seg, params, batch_stats, batch['image'],
                                  config.model.bn_mode == 'train')
  logits = losses.upsample_bilinear(seg_t.astype(jnp.float32), batch['image'].shape[1:3])
  loss = losses.weighted_cross_entropy(logits, batch['label'], None, axis_name=axis_name)
  return loss, stats


def self_train_step(state: TrainState, batch: dict, *, seg: nn.Module, seg_tx,
                    config: ml_collections.ConfigDict, axis_name: str | None = AXIS):
  """Unweighted cross-entropy on pseudo-labelled target images (METHOD §6)."""
  (loss, new_stats), grads = jax.value_and_grad(self_train_loss, has_aux=True)(
      _per_device(state.params, axis_name), state.batch_stats, batch, seg=seg, config=config,
      axis_name=axis_name)
  grads = _sum_over_devices(grads, axis_name)
  if axis_name is not None:
    new_stats = jax.lax.pmean(new_stats, axis_name)
  updates, opt_state = seg_tx.update(grads, state.opt_state, state.params)
  metrics = {'loss_seg': loss, 'loss': loss,
             'lr': _schedule(config, config.optim.lr)(state.step)}
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=new_stats, opt_state=opt_state)
  new_state, metrics['nonfinite'] = _guard_nonfinite(config, state, new_state, metrics, grads)
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  return new_state, metrics


@functools.partial(jax.jit, static_argnums=0)
def _predict(seg: nn.Module, variables, images):
  return seg.apply(variables, images, train=False)


def predict_fn(seg: nn.Module) -> Callable:
  """Jitted eval-mode forward: (variables, images) -> (seg, density, depth) on the grid.

  One jitted function for all calls: equal modules and input shapes share one compilation
  (a new `jax.jit` per call would compile again at every call)."""
  return functools.partial(_predict, seg)
