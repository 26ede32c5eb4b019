"""Genotypes: the discrete architectures of the DARTS family, their JSON form, derivation from alphas, and
a zoo of published genotypes.

A genotype maps each cell type to a tuple of ``(op, input_index)`` pairs, two per intermediate node, plus the
indices of the states concatenated at the cell output. DARTS has cell types ``normal`` and ``reduce``;
DSARA has ``accurate``, ``reduce`` and ``robust``. The JSON form is the one of the published code bases::

  {"normal": [["sep_conv_3x3", 0], ...], "normal_concat": [2, 3, 4, 5], "reduce": [...], ...}
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from jaxnas import ops

Edges = tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class Genotype:
  """An immutable genotype. ``cells`` and ``concat`` are tuples of ``(cell_type, value)`` pairs."""
  cells: tuple[tuple[str, Edges], ...]
  concat: tuple[tuple[str, tuple[int, ...]], ...]

  def __post_init__(self):
    for cell_type, edges in self.cells:
      _check_edges(cell_type, edges, dict(self.concat).get(cell_type, ()))

  @property
  def cell_types(self) -> tuple[str, ...]:
    return tuple(t for t, _ in self.cells)

  def __getitem__(self, cell_type: str) -> Edges:
    cells = dict(self.cells)
    if cell_type not in cells:
      raise KeyError(f'genotype has no {cell_type!r} cell; it has {self.cell_types}')
    return cells[cell_type]

  def __getattr__(self, name):  # genotype.normal, genotype.reduce_concat, as in the original code.
    if name.startswith('_'):
      raise AttributeError(name)
    if name.endswith('_concat') and name[:-7] in dict(self.concat):
      return dict(self.concat)[name[:-7]]
    if name in dict(self.cells):
      return dict(self.cells)[name]
    raise AttributeError(name)

  def concat_of(self, cell_type: str) -> tuple[int, ...]:
    return dict(self.concat)[cell_type]

  def to_dict(self) -> dict:
    out = {}
    for cell_type, edges in self.cells:
      out[cell_type] = [[op, idx] for op, idx in edges]
      out[cell_type + '_concat'] = list(self.concat_of(cell_type))
    return out

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  @classmethod
  def from_dict(cls, d: Mapping) -> 'Genotype':
    if not isinstance(d, Mapping) or not d:
      raise ValueError('a genotype must be a JSON object like {"normal": [["sep_conv_3x3", 0], ...], '
                       f'"normal_concat": [2, 3, 4, 5], ...}}, got {d!r:.80}')
    cells, concat = [], []
    for key, value in d.items():
      if key.endswith('_concat'):
        continue
      try:
        edges = tuple((str(op), int(idx)) for op, idx in value)
      except (TypeError, ValueError):
        raise ValueError(f'genotype cell {key!r} must be a list of [op, input_index] pairs, got '
                         f'{value!r:.80}') from None
      steps = len(edges) // 2
      cells.append((key, edges))
      concat.append((key, tuple(int(i) for i in d.get(key + '_concat', range(2, steps + 2)))))
    return cls(tuple(cells), tuple(concat))

  @classmethod
  def from_json(cls, text: str) -> 'Genotype':
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'genotype JSON does not parse: {e}') from None
    return cls.from_dict(d)


def _check_edges(cell_type: str, edges: Edges, concat: Sequence[int]) -> None:
  if len(edges) == 0 or len(edges) % 2:
    raise ValueError(f'genotype cell {cell_type!r} has {len(edges)} edges: it needs two per node '
                     '(an even, non-zero number; 8 for 4 nodes)')
  steps = len(edges) // 2
  for e, (op, idx) in enumerate(edges):
    if op not in ops.OPS or op == 'none':
      raise ValueError(f'genotype cell {cell_type!r} edge {e} has unknown operation {op!r}: choose one of '
                       f'{sorted(set(ops.OPS) - {"none"})}')
    node = e // 2
    if not 0 <= idx < node + 2:
      raise ValueError(f'genotype cell {cell_type!r} edge {e} (node {node}) reads state {idx}, out of range: '
                       f'node {node} may read states 0..{node + 1}')
  for i in concat:
    if not 0 <= i < steps + 2:
      raise ValueError(f'genotype cell {cell_type!r} concatenates state {i}, out of range 0..{steps + 1}')


def get(name: str) -> Genotype:
  """A published genotype by name (see ``ZOO``)."""
  if name not in ZOO:
    raise ValueError(f'unknown genotype {name!r}: the zoo has {", ".join(ZOO)}')
  return Genotype.from_dict(ZOO[name])


def load(name_or_path: str | os.PathLike) -> Genotype:
  """A zoo genotype by name, a genotype JSON file, or a search workdir holding ``genotype.json``."""
  name_or_path = os.fspath(name_or_path)
  if name_or_path in ZOO:
    return get(name_or_path)
  if os.path.isdir(name_or_path):
    if not os.path.isfile(os.path.join(name_or_path, 'genotype.json')):
      raise ValueError(f'{name_or_path} holds no genotype.json: finish the search there first (rerun its command: '
                       'it resumes), or give an epoch\'s genotype from its history/ directory')
    name_or_path = os.path.join(name_or_path, 'genotype.json')
  if os.path.isfile(name_or_path):
    with open(name_or_path) as f:
      text = f.read()
    try:
      return Genotype.from_json(text)
    except ValueError as e:
      raise ValueError(f'{name_or_path}: {e}') from None
  if name_or_path.endswith('.json') or os.sep in name_or_path:
    raise ValueError(f'genotype file {name_or_path!r} not found (resolved to {os.path.abspath(name_or_path)}): '
                     f'give an existing genotype JSON file, a search workdir, or a zoo name ({", ".join(ZOO)})')
  raise ValueError(f'unknown genotype {name_or_path!r}: give a zoo name ({", ".join(ZOO)}), a genotype JSON '
                   'file, or a search workdir containing genotype.json')


# ------------------------------------------------------------------------------------------------
# Derivation from alphas.
# ------------------------------------------------------------------------------------------------
def edge_index(steps: int) -> list[tuple[int, int]]:
  """(node, input_state) of every edge of a search cell, in the original order (node-major)."""
  return [(i, j) for i in range(steps) for j in range(i + 2)]


def derive(alphas: Mapping[str, np.ndarray], primitives: Sequence[str], steps: int = 4,
           multiplier: int = 4) -> Genotype:
  """The original ``_parse`` rule: softmax the alphas; per node keep the 2 incoming edges with the largest
  max non-'none' weight (stable order), and on each the argmax op excluding 'none'."""
  cells, concat = [], []
  for cell_type, a in alphas.items():
    a = np.asarray(a, np.float64)
    w = np.exp(a - a.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    if 'none' in primitives:
      w[:, list(primitives).index('none')] = -np.inf
    edges, start = [], 0
    for i in range(steps):
      rows = w[start:start + i + 2]
      best = sorted(range(i + 2), key=lambda j: -rows[j].max())[:2]
      edges.extend((primitives[int(np.argmax(rows[j]))], j) for j in best)
      start += i + 2
    cells.append((cell_type, tuple(edges)))
    concat.append((cell_type, tuple(range(2 + steps - multiplier, steps + 2))))
  return Genotype(tuple(cells), tuple(concat))


# ------------------------------------------------------------------------------------------------
# The zoo: published genotypes (sources in comments).
# ------------------------------------------------------------------------------------------------
ZOO = {
  'DARTS_V1': {  # quark0/darts cnn/genotypes.py
    'normal': [('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)],
    'reduce': [('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)],
  },
  'DARTS_V2': {  # quark0/darts cnn/genotypes.py
    'normal': [('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)],
    'reduce': [('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)],
  },
  'PDARTS': {  # nutellamok/advrush eval/genotypes.py
    'normal': [('skip_connect', 0), ('dil_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3', 0), ('dil_conv_5x5', 4)],
    'reduce': [('avg_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('dil_conv_5x5', 2), ('max_pool_3x3', 0), ('dil_conv_3x3', 1), ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)],
  },
  'PC_DARTS': {  # hye999/RNAS genotypes.py
    'normal': [('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), ('dil_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)],
    'reduce': [('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), ('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)],
  },
  'ADVRUSH': {  # nutellamok/advrush eval/genotypes.py
    'normal': [('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1)],
    'reduce': [('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('dil_conv_3x3', 2), ('skip_connect', 0), ('avg_pool_3x3', 1), ('skip_connect', 0), ('skip_connect', 2)],
  },
  'RACL': {  # nutellamok/advrush eval/genotypes.py
    'normal': [('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_5x5', 0), ('skip_connect', 1), ('sep_conv_3x3', 0), ('skip_connect', 3), ('sep_conv_3x3', 3), ('skip_connect', 4)],
    'reduce': [('sep_conv_3x3', 0), ('sep_conv_5x5', 1), ('avg_pool_3x3', 0), ('dil_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 2), ('dil_conv_3x3', 3)],
  },
  'RNAS_H': {  # hye999/RNAS genotypes.py
    'normal': [('dil_conv_5x5', 0), ('dil_conv_5x5', 1), ('dil_conv_5x5', 0), ('dil_conv_3x3', 1), ('dil_conv_5x5', 3), ('sep_conv_5x5', 0), ('dil_conv_5x5', 0), ('dil_conv_3x3', 2)],
    'reduce': [('avg_pool_3x3', 1), ('dil_conv_5x5', 0), ('dil_conv_5x5', 2), ('sep_conv_5x5', 0), ('sep_conv_3x3', 3), ('skip_connect', 0), ('sep_conv_5x5', 0), ('sep_conv_5x5', 4)],
  },
  'RNAS_L': {  # hye999/RNAS genotypes.py
    'normal': [('dil_conv_5x5', 0), ('dil_conv_5x5', 1), ('skip_connect', 2), ('dil_conv_5x5', 0), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), ('skip_connect', 2)],
    'reduce': [('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('sep_conv_5x5', 2), ('sep_conv_3x3', 1), ('dil_conv_3x3', 3), ('dil_conv_5x5', 2), ('sep_conv_5x5', 3), ('sep_conv_3x3', 2)],
  },
  'E2RNAS': {  # genotype published for E2RNAS-S1 (same edges as yuezhixiong/NAS-Benchmark DARTS/genotypes.py)
    'normal': [('avg_pool_3x3', 0), ('skip_connect', 1), ('avg_pool_3x3', 0), ('sep_conv_3x3', 2), ('sep_conv_5x5', 3), ('avg_pool_3x3', 0), ('avg_pool_3x3', 0), ('sep_conv_5x5', 2)],
    'reduce': [('avg_pool_3x3', 0), ('avg_pool_3x3', 1), ('avg_pool_3x3', 0), ('avg_pool_3x3', 1), ('avg_pool_3x3', 0), ('skip_connect', 3), ('avg_pool_3x3', 0), ('skip_connect', 3)],
  },
  'DSARA': {  # fyqsama/ARNAS ARNAS_train_eval/advrush/genotypes.py (ARNAS, the published DSARA successor; 3 cell types)
    'accurate': [('skip_connect', 0), ('skip_connect', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('sep_conv_5x5', 3), ('sep_conv_3x3', 1), ('sep_conv_5x5', 4), ('skip_connect', 0)],
    'reduce': [('avg_pool_3x3', 1), ('avg_pool_3x3', 0), ('dil_conv_5x5', 2), ('avg_pool_3x3', 0), ('dil_conv_5x5', 3), ('dil_conv_5x5', 2), ('dil_conv_5x5', 4), ('dil_conv_5x5', 3)],
    'robust': [('dil_conv_5x5', 0), ('dil_conv_5x5', 1), ('dil_conv_5x5', 1), ('dil_conv_5x5', 2), ('dil_conv_3x3', 3), ('dil_conv_5x5', 2), ('dil_conv_3x3', 4), ('dil_conv_3x3', 3)],
  },
}
