"""The networks: DeepLabV2 with depth and density heads, the discriminator, the factory that
builds both from a config, checkpoint import."""

from depthuda.models.deeplab import HEADS, DeepLabV2Depth, frozen_mask, trunk
from depthuda.models.discriminator import Discriminator
from depthuda.models.factory import abstract_variables, build, feature_grid
from depthuda.models.torch_convert import from_torch_state_dict, infer_architecture

__all__ = ['HEADS', 'DeepLabV2Depth', 'Discriminator', 'abstract_variables', 'build',
           'feature_grid', 'from_torch_state_dict', 'frozen_mask', 'infer_architecture', 'trunk']
