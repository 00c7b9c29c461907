"""Converts a PyTorch checkpoint of the original into Flax variables for `config.init_from`.

  python -m depthuda.convert --torch_checkpoint=DeepLab_resnet_pretrained_imagenet.pth \
      --output=pretrained/imagenet [--num_classes=16]

Reads the ImageNet initialization (`Scale.*` keys; the heads are then initialized from seed 0)
or a trained checkpoint of the original (see `depthuda.models.torch_convert`), and writes the
segmenter variables to `OUTPUT/variables` with Orbax (replacing what is there). Needs torch:
`pip install 'depthuda[torch]'`. Bad input ends with a one-line error and exit status 1.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

from depthuda import checkpointing
from depthuda import models

_TORCH_CHECKPOINT = flags.DEFINE_string('torch_checkpoint', None,
                                        'PyTorch .pth file of the original.', required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to write `variables/` into.',
                              required=True)
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 16, 'Classes of the segmenter.')


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: float array} from a .pth holding a state dict, or one wrapped in a dict under
  'model' (the original's {'model': ..., 'optimizer': ...} files) or 'state_dict'."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional dependency
  except ImportError:
    raise ImportError("reading a PyTorch checkpoint needs torch: "
                      "pip install 'depthuda[torch]'") from None
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--torch_checkpoint={path}: no such file')
  try:
    content = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises several types for a file it cannot read
    reason = ' '.join(str(e).split())[:160]
    raise ValueError(f'--torch_checkpoint={path}: not a readable PyTorch checkpoint '
                     f'({type(e).__name__}: {reason})') from None
  for wrapper in ('model', 'state_dict'):
    if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
      content = content[wrapper]
  if not isinstance(content, dict):
    raise ValueError(f'--torch_checkpoint={path}: holds a {type(content).__name__}, '
                     'not a state dict')
  return {key: value.float().numpy() if torch.is_tensor(value) else value
          for key, value in content.items()}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    state_dict = load_torch_state_dict(_TORCH_CHECKPOINT.value)
    variables = models.from_torch_state_dict(state_dict, num_classes=_NUM_CLASSES.value)
    checkpointing.save_variables(_OUTPUT.value, variables)
  except (ImportError, OSError, ValueError) as e:
    sys.exit(f'error: {e}'.replace('\n', ' '))
  layers, width = models.infer_architecture(state_dict)
  count = sum(x.size for x in jax.tree.leaves(variables['params']))
  print(f'wrote {os.path.join(os.path.abspath(_OUTPUT.value), "variables")}: ResNet layers '
        f'{layers}, width {width}, {count:,} parameters')


if __name__ == '__main__':
  app.run(main)
