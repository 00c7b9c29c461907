"""The train steps: multi-device equals single-device, update isolation, one compile, optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from depthuda import gmm
from depthuda import losses
from depthuda import models
from depthuda import sharding
from depthuda import train

C = 7


def _config(**overrides):
  config = test_config.get_config()
  config.data.input_size = (48, 32)
  config.model.bn_sync = True  # Global batch statistics: N devices must equal 1 device.
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return config


def _gmm_params():
  rng = np.random.default_rng(0)
  k = 3
  return gmm.GMMParams(
      weights=jnp.full((C, k), 1.0 / k),
      means=jnp.asarray(rng.uniform([0, 0, 1], [6, 4, 50], (C, k, 3)), jnp.float32),
      variances=jnp.asarray(rng.uniform([2, 2, 20], [6, 6, 200], (C, k, 3)), jnp.float32))


def _on_grid(x, grid):
  """x [b, H, W] sampled at the grid (h, w) by the PIL rule, floor((i + 1/2) * in / out)."""
  rows, cols = (np.floor((np.arange(m) + 0.5) * n / m).astype(int)
                for n, m in zip(x.shape[1:], grid))
  return x[:, rows][:, :, cols]


def _batches(num, batch, config, seed=0):
  rng = np.random.default_rng(seed)
  w, h = config.data.input_size
  grid = models.feature_grid(config)
  out = []
  for _ in range(num):
    label = rng.integers(0, C, (batch, h, w)).astype(np.int32)
    label[:, :3] = 255
    depth = rng.uniform(1, 60, (batch, h, w)).astype(np.float32)
    out.append({
        'source': {'image': rng.normal(0, 50, (batch, h, w, 3)).astype(np.float32),
                   'label': label, 'depth': depth, 'label_grid': _on_grid(label, grid),
                   'depth_grid': _on_grid(depth, grid)},
        'target': {'image': rng.normal(10, 40, (batch, h, w, 3)).astype(np.float32)}})
  return out


def _sharded_adapt_step(config, devices):
  """(mesh, replicated initial state, jitted adapt step) over `devices` (None: all)."""
  mesh = sharding.make_mesh(devices)
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  state, seg_tx, disc_tx = train.init_state(config, seg, disc)
  step = sharding.make_sharded_step(train.adapt_step, mesh, seg=seg, disc=disc, seg_tx=seg_tx,
                                 disc_tx=disc_tx, config=config)
  return mesh, sharding.replicate(state, mesh), step


def _steps(config, devices, batches, local=slice(None)):
  """Adapt steps over `devices` (None: all, of all processes) on global `batches`, each process
  feeding its `local` part. Returns the state on device, the metrics (replicated, so any
  device's copy is the value) on the host, and the step function."""
  mesh, state, step = _sharded_adapt_step(config, devices)
  params = sharding.replicate(_gmm_params(), mesh)
  history = []
  for batch in batches:
    mine = jax.tree.map(lambda x: x[local], batch)
    state, metrics = step(state, sharding.shard_batch(mine, mesh), params)
    history.append({k: np.asarray(v.addressable_data(0)) for k, v in metrics.items()})
  return state, history, step


def _run(config, devices, batches):
  state, history, step = _steps(config, devices, batches)
  return jax.device_get(state), history, step


def test_four_devices_equal_one_device():
  """5 adapt steps, global batch 4: 4 devices x 1 image == 1 device x 4 images.

  Losses agree to 1e-5 relative at every step. Parameters agree to 1e-3 of the distance they
  moved: the only difference is the order of float32 sums, which momentum and Adam's
  normalisation carry forward.
  """
  assert jax.device_count() >= 4
  # The original's rate and head init: the toy's 1e-2 and He-initialised heads are chaotic here
  # (a summation-order difference of 1e-7 grows to 1e-4 within 5 steps).
  config = _config(**{'optim.lr': 2.5e-4, 'model.head_init': 'normal'})
  batches = _batches(5, 4, config)
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  state0 = jax.device_get(train.init_state(config, seg, disc)[0])
  state1, hist1, _ = _run(config, jax.devices()[:1], batches)
  state4, hist4, _ = _run(config, jax.devices()[:4], batches)
  for m1, m4 in zip(hist1, hist4):
    for name in train.LOSS_NAMES + ('loss_disc',):
      np.testing.assert_allclose(m4[name], m1[name], rtol=1e-5, atol=1e-7, err_msg=name)
  for tree in ('params', 'batch_stats', 'disc_params'):
    def close(a, b, start):
      moved = np.abs(b - start).max()
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * moved + 1e-7)
    jax.tree.map(close, getattr(state4, tree), getattr(state1, tree), getattr(state0, tree))


def test_step_compiles_once_and_losses_are_finite():
  config = _config()
  _, history, step = _run(config, jax.devices()[:2], _batches(3, 2, config))
  assert step._cache_size() == 1
  for metrics in history:
    assert all(np.isfinite(metrics[k]) for k in train.LOSS_NAMES)
    assert metrics['loss_disc'] > 0


def test_discriminator_update_ignores_segmenter_loss():
  """D's step depends only on D's loss: changing every segmenter weight leaves it unchanged."""
  batches = _batches(1, 2, _config())
  a, _, _ = _run(_config(), jax.devices()[:1], batches)
  b, _, _ = _run(_config(**{'loss.lambda_seg': 3.0, 'loss.lambda_adv': 0.5,
                            'loss.lambda_depth': 0.2}), jax.devices()[:1], batches)
  jax.tree.map(np.testing.assert_array_equal, a.disc_params, b.disc_params)
  diff = jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(x - y).max(), a.params, b.params))
  assert max(diff) > 0


def test_segmenter_update_ignores_discriminator_loss():
  """The segmenter's step is the same whatever D's learning rate: no gradient flows back."""
  batches = _batches(1, 2, _config())
  a, _, _ = _run(_config(**{'optim.disc_lr': 1e-3}), jax.devices()[:1], batches)
  b, _, _ = _run(_config(**{'optim.disc_lr': 0.5}), jax.devices()[:1], batches)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  diff = jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(x - y).max(), a.disc_params,
                                      b.disc_params))
  assert max(diff) > 0


def test_source_only_leaves_discriminator_untouched():
  config = _config(**{'loss.lambda_adv': 0.0, 'loss.lambda_bal_tgt': 0.0,
                      'loss.lambda_bal_src': 0.0, 'loss.lambda_depth': 0.0})
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  before, _, _ = train.init_state(config, seg, disc)
  after, history, _ = _run(config, jax.devices()[:1], _batches(2, 2, config))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(before.disc_params), after.disc_params)
  assert history[-1]['loss_adv'] == 0 and history[-1]['loss_seg'] > 0


def test_frozen_batchnorm_affine_parameters_do_not_move():
  config = _config()
  after, _, _ = _run(config, jax.devices()[:1], _batches(2, 2, config))
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  before, _, _ = train.init_state(config, seg, disc)
  mask = models.frozen_mask(after.params)
  moved = jax.tree.map(lambda m, a, b: bool(m) and not np.array_equal(a, b), mask,
                       after.params, jax.device_get(before.params))
  assert not any(jax.tree.leaves(moved))
  assert any(jax.tree.leaves(mask))


@pytest.mark.parametrize('steps', [3])
def test_optimizers_match_pytorch(steps):
  torch = pytest.importorskip('torch')
  config = _config(**{'optim.lr': 0.1, 'optim.poly_horizon': 10, 'optim.disc_lr': 0.01})
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5, 3)).astype(np.float32)
  grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(steps)]
  seg_tx = train.segmenter_optimizer(config, {'w': False})
  disc_tx = train.discriminator_optimizer(config)
  for tx, make in ((seg_tx, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9,
                                                       weight_decay=5e-4)),
                   (disc_tx, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99)))):
    params = {'w': jnp.asarray(w0)}
    state = tx.init(params)
    tw = torch.nn.Parameter(torch.tensor(w0))
    opt = make([tw])
    base = opt.param_groups[0]['lr']
    for i, g in enumerate(grads):
      opt.param_groups[0]['lr'] = base * (1 - i / 10) ** 0.9  # The original's poly schedule.
      tw.grad = torch.tensor(g)
      opt.step()
      updates, state = tx.update({'w': jnp.asarray(g)}, state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(np.asarray(params['w']), tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def _jaxprs_with(jaxpr, primitive: str):
  """The (sub)jaxprs of `jaxpr` that contain an equation of `primitive`."""
  found = []
  if any(eqn.primitive.name == primitive for eqn in jaxpr.eqns):
    found.append(jaxpr)
  for eqn in jaxpr.eqns:
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          found += _jaxprs_with(sub, primitive)
  return found


def test_target_pass_waits_for_the_whole_source_gradient():
  """The target images reach the network only through a barrier with every source gradient
  (and the BN statistics), so on GPU/TPU the source activations are freed first."""
  config = _config()
  mesh, state, step = _sharded_adapt_step(config, jax.devices()[:2])
  batch = sharding.shard_batch(_batches(1, 2, config)[0], mesh)
  closed = jax.make_jaxpr(step)(state, batch, sharding.replicate(_gmm_params(), mesh))
  (inner,) = _jaxprs_with(closed.jaxpr, 'optimization_barrier')
  (barrier,) = [e for e in inner.eqns if e.primitive.name == 'optimization_barrier']
  n_params = len(jax.tree.leaves(state.params))
  assert len(barrier.invars) == n_params + len(jax.tree.leaves(state.batch_stats)) + 1
  # The per-device target images (the shard_map body's input) have no other consumer.
  target = barrier.invars[-1]
  assert target in inner.invars and target.aval.shape == (1, 32, 48, 3)
  consumers = [e for e in inner.eqns if any(v is target for v in e.invars)]
  assert consumers == [barrier]
  # Each gradient operand is the gradient of one parameter (same shapes, same order).
  shapes = [p.shape for p in jax.tree.leaves(state.params)]
  assert [v.aval.shape for v in barrier.invars[:n_params]] == shapes


def test_two_gradients_equal_the_gradient_of_the_summed_loss():
  """adapt_step's source-then-target gradients against one `grad` of the summed losses."""
  config = _config(**{'model.bn_sync': False})
  assert config.loss.lambda_adv > 0 and config.loss.lambda_bal_tgt > 0  # Both target terms on.
  seg, disc = models.build(config)
  state, seg_tx, disc_tx = train.init_state(config, seg, disc)
  batch = jax.tree.map(jnp.asarray, _batches(1, 2, config)[0])
  gmm_params = _gmm_params()
  def step_gradient(state):
    captured = {}
    def capture(grads, opt_state, params):  # An optimizer that records the gradient it gets.
      captured['grads'] = grads
      return seg_tx.update(grads, opt_state, params)
    train.adapt_step(state, batch, gmm_params, seg=seg, disc=disc,
                     seg_tx=seg_tx._replace(update=capture), disc_tx=disc_tx, config=config,
                     axis_name=None)
    return captured['grads']
  got = jax.jit(step_gradient)(state)
  # Reference: jax.grad of the step's reported total loss (source and target terms together)
  # as a function of the parameters.
  def total(params):
    _, m = train.adapt_step(state.replace(params=params), batch, gmm_params, seg=seg, disc=disc,
                            seg_tx=seg_tx, disc_tx=disc_tx, config=config, axis_name=None)
    return m['loss']
  want = jax.jit(jax.grad(total))(state.params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(b))) + 1e-12)


def _one_adapt_step(config):
  """(state before, the segmenter gradient, metrics) of one unsharded adapt step."""
  seg, disc = models.build(config)
  state, seg_tx, disc_tx = train.init_state(config, seg, disc)
  batch = jax.tree.map(jnp.asarray, _batches(1, 2, config)[0])

  def step(state):
    captured = {}
    def capture(grads, opt_state, params):
      captured['grads'] = grads
      return seg_tx.update(grads, opt_state, params)
    _, metrics = train.adapt_step(state, batch, _gmm_params(), seg=seg, disc=disc,
                                  seg_tx=seg_tx._replace(update=capture), disc_tx=disc_tx,
                                  config=config, axis_name=None)
    return captured['grads'], metrics
  grads, metrics = jax.jit(step)(state)
  return (seg, disc, state, batch), grads, metrics


# The default, 'entropy_density', is every other adapt test's; 'entropy' is a factor of both.
@pytest.mark.parametrize('mode', ['softmax', 'entropy_depth'])
def test_adapt_step_feeds_the_configured_discriminator_input(mode):
  """loss_adv and loss_disc are D's losses on `loss.disc_input`'s tensor of the step's own
  source and target outputs (the tensor itself: test_losses' closed forms)."""
  config = _config(**{'model.bn_sync': False, 'loss.disc_input': mode})
  (seg, disc, state, batch), _, metrics = _one_adapt_step(config)
  size = batch['source']['image'].shape[1:3]
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  inputs = {}
  for domain in ('source', 'target'):  # BN in training mode: batch statistics, per domain
    (seg_out, dens, dep), _ = seg.apply(variables, batch[domain]['image'], train=True,
                                        mutable=['batch_stats'])
    inputs[domain] = losses.discriminator_input(mode, seg_out, dens, dep, size)
  logits = {d: disc.apply(state.disc_params, x) for d, x in inputs.items()}
  np.testing.assert_allclose(metrics['loss_adv'], losses.bce_with_logits(logits['target'], 0.0),
                             rtol=1e-5)
  np.testing.assert_allclose(
      metrics['loss_disc'], losses.bce_with_logits(logits['source'], 0.0)
      + losses.bce_with_logits(logits['target'], 1.0), rtol=1e-5)


def test_density_losses_off_zero_their_terms_and_gradients():
  """loss.density_losses=False: L_bal_src and L_bal_tgt are 0 and nothing reaches the density
  head (with lambda_adv = 0, its only other input); on, it gets a gradient."""
  grads = {}
  for on in (True, False):
    config = _config(**{'model.bn_sync': False, 'loss.lambda_adv': 0.0,
                        'loss.density_losses': on})
    _, grads[on], metrics = _one_adapt_step(config)
    if not on:
      assert metrics['loss_bal_src'] == 0 and metrics['loss_bal_tgt'] == 0
    assert metrics['loss_depth'] > 0
  for leaf in jax.tree.leaves(grads[False]['density_head']):
    np.testing.assert_array_equal(leaf, 0)
  assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(grads[True]['density_head']))
  assert np.abs(grads[False]['depth_head']['conv3']['bias']).max() > 0


def _self_train_run(config, devices, batches):
  mesh = sharding.make_mesh(devices)
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  state, seg_tx, _ = train.init_state(config, seg, disc)
  step = sharding.make_sharded_step(train.self_train_step, mesh, seg=seg, seg_tx=seg_tx,
                                 config=config)
  state, history = sharding.replicate(state, mesh), []
  for batch in batches:
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    history.append(float(metrics['loss_seg'].addressable_data(0)))
  return jax.device_get(state), history


def test_self_train_two_devices_equal_one_device():
  """The gradient summed over devices is the global one: 2 x 1 image == 1 x 2 images."""
  config = _config(**{'optim.lr': 2.5e-4})
  batches = [{'image': b['target']['image'], 'label': b['source']['label']}
             for b in _batches(2, 2, config)]
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  start = jax.device_get(train.init_state(config, seg, disc)[0].params)
  one, loss1 = _self_train_run(config, jax.devices()[:1], batches)
  two, loss2 = _self_train_run(config, jax.devices()[:2], batches)
  np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
  def close(a, b, s):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * np.abs(b - s).max() + 1e-7)
  jax.tree.map(close, two.params, one.params, start)


def test_both_steps_sum_gradients_with_one_explicit_psum(monkeypatch):
  """Each step sums each network's per-device gradient over the data axis through
  `_sum_over_devices` (one mechanism, not shard_map's transpose in one step and psum in the
  other): traced, it receives the segmenter's gradient in both steps and D's in adapt_step."""
  config = _config()
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  state, seg_tx, disc_tx = train.init_state(config, seg, disc)
  mesh = sharding.make_mesh(jax.devices()[:2])
  summed, sum_over_devices = [], train._sum_over_devices
  def record(grads, axis_name):
    summed.append(jax.tree.structure(grads))
    assert axis_name == sharding.AXIS
    return sum_over_devices(grads, axis_name)
  monkeypatch.setattr(train, '_sum_over_devices', record)
  batch = sharding.shard_batch(_batches(1, 2, config)[0], mesh)
  state = sharding.replicate(state, mesh)
  adapt = sharding.make_sharded_step(train.adapt_step, mesh, seg=seg, disc=disc, seg_tx=seg_tx,
                                  disc_tx=disc_tx, config=config)
  jax.eval_shape(adapt, state, batch, sharding.replicate(_gmm_params(), mesh))
  assert summed == [jax.tree.structure(state.params), jax.tree.structure(state.disc_params)]
  summed.clear()
  self_train = sharding.make_sharded_step(train.self_train_step, mesh, seg=seg, seg_tx=seg_tx,
                                       config=config)
  jax.eval_shape(self_train, state, {'image': batch['target']['image'],
                                     'label': batch['source']['label']})
  assert summed == [jax.tree.structure(state.params)]


def test_prefetch_to_mesh_puts_batches_on_the_mesh_ahead_of_the_consumer():
  mesh = sharding.make_mesh(jax.devices()[:2])
  taken = []
  def source():
    for i in range(4):
      taken.append(i)
      yield {'x': np.full((2, 3), i, np.float32)}
  stream = sharding.prefetch_to_mesh(source(), mesh, size=2)
  first = next(stream)
  assert taken == [0, 1]  # while step 0 runs, batch 1 is already on its way to the devices
  assert first['x'].sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  rest = list(stream)
  assert [int(b['x'][0, 0]) for b in [first] + rest] == [0, 1, 2, 3]
