"""Search split, deterministic resumable epochs, and per-host shards of the global batch."""
import numpy as np
import pytest

from jaxnas import data


def _toy(n=23):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(2, axis=1)
  return data.Split(images, np.arange(n, dtype=np.int32))


def test_search_split_deterministic_and_disjoint():
  dataset = data.load({'source': 'digits'})
  train, val = data.search_split(dataset, 0.5, seed=3)
  assert len(train.labels) == 750 and len(val.labels) == 750
  again_train, again_val = data.search_split(dataset, 0.5, seed=3)
  np.testing.assert_array_equal(train.images, again_train.images)
  np.testing.assert_array_equal(val.labels, again_val.labels)
  other_train, _ = data.search_split(dataset, 0.5, seed=4)
  assert not np.array_equal(train.images, other_train.images)
  # Disjoint, and together exactly the training set (each image identified by its bytes).
  rows = lambda split: {im.tobytes() + bytes([lab]) for im, lab in zip(split.images, split.labels)}
  everything = rows(dataset.train)
  assert rows(train).isdisjoint(rows(val))
  assert rows(train) | rows(val) == everything


def test_search_split_darts_order_and_odd_sizes():
  toy = _toy(23)
  train, val = data.search_split(toy, 0.5, seed=None)  # DARTS: first floor(N/2) train, rest validation.
  np.testing.assert_array_equal(train.labels, np.arange(11))
  np.testing.assert_array_equal(val.labels, np.arange(11, 23))
  train, val = data.search_split(toy, 0.25, seed=0)
  assert len(train.labels) == 17 and len(val.labels) == 6
  assert sorted(np.concatenate([train.labels, val.labels])) == list(range(23))


@pytest.mark.parametrize('fraction', [0.0, 1.0, 0.99])
def test_search_split_rejects_empty_parts(fraction):
  with pytest.raises(ValueError, match='leaves an empty part'):
    data.search_split(_toy(23), fraction, seed=0)


def test_epoch_covers_every_example_once():
  toy = _toy(23)
  batches = list(data.epoch_batches(*toy, batch_size=5, seed=1, epoch=0, drop_remainder=False))
  assert [len(b.labels) for b in batches] == [5, 5, 5, 5, 3]
  seen = np.concatenate([b.labels for b in batches])
  assert sorted(seen) == list(range(23))
  for b in batches:  # Images travel with their labels.
    np.testing.assert_array_equal(b.images[:, 0, 0, 0], b.labels)
  full = list(data.epoch_batches(*toy, batch_size=5, seed=1, epoch=0))
  assert len(full) == data.num_batches(23, 5) == 4
  dropped = np.concatenate([b.labels for b in full])
  assert len(set(dropped)) == 20
  np.testing.assert_array_equal(dropped, seen[:20])


def test_epochs_and_seeds_differ_and_repeat():
  order = lambda seed, epoch: np.concatenate(list(data.batch_indices(50, 10, seed, epoch)))
  np.testing.assert_array_equal(order(0, 2), order(0, 2))
  assert not np.array_equal(order(0, 2), order(0, 3))
  assert not np.array_equal(order(0, 2), order(1, 2))
  np.testing.assert_array_equal(order(None, 5), np.arange(50))


@pytest.mark.parametrize('k', [0, 1, 3])
def test_resume_mid_epoch_reproduces_the_rest(k):
  toy = _toy(40)
  full = [b.labels for b in data.epoch_batches(*toy, batch_size=8, seed=7, epoch=4)]
  resumed = [b.labels for b in data.epoch_batches(*toy, batch_size=8, seed=7, epoch=4, start_step=k)]
  assert len(resumed) == len(full) - k
  for a, b in zip(full[k:], resumed):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('drop_remainder', [True, False])
def test_host_shards_are_disjoint_and_form_the_global_batch(drop_remainder):
  kwargs = dict(num_examples=29, batch_size=12, seed=5, epoch=1, drop_remainder=drop_remainder)
  global_batches = list(data.batch_indices(**kwargs))
  per_host = [list(data.batch_indices(**kwargs, process_index=p, process_count=4)) for p in range(4)]
  for step, global_batch in enumerate(global_batches):
    shards = [host[step] for host in per_host]
    if len(global_batch) == 12:
      assert all(len(s) == 3 for s in shards)
    np.testing.assert_array_equal(np.concatenate(shards), global_batch)
    assert len(set(np.concatenate(shards))) == len(global_batch)


def test_batching_errors():
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    next(data.batch_indices(30, 10, 0, 0, process_index=0, process_count=3))
  with pytest.raises(ValueError, match='process_index 2 is outside 0..1'):
    next(data.batch_indices(30, 10, 0, 0, process_index=2, process_count=2))
  with pytest.raises(ValueError, match='batch_size 64 exceeds the 30 examples'):
    data.num_batches(30, 64)
  assert data.num_batches(30, 64, drop_remainder=False) == 1
