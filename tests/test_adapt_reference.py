"""`adapt_step` against the adaptation iteration written independently in PyTorch (METHOD §4-§5).

The reference shares only the initial weights with depthuda (converted from a PyTorch model
built like the original, `test_convert.TorchDeepLab`): its losses and their λ's, the density
targets (the class GMMs' density computed in torch), the discriminator's labels and both
optimizers (SGD with momentum and L2 added to the gradient, Adam with betas (0.9, 0.99), poly
learning rates) are written from METHOD, not from depthuda's code. After each of two iterations
every loss agrees, and after the second the parameters of both networks do.
"""

import math

import jax
import numpy as np
import pytest

from depthuda import models
from depthuda import sharding
from depthuda import train
from test_convert import TorchDeepLab
from test_train import C, _batches, _config, _gmm_params

torch = pytest.importorskip('torch')
F = torch.nn.functional

# Distinct weights, so that a term multiplied by another's λ changes the update.
LAMBDAS = {'seg': 1.0, 'depth': 0.02, 'bal_src': 0.003, 'bal_tgt': 0.007, 'adv': 0.3}
STEPS = 2


class TorchDiscriminator(torch.nn.Module):
  """Five 4x4 stride-2 pad-1 convs, LeakyReLU(0.2) between (METHOD §3)."""

  def __init__(self, channels):
    super().__init__()
    self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 4, stride=2, padding=1)
                                     for a, b in zip(channels[:-1], channels[1:]))

  def forward(self, x):
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i < len(self.convs) - 1:
        x = F.leaky_relu(x, 0.2)
    return x


def _up(x, size):
  return F.interpolate(x, size=size, mode='bilinear', align_corners=True)


def _berhu(pred, target):
  diff = pred - target
  c = 0.2 * diff.abs().max().item()
  return torch.where(diff.abs() <= c, diff.abs(), (diff ** 2 + c ** 2) / (2 * c)).mean()


def _entropy(logits):
  p = F.softmax(logits, dim=1)
  return -p * torch.log2(p) / math.log2(logits.shape[1])


def _density_target(gmm, classes, z, scale):
  """g(density_c(x, y, z)): classes, z [B, h, w]; x, y the cell's column and row."""
  weights, means, variances = (torch.tensor(np.asarray(a), dtype=torch.float64)
                               for a in (gmm.weights, gmm.means, gmm.variances))
  h, w = z.shape[1:]
  rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
  v = torch.stack(torch.broadcast_tensors(cols, rows, z.double()), -1)[..., None, :]
  var = variances[classes]  # [B, h, w, K, 3]
  normal = torch.exp(-(v - means[classes]) ** 2 / (2 * var)) / torch.sqrt(2 * math.pi * var)
  density = (weights[classes] * normal.prod(-1)).sum(-1)
  return (255 * (1 - torch.exp(-scale * density))).float()


class TorchIteration:
  """METHOD §5, one batch of source and target images per call."""

  def __init__(self, config, model, disc, gmm):
    self.config, self.model, self.disc, self.gmm = config, model, disc, gmm
    for name, p in model.named_parameters():  # BatchNorm affine parameters are frozen.
      p.requires_grad = 'bn' not in name and 'downsample.1' not in name
    o = config.optim
    self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                               momentum=0.9, weight_decay=5e-4)
    self.disc_opt = torch.optim.Adam(disc.parameters(), lr=o.disc_lr, betas=(0.9, 0.99))
    self.i = 0

  def __call__(self, batch):
    config, lam = self.config, LAMBDAS
    o = config.optim
    poly = (1 - self.i / o.poly_horizon) ** 0.9
    self.opt.param_groups[0]['lr'] = o.lr * poly
    self.disc_opt.param_groups[0]['lr'] = o.disc_lr * poly
    self.i += 1
    nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
    src, tgt = batch['source'], batch['target']
    label = torch.from_numpy(src['label']).long()
    depth = torch.from_numpy(src['depth'])
    size = tuple(label.shape[1:])
    self.model.train()
    self.opt.zero_grad()
    self.disc_opt.zero_grad()
    for p in self.disc.parameters():
      p.requires_grad = False

    seg_s, dens_s, dep_s = self.model(nchw(src['image']))
    grid = tuple(seg_s.shape[2:])
    loss = {}
    loss['seg'] = F.cross_entropy(_up(seg_s, size), label, ignore_index=255,
                                  weight=torch.tensor(config.loss.class_weights))
    loss['depth'] = _berhu(_up(dep_s, size)[:, 0], depth)
    # The label and depth on the grid come with the batch (the input pipeline's nearest rule).
    label_grid = torch.from_numpy(src['label_grid']).long()
    assert tuple(label_grid.shape[1:]) == grid
    pred = seg_s.detach().argmax(1)
    z = torch.where(label_grid == pred, torch.from_numpy(src['depth_grid']), 0.0)
    loss['bal_src'] = _berhu(dens_s[:, 0],
                             _density_target(self.gmm, pred, z, config.gmm.density_scale))

    seg_t, dens_t, dep_t = self.model(nchw(tgt['image']))
    z = dep_t.detach()[:, 0]
    target = _density_target(self.gmm, seg_t.detach().argmax(1), z, config.gmm.density_scale)
    loss['bal_tgt'] = _berhu(dens_t[:, 0], torch.where(z > 0, target, 0.0))
    d_tgt = _entropy(_up(seg_t, size)) * _up(dens_t, size)
    out = self.disc(d_tgt)
    loss['adv'] = F.binary_cross_entropy_with_logits(out, torch.zeros_like(out))  # "source"
    total = sum(lam[name] * value for name, value in loss.items())
    total.backward()

    for p in self.disc.parameters():
      p.requires_grad = True
    d_src = _entropy(_up(seg_s, size)) * _up(dens_s, size)
    out_s, out_t = self.disc(d_src.detach()), self.disc(d_tgt.detach())
    loss['disc'] = (F.binary_cross_entropy_with_logits(out_s, torch.zeros_like(out_s))
                    + F.binary_cross_entropy_with_logits(out_t, torch.ones_like(out_t)))
    loss['disc'].backward()
    self.opt.step()
    self.disc_opt.step()
    return {f'loss_{k}': v.item() for k, v in loss.items()} | {'loss': total.item()}


def _disc_params(disc):
  return {'params': {f'conv{i + 1}': {'kernel': c.weight.detach().numpy().transpose(2, 3, 1, 0),
                                      'bias': c.bias.detach().numpy()}
                     for i, c in enumerate(disc.convs)}}


def _assert_moved_alike(got, want, start, what, tol, norm=False):
  """Each leaf moved from `start` as the reference did: every element to `tol` of the largest
  move, or (norm) the difference of the moves to `tol` of the reference move's norm."""
  def check(path, g, w, s):
    name = f'{what} {jax.tree_util.keystr(path)}'
    if norm:
      error = np.linalg.norm((g - s) - (w - s)) / np.linalg.norm(w - s)
      assert error <= tol, (name, error)
    else:
      np.testing.assert_allclose(g - s, w - s, rtol=0, atol=tol * np.abs(w - s).max() + 1e-9,
                                 err_msg=name)
  jax.tree_util.tree_map_with_path(check, got, want, start)


def test_adapt_steps_match_an_independent_pytorch_iteration():
  config = _config(**{f'loss.lambda_{k}': v for k, v in LAMBDAS.items()},
                      **{'optim.poly_horizon': 4, 'optim.disc_lr': 1e-3})
  gmm = _gmm_params()
  torch.manual_seed(0)
  model = TorchDeepLab(config.model.layers, config.model.width, C)
  state_dict = lambda: {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  seg, disc = models.build(config, axis_name=sharding.AXIS)
  state, seg_tx, disc_tx = train.init_state(config, seg, disc,
                                            models.from_torch_state_dict(state_dict(), C))
  torch_disc = TorchDiscriminator((C,) + tuple(config.model.disc_ndf * 2**i for i in range(4))
                                  + (1,))
  for i, conv in enumerate(torch_disc.convs):
    p = state.disc_params['params'][f'conv{i + 1}']
    conv.weight.data = torch.from_numpy(np.asarray(p['kernel']).transpose(3, 2, 0, 1).copy())
    conv.bias.data = torch.from_numpy(np.asarray(p['bias']).copy())
  start = jax.device_get(state)

  mesh = sharding.make_mesh(jax.devices()[:1])
  step = sharding.make_sharded_step(train.adapt_step, mesh, seg=seg, disc=disc, seg_tx=seg_tx,
                                 disc_tx=disc_tx, config=config)
  state = sharding.replicate(state, mesh)
  reference = TorchIteration(config, model, torch_disc, gmm)
  for batch in _batches(STEPS, 2, config):
    state, metrics = step(state, sharding.shard_batch(batch, mesh), sharding.replicate(gmm, mesh))
    want = reference(batch)
    for name, value in want.items():
      np.testing.assert_allclose(metrics[name], value, rtol=2e-5, err_msg=name)

  state = jax.device_get(state)
  _assert_moved_alike(state.params, models.from_torch_state_dict(state_dict(), C)['params'],
                      start.params, 'segmenter', tol=1e-3)
  # Adam divides by the root of the squared gradients: float32 noise in an element with a
  # near-zero gradient can move it by up to lr, hence a bound on the whole move.
  _assert_moved_alike(state.disc_params, _disc_params(torch_disc), start.disc_params,
                      'discriminator', tol=1e-2, norm=True)
