"""Pictures of a search / training workdir: derived cells as graphs, training and search curves, and the
evolution of the architecture weights (alphas) during search.

``render_workdir(workdir)`` (``jaxnas viz WORKDIR``) redraws everything it finds into ``workdir/figures/``.
It reads, in the workdir and in each of its immediate sub-directories (stages, e.g. a pipeline's ``train/``;
figures from a sub-directory are prefixed with its name):

- ``genotype.json``: the genotype (``Genotype.to_json``) -> ``cell_<type>.png/.svg`` (and ``.dot``, for
  Graphviz users), one per cell type, drawn as in DARTS Fig. 4: inputs ``c_{k-2}``, ``c_{k-1}``, intermediate
  nodes ``0..3``, output ``c_{k}``, edges labelled with their operation (a sub-directory's copy of the
  workdir's genotype, e.g. a pipeline's ``train/genotype.json``, is not drawn again);
- ``alphas.npz``: final alphas, one ``(n_edges, n_ops)`` array per cell type -> ``alphas_final``: the softmax
  weights (DARTS Eq. 2) of every edge;
- ``history/``: alphas per epoch (``history/epoch_XXX_alphas.npz``; any ``.npz`` below ``history/`` whose path
  holds the epoch number, e.g. ``history/epoch_3/alphas.npz``) -> ``alphas_evolution_<type>``: for every edge
  a heat map of the softmax weights over operations (rows) across epochs (columns);
- ``*.jsonl``: metrics, one JSON object per line (``metrics.jsonl`` of ``jaxnas.workdir``) -> ``curves_<name>``:
  losses, accuracies (clean, PGD; a training run's held-out ``test/clean_acc`` and ``test/pgd<k>_acc``),
  objective values, MGDA/min-norm weights gamma, alpha entropy, learning rates and other scalars per epoch
  (see ``metric_series``). Nested objects are flattened with ``/`` and lists of numbers become ``key[i]``.

Operation names on the alpha axes come from ``config.json`` (a ``primitives`` list or a search space name
anywhere in it) or, failing that, from the number of operations (8: DARTS, 7: DSARA).

Only matplotlib's Agg canvas is used (no pyplot, no display, no global backend change).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
from typing import Iterable, Mapping, Sequence

import numpy as np
from matplotlib import cm
from matplotlib import colors as mcolors
from matplotlib import patches
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxnas import genotypes, ops, search_space

FORMATS = ('png', 'svg')
SKIP_DIRS = ('figures', 'checkpoints', 'history')
_OP_COLORS = dict(zip(sorted(set(ops.DARTS_PRIMITIVES) - {'none'}),
                      ('#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2')))


# ------------------------------------------------------------------------------------------------
# Cells as graphs.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CellGraph:
  """A derived cell: ``nodes`` in drawing order and ``edges`` as ``(source, target, label)``; operation
  edges carry the op name, the edges into the output ``c_{k}`` (channel concatenation) carry ''."""
  cell_type: str
  nodes: tuple[str, ...]
  edges: tuple[tuple[str, str, str], ...]


def state_name(index: int, tex: bool = False) -> str:
  """Name of cell state ``index``: 0 and 1 are the cell inputs ``c_{k-2}``, ``c_{k-1}`` (as matplotlib
  mathtext when ``tex``); then intermediate nodes 0, 1..."""
  if index >= 2:
    return str(index - 2)
  name = ('c_{k-2}', 'c_{k-1}')[index]
  return f'${name}$' if tex else name


def cell_graph(genotype: genotypes.Genotype, cell_type: str) -> CellGraph:
  """The graph of one cell of ``genotype``: edge ``2i`` and ``2i+1`` feed intermediate node ``i``."""
  edges = genotype[cell_type]
  steps = len(edges) // 2
  nodes = tuple(state_name(i) for i in range(steps + 2)) + ('c_{k}',)
  op_edges = tuple((state_name(idx), str(e // 2), op) for e, (op, idx) in enumerate(edges))
  concat = tuple((state_name(i), 'c_{k}', '') for i in genotype.concat_of(cell_type))
  return CellGraph(cell_type, nodes, op_edges + concat)


def cell_dot(graph: CellGraph) -> str:
  """The cell in Graphviz DOT (left to right), for ``dot -Tpdf``."""
  lines = [f'digraph "{graph.cell_type}" {{', '  rankdir=LR;', '  node [style=filled, shape=box];']
  for name in graph.nodes:
    color = 'lightblue' if name.startswith('c_') else 'lightyellow'
    lines.append(f'  "{name}" [fillcolor={color}];')
  for src, dst, label in graph.edges:
    lines.append(f'  "{src}" -> "{dst}" [label="{label}"];' if label else f'  "{src}" -> "{dst}";')
  return '\n'.join(lines + ['}']) + '\n'


_RANK_GAP, _ROW_GAP = 2.7, 1.25   # inches between ranks (columns) and between nodes of one rank


def _layout(graph: CellGraph) -> dict[str, np.ndarray]:
  """Node positions (inches) in ranks, as Graphviz's ``rankdir=LR``: the inputs in rank 0, a node one rank
  right of its deepest input, the output in the last rank; nodes of one rank stacked vertically."""
  rank = {graph.nodes[0]: 0, graph.nodes[1]: 0}
  for src, dst, label in graph.edges:   # node-major order: sources are ranked before their targets
    if label:
      rank[dst] = max(rank.get(dst, 1), rank[src] + 1)
  rank[graph.nodes[-1]] = max(rank.values()) + 1
  columns = collections.defaultdict(list)
  for name in graph.nodes:
    columns[rank[name]].append(name)
  pos = {}
  for r, names in columns.items():
    gap = 1.8 if r == 0 else _ROW_GAP
    for k, name in enumerate(names):
      pos[name] = np.array([r * _RANK_GAP, ((len(names) - 1) / 2 - k) * gap])
  return pos


def _arc(p0: np.ndarray, p1: np.ndarray, rad: float, t: np.ndarray) -> np.ndarray:
  """Points at ``t`` of matplotlib's ``arc3`` curve: the quadratic Bezier with control point
  ``mid + rad * (dy, -dx)`` (equal aspect, so data and display coordinates agree up to scale)."""
  d = p1 - p0
  c = (p0 + p1) / 2 + rad * np.array([d[1], -d[0]])
  t = t[:, None]
  return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * c + t ** 2 * p1


def _bend(p0: np.ndarray, p1: np.ndarray, obstacles: Sequence[np.ndarray]) -> float:
  """The smallest ``arc3`` curvature whose curve keeps clear of the other nodes, bulging away from the
  vertical centre of the drawing when it has to bend."""
  t = np.linspace(0.08, 0.92, 40)
  outward = -1.0 if (p0[1] + p1[1]) / 2 >= 0 else 1.0   # rad < 0 bulges up for a left-to-right edge
  candidates = [0.0] + [sign * r for r in (0.12, 0.22, 0.32, 0.45) for sign in (outward, -outward)]
  for rad in candidates:
    pts = _arc(p0, p1, rad, t)
    if all(np.min(np.abs(pts[:, 1] - o[1]) + np.maximum(np.abs(pts[:, 0] - o[0]) - 0.3, 0)) > 0.38
           for o in obstacles):
      return rad
  return candidates[-2]


def _overlap(a, b) -> float:
  """Overlap area of two boxes ``(x0, y0, x1, y1)``."""
  return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def draw_cell(graph: CellGraph, title: str | None = None) -> Figure:
  """The cell as a figure: rounded node boxes, arrows coloured and labelled by operation; edge labels are
  placed greedily along their curves where they overlap no node and no other label."""
  pos = _layout(graph)
  xs, ys = np.array([p[0] for p in pos.values()]), np.array([p[1] for p in pos.values()])
  x0, x1, y0, y1 = xs.min() - 0.7, xs.max() + 0.7, ys.min() - 0.5, ys.max() + 0.5
  top = 0.5 if title else 0.0
  fig = Figure(figsize=(x1 - x0, y1 - y0 + top))
  FigureCanvasAgg(fig)
  ax = fig.add_axes((0, 0, 1, (y1 - y0) / (y1 - y0 + top)))
  ax.set_xlim(x0, x1)
  ax.set_ylim(y0, y1)
  ax.axis('off')
  if title:
    fig.suptitle(title, fontsize=13, y=1 - 0.15 / (y1 - y0 + top))
  node_boxes = []
  for name, (x, y) in pos.items():
    is_io = name.startswith('c_')
    ax.text(x, y, f'${name}$' if is_io else name, ha='center', va='center', fontsize=12, zorder=3,
            bbox=dict(boxstyle='round,pad=0.35', lw=1.2, fc='#cfe2f3' if is_io else '#fff2cc', ec='0.3'))
    half = 0.36 if is_io else 0.2
    node_boxes.append((x - half, y - 0.2, x + half, y + 0.2))
  t = np.linspace(0.0, 1.0, 60)
  rads = [_bend(pos[src], pos[dst], [p for n, p in pos.items() if n not in (src, dst)])
          for src, dst, _ in graph.edges]
  curves = [_arc(pos[src], pos[dst], rad, t) for (src, dst, _), rad in zip(graph.edges, rads)]
  label_boxes = []
  for e, ((src, dst, label), rad) in enumerate(zip(graph.edges, rads)):
    color = _OP_COLORS.get(label, '0.5')
    ax.add_patch(patches.FancyArrowPatch(tuple(pos[src]), tuple(pos[dst]), connectionstyle=f'arc3,rad={rad}',
                                         arrowstyle='-|>', mutation_scale=14, lw=1.5, color=color,
                                         shrinkA=16, shrinkB=16, zorder=1))
    if not label:
      continue
    w, h = 0.066 * len(label) + 0.08, 0.2
    spots = _arc(pos[src], pos[dst], rad, np.array([0.5, 0.6, 0.4, 0.7, 0.3, 0.75, 0.25]))
    boxes = [(x - w / 2, y - h / 2, x + w / 2, y + h / 2) for x, y in spots]
    foreign = np.concatenate([c for f, c in enumerate(curves) if f != e])
    # Cost: overlap with nodes and placed labels first, then how many other edges run under the label.
    costs = [100 * sum(_overlap(b, o) for o in node_boxes + label_boxes)
             + np.sum((foreign[:, 0] > b[0]) & (foreign[:, 0] < b[2]) & (foreign[:, 1] > b[1])
                      & (foreign[:, 1] < b[3])) for b in boxes]
    k = int(np.argmin(costs))
    label_boxes.append(boxes[k])
    ax.text(*spots[k], label, ha='center', va='center', fontsize=8.5, color=color, zorder=2,
            bbox=dict(boxstyle='round,pad=0.12', fc='white', ec='none', alpha=0.9))
  return fig


def draw_genotype(genotype: genotypes.Genotype, name: str = '') -> dict[str, Figure]:
  """One figure per cell type of ``genotype``."""
  return {t: draw_cell(cell_graph(genotype, t), f'{name} {t} cell'.strip()) for t in genotype.cell_types}


# ------------------------------------------------------------------------------------------------
# Metrics curves.
# ------------------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The JSON objects of a JSONL file (blank lines skipped; a truncated last line, from a run that was
  killed mid-write, is ignored)."""
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        break
      raise ValueError(f'{path}: line {i + 1} is not JSON: fix or delete that line') from None
    if isinstance(record, dict):
      records.append(record)
  return records


def _flatten(record: Mapping, prefix: str = '') -> dict[str, float]:
  out = {}
  for key, value in record.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + '/'))
    elif isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
      out.update({f'{name}[{i}]': float(v) for i, v in enumerate(value)})
    elif _is_number(value) and math.isfinite(value):
      out[name] = float(value)
  return out


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_series(records: Sequence[Mapping]) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """``(x label, {metric: (x, y)})``. Records with ``epoch/``-prefixed keys (the search driver's per-epoch
  means) are used alone, prefix dropped; otherwise values are averaged per ``epoch`` when every record has
  one, else plotted against ``step`` (or the record number)."""
  flat = [_flatten(r) for r in records]
  if any(k.startswith('epoch/') for r in flat for k in r):
    flat = [{'epoch': r['epoch'], **{k[6:]: v for k, v in r.items() if k.startswith('epoch/')}}
            for r in flat if 'epoch' in r and any(k.startswith('epoch/') for k in r)]
  xkey = next((k for k in ('epoch', 'step') if flat and all(k in r for r in flat)), None)
  points = collections.defaultdict(lambda: collections.defaultdict(list))
  for i, r in enumerate(flat):
    x = r[xkey] if xkey else float(i)
    for key, value in r.items():
      if key not in ('epoch', 'step'):
        points[key][x].append(value)
  series = {}
  for key, by_x in points.items():
    xs = np.array(sorted(by_x))
    series[key] = (xs, np.array([np.mean(by_x[x]) for x in xs]))
  return xkey or 'record', series


PANELS = ('loss', 'accuracy', 'objectives', 'gamma', 'architecture', 'learning rate', 'other')


def panel_of(key: str) -> str | None:
  """The panel of a metric, by name (None: not plotted, e.g. timers)."""
  name = key.lower()
  leaf = name.rsplit('/', 1)[-1]
  if any(t in name for t in ('time', 'second', 'throughput')):
    return None
  if 'gamma' in name:
    return 'gamma'
  if 'acc' in leaf:
    return 'accuracy'
  if 'loss' in leaf:
    return 'loss'
  if 'entropy' in leaf or 'skip_connect' in leaf:
    return 'architecture'
  if leaf == 'lr' or leaf.endswith('_lr'):
    return 'learning rate'
  if 'norm' not in leaf and name.startswith(('train/', 'val/', 'test/')):
    return 'objectives'
  return 'other'


def draw_curves(records: Sequence[Mapping], title: str = '') -> Figure:
  """Loss, accuracy (clean / PGD), objective values, gamma and other scalars, one panel each."""
  xlabel, series = metric_series(records)
  groups = {p: sorted(k for k in series if panel_of(k) == p) for p in PANELS}
  groups = {p: keys for p, keys in groups.items() if keys}
  if not groups:
    raise ValueError(f'no numeric metrics to plot{" in " + title if title else ""}: each JSONL line must be '
                     'an object with numeric values (and an "epoch" or "step" field)')
  cols = min(3, len(groups))
  rows = -(-len(groups) // cols)
  fig = Figure(figsize=(5.2 * cols, 3.8 * rows), layout='constrained')
  FigureCanvasAgg(fig)
  if title:
    fig.suptitle(title, fontsize=13)
  for n, (panel, keys) in enumerate(groups.items()):
    ax = fig.add_subplot(rows, cols, n + 1)
    for key in keys:
      x, y = series[key]
      ax.plot(x, y, marker='o' if len(x) <= 30 else None, ms=3, lw=1.4, label=key)
    ax.set_title(panel)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if panel == 'accuracy' and all(series[k][1].max() <= 1.0 for k in keys):
      ax.set_ylim(-0.02, 1.02)
    if panel == 'learning rate' and all(series[k][1].min() > 0 for k in keys):
      ax.set_yscale('log')
    ax.legend(fontsize=7, loc='best')
  return fig


# ------------------------------------------------------------------------------------------------
# Alphas.
# ------------------------------------------------------------------------------------------------
def softmax(a: np.ndarray) -> np.ndarray:
  """Softmax over the last axis (the operation weights of DARTS Eq. 2)."""
  a = np.asarray(a, np.float64)
  w = np.exp(a - a.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def cell_steps(n_edges: int) -> int:
  """Number of intermediate nodes of a search cell with ``n_edges`` = 2 + 3 + ... + (steps + 1) edges."""
  steps = next((s for s in range(1, 64) if s * (s + 3) // 2 == n_edges), None)
  if steps is None:
    raise ValueError(f'{n_edges} alpha rows do not make a DARTS cell (2 + 3 + ... edges, e.g. 14 for 4 nodes)')
  return steps


def edge_labels(n_edges: int) -> list[str]:
  """``'$c_{k-2}$ → 0'``... (mathtext) for the node-major edge order of a search cell with ``n_edges`` edges."""
  return [f'{state_name(j, tex=True)} → {i}' for i, j in genotypes.edge_index(cell_steps(n_edges))]


def _find_primitives(config) -> tuple[str, ...] | None:
  if isinstance(config, Mapping):
    if isinstance(config.get('primitives'), (list, tuple)) and config['primitives']:
      return tuple(config['primitives'])
    for key in ('space', 'search_space'):
      if isinstance(config.get(key), str) and config[key] in search_space.SPACES:
        return search_space.SPACES[config[key]].primitives
    values = config.values()
  elif isinstance(config, (list, tuple)):
    values = config
  else:
    return None
  return next((p for p in map(_find_primitives, values) if p is not None), None)


def primitives_for(n_ops: int, config: Mapping | None = None) -> tuple[str, ...]:
  """Operation names for alpha columns: from ``config`` when it names them, else DARTS (8) / DSARA (7)."""
  found = _find_primitives(config or {})
  if found is not None and len(found) == n_ops:
    return found
  by_count = {len(s.primitives): s.primitives for s in search_space.SPACES.values()}
  return by_count.get(n_ops, tuple(f'op{i}' for i in range(n_ops)))


def draw_alphas(alphas: Mapping[str, np.ndarray], primitives: Sequence[str], title: str = '') -> Figure:
  """Softmax weights of every edge (rows) over operations (columns), one heat map per cell type."""
  fig = Figure(figsize=(0.62 * len(primitives) * len(alphas) + 2.2 * len(alphas) + 1.0,
                        0.36 * max(np.shape(a)[0] for a in alphas.values()) + 2.4), layout='constrained')
  FigureCanvasAgg(fig)
  if title:
    fig.suptitle(title, fontsize=13)
  axes = fig.subplots(1, len(alphas), squeeze=False)[0]
  for ax, (cell_type, a) in zip(axes, alphas.items()):
    w = softmax(a)
    image = ax.imshow(w, cmap='viridis', vmin=0.0, vmax=max(w.max(), 1e-6), aspect='auto')
    ax.set_title(f'{cell_type} cell')
    ax.set_xticks(range(len(primitives)), primitives, rotation=45, ha='right', fontsize=8)
    ax.set_yticks(range(len(w)), edge_labels(len(w)), fontsize=8)
    for (i, j), value in np.ndenumerate(w):
      ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=6.5,
              color='black' if value > 0.6 * w.max() else 'white')
    fig.colorbar(image, ax=ax, shrink=0.8)
  return fig


def draw_alpha_evolution(epochs: Sequence[float], history: np.ndarray, primitives: Sequence[str],
                         title: str = '') -> Figure:
  """``history [epochs, n_edges, n_ops]`` of one cell type as a grid of heat maps, one per edge: row ``i``
  holds the edges into node ``i``, column ``j`` the input state; colour is the softmax weight."""
  w = softmax(history)
  n_epochs, n_edges, n_ops = w.shape
  steps = cell_steps(n_edges)
  pairs = genotypes.edge_index(steps)
  # Fixed margins in inches (no layout engine: with 20 axes it costs more than the drawing).
  width, height = 2.6 * (steps + 1) + 2.6, 2.1 * steps + 1.1
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  if title:
    fig.suptitle(title, fontsize=13, y=1 - 0.2 / height)
  grid = fig.add_gridspec(steps, steps + 1, left=1.3 / width, right=1 - 1.3 / width, top=1 - 0.75 / height,
                          bottom=0.5 / height, wspace=0.08, hspace=0.6)
  norm = mcolors.Normalize(0.0, max(w.max(), 1e-6))
  ticks = np.arange(0, n_epochs, -(-n_epochs // 5))
  for e, (i, j) in enumerate(pairs):
    ax = fig.add_subplot(grid[i, j])
    ax.imshow(w[:, e, :].T, cmap='viridis', norm=norm, aspect='auto', interpolation='nearest')
    ax.set_title(f'{state_name(j, tex=True)} → {i}', fontsize=9)
    ax.set_yticks(range(n_ops), primitives if j == 0 else [''] * n_ops, fontsize=7)
    ax.set_xticks(ticks, [f'{epochs[t]:g}' for t in ticks], fontsize=7)
    if i == steps - 1 or j == i + 1:
      ax.set_xlabel('epoch', fontsize=8)
  bar = fig.add_axes((1 - 0.95 / width, 0.25, 0.18 / width, 0.5))
  fig.colorbar(cm.ScalarMappable(norm=norm, cmap='viridis'), cax=bar, label='softmax weight')
  return fig


def load_alphas(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays of an alphas ``.npz`` keyed by cell type (a ``prefix/`` in a key is dropped)."""
  with np.load(path) as data:
    return {key.rsplit('/', 1)[-1]: np.asarray(data[key]) for key in data.files}


def load_history(history_dir: str | os.PathLike) -> tuple[list[float], dict[str, np.ndarray]]:
  """``(epochs, {cell_type: [epochs, n_edges, n_ops]})`` from the per-epoch alpha files in ``history_dir``:
  every ``.npz`` below it whose path (relative to ``history_dir``) contains a number, the last number being
  the epoch; arrays that are not 2-D are skipped."""
  found = []
  for root, _, files in os.walk(history_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), history_dir)
      numbers = re.findall(r'\d+', rel)
      if name.endswith('.npz') and numbers:
        found.append((int(numbers[-1]), os.path.join(root, name)))
  found.sort()
  epochs, per_type = [], collections.defaultdict(dict)
  for epoch, path in found:
    arrays = {k: v for k, v in load_alphas(path).items() if v.ndim == 2}
    if arrays:
      epochs.append(epoch)
      for cell_type, a in arrays.items():
        per_type[cell_type][epoch] = a
  complete = {t: np.stack([d[e] for e in epochs]) for t, d in per_type.items() if len(d) == len(epochs)}
  return [float(e) for e in epochs], complete


# ------------------------------------------------------------------------------------------------
# Workdirs.
# ------------------------------------------------------------------------------------------------
def stage_dirs(workdir: str | os.PathLike) -> list[tuple[str, str]]:
  """``(prefix, path)`` of the workdir ('' prefix) and of its immediate sub-directories (``'<name>_'``),
  except figures, checkpoints and history."""
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'workdir {workdir!r} does not exist: pass the --workdir of a search or pipeline run')
  subs = sorted(d for d in os.listdir(workdir)
                if os.path.isdir(os.path.join(workdir, d)) and d not in SKIP_DIRS and not d.startswith('.'))
  return [('', workdir)] + [(f'{d}_', os.path.join(workdir, d)) for d in subs]


def read_config(path: str | os.PathLike) -> dict:
  """``config.json`` of a stage directory, or {} when there is none."""
  path = os.path.join(path, 'config.json')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def save(fig: Figure, out_dir: str, name: str, formats: Iterable[str] = FORMATS) -> list[str]:
  """Writes ``fig`` as ``out_dir/name.<format>`` for each format; returns the paths."""
  paths = []
  for fmt in formats:
    path = os.path.join(out_dir, f'{name}.{fmt}')
    fig.savefig(path, dpi=130 if fmt == 'png' else None)
    fig.set_layout_engine('none')   # the first save placed the axes; the other formats keep that layout
    paths.append(path)
  return paths


def render_stage(prefix: str, path: str, out_dir: str, formats: Iterable[str] = FORMATS, name: str = '',
                 drawn: genotypes.Genotype | None = None) -> list[str]:
  """All figures of one stage directory (see the module docstring); returns the written paths. Cells are not
  redrawn for a genotype equal to ``drawn`` (a pipeline's train/ stage holds a copy of the search result)."""
  written = []
  config = read_config(path)
  genotype = genotypes.load(path) if os.path.isfile(os.path.join(path, 'genotype.json')) else None
  if genotype is not None and genotype != drawn:
    for cell_type, fig in draw_genotype(genotype, name).items():
      written += save(fig, out_dir, f'{prefix}cell_{cell_type}', formats)
      dot = os.path.join(out_dir, f'{prefix}cell_{cell_type}.dot')
      with open(dot, 'w') as f:
        f.write(cell_dot(cell_graph(genotype, cell_type)))
      written.append(dot)
  if os.path.isfile(os.path.join(path, 'alphas.npz')):
    alphas = load_alphas(os.path.join(path, 'alphas.npz'))
    primitives = primitives_for(next(iter(alphas.values())).shape[-1], config)
    written += save(draw_alphas(alphas, primitives, f'{name} final alphas'.strip()), out_dir,
                    f'{prefix}alphas_final', formats)
  if os.path.isdir(os.path.join(path, 'history')):
    epochs, history = load_history(os.path.join(path, 'history'))
    for cell_type, h in history.items():
      fig = draw_alpha_evolution(epochs, h, primitives_for(h.shape[-1], config),
                                 f'{name} {cell_type} cell: alphas during search'.strip())
      written += save(fig, out_dir, f'{prefix}alphas_evolution_{cell_type}', formats)
  for metrics in sorted(f for f in os.listdir(path) if f.endswith('.jsonl')):
    records = read_jsonl(os.path.join(path, metrics))
    if records:
      stem = metrics[:-len('.jsonl')]
      written += save(draw_curves(records, f'{name} {prefix}{stem}'.strip()), out_dir,
                      f'{prefix}curves_{stem}', formats)
  return written


def render_workdir(workdir: str | os.PathLike, formats: Iterable[str] = FORMATS) -> list[str]:
  """Redraws every picture of ``workdir`` into ``workdir/figures/``; returns the written paths."""
  formats = tuple(formats)
  bad = set(formats) - {'png', 'svg', 'pdf'}
  if bad:
    raise ValueError(f'unknown figure format(s) {sorted(bad)}: use png, svg or pdf')
  stages = stage_dirs(workdir)
  out_dir = os.path.join(os.fspath(workdir), 'figures')
  os.makedirs(out_dir, exist_ok=True)
  name = os.path.basename(os.path.normpath(os.fspath(workdir)))
  written = []
  root = os.fspath(workdir)
  drawn = genotypes.load(root) if os.path.isfile(os.path.join(root, 'genotype.json')) else None
  for prefix, path in stages:
    written += render_stage(prefix, path, out_dir, formats, name, drawn if prefix else None)
  if not written:
    raise FileNotFoundError(f'nothing to draw in {os.fspath(workdir)!r}: expected genotype.json, alphas.npz, '
                            'history/ or a metrics .jsonl file (in it or in a stage sub-directory)')
  return written


# ------------------------------------------------------------------------------------------------
# ``jaxnas viz``.
# ------------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
  parser = parser or argparse.ArgumentParser(prog='jaxnas viz', description=__doc__.splitlines()[0])
  parser.add_argument('workdir', help='a search, training or pipeline workdir')
  parser.add_argument('--formats', nargs='+', default=list(FORMATS), help='figure formats (png svg pdf)')
  parser.add_argument('--report', action='store_true', help='also write report.json and report.md')
  return parser


def run(args: argparse.Namespace) -> int:
  try:
    written = render_workdir(args.workdir, args.formats)
    if args.report:
      from jaxnas import report  # pylint: disable=g-import-not-at-top  (report imports viz)
      written += report.write_report(args.workdir, render=False)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print('\n'.join(written))
  return 0
