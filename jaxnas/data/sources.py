"""Data sources: scikit-learn's 8x8 digits, local ``.npz`` arrays and TFDS datasets, behind ``load(config)``.

Every source gives a ``Dataset`` of uint8 NHWC images and int32 labels held in host memory, plus the
per-channel mean and std (in [0, 1] pixel units) that the *model* uses to normalise its input, so that attacks
and augmentation work in [0, 1] pixel space. The config fields are those of ``default_config()``.
scikit-learn and TFDS are imported only by the sources that use them (each takes seconds to import).
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import ml_collections
import numpy as np

SOURCES = ('digits', 'npz', 'tfds')
DIGITS_TRAIN = 1500  # load_digits has 1797 images: the first 1500 train, the remaining 297 test.


def default_config() -> ml_collections.ConfigDict:
  """The data config with every field and its default; ``load`` accepts any subset of these fields."""
  return ml_collections.ConfigDict(dict(
      source='digits',       # 'digits' (embedded, no network), 'npz' (local arrays) or 'tfds'.
      name='',               # TFDS dataset name, e.g. 'cifar10', 'cifar100', 'svhn_cropped', 'mnist'.
      data_dir='',           # TFDS data directory ('' = TFDS' default, ~/tensorflow_datasets).
      train_split='train',   # TFDS split names.
      test_split='test',     # '' = no test set.
      image_key='image',     # TFDS feature names.
      label_key='label',
      path='',               # .npz with uint8 'image' (NHWC or NHW) and integer 'label' (training set).
      test_path='',          # Optional .npz test set ('' = no test set).
      num_examples=0,        # Keep only the first N training and N test examples (0 = all), for smoke runs.
      num_classes=0,         # 0 = from the dataset (TFDS metadata, or the largest label + 1).
      mean=(),               # Per-channel mean in [0, 1] for the model's normalisation (() = from train).
      std=(),                # Per-channel std in [0, 1] (() = from train).
      val_fraction=0.5,      # Search: fraction of train held out for the architecture step (DARTS: 0.5).
      crop_padding=0,        # Augmentation: random crop with this zero padding (0 = off; CIFAR: 4).
      flip=False,            # Augmentation: random horizontal flip.
      cutout=0,              # Augmentation: cutout length (0 = off; DARTS evaluation: 16).
  ))


class Split(NamedTuple):
  """Images (uint8, NHWC) and labels (int32) of one split."""
  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset in host memory; the arrays are read-only."""
  name: str
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray   # uint8 [M, H, W, C]; M = 0 when there is no test set.
  test_labels: np.ndarray   # int32 [M]
  num_classes: int
  mean: tuple[float, ...]   # Per channel, in [0, 1] pixel units.
  std: tuple[float, ...]

  @property
  def train(self) -> Split:
    return Split(self.train_images, self.train_labels)

  @property
  def test(self) -> Split:
    return Split(self.test_images, self.test_labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Exact per-channel mean and (population) std of uint8 images in [0, 1] units, from value histograms."""
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, std = [], []
  for c in range(images.shape[-1]):
    counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
    m = counts @ values / counts.sum()
    mean.append(float(m))
    std.append(float(np.sqrt(counts @ (values - m) ** 2 / counts.sum())))
  return tuple(mean), tuple(std)


def _resolve(config) -> ml_collections.ConfigDict:
  """``default_config()`` updated with ``config`` (a ConfigDict or dict); unknown keys are an error."""
  resolved = default_config()
  for key, value in dict(config).items():
    if key not in resolved:
      raise ValueError(f'unknown data config key {key!r}: known keys are {sorted(resolved.keys())}')
    resolved[key] = value
  return resolved


def _digits() -> tuple[Split, Split]:
  """scikit-learn's bundled 8x8 digits (values 0..16) as uint8 0..255 images of shape (8, 8, 1)."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top (slow; digits only)
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  return (Split(images[:DIGITS_TRAIN], labels[:DIGITS_TRAIN]),
          Split(images[DIGITS_TRAIN:], labels[DIGITS_TRAIN:]))


def read_npz(path: str) -> Split:
  """Reads an ``.npz`` with uint8 ``image`` (NHWC, or NHW for grayscale) and integer ``label`` arrays."""
  if not path:
    raise ValueError("data.source='npz' needs data.path: set --config.data.path=FILE.npz "
                     "(uint8 'image' NHWC and integer 'label')")
  if not os.path.isfile(path):
    raise FileNotFoundError(f'npz file {path!r} not found (resolved to {os.path.abspath(path)}): point '
                            f"data.path / data.test_path to an existing .npz with 'image' and 'label' arrays")
  save_hint = 'save the data with np.savez(path, image=uint8 NHWC images, label=integer labels)'
  try:
    arrays = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f'{path} is not an .npz archive (numpy: {str(e).splitlines()[0]}): {save_hint}') from e
  if not isinstance(arrays, np.lib.npyio.NpzFile):
    raise ValueError(f'{path} holds a single array, not an .npz archive of arrays: {save_hint}')
  with arrays:
    missing = [k for k in ('image', 'label') if k not in arrays.files]
    if missing:
      raise ValueError(f'{path} lacks {missing} (it has {arrays.files}): {save_hint}')
    images, labels = arrays['image'], arrays['label']
  if images.dtype != np.uint8:
    raise ValueError(f"{path}: 'image' must be uint8 in [0, 255], got {images.dtype}; "
                     f'convert it with np.round(x * 255).astype(np.uint8) if it holds floats in [0, 1]')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"{path}: 'image' must be NHWC (or NHW for grayscale), got shape {images.shape}")
  if images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
    raise ValueError(f"{path}: 'image' of shape {images.shape} looks channels-first (NCHW): save it as NHWC, "
                     'e.g. images.transpose(0, 2, 3, 1)')
  if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
    raise ValueError(f"{path}: 'label' must be integers of shape ({images.shape[0]},), "
                     f'got {labels.dtype} {labels.shape}')
  if labels.size and labels.min() < 0:
    raise ValueError(f"{path}: 'label' has negative values; labels must be class indices 0..K-1")
  return Split(images, labels.astype(np.int32))


def _tfds_builder(cfg):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (slow; TFDS source only)
  if not cfg.name:
    raise ValueError("data.source='tfds' needs data.name, e.g. --config.data.name=cifar10")
  try:
    return tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
  except tfds.core.DatasetNotFoundError as e:
    raise ValueError(f'unknown TFDS dataset {cfg.name!r}: check the name with '
                     f"`python -c 'import tensorflow_datasets as tfds; print(tfds.list_builders())'`, "
                     f"or use data.source='npz' with data.path=FILE.npz") from e


def _read_tfds(builder, split: str, cfg) -> Split:
  """Reads one split of a prepared TFDS dataset into numpy through its random-access (array_record) source."""
  name = cfg.name
  try:
    source = builder.as_data_source(split=split)
  except (NotImplementedError, FileNotFoundError) as e:
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is not prepared in {builder.data_dir}: on a machine with network run '
          f'`tfds build {name} --data_dir=DIR --file_format=array_record`, copy DIR here and set '
          f"data.data_dir=DIR; or use data.source='npz' with data.path=FILE.npz") from e
    raise ValueError(f'TFDS dataset {name!r} in {builder.data_dir} has no random-access files (needed without '
                     f'TensorFlow): rebuild it with `tfds build {name} --file_format=array_record`') from e
  count = len(source) if not cfg.num_examples else min(len(source), cfg.num_examples)
  examples = [source[i] for i in range(count)]
  images = np.stack([np.asarray(e[cfg.image_key]) for e in examples])
  labels = np.asarray([e[cfg.label_key] for e in examples], dtype=np.int32)
  if images.dtype != np.uint8:
    raise ValueError(f'TFDS dataset {name!r}: feature {cfg.image_key!r} is {images.dtype}, jaxnas needs uint8 '
                     f'images')
  return Split(images, labels)


def _tfds(cfg) -> tuple[Split, Split, int]:
  builder = _tfds_builder(cfg)
  features = builder.info.features
  for role, key in (('image', cfg.image_key), ('label', cfg.label_key)):
    if key not in features:
      raise ValueError(f'TFDS dataset {cfg.name!r} has no feature {key!r} (it has {sorted(features.keys())}): '
                       f'set data.{role}_key')
  shape = features[cfg.image_key].shape
  if len(shape) != 3 or None in shape:
    raise ValueError(f'TFDS dataset {cfg.name!r} has images of shape {shape}; jaxnas needs a fixed HWC shape')
  num_classes = getattr(features[cfg.label_key], 'num_classes', 0) or 0
  train = _read_tfds(builder, cfg.train_split, cfg)
  test = _read_tfds(builder, cfg.test_split, cfg) if cfg.test_split else _empty_like(train)
  return train, test, num_classes


def _empty_like(split: Split) -> Split:
  return Split(split.images[:0], split.labels[:0])


def _head(split: Split, n: int) -> Split:
  return Split(split.images[:n], split.labels[:n]) if n else split


def _frozen(array: np.ndarray) -> np.ndarray:
  array = np.ascontiguousarray(array)
  array.setflags(write=False)
  return array


def load(config) -> Dataset:
  """Loads the dataset described by a data config (see ``default_config`` for the fields)."""
  cfg = _resolve(config)
  if cfg.source not in SOURCES:
    raise ValueError(f'unknown data source {cfg.source!r}: use one of {SOURCES}')
  num_classes = cfg.num_classes
  if cfg.source == 'digits':
    (train, test), name, num_classes = _digits(), 'digits', num_classes or 10
  elif cfg.source == 'npz':
    train = read_npz(cfg.path)
    test = read_npz(cfg.test_path) if cfg.test_path else _empty_like(train)
    name = os.path.splitext(os.path.basename(cfg.path))[0]
    if test.images.shape[1:] != train.images.shape[1:]:
      raise ValueError(f'{cfg.test_path} has images of shape {test.images.shape[1:]} but {cfg.path} has '
                       f'{train.images.shape[1:]}: use a test set of the same image shape')
  else:
    train, test, tfds_classes = _tfds(cfg)
    name, num_classes = cfg.name, num_classes or tfds_classes
  train, test = _head(train, cfg.num_examples), _head(test, cfg.num_examples)
  if not len(train.labels):
    raise ValueError(f'the training set of {name!r} is empty: check data.path / data.train_split')
  largest = int(max(train.labels.max(), test.labels.max(initial=0)))
  num_classes = num_classes or largest + 1
  if largest >= num_classes:
    raise ValueError(f'{name!r} has label {largest} but num_classes={num_classes}: fix data.num_classes')
  mean, std = channel_stats(train.images)
  mean, std = tuple(cfg.mean) or mean, tuple(cfg.std) or std
  channels = train.images.shape[-1]
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f'data.mean and data.std need {channels} values (one per channel), '
                     f'got {len(mean)} and {len(std)}')
  return Dataset(name=name, train_images=_frozen(train.images), train_labels=_frozen(train.labels),
                 test_images=_frozen(test.images), test_labels=_frozen(test.labels),
                 num_classes=int(num_classes), mean=tuple(float(m) for m in mean),
                 std=tuple(float(s) for s in std))
