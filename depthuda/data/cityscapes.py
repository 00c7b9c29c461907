"""Cityscapes through TFDS's own `cityscapes/semantic_segmentation` builder.

The builder reads the two official zips from a manual directory
(data.target_dir) and yields `image_id`, `image_left` (uint8 [1024, 2048, 3])
and `segmentation_label` (labelIds, uint8 [1024, 2048, 1]) for the splits
'train' (2,975), 'validation' (500) and 'test' (1,525).
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile

import tensorflow_datasets as tfds

from depthuda.data import preparing
from depthuda.errors import InputError

ZIPS = ('leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip')
SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}  # TFDS -> folder
# Preparation time per image, roughly (README, Datasets): both zips are extracted (11 GB), then
# TFDS's builder writes every image and label into its TFRecords.
SECONDS_PER_IMAGE = 0.3


def _image_counts(images_zip: str) -> dict[str, int]:
  """Left images per TFDS split, from the zip's directory (nothing is extracted)."""
  pattern = re.compile(r'leftImg8bit/(train|val|test)/[^/]+/[^/]+_leftImg8bit\.png$')
  counts = {split: 0 for split in SPLITS}
  folders = {folder: split for split, folder in SPLITS.items()}
  for name in _names(images_zip):
    match = pattern.match(name)
    if match:
      counts[folders[match.group(1)]] += 1
  return counts


def _names(path: str) -> list[str]:
  try:
    with zipfile.ZipFile(path) as archive:
      return archive.namelist()
  except (OSError, zipfile.BadZipFile) as e:
    raise InputError(f'Cityscapes: cannot read {path} ({e})') from None


def _check_labels(images_zip: str, labels_zip: str) -> None:
  """Every train and val image has its labelIds file (TFDS's builder would fail obscurely)."""
  labels = set(_names(labels_zip))
  pattern = re.compile(r'leftImg8bit/(train|val)/([^/]+/[^/]+)_leftImg8bit\.png$')
  for name in _names(images_zip):
    match = pattern.match(name)
    if match and f'gtFine/{match[1]}/{match[2]}_gtFine_labelIds.png' not in labels:
      raise InputError(f'Cityscapes: {name} in {images_zip} has no label '
                       f'gtFine/{match[1]}/{match[2]}_gtFine_labelIds.png in {labels_zip}')


def prepare(target_dir: str, tfds_dir: str) -> tfds.core.DatasetBuilder:
  """The prepared Cityscapes builder under `tfds_dir`, built from `target_dir`'s zips.

  Preparing extracts the zips to a scratch folder under `tfds_dir` that is
  removed afterwards (the prepared TFRecords hold everything needed).
  """
  paths = [os.path.join(target_dir, name) for name in ZIPS]
  missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
  if missing:
    raise InputError(f'Cityscapes: {" and ".join(missing)} not found in data.target_dir='
                     f'{os.path.abspath(target_dir)}; download them from '
                     'https://www.cityscapes-dataset.com (free registration) into that folder')
  expected = _image_counts(paths[0])
  for split in ('train', 'validation'):
    if not expected[split]:
      raise InputError(f'Cityscapes: no {SPLITS[split]} images (leftImg8bit/{SPLITS[split]}/) '
                       f'in {paths[0]}')
  builder = tfds.builder('cityscapes/semantic_segmentation', data_dir=tfds_dir)
  if not builder.is_prepared():
    _check_labels(*paths)
    scratch = os.path.join(tfds_dir, 'downloads', 'cityscapes_extracted')
    shutil.rmtree(scratch, ignore_errors=True)  # a cut-off run's partial extraction
    with preparing.announced('Cityscapes', builder.data_dir, sum(expected.values()),
                             SECONDS_PER_IMAGE):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=target_dir, extract_dir=scratch, try_download_gcs=False))
    shutil.rmtree(scratch, ignore_errors=True)
  prepared = {split: builder.info.splits[split].num_examples for split in SPLITS}
  if prepared != expected:
    raise InputError(f'{builder.data_dir} holds Cityscapes splits of sizes {prepared} but '
                     f'{paths[0]} has {expected}: delete it or point data.tfds_dir elsewhere')
  return builder
