"""Converts a PyTorch checkpoint of the original into Flax variables for `config.init_from`.

  python -m depthuda.convert --torch_checkpoint=DeepLab_resnet_pretrained_imagenet.pth \
      --output=pretrained/imagenet
  python -m depthuda.convert --torch_checkpoint=trained.pth --output=pretrained/x [--num_classes=7]

Reads the ImageNet initialization (`Scale.*` keys) or a trained checkpoint of the original (see
`depthuda.models.torch_convert`), and writes the segmenter variables to `OUTPUT/variables` with
Orbax (replacing what is there) and what they are to `OUTPUT/metadata.json`
(`depthuda.converted`). From the ImageNet file only the ResNet trunk is kept: the runs that
start from it initialize the classifier and heads themselves, so the one folder serves every
experiment, 16 or 7 classes. Needs torch: `pip install 'depthuda[torch]'`. Bad input ends with a
one-line error and exit status 1, a bad command line with exit status 2.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import jax
import numpy as np

from depthuda import checkpointing
from depthuda import cli
from depthuda import converted
from depthuda import fileio
from depthuda import models

_TORCH_CHECKPOINT = flags.DEFINE_string('torch_checkpoint', None,
                                        'PyTorch .pth file of the original.', required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to write `variables/` into.',
                              required=True)
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', None, 'The classes a trained checkpoint must have (default: whatever its '
    'classifier has). Not used for the ImageNet file, which has no classifier of ours.')


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
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', cli.USAGE)
  try:
    state_dict = load_torch_state_dict(_TORCH_CHECKPOINT.value)
    variables = models.from_torch_state_dict(state_dict, num_classes=_NUM_CLASSES.value)
    layers, width = models.infer_architecture(state_dict)
    params = variables['params']
    if 'classifier' in params:
      num_classes = params['classifier']['conv0']['bias'].shape[0]
      kind, what = converted.TRAINED, f'trained {num_classes}-class model'
    else:
      num_classes = None
      kind, what = converted.IMAGENET, 'ImageNet trunk (any class count)'
    meta = converted.metadata(kind, layers, width, num_classes,
                              source=os.path.abspath(_TORCH_CHECKPOINT.value))
    checkpointing.save_variables(_OUTPUT.value, variables, meta)
  except (ImportError, OSError, ValueError) as e:
    cli.fail(str(e), cli.INPUT)
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f'wrote {fileio.absolute(_OUTPUT.value)}: {what}, ResNet layers {layers}, width '
        f'{width}, {count:,} parameters')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
