"""Label spaces: dataset class ids -> training classes, names, mean, class weights.

Pure NumPy (no TensorFlow), so the core modules can use names and weights.
Lookup tables are 256-entry uint8 arrays: `table[dataset_id]` is the training
class, or `IGNORE_LABEL` for ids the experiment does not use (METHOD §2).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

IGNORE_LABEL = 255

# Subtracted from BGR images; no division by a standard deviation (METHOD §2).
MEAN_BGR = np.array((104.00698793, 116.66876762, 122.67891434), np.float32)
MEAN_BGR.setflags(write=False)

CLASS_NAMES_16 = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'light', 'sign',
    'vegetation', 'sky', 'person', 'rider', 'car', 'bus', 'motorcycle',
    'bicycle')
CLASS_NAMES_7 = (
    'flat', 'construction', 'object', 'nature', 'sky', 'human', 'vehicle')

# The 13-class protocol drops wall, fence and pole from the 16 classes.
CLASSES_13 = tuple(
    i for i, name in enumerate(CLASS_NAMES_16)
    if name not in ('wall', 'fence', 'pole'))

# Class weights of the weighted source cross-entropy (METHOD §5).
CLASS_WEIGHTS_16 = (
    0.327, 0.313, 0.206, 22.427, 22.558, 5.811, 155.643, 59.528, 0.586, 0.882,
    1.423, 12.871, 1.488, 3.955, 29.164, 27.563)
CLASS_WEIGHTS_7 = (0.349, 0.462, 11.576, 1.325, 1.993, 3.216, 3.192)


def _table(mapping: Mapping[int, int]) -> np.ndarray:
  """A [256] uint8 lookup table; ids absent from `mapping` map to ignore."""
  table = np.full((256,), IGNORE_LABEL, np.uint8)
  for dataset_id, class_id in mapping.items():
    table[dataset_id] = class_id
  table.setflags(write=False)
  return table


def _groups(groups: Iterable[tuple[Iterable[int], int]]) -> dict[int, int]:
  return {i: class_id for ids, class_id in groups for i in ids}


# SYNTHIA ids: 1 sky, 2 building, 3 road, 4 sidewalk, 5 fence, 6 vegetation,
# 7 pole, 8 car, 9 sign, 10 pedestrian, 11 bicycle, 12 motorcycle,
# 15 traffic light, 17 rider, 19 bus, 21 wall, 22 lane marking.
SYNTHIA_TO_16 = _table({
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10,
    17: 11, 8: 12, 19: 13, 12: 14, 11: 15})
# The original's 7-class SYNTHIA map leaves wall, rider, bus and motorcycle out
# (they are ignored, not merged); kept as is.
SYNTHIA_TO_7 = _table(_groups([
    ((3, 4, 22), 0), ((2, 5), 1), ((7, 9, 15), 2), ((6,), 3), ((1,), 4),
    ((10,), 5), ((8, 11), 6)]))

# Cityscapes labelIds (not trainIds): 7 road, 8 sidewalk, 11 building, 12 wall,
# 13 fence, 17 pole, 19 light, 20 sign, 21 vegetation, 22 terrain, 23 sky,
# 24 person, 25 rider, 26 car, 27 truck, 28 bus, 31 train, 32 motorcycle,
# 33 bicycle.
CITYSCAPES_TO_16 = _table({
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9,
    24: 10, 25: 11, 26: 12, 28: 13, 32: 14, 33: 15})
CITYSCAPES_TO_7 = _table(_groups([
    ((7, 8), 0), ((11, 12, 13), 1), ((17, 19, 20), 2), ((21, 22), 3),
    ((23,), 4), ((24, 25), 5), (range(26, 34), 6)]))

# The ids a Cityscapes labelIds PNG may hold: 0 (unlabeled) ... 33 (bicycle). License plates
# (id -1) are drawn as 255 by some conversion tools; both map to ignore.
CITYSCAPES_IDS = np.zeros((256,), bool)
CITYSCAPES_IDS[:34] = CITYSCAPES_IDS[255] = True
CITYSCAPES_IDS.setflags(write=False)

# Mapillary Vistas v1.2 labels in the order of its config.json: a label PNG's pixel value is
# the index into this tuple.
MAPILLARY_LABELS = (
    'animal--bird', 'animal--ground-animal', 'construction--barrier--curb',
    'construction--barrier--fence', 'construction--barrier--guard-rail',
    'construction--barrier--other-barrier', 'construction--barrier--wall',
    'construction--flat--bike-lane', 'construction--flat--crosswalk-plain',
    'construction--flat--curb-cut', 'construction--flat--parking',
    'construction--flat--pedestrian-area', 'construction--flat--rail-track',
    'construction--flat--road', 'construction--flat--service-lane',
    'construction--flat--sidewalk', 'construction--structure--bridge',
    'construction--structure--building', 'construction--structure--tunnel', 'human--person',
    'human--rider--bicyclist', 'human--rider--motorcyclist', 'human--rider--other-rider',
    'marking--crosswalk-zebra', 'marking--general', 'nature--mountain', 'nature--sand',
    'nature--sky', 'nature--snow', 'nature--terrain', 'nature--vegetation', 'nature--water',
    'object--banner', 'object--bench', 'object--bike-rack', 'object--billboard',
    'object--catch-basin', 'object--cctv-camera', 'object--fire-hydrant', 'object--junction-box',
    'object--mailbox', 'object--manhole', 'object--phone-booth', 'object--pothole',
    'object--street-light', 'object--support--pole', 'object--support--traffic-sign-frame',
    'object--support--utility-pole', 'object--traffic-light', 'object--traffic-sign--back',
    'object--traffic-sign--front', 'object--trash-can', 'object--vehicle--bicycle',
    'object--vehicle--boat', 'object--vehicle--bus', 'object--vehicle--car',
    'object--vehicle--caravan', 'object--vehicle--motorcycle', 'object--vehicle--on-rails',
    'object--vehicle--other-vehicle', 'object--vehicle--trailer', 'object--vehicle--truck',
    'object--vehicle--wheeled-slow', 'void--car-mount', 'void--ego-vehicle', 'void--unlabeled')

# The original's name-based Vistas -> 7 map (from DADA): ground surfaces, lane markings and
# terrain are flat; curbs, barriers and structures construction; poles, lights, signs, sign
# frames and (as in the original) potholes object. Animals, mountain, sand, snow, water, the
# remaining street furniture and the void labels are ignored.
MAPILLARY_7_GROUPS = (
    ('construction--flat--bike-lane', 'construction--flat--crosswalk-plain',
     'construction--flat--curb-cut', 'construction--flat--parking',
     'construction--flat--pedestrian-area', 'construction--flat--rail-track',
     'construction--flat--road', 'construction--flat--service-lane',
     'construction--flat--sidewalk', 'marking--crosswalk-zebra', 'marking--general',
     'nature--terrain'),
    ('construction--barrier--curb', 'construction--barrier--fence',
     'construction--barrier--guard-rail', 'construction--barrier--other-barrier',
     'construction--barrier--wall', 'construction--structure--bridge',
     'construction--structure--building', 'construction--structure--tunnel'),
    ('object--pothole', 'object--street-light', 'object--support--pole',
     'object--support--traffic-sign-frame', 'object--support--utility-pole',
     'object--traffic-light', 'object--traffic-sign--back', 'object--traffic-sign--front'),
    ('nature--vegetation',),
    ('nature--sky',),
    ('human--person', 'human--rider--bicyclist', 'human--rider--motorcyclist',
     'human--rider--other-rider'),
    ('object--vehicle--bicycle', 'object--vehicle--boat', 'object--vehicle--bus',
     'object--vehicle--car', 'object--vehicle--caravan', 'object--vehicle--motorcycle',
     'object--vehicle--on-rails', 'object--vehicle--other-vehicle', 'object--vehicle--trailer',
     'object--vehicle--truck', 'object--vehicle--wheeled-slow'),
)
MAPILLARY_TO_7 = _table(_groups(
    ([MAPILLARY_LABELS.index(name) for name in names], class_id)
    for class_id, names in enumerate(MAPILLARY_7_GROUPS)))

_TABLES = {
    ('synthia', 16): SYNTHIA_TO_16,
    ('synthia', 7): SYNTHIA_TO_7,
    ('cityscapes', 16): CITYSCAPES_TO_16,
    ('cityscapes', 7): CITYSCAPES_TO_7,
    ('mapillary', 7): MAPILLARY_TO_7,
}


def label_map(dataset: str, num_classes: int) -> np.ndarray:
  """The [256] uint8 table mapping `dataset`'s ids to `num_classes` classes."""
  try:
    return _TABLES[(dataset, num_classes)].copy()
  except KeyError:
    raise ValueError(
        f'no label map for dataset={dataset!r} with num_classes={num_classes};'
        f' known: {sorted(_TABLES)}') from None


def class_names(num_classes: int) -> tuple[str, ...]:
  """Names of the 16 or 7 training classes, in class-id order."""
  names = {16: CLASS_NAMES_16, 7: CLASS_NAMES_7}
  if num_classes not in names:
    raise ValueError(f'num_classes must be 16 or 7, got {num_classes}')
  return names[num_classes]


def class_weights(num_classes: int) -> tuple[float, ...]:
  """The SYNTHIA->Cityscapes cross-entropy weights for 16 or 7 classes."""
  weights = {16: CLASS_WEIGHTS_16, 7: CLASS_WEIGHTS_7}
  if num_classes not in weights:
    raise ValueError(f'num_classes must be 16 or 7, got {num_classes}')
  return weights[num_classes]
