"""Mixed precision: bfloat16 compute leaves parameters, optimizer states and losses float32."""

import jax
import jax.numpy as jnp
import numpy as np

from depthuda import models
from depthuda import sharding
from depthuda import train
from test_train import _batches, _config, _gmm_params


def _floating_dtypes(tree) -> set:
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def _equations(jaxpr, primitive: str) -> list:
  """Every equation of `primitive` in `jaxpr` and its sub-jaxprs."""
  found = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == primitive]
  for eqn in jaxpr.eqns:
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          found += _equations(sub, primitive)
  return found


def test_bfloat16_compute_keeps_state_and_losses_float32():
  config = _config(compute_dtype='bfloat16')
  mesh = sharding.make_mesh(jax.devices()[:1])
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  assert seg.dtype == jnp.bfloat16
  state, seg_tx, disc_tx = train.init_state(config, seg, disc)
  state = sharding.replicate(state, mesh)
  step = sharding.make_sharded_step(train.adapt_step, mesh, seg=seg, disc=disc, seg_tx=seg_tx,
                                 disc_tx=disc_tx, config=config)
  params = sharding.replicate(_gmm_params(), mesh)
  batch = _batches(1, 1, config)[0]
  # SYNTHIA's raw depth 0 (inverse depth 65,536) and a value bfloat16 cannot hold: the depth
  # target and its losses are float32 whatever the compute dtype.
  batch['source']['depth'][0, 5, :4] = (65536.0, 64270.0, 65536.0, 64270.0)
  batch['source']['depth_grid'][0, 1, :2] = (65536.0, 64270.0)
  batch = sharding.shard_batch(batch, mesh)
  # The segmenter's convolutions, forward and gradients, take bfloat16 operands; the only
  # float32 ones are the discriminator's (it is built in float32).
  convs = _equations(jax.make_jaxpr(step)(state, batch, params).jaxpr, 'conv_general_dilated')
  kernels = [k for k in jax.tree.leaves(state.params) if k.ndim == 4]
  operands = [tuple(v.aval.dtype for v in eqn.invars) for eqn in convs]
  low = operands.count((jnp.dtype(jnp.bfloat16),) * 2)
  assert low >= 4 * len(kernels), (low, len(kernels))  # forward and kernel gradient, 2 domains
  assert set(operands) == {(jnp.dtype(jnp.bfloat16),) * 2, (jnp.dtype(jnp.float32),) * 2}

  for _ in range(2):
    state, metrics = step(state, batch, params)
  for name in ('params', 'batch_stats', 'opt_state', 'disc_params', 'disc_opt_state'):
    assert _floating_dtypes(getattr(state, name)) == {jnp.dtype(jnp.float32)}, name
  for name in train.LOSS_NAMES + ('loss_disc', 'loss'):
    assert metrics[name].dtype == jnp.float32, name
    assert np.isfinite(metrics[name]), name

  images = jnp.zeros((1, 32, 48, 3), jnp.float32)
  outputs = seg.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                      train=False)
  assert all(o.dtype == jnp.float32 for o in outputs)
