"""Search split and deterministic, resumable, multi-host batching.

The order of every epoch is a pure function of ``(seed, epoch)``, so a run stopped at step ``k`` of an epoch
resumes exactly by asking for the same epoch from ``start_step=k``. Each global batch is cut into
``process_count`` contiguous, disjoint slices; process ``process_index`` reads its own slice (multi-host data
parallelism: the global batch is the concatenation of the hosts' slices in process order).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxnas.data.sources import Dataset, Split


def search_split(data: Dataset | Split, val_fraction: float, seed: int | None) -> tuple[Split, Split]:
  """Splits the training set into the weight-training part and the architecture (validation) part.

  DARTS (Liu et al. 2019, Sec. 3) trains weights on the first ``floor((1 - val_fraction) * N)`` examples and
  the architecture on the rest (``val_fraction=0.5``). Here the examples are first put in the order of a
  permutation drawn from ``seed``; ``seed=None`` keeps the stored order, exactly as DARTS does.
  """
  train = data.train if isinstance(data, Dataset) else data
  n = len(train.labels)
  n_train = int(np.floor((1.0 - val_fraction) * n))
  if not 0.0 < val_fraction < 1.0 or n_train == 0 or n_train == n:
    raise ValueError(f'val_fraction={val_fraction} leaves an empty part of the {n} training examples: '
                     f'use a value strictly between 0 and 1 (DARTS: 0.5)')
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  first, second = order[:n_train], order[n_train:]
  return (Split(train.images[first], train.labels[first]),
          Split(train.images[second], train.labels[second]))


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of (global) batches in one epoch."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  count = num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
  if count == 0 and num_examples > 0:
    raise ValueError(f'batch_size {batch_size} exceeds the {num_examples} examples, so an epoch has no full '
                     f'batch: lower the batch size or use more data')
  return count


def epoch_order(num_examples: int, seed: int | None, epoch: int) -> np.ndarray:
  """The order in which epoch ``epoch`` visits the examples: a permutation drawn from ``(seed, epoch)``.

  ``seed=None`` visits them in stored order (for evaluation).
  """
  if seed is None:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, seed: int | None, epoch: int, *, start_step: int = 0,
                  drop_remainder: bool = True, process_index: int = 0,
                  process_count: int = 1) -> Iterator[np.ndarray]:
  """Yields this process's example indices for steps ``start_step, start_step + 1, ...`` of an epoch.

  A global batch of ``batch_size`` examples is split into ``process_count`` equal contiguous slices; this
  yields slice ``process_index``. A final partial batch (``drop_remainder=False``) is split as evenly as
  possible.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is outside 0..{process_count - 1}')
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by the {process_count} processes: '
                     f'use a multiple of {process_count}')
  order = epoch_order(num_examples, seed, epoch)
  for step in range(start_step, num_batches(num_examples, batch_size, drop_remainder)):
    global_batch = order[step * batch_size:(step + 1) * batch_size]
    yield np.array_split(global_batch, process_count)[process_index]


def epoch_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None, epoch: int, *,
                  start_step: int = 0, drop_remainder: bool = True, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Split]:
  """Yields this process's ``Split(images, labels)`` batches of an epoch from ``start_step`` on."""
  for idx in batch_indices(len(labels), batch_size, seed, epoch, start_step=start_step,
                           drop_remainder=drop_remainder, process_index=process_index,
                           process_count=process_count):
    yield Split(images[idx], labels[idx])
