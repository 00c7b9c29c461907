"""The fully convolutional domain discriminator (METHOD §3, ADVENT's `get_fc_discriminator`)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LEAKY_SLOPE = 0.2


def _uniform(bound: float) -> nn.initializers.Initializer:
  """U(-bound, bound)."""
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Discriminator(nn.Module):
  """Five 4x4 stride-2 pad-1 convs C -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1, LeakyReLU(0.2) between.

  Initialized as PyTorch's Conv2d default: kaiming_uniform(a=sqrt(5)) for the kernel, which is
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias. Convs are `conv1`..`conv5`.

  Attributes:
    ndf: channels of the first conv.
    dtype: compute dtype; parameters stay float32, logits are float32.
  """
  ndf: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> domain logits [B, H/32, W/32, 1] (each side floor-halved five times)."""
    channels = (self.ndf, 2 * self.ndf, 4 * self.ndf, 8 * self.ndf, 1)
    x = x.astype(self.dtype)
    for i, features in enumerate(channels):
      bound = 1.0 / math.sqrt(x.shape[-1] * 4 * 4)
      x = nn.Conv(features, (4, 4), strides=2, padding=((1, 1), (1, 1)),
                  kernel_init=_uniform(bound), bias_init=_uniform(bound), dtype=self.dtype,
                  param_dtype=jnp.float32, name=f'conv{i + 1}')(x)
      if i < len(channels) - 1:
        x = nn.leaky_relu(x, LEAKY_SLOPE)
    return x.astype(jnp.float32)
