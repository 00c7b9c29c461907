"""The dilated ResNet trunk of DeepLabV2 (METHOD §3), output stride 8.

Module and parameter names mirror the original PyTorch model (`conv1`, `bn1`,
`layer3_7/conv2`, `layer1_0/downsample_bn`, ...) so that `torch_convert` is a renaming.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Every convolution of the segmenter starts as N(0, 0.01) (the original's init loop). 'he' is
# for the depth and density heads of a network trained from scratch (see DeepLabV2Depth).
CONV_INITS = {'normal': nn.initializers.normal(stddev=0.01),
              'he': nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')}
CONV_INIT = CONV_INITS['normal']
# Bottleneck output channels = planes * EXPANSION.
EXPANSION = 4
# (stride, dilation) of layer1..layer4: output stride 8, the last two layers dilated instead.
LAYER_STRIDES_DILATIONS = ((1, 1), (2, 1), (1, 2), (1, 4))

ModuleDef = Callable[..., nn.Module]


def max_pool_ceil(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """Max pooling with PyTorch's `ceil_mode=True` output size.

  Output side = ceil((n + 2p - k) / s) + 1, minus one if the last window would start beyond
  the input and its left padding (PyTorch's rule). The extra right padding is -inf, so it never
  wins the max.

  Args:
    x: [B, H, W, C].
  Returns:
    [B, H', W', C].
  """
  pads = []
  for size in x.shape[1:3]:
    out = math.ceil((size + 2 * padding - window) / stride) + 1
    if (out - 1) * stride >= size + padding:
      out -= 1
    pads.append((padding, (out - 1) * stride + window - size - padding))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


class Bottleneck(nn.Module):
  """ResNet bottleneck, with the stride on the first 1x1 conv as in the original (Caffe style).

  Attributes:
    planes: width of the inner convs; the block outputs planes * 4 channels.
    stride: stride of conv1 and of the projection shortcut.
    dilation: dilation (= padding) of the 3x3 conv.
    project: whether the shortcut is a 1x1 conv + BN (the first block of every layer).
    norm: BatchNorm constructor (takes `name`).
    dtype: compute dtype.
  """
  planes: int
  norm: ModuleDef
  stride: int = 1
  dilation: int = 1
  project: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C_in] -> [B, H', W', planes * 4]."""
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype,
                             param_dtype=jnp.float32)
    d = self.dilation
    out = conv(self.planes, (1, 1), strides=self.stride, padding='VALID', name='conv1')(x)
    out = nn.relu(self.norm(name='bn1')(out))
    out = conv(self.planes, (3, 3), padding=((d, d), (d, d)), kernel_dilation=d,
               name='conv2')(out)
    out = nn.relu(self.norm(name='bn2')(out))
    out = conv(self.planes * EXPANSION, (1, 1), name='conv3')(out)
    out = self.norm(name='bn3')(out)
    if self.project:
      x = conv(self.planes * EXPANSION, (1, 1), strides=self.stride, padding='VALID',
               name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x)
    return nn.relu(out + x)


def resnet_trunk(x: jax.Array, *, layers: Sequence[int], width: int, norm: ModuleDef,
                 dtype: Any = jnp.float32) -> jax.Array:
  """Stem and layer1..layer4 of DeepLabV2's ResNet.

  Must be called inside a compact method: the submodules (`conv1`, `bn1`, `layer{i}_{j}`) are
  created in the caller's scope, so their parameters sit at the top level of the segmenter,
  like the original's.

  Args:
    x: images [B, H, W, 3].
    layers: bottleneck blocks per layer, (3, 4, 23, 3) for ResNet-101.
    width: stem channels; layer i has width * 2**(i-1) planes.
    norm: BatchNorm constructor (takes `name`).
    dtype: compute dtype.
  Returns:
    layer4 features [B, h, w, width * 32], (h, w) the stride-8 grid (760x1280 -> 96x161).
  """
  x = nn.Conv(width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
              kernel_init=CONV_INIT, dtype=dtype, param_dtype=jnp.float32, name='conv1')(x)
  x = nn.relu(norm(name='bn1')(x))
  x = max_pool_ceil(x)
  for i, (blocks, (stride, dilation)) in enumerate(zip(layers, LAYER_STRIDES_DILATIONS)):
    planes = width * 2**i
    for j in range(blocks):
      x = Bottleneck(planes, norm, stride=stride if j == 0 else 1, dilation=dilation,
                     project=j == 0, dtype=dtype, name=f'layer{i + 1}_{j}')(x)
  return x
