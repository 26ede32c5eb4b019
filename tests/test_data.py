"""Data sources: the embedded digits, local .npz arrays and TFDS (through tfds.testing.mock_data)."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from jaxnas import data


def _check(dataset, shape, num_classes):
  assert dataset.train_images.dtype == np.uint8 and dataset.test_images.dtype == np.uint8
  assert dataset.train_labels.dtype == np.int32 and dataset.test_labels.dtype == np.int32
  assert dataset.train_images.shape[1:] == shape and dataset.image_shape == shape
  assert dataset.train_images.shape[0] == dataset.train_labels.shape[0]
  assert dataset.test_images.shape[0] == dataset.test_labels.shape[0]
  assert dataset.num_classes == num_classes
  assert len(dataset.mean) == len(dataset.std) == shape[-1]
  assert not dataset.train_images.flags.writeable


def test_digits_shapes_range_and_determinism():
  dataset = data.load(data.default_config())
  _check(dataset, (8, 8, 1), 10)
  assert dataset.train_images.shape[0] + dataset.test_images.shape[0] == 1797
  assert dataset.train_images.max() == 255 and dataset.train_images.min() == 0
  # Same pixels as scikit-learn's (0..16 scaled to 0..255), labels in order.
  reference = load_digits()
  np.testing.assert_allclose(dataset.train_images[..., 0] / 255.0,
                             reference.images[:1500] / 16.0, atol=0.5 / 255)
  np.testing.assert_array_equal(dataset.test_labels, reference.target[1500:])
  again = data.load({'source': 'digits'})
  np.testing.assert_array_equal(again.train_images, dataset.train_images)
  np.testing.assert_array_equal(again.test_labels, dataset.test_labels)
  assert set(np.unique(dataset.train_labels)) == set(range(10))


def test_channel_stats_match_numpy():
  images = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
  mean, std = data.channel_stats(images)
  np.testing.assert_allclose(mean, (images / 255.0).mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(std, (images / 255.0).std(axis=(0, 1, 2)), rtol=1e-12)
  dataset = data.load({'source': 'digits'})
  np.testing.assert_allclose(dataset.mean, [dataset.train_images.mean() / 255.0], rtol=1e-12)


def test_mean_std_and_num_examples_overrides():
  dataset = data.load({'source': 'digits', 'mean': (0.5,), 'std': (0.25,), 'num_examples': 40})
  assert dataset.mean == (0.5,) and dataset.std == (0.25,)
  assert dataset.train_images.shape[0] == 40 and dataset.test_images.shape[0] == 40


def _write_npz(path, images, labels):
  np.savez(path, image=images, label=labels)
  return str(path)


def test_npz_round_trip_and_grayscale(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 6, 5, 3), dtype=np.uint8)
  labels = rng.integers(0, 4, 12).astype(np.uint8)
  gray = rng.integers(0, 256, (5, 6, 5), dtype=np.uint8)
  train = _write_npz(tmp_path / 'train.npz', images, labels)
  dataset = data.load({'source': 'npz', 'path': train, 'num_classes': 4})
  _check(dataset, (6, 5, 3), 4)
  np.testing.assert_array_equal(dataset.train_images, images)
  np.testing.assert_array_equal(dataset.train_labels, labels)
  assert dataset.test_images.shape == (0, 6, 5, 3) and dataset.name == 'train'
  gray_path = _write_npz(tmp_path / 'gray.npz', gray, np.arange(5))
  gray_set = data.load({'source': 'npz', 'path': gray_path, 'test_path': gray_path})
  _check(gray_set, (6, 5, 1), 5)
  np.testing.assert_array_equal(gray_set.test_images[..., 0], gray)


def test_npz_shared_mnist(shared_dir):
  path = str(shared_dir / 'data' / 'mnist_subset_test.npz')
  dataset = data.load({'source': 'npz', 'path': path, 'test_path': path, 'num_examples': 500})
  _check(dataset, (28, 28, 1), 10)
  assert dataset.train_images.shape[0] == 500
  with np.load(path) as raw:
    np.testing.assert_array_equal(dataset.train_images, raw['image'][:500])
    np.testing.assert_array_equal(dataset.test_labels, raw['label'][:500])
  assert 0.05 < dataset.mean[0] < 0.25  # MNIST: mostly black background.


@pytest.mark.parametrize('name, shape, num_classes', [('cifar10', (32, 32, 3), 10), ('mnist', (28, 28, 1), 10),
                                                      ('cifar100', (32, 32, 3), 100)])
def test_tfds_mock(name, shape, num_classes, tmp_path):
  with tfds.testing.mock_data(num_examples=9):
    dataset = data.load({'source': 'tfds', 'name': name, 'data_dir': str(tmp_path)})
    source = tfds.data_source(name, split='train', data_dir=str(tmp_path))
    expected = np.stack([source[i]['image'] for i in range(9)])
  _check(dataset, shape, num_classes)
  assert dataset.train_images.shape[0] == dataset.test_images.shape[0] == 9
  np.testing.assert_array_equal(dataset.train_images, expected)  # mock data is deterministic per split.


def test_tfds_mock_no_test_split_and_limit(tmp_path):
  with tfds.testing.mock_data(num_examples=9):
    dataset = data.load({'source': 'tfds', 'name': 'cifar10', 'test_split': '', 'num_examples': 4})
  assert dataset.train_images.shape == (4, 32, 32, 3) and dataset.test_images.shape == (0, 32, 32, 3)


@pytest.mark.parametrize('config, error, match', [
    ({'source': 'lmdb'}, ValueError, r"unknown data source 'lmdb'"),
    ({'sorce': 'npz'}, ValueError, r"unknown data config key 'sorce'"),
    ({'source': 'npz'}, ValueError, r'needs data.path'),
    ({'source': 'npz', 'path': 'nowhere/x.npz'}, FileNotFoundError, r"npz file 'nowhere/x.npz' not found"),
    ({'source': 'tfds'}, ValueError, r'needs data.name'),
    ({'source': 'tfds', 'name': 'no_such_dataset_xyz'}, ValueError,
     r"unknown TFDS dataset 'no_such_dataset_xyz': check the name"),
    ({'source': 'digits', 'num_classes': 5}, ValueError, r'has label 9 but num_classes=5'),
    ({'source': 'digits', 'mean': (0.1, 0.2, 0.3)}, ValueError, r'need 1 values'),
])
def test_config_errors(config, error, match):
  with pytest.raises(error, match=match):
    data.load(config)


def test_tfds_not_prepared_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"TFDS dataset 'cifar10' is not prepared in .*tfds build cifar10 "
                                              r'--data_dir=DIR --file_format=array_record.*data.source=.npz.'):
    data.load({'source': 'tfds', 'name': 'cifar10', 'data_dir': str(tmp_path)})


def test_tfds_unknown_feature_error(tmp_path):
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(ValueError, match=r"has no feature 'img' .*set data.image_key"):
      data.load({'source': 'tfds', 'name': 'mnist', 'image_key': 'img'})


@pytest.mark.parametrize('arrays, match', [
    ({'image': np.zeros((3, 4, 4, 1), np.uint8)}, r"lacks \['label'\]"),
    ({'image': np.zeros((3, 4, 4, 1), np.float32), 'label': np.zeros(3, int)}, r"'image' must be uint8"),
    ({'image': np.zeros((3, 4), np.uint8), 'label': np.zeros(3, int)}, r"must be NHWC .*shape \(3, 4\)"),
    ({'image': np.zeros((3, 3, 32, 32), np.uint8), 'label': np.zeros(3, int)}, r"looks channels-first \(NCHW\)"),
    ({'image': np.zeros((3, 4, 4, 1), np.uint8), 'label': np.zeros(2, int)}, r"'label' must be integers of"),
    ({'image': np.zeros((3, 4, 4, 1), np.uint8), 'label': np.zeros(3, float)}, r"'label' must be integers of"),
    ({'image': np.zeros((3, 4, 4, 1), np.uint8), 'label': -np.ones(3, int)}, r'negative'),
])
def test_npz_content_errors(tmp_path, arrays, match):
  path = os.path.join(tmp_path, 'bad.npz')
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=match):
    data.load({'source': 'npz', 'path': path})


def test_files_that_are_not_npz_archives(tmp_path):
  np.save(tmp_path / 'one.npy', np.zeros((3, 4, 4, 1), np.uint8))
  (tmp_path / 'text.npz').write_text('image,label\n')
  for name, match in (('one.npy', 'holds a single array, not an .npz archive'), ('text.npz', 'is not an .npz archive')):
    with pytest.raises(ValueError, match=rf'{name} {match}.*: save the data with np.savez'):
      data.load({'source': 'npz', 'path': str(tmp_path / name)})


def test_npz_test_shape_mismatch(tmp_path):
  train = _write_npz(tmp_path / 'a.npz', np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, int))
  test = _write_npz(tmp_path / 'b.npz', np.zeros((2, 5, 5, 3), np.uint8), np.zeros(2, int))
  with pytest.raises(ValueError, match=r'has images of shape \(5, 5, 3\)'):
    data.load({'source': 'npz', 'path': train, 'test_path': test})
