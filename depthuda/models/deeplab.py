"""DeepLabV2 with depth and density heads: the segmenter of METHOD §3.

One ResNet trunk (output stride 8) feeds three heads at the feature grid: the ASPP classifier
(segmentation logits), a depth head (inverse depth) and a density head (the GMM density target
of METHOD §4). The depth and density heads are the original's `enc5_*` and `enc4_*` convs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from depthuda.models.resnet import CONV_INIT, CONV_INITS, resnet_trunk

# PyTorch's BatchNorm2d defaults: eps 1e-5, momentum 0.1 (new = 0.9 * old + 0.1 * batch), which
# is Flax's momentum 0.9.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
BN_MODES = ('train', 'frozen')
ASPP_DILATIONS = (6, 12, 18, 24)
# Top-level modules that are not part of the ResNet trunk.
HEADS = ('classifier', 'density_head', 'depth_head')


def torch_bias_init(fan_in: int) -> Callable:
  """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C_in * kh * kw.

  The original re-initialises only the conv weights (N(0, 0.01)); the biases of the classifier
  and of the depth and density heads keep this default (METHOD §3).
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ASPPClassifier(nn.Module):
  """Sum of four 3x3 convs (bias) with dilation = padding = 6, 12, 18, 24 (`conv0`..`conv3`)."""
  num_classes: int
  dtype: Any = jnp.float32
  kernel_init: Callable = CONV_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, h, w, C_in] -> logits [B, h, w, num_classes]."""
    return sum(nn.Conv(self.num_classes, (3, 3), padding=((d, d), (d, d)), kernel_dilation=d,
                       kernel_init=self.kernel_init, bias_init=torch_bias_init(9 * x.shape[-1]),
                       dtype=self.dtype, param_dtype=jnp.float32, name=f'conv{i}')(x)
               for i, d in enumerate(ASPP_DILATIONS))


class RegressionHead(nn.Module):
  """1x1 (8w) -> ReLU -> 3x3 (8w) -> ReLU -> 1x1 (2w) -> mean over channels (`conv1`..`conv3`).

  With w = 64: 2048 -> 512 -> 512 -> 128 -> 1, as the original's depth and density heads.
  """
  width: int
  dtype: Any = jnp.float32
  kernel_init: Callable = CONV_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, h, w, C_in] -> [B, h, w, 1] float32."""
    conv = functools.partial(nn.Conv, kernel_init=self.kernel_init, dtype=self.dtype,
                             param_dtype=jnp.float32)
    c_in, hidden = x.shape[-1], 8 * self.width
    x = nn.relu(conv(hidden, (1, 1), bias_init=torch_bias_init(c_in), name='conv1')(x))
    x = nn.relu(conv(hidden, (3, 3), padding=((1, 1), (1, 1)),
                     bias_init=torch_bias_init(9 * hidden), name='conv2')(x))
    x = conv(2 * self.width, (1, 1), bias_init=torch_bias_init(hidden), name='conv3')(x)
    return jnp.mean(x.astype(jnp.float32), axis=-1, keepdims=True)


class DeepLabV2Depth(nn.Module):
  """DeepLabV2 (dilated ResNet + ASPP) with depth and density heads.

  Attributes:
    num_classes: segmentation classes.
    layers: bottleneck blocks per ResNet layer; (3, 4, 23, 3) is ResNet-101.
    width: stem channels; layer4 outputs width * 32 channels (2048 for 64).
    bn_mode: 'train': batch statistics when `train=True` (running statistics updated, so call
      `apply(..., mutable=['batch_stats'])`), running statistics otherwise, as the original;
      'frozen': running statistics always. BN scale and bias are trainable parameters either
      way; `frozen_mask` marks them for the optimizer to leave alone.
    bn_axis_name: if set, batch statistics are averaged over this mapped axis (synced BN).
      Initialize with `train=False`, where no axis needs to be bound.
    dtype: compute dtype; parameters and statistics stay float32, outputs are float32.
    head_init: init of the depth and density heads: 'normal' (N(0, 0.01), the original's) or
      'he' (He normal). The heads have no normalisation: with N(0, 0.01) their output is ~1e-2
      of their input and barely learns unless the backbone is pretrained, so a network trained
      from scratch (the toy) uses 'he' there.
  """
  num_classes: int
  layers: Sequence[int] = (3, 4, 23, 3)
  width: int = 64
  bn_mode: str = 'train'
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  head_init: str = 'normal'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Segmentation logits, density and depth at the feature grid.

    Args:
      images: [B, H, W, 3] BGR, mean-subtracted.
      train: use batch statistics in BN (only with bn_mode 'train').
    Returns:
      seg [B, h, w, num_classes], density [B, h, w, 1], depth [B, h, w, 1], all float32;
      (h, w) = (96, 161) for 760x1280 inputs, (41, 81) for 320x640.
    """
    if self.bn_mode not in BN_MODES:
      raise ValueError(f'bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}')
    norm = functools.partial(
        nn.BatchNorm, use_running_average=self.bn_mode == 'frozen' or not train,
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, axis_name=self.bn_axis_name,
        # Two-pass variance, as PyTorch: E[x^2] - E[x]^2 loses digits where |mean| >> std.
        use_fast_variance=False, dtype=self.dtype, param_dtype=jnp.float32)
    if self.head_init not in CONV_INITS:
      raise ValueError(f'head_init must be one of {tuple(CONV_INITS)}, got {self.head_init!r}')
    init = CONV_INITS[self.head_init]
    x = resnet_trunk(images.astype(self.dtype), layers=self.layers, width=self.width,
                     norm=norm, dtype=self.dtype)
    seg = ASPPClassifier(self.num_classes, dtype=self.dtype, name='classifier')(x)
    density = RegressionHead(self.width, dtype=self.dtype, kernel_init=init,
                             name='density_head')(x)
    depth = RegressionHead(self.width, dtype=self.dtype, kernel_init=init, name='depth_head')(x)
    return seg.astype(jnp.float32), density, depth


def trunk(variables: dict[str, Any]) -> dict[str, Any]:
  """The ResNet trunk's part of `DeepLabV2Depth` variables (or their shapes): every collection
  without the classifier and heads."""
  return {collection: {name: tree for name, tree in modules.items() if name not in HEADS}
          for collection, modules in variables.items()}


def frozen_mask(params: Any) -> Any:
  """True for the BatchNorm scale and bias leaves (frozen in the original), False elsewhere.

  Args:
    params: the 'params' collection of `DeepLabV2Depth` (any pytree of dicts whose BN module
      names contain 'bn').
  Returns:
    a pytree of bools with the structure of `params`.
  """
  def is_bn(path, _) -> bool:
    return any('bn' in str(getattr(k, 'key', '')) for k in path)
  return jax.tree_util.tree_map_with_path(is_bn, params)
