"""Checkpoints of the search/training state: the only module that talks to orbax.

A state is any pytree (nested dicts, tuples, NamedTuples such as optax states) whose leaves are jax arrays,
numpy arrays, typed PRNG keys (``jax.random.key``) or Python/numpy scalars. It is stored as a nested dict of
arrays keyed by the leaves' tree paths: typed keys as their ``key_data`` (uint32), scalars as 0-d arrays.
Restoring goes onto a *target* of the same structure (for example a freshly initialised state) and gives back
the target's types, dtypes and shardings, so a checkpoint written on one device layout restores on another.

Saves are atomic: orbax writes each step into a temporary directory and renames it when complete, so a process
killed (even by SIGKILL) during a save leaves the previous checkpoint as the latest one. In a multi-host run
every process calls these functions; orbax coordinates the writes. Every leaf's CRC-32 is stored with it
(``CHECKSUMS``) and checked on restore, so a checkpoint whose bytes changed on disk is reported as damaged instead
of restoring other numbers (leaves sharded over several processes are not checksummed).
"""
from __future__ import annotations

import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _key_name(key) -> str:
  """One element of a tree path as a string: dict key, sequence index or NamedTuple field."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  raise TypeError(f'unsupported pytree path element {key!r}')


def _names(path) -> list[str]:
  return [_key_name(k) for k in path] or ['value']


def _name(path) -> str:
  return '/'.join(_names(path))


def _by_name(tree) -> dict:
  """The leaves of a tree keyed by their joined path names."""
  return {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_prng_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _nest(paths_and_leaves) -> dict:
  """Builds a nested dict from ``[(path, leaf)]`` with tree paths as returned by ``tree_flatten_with_path``."""
  tree: dict = {}
  for path, leaf in paths_and_leaves:
    node = tree
    names = _names(path)
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = leaf
  return tree


def _storable(leaf):
  """A leaf as orbax stores it: arrays as they are, typed PRNG keys as key data, scalars as 0-d arrays."""
  if _is_prng_key(leaf):
    return jax.random.key_data(leaf)
  if isinstance(leaf, (jax.Array, np.ndarray)):
    return leaf
  return np.asarray(leaf)


def _abstract(leaf):
  """What orbax should restore for a target leaf: device arrays with the target's sharding, else numpy."""
  if _is_prng_key(leaf):
    leaf = jax.random.key_data(leaf)
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return np.zeros(np.shape(leaf), np.asarray(leaf).dtype)


def _like(target_leaf, value):
  """Converts a restored array back to the type of the target leaf."""
  if _is_prng_key(target_leaf):
    return jax.random.wrap_key_data(value, impl=jax.random.key_impl(target_leaf))
  if isinstance(target_leaf, (jax.Array, np.ndarray)):
    return value
  if isinstance(target_leaf, np.generic):
    return target_leaf.dtype.type(value)
  return type(target_leaf)(np.asarray(value).item())


CHECKSUMS = '_crc32'  # the item's entry of per-leaf checksums, in the order of the sorted leaf names
_UNCHECKED = -1


def _crc32(leaf) -> int:
  """The CRC-32 of a stored leaf's bytes, or ``_UNCHECKED`` for an array no process holds whole."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if not leaf.is_fully_replicated:
      return _UNCHECKED
    leaf = leaf.addressable_shards[0].data
  return zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes())


def _checksums(leaves: dict) -> np.ndarray:
  """The CRC-32 of every leaf of ``{name: leaf}``, in the order of the sorted names."""
  return np.asarray([_crc32(leaves[name]) for name in sorted(leaves)], np.int64)


def _manager(directory: str, keep: int | None = None, create: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save_checkpoint(directory: str, step: int, state: Any, *, keep: int = 3) -> bool:
  """Saves ``state`` as checkpoint ``step`` in ``directory``, keeping the ``keep`` most recent steps.

  Returns False (and writes nothing) when ``step`` is already saved there: checkpoints are never overwritten in
  place, since that could not be atomic.
  """
  step = int(step)
  paths_and_leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  item = _nest((p, _storable(x)) for p, x in paths_and_leaves)
  item[CHECKSUMS] = _checksums(_by_name(item))
  with _manager(directory, keep=keep, create=True) as manager:
    if step in manager.all_steps():
      return False
    manager.save(step, args=ocp.args.StandardSave(item), force=True)
    manager.wait_until_finished()
  return True


def latest_step(directory: str) -> int | None:
  """The most recent complete checkpoint step in ``directory``, or None if there is none."""
  if not os.path.isdir(directory):
    return None
  with _manager(directory) as manager:
    return manager.latest_step()


def all_steps(directory: str) -> list[int]:
  """All complete checkpoint steps in ``directory``, in increasing order."""
  if not os.path.isdir(directory):
    return []
  with _manager(directory) as manager:
    return sorted(manager.all_steps())


def _check_compatible(stored, expected, where: str) -> None:
  """Raises a one-line ValueError when the stored tree differs from the target's in paths or shapes."""
  stored = {name: tuple(x.shape) for name, x in _by_name(stored).items()}
  expected = {name: tuple(x.shape) for name, x in _by_name(expected).items()}
  fix = 'it was written for a different state: use a new workdir or delete that checkpoint directory'
  if stored.keys() != expected.keys():
    missing = sorted(expected.keys() - stored.keys())[:3]
    extra = sorted(stored.keys() - expected.keys())[:3]
    raise ValueError(f'checkpoint {where} does not match the state (missing {missing}, '
                     f'unexpected {extra}): {fix}')
  for path, shape in expected.items():
    if stored[path] != shape:
      raise ValueError(f'checkpoint {where} stores {path} with shape {stored[path]}, '
                       f'the state has {shape}: {fix}')


def restore_checkpoint(directory: str, target: Any, step: int | None = None) -> Any:
  """Restores checkpoint ``step`` (default: the latest) of ``directory`` onto the structure of ``target``.

  ``target`` is a state of the same structure (values are ignored); each restored leaf gets the target leaf's
  type, dtype and, for jax arrays, sharding. Raises FileNotFoundError when there is no such checkpoint and a
  one-line ValueError when it is damaged or was written for a different state.
  """
  if step is None:
    step = latest_step(directory)
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {directory}: save one first or point to another directory')
  step = int(step)
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  abstract = _nest((p, _abstract(x)) for p, x in paths_and_leaves)
  where = os.path.join(os.path.abspath(directory), str(step))
  with _manager(directory) as manager:
    if step not in manager.all_steps():
      raise FileNotFoundError(f'no checkpoint step {step} in {directory}; '
                              f'available steps: {sorted(manager.all_steps())}')
    try:
      stored = dict(manager.item_metadata(step).tree)
    except Exception as e:  # orbax and tensorstore raise many types for damaged files.
      raise _damaged(where, e) from e
    checked = stored.pop(CHECKSUMS, None) is not None  # absent in checkpoints of earlier jaxnas versions
    _check_compatible(stored, abstract, where)
    if checked:
      abstract[CHECKSUMS] = np.zeros(len(_by_name(abstract)), np.int64)
    try:
      restored = dict(manager.restore(step, args=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # orbax and tensorstore raise many types for damaged files.
      raise _damaged(where, e) from e
  expected = restored.pop(CHECKSUMS, None)
  by_name = _by_name(restored)
  if expected is not None:
    _verify(where, stored, np.asarray(expected), by_name)
  leaves = [_like(x, by_name[_name(p)]) for p, x in paths_and_leaves]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _verify(where: str, stored, expected: np.ndarray, leaves: dict) -> None:
  """Raises the damaged-checkpoint error when a restored leaf of ``{name: leaf}`` has another CRC-32 than the
  one saved with it (leaves restored into another dtype than the stored one are not compared)."""
  dtypes = {name: np.dtype(m.dtype) for name, m in _by_name(stored).items()}
  for name, want, got in zip(sorted(leaves), expected, _checksums(leaves)):
    if want != _UNCHECKED and want != got and dtypes[name] == leaves[name].dtype:
      raise _damaged(where, ValueError(f'{name} differs from the array that was saved (CRC-32 mismatch)'))


def _damaged(where: str, error: Exception) -> ValueError:
  detail = (str(error).splitlines() or [''])[0][:200]
  return ValueError(f'checkpoint {where} is damaged and cannot be restored ({type(error).__name__}: '
                    f'{detail}); delete that step directory to resume from the previous checkpoint, '
                    f'or use another workdir')
