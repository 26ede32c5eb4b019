"""Host-side batching for the evaluation drivers: fixed-shape chunks so each jitted attack compiles once.

The last chunk is padded with copies of its first example up to the next power of two (at least 8, at most
``batch_size``), so that a handful of examples left for an expensive attack does not cost a full batch.
Attacks derive their randomness from global example indices, so chunking does not change results beyond
floating-point rounding (XLA may order a reduction differently for another chunk shape: l_2 steps moved
adversarial examples by ~1e-4, which changed no robust flag in our checks; l_inf results were identical).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np


def padded_size(m: int, batch_size: int) -> int:
  """Size a chunk of ``m <= batch_size`` examples is padded to."""
  return min(batch_size, max(8, 1 << (m - 1).bit_length()))


def run_batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int):
  """``fn(*chunk)`` over the leading axis of ``arrays`` in chunks; outputs concatenated as numpy arrays."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  n = len(arrays[0])
  if n == 0:
    raise ValueError('run_batched got no examples')
  outs = []
  for start in range(0, n, batch_size):
    chunk = [np.asarray(a[start:start + batch_size]) for a in arrays]
    m = len(chunk[0])
    size = padded_size(m, batch_size)
    if size > m:
      chunk = [np.concatenate([c, np.repeat(c[:1], size - m, axis=0)]) for c in chunk]
    outs.append(jax.tree.map(lambda o: np.asarray(o)[:m], fn(*chunk)))
  return jax.tree.map(lambda *o: np.concatenate(o), *outs)


@functools.lru_cache(maxsize=64)
def predictor(logits_fn) -> Callable:
  """A jitted ``x -> predicted labels`` (cached per model), for ``run_batched``."""
  return jax.jit(lambda xb: logits_fn(xb).argmax(axis=1))
