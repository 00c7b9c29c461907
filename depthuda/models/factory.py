"""The networks a config describes, and their variables' shapes without computing them."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from depthuda.models.deeplab import DeepLabV2Depth
from depthuda.models.discriminator import Discriminator


def build(config: ml_collections.ConfigDict, axis_name: str | None = None
          ) -> tuple[DeepLabV2Depth, Discriminator]:
  """The segmenter and the discriminator of `config.model`.

  axis_name: the mesh axis the train step is mapped over; with `config.model.bn_sync` the
  segmenter's BatchNorm averages its batch statistics over it. None for evaluation.
  """
  seg = DeepLabV2Depth(
      num_classes=config.data.num_classes, layers=tuple(config.model.layers),
      width=config.model.width, bn_mode=config.model.bn_mode,
      bn_axis_name=axis_name if config.model.bn_sync else None,
      dtype=jnp.dtype(config.compute_dtype), head_init=config.model.head_init)
  return seg, Discriminator(ndf=config.model.disc_ndf)


def _input(config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
  """One image of the configured input size, [1, H, W, 3]."""
  width, height = config.data.input_size
  return jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)


def abstract_variables(config: ml_collections.ConfigDict, seg: nn.Module) -> Any:
  """Shapes of the segmenter variables, placed on this process's first device.

  An explicit device keeps Orbax from restoring onto the devices recorded at save time (a
  checkpoint written on a GPU machine restores on a CPU-only one and vice versa).
  """
  shapes = jax.eval_shape(lambda x: seg.init(jax.random.PRNGKey(0), x, train=False),
                          _input(config))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def feature_grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(h, w) of the segmenter's output grid for the configured input size."""
  seg, _ = build(config)
  logits, _, _ = jax.eval_shape(
      lambda x: seg.init_with_output(jax.random.PRNGKey(0), x, train=False)[0], _input(config))
  return tuple(logits.shape[1:3])
