"""The original's networks and adaptation iteration in PyTorch eager: the baseline of train_step.py.

The same DeepLabV2 ResNet (stride on the first 1x1 conv, dilated layer3/layer4, ceil-mode max
pool, frozen BatchNorm affine parameters, BN in training mode), ASPP classifier, depth and
density heads and discriminator as depthuda's, trained the way the original trains (ADVENT's
loop): source forward, its losses, backward; target forward, its losses with D frozen, backward;
D on the detached source and target inputs, backward; then both optimizer steps.

The density targets are random tensors, as the original read them from precomputed files: the
source target gathers the predicted class's map from 16 precomputed maps, the target-domain
target is a random map. Neither imports depthuda, JAX or TensorFlow.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

ASPP_DILATIONS = (6, 12, 18, 24)
LAYER_STRIDES_DILATIONS = ((1, 1), (2, 1), (1, 2), (1, 4))


def _frozen_bn(channels: int) -> nn.BatchNorm2d:
  bn = nn.BatchNorm2d(channels, affine=True)
  for p in bn.parameters():
    p.requires_grad = False
  return bn


class Bottleneck(nn.Module):
  def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, project: bool):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
    self.bn1 = _frozen_bn(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = _frozen_bn(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = _frozen_bn(planes * 4)
    self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                     _frozen_bn(planes * 4)) if project else None)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RegressionHead(nn.Module):
  """The original's enc4_* (density) / enc5_* (depth): 1x1, ReLU, 3x3, ReLU, 1x1, channel mean."""

  def __init__(self, inplanes: int, width: int):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, 8 * width, 1)
    self.conv2 = nn.Conv2d(8 * width, 8 * width, 3, padding=1)
    self.conv3 = nn.Conv2d(8 * width, 2 * width, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.conv2(F.relu(self.conv1(x))))
    return self.conv3(x).mean(dim=1, keepdim=True)


class DeepLabV2Depth(nn.Module):
  def __init__(self, num_classes: int, layers: Sequence[int], width: int = 64):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = _frozen_bn(width)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    blocks, inplanes = [], width
    for i, (n, (stride, dilation)) in enumerate(zip(layers, LAYER_STRIDES_DILATIONS)):
      planes = width * 2**i
      for j in range(n):
        blocks.append(Bottleneck(inplanes, planes, stride if j == 0 else 1, dilation, j == 0))
        inplanes = planes * 4
    self.trunk = nn.Sequential(*blocks)
    self.classifier = nn.ModuleList(
        nn.Conv2d(inplanes, num_classes, 3, padding=d, dilation=d) for d in ASPP_DILATIONS)
    self.density_head = RegressionHead(inplanes, width)
    self.depth_head = RegressionHead(inplanes, width)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        m.weight.data.normal_(0, 0.01)

  def forward(self, x: torch.Tensor):
    x = self.trunk(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
    seg = sum(conv(x) for conv in self.classifier)
    return seg, self.density_head(x), self.depth_head(x)


class Discriminator(nn.Module):
  def __init__(self, in_channels: int, ndf: int = 64):
    super().__init__()
    channels = (in_channels, ndf, 2 * ndf, 4 * ndf, 8 * ndf, 1)
    self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1)
                               for a, b in zip(channels[:-1], channels[1:]))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i < len(self.convs) - 1:
        x = F.leaky_relu(x, 0.2)
    return x


def berhu(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
  diff = pred - target
  abs_diff = diff.abs()
  c = 0.2 * abs_diff.max().item()  # The original takes c with .item(): a host sync.
  if c == 0:
    return abs_diff.mean()
  return torch.where(abs_diff <= c, abs_diff, (diff * diff + c * c) / (2 * c)).mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
  p = F.softmax(logits, dim=1)
  return -p * torch.log2(p + 1e-30) / math.log2(logits.shape[1])


class AdaptationIteration:
  """One iteration of METHOD §5 with the original's loss weights (synthia_city)."""

  def __init__(self, num_classes: int, layers: Sequence[int], width: int, height: int,
               image_width: int, device: str, bf16: bool, class_weights: Sequence[float],
               seed: int = 0, lambdas=(0.005, 0.01, 0.05, 0.05)):
    torch.manual_seed(seed)
    self.device, self.bf16 = device, bf16
    self.model = DeepLabV2Depth(num_classes, layers, width).to(device).train()
    self.disc = Discriminator(num_classes).to(device).train()
    self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad],
                               lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=1e-3, betas=(0.9, 0.99))
    self.weights = torch.tensor(class_weights, dtype=torch.float32, device=device)
    self.lambdas = lambdas
    self.size = (height, image_width)
    g = torch.Generator().manual_seed(seed)
    self.src_image = (torch.randn(1, 3, height, image_width, generator=g) * 50).to(device)
    self.tgt_image = (torch.randn(1, 3, height, image_width, generator=g) * 50).to(device)
    label = torch.randint(0, num_classes, (1, height, image_width), generator=g)
    label[:, : height // 10] = 255
    self.label = label.to(device)
    self.depth = (torch.rand(1, height, image_width, generator=g) * 59 + 1).to(device)
    self.num_classes, self.generator = num_classes, g
    self._src_maps = None

  def _forward(self, images: torch.Tensor):
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
      outputs = self.model(images)
    return tuple(o.float() for o in outputs)

  def _up(self, x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=self.size, mode='bilinear', align_corners=True)

  def step(self) -> None:
    lam_depth, lam_bal_src, lam_adv, lam_bal_tgt = self.lambdas
    self.opt.zero_grad(set_to_none=True)
    self.disc_opt.zero_grad(set_to_none=True)
    for p in self.disc.parameters():
      p.requires_grad = False

    seg_s, dens_s, dep_s = self._forward(self.src_image)
    if self._src_maps is None:  # 16 precomputed density maps per source image, on the grid.
      h, w = seg_s.shape[2:]
      self._src_maps = (torch.rand(1, self.num_classes, h, w, generator=self.generator) * 255
                        ).to(self.device)
      self._tgt_map = (torch.rand(1, 1, h, w, generator=self.generator) * 255).to(self.device)
    src_target = torch.gather(self._src_maps, 1, seg_s.detach().argmax(1, keepdim=True))
    loss = (F.cross_entropy(self._up(seg_s), self.label, weight=self.weights, ignore_index=255)
            + lam_depth * berhu(self._up(dep_s)[:, 0], self.depth)
            + lam_bal_src * berhu(dens_s, src_target))
    loss.backward()

    seg_t, dens_t, _ = self._forward(self.tgt_image)
    d_tgt = entropy(self._up(seg_t)) * self._up(dens_t)
    out = self.disc(d_tgt)
    loss = (lam_adv * F.binary_cross_entropy_with_logits(out, torch.zeros_like(out))
            + lam_bal_tgt * berhu(dens_t, self._tgt_map))
    loss.backward()

    for p in self.disc.parameters():
      p.requires_grad = True
    d_src = entropy(self._up(seg_s.detach())) * self._up(dens_s.detach())
    out = self.disc(d_src)
    F.binary_cross_entropy_with_logits(out, torch.zeros_like(out)).backward()
    out = self.disc(d_tgt.detach())
    F.binary_cross_entropy_with_logits(out, torch.ones_like(out)).backward()
    self.opt.step()
    self.disc_opt.step()

  def synchronize(self) -> None:
    if self.device == 'cuda':
      torch.cuda.synchronize()
