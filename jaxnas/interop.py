"""PyTorch interop: DARTS-family ``state_dict`` <-> jaxnas variables.

Works for the original code bases' module names (quark0/darts ``NetworkCIFAR`` and ``model_search.Network``,
and the many repositories derived from them: PDARTS, PC-DARTS, AdvRush, RACL, RNAS, DSARA/ARNAS eval nets).
Layouts: conv kernels OIHW -> HWIO, linear (out, in) -> (in, out); BN ``weight/bias/running_mean/
running_var`` -> ``scale/bias`` (params) and ``mean/var`` (batch_stats).
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import genotypes

_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_SEP = {'dw1': 'op.1', 'pw1': 'op.2', 'bn1': 'op.3', 'dw2': 'op.5', 'pw2': 'op.6', 'bn2': 'op.7'}
_DIL = {'dw': 'op.1', 'pw': 'op.2', 'bn': 'op.3'}
_RCB = {'conv': 'op.1', 'bn': 'op.2'}
_FR = {'conv_1': 'conv_1', 'conv_2': 'conv_2', 'bn': 'bn'}
_POOL = {'bn': '1'}  # search supernet: Sequential(pool, BatchNorm2d(affine=False))
_AUX = {'conv1': 'features.2', 'bn1': 'features.3', 'conv2': 'features.5', 'bn2': 'features.6',
        'classifier': 'classifier'}


def _op_table(name: str, stride: int) -> dict:
  if name.startswith('sep_conv'):
    return _SEP
  if name.startswith('dil_conv'):
    return _DIL
  if name.endswith('pool_3x3'):
    return _POOL
  if name == 'skip_connect' and stride == 2:
    return _FR
  return {}


def _keys(path) -> list:
  return [getattr(k, 'key', getattr(k, 'idx', None)) for k in path]


def torch_names(net, path) -> list[str]:
  """The PyTorch name(s) of one leaf: several for stacked search-cell edges (``_stacked_axes``)."""
  keys = _keys(path)
  leaf = _LEAF[keys[-1]]
  top = keys[1]
  if top in ('stem',):
    return [f'stem.{0 if keys[2] == "conv" else 1}.{leaf}']
  if top == 'classifier':
    return [f'classifier.{leaf}']
  if top == 'aux_head':
    return [f'auxiliary_head.{_AUX[keys[2]]}.{leaf}']
  if top == 'stages':  # search supernet: a stage's normal cells' edges, stacked (cells, edges, ...)
    k, sub = net.space.primitives.index(keys[3]), _op_table(keys[3], 1)[keys[4]]
    return [f'cells.{i}._ops.{e}._ops.{k}.{sub}.{leaf}' for i in net.stage_cells[keys[2]]
            for e in range(net.num_edges)]
  i, spec = keys[2], net.plan[keys[2]]
  prefix = f'cells.{i}'
  if keys[3].startswith('preprocess'):
    table = _FR if keys[3] == 'preprocess0' and spec.reduction_prev else _RCB
    return [f'{prefix}.{keys[3]}.{table[keys[4]]}.{leaf}']
  if keys[3] == 'ops':  # evaluation cell: one op per genotype edge
    name, idx = net.genotype[spec.cell_type][keys[4]]
    stride = 2 if spec.reduction and idx < 2 else 1
    return [f'{prefix}._ops.{keys[4]}.{_op_table(name, stride)[keys[5]]}.{leaf}']
  # search reduction cell: edges[group][op_name][...] stacked over the stride-2 edges (group 0) or the rest
  group, op_name = keys[4], keys[5]
  edges = [e for e, (_, j) in enumerate(genotypes.edge_index(net.steps)) if (j < 2) == (group == 0)]
  k, sub = net.space.primitives.index(op_name), _op_table(op_name, 2 if group == 0 else 1)[keys[6]]
  return [f'{prefix}._ops.{e}._ops.{k}.{sub}.{leaf}' for e in edges]


def _to_jax_layout(a: np.ndarray, leaf_key: str) -> np.ndarray:
  if leaf_key == 'kernel' and a.ndim == 4:
    return a.transpose(2, 3, 1, 0)
  if leaf_key == 'kernel' and a.ndim == 2:
    return a.T
  return a


def _to_torch_layout(a: np.ndarray, leaf_key: str) -> np.ndarray:
  if leaf_key == 'kernel' and a.ndim == 4:
    return a.transpose(3, 2, 0, 1)
  if leaf_key == 'kernel' and a.ndim == 2:
    return a.T
  return a


def load_state_dict(source) -> dict[str, np.ndarray]:
  """A mapping name -> array from a mapping, an ``.npz`` (keys optionally prefixed ``state_dict/``) or a
  ``.pt``/``.pth`` file (needs torch)."""
  if isinstance(source, Mapping):
    return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v) for k, v in source.items()}
  path = os.fspath(source)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'state dict file {path!r} does not exist: pass a .npz or .pt file')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as f:
      d = {k[len('state_dict/'):] if k.startswith('state_dict/') else k: f[k] for k in f.files}
    return {k: v for k, v in d.items() if '.' in k}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'reading {path!r} needs PyTorch: pip install torch, or convert it to .npz') from None
  obj = torch.load(path, map_location='cpu', weights_only=True)
  obj = obj.get('state_dict', obj.get('model', obj)) if isinstance(obj, dict) else obj
  return load_state_dict({k.removeprefix('module.'): v for k, v in obj.items()})


def _template(net, input_shape, dtype):
  return net.init(jax.random.PRNGKey(0), np.zeros(input_shape, dtype))


def from_torch_state_dict(state_dict, net, input_shape=(1, 32, 32, 3), dtype=jnp.float32) -> dict:
  """jaxnas variables for ``net`` (an ``EvalNetwork`` or ``Supernet``) from a PyTorch state dict.

  ``state_dict``: mapping name -> array/tensor, or a path to ``.npz``/``.pt``. Every parameter and running
  statistic must be present and of the right shape; unused keys other than ``num_batches_tracked`` are an
  error (they mean the genotype or the network configuration differs from the checkpoint's).
  """
  sd = load_state_dict(state_dict)
  template = _template(net, input_shape, dtype)
  used = set()

  def fill(path, leaf):
    names = torch_names(net, path)
    missing = [n for n in names if n not in sd]
    if missing:
      raise ValueError(f'state dict lacks {missing[0]!r} (needed for {jax.tree_util.keystr(path)}): '
                       'check the genotype, init_channels, layers and auxiliary settings')
    key, axes = _keys(path)[-1], _stacked_axes(path)
    arrays = [_to_jax_layout(np.asarray(sd[n]), key) for n in names]
    for name, a in zip(names, arrays):  # each tensor, before stacking: the error names the one that differs
      if a.shape != leaf.shape[axes:]:
        raise ValueError(f'shape mismatch for {name!r}: state dict has {np.asarray(sd[name]).shape}, '
                         f'the network needs {leaf.shape[axes:]} (after layout change): check init_channels/layers')
    used.update(names)
    return jnp.asarray(np.stack(arrays).reshape(leaf.shape) if axes else arrays[0], dtype)

  out = jax.tree_util.tree_map_with_path(fill, template)
  unused = sorted(k for k in sd if k not in used and not k.endswith('num_batches_tracked'))
  if unused:
    raise ValueError(f'state dict has {len(unused)} entries the network does not use (first: {unused[0]!r}): '
                     'the checkpoint was made for a different genotype or network configuration')
  return out


def _stacked_axes(path) -> int:
  """How many leading axes stack PyTorch tensors: (cells, edges) of a supernet stage, (edges,) of a reduction
  cell's edge group, none elsewhere."""
  keys = _keys(path)
  if keys[1] == 'stages':
    return 2
  return int(len(keys) > 3 and keys[1] == 'cells' and keys[3] == 'edges')


def to_torch_state_dict(variables, net) -> dict[str, np.ndarray]:
  """The inverse of ``from_torch_state_dict``: PyTorch names and layouts (numpy arrays)."""
  out = {}

  def emit(path, leaf):
    names, key = torch_names(net, path), _keys(path)[-1]
    axes, leaf = _stacked_axes(path), np.asarray(leaf)
    leaves = list(leaf.reshape((-1,) + leaf.shape[axes:])) if axes else [leaf]
    for n, a in zip(names, leaves):
      out[n] = _to_torch_layout(a, key)

  jax.tree_util.tree_map_with_path(emit, variables)
  return out

