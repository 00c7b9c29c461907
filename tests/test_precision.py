"""Mixed precision: bfloat16 compute leaves parameters, optimizer states and losses float32."""

import jax
import jax.numpy as jnp
import numpy as np

from depthuda import train
from test_train import _batches, _config, _gmm_params


def _floating_dtypes(tree) -> set:
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bfloat16_compute_keeps_state_and_losses_float32():
  config = _config(compute_dtype='bfloat16')
  mesh = train.make_mesh(jax.devices()[:1])
  seg, disc = train.build_models(config)
  assert seg.dtype == jnp.bfloat16
  state, seg_tx, disc_tx = train.init_state(config, seg, disc)
  state = train.replicate(state, mesh)
  step = train.make_sharded_step(train.adapt_step, mesh, seg=seg, disc=disc, seg_tx=seg_tx,
                                 disc_tx=disc_tx, config=config)
  params = train.replicate(_gmm_params(), mesh)
  batch = _batches(1, 1, config)[0]
  # SYNTHIA's raw depth 0 (inverse depth 65,536) and a value bfloat16 cannot hold: the depth
  # target and its losses are float32 whatever the compute dtype.
  batch['source']['depth'][0, 5, :4] = (65536.0, 64270.0, 65536.0, 64270.0)
  batch['source']['depth_grid'][0, 1, :2] = (65536.0, 64270.0)
  batch = train.shard_batch(batch, mesh)
  # The convolutions really run in bfloat16.
  hlo = step.lower(state, batch, params).as_text()
  assert 'convolution' in hlo and 'bf16' in hlo

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
