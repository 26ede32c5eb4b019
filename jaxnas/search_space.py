"""Search spaces, the mixed operation, the search cell and the supernet (DARTS and DSARA from one code path).

The architecture parameters (alphas) are a separate pytree ``{cell_type: (n_edges, n_ops)}`` passed to
``Supernet.apply``; they are never module state, so weights and alphas get separate optimizers and
gradients.

Speed: a cell's edge weights are stacked, and its edges run as one ``lax.scan`` in node-major order over a
buffer of states, one mixed-op body for all of them, each edge under a ``lax.cond`` on whether it is active.
A stage's normal cells run under one ``lax.scan`` (``search_stage``) over their edge weights, which the
supernet stores stacked per stage. A reduction cell's stride-2 edges form a second scan; its stride-1 edges
have the shapes of the next stage's edges and run as that stage's first iteration, with the cell's input
edges inactive. So from 5 cells on, the program holds five mixed-op bodies at any depth. The mixed op is
traced once per distinct shape and rematerialised in the backward pass.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import cells, genotypes, ops, parallel


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A DARTS-family search space: primitives, cell type per stage and width multiplier per stage."""
  name: str
  primitives: tuple[str, ...]
  stage_types: tuple[str, str, str]
  widths: tuple[int, int, int]

  @property
  def cell_types(self) -> tuple[str, ...]:
    """Alpha / genotype keys: the normal cell types in order of first use, then 'reduce'."""
    return tuple(dict.fromkeys(self.stage_types)) + ('reduce',)


DARTS = SearchSpace('darts', ops.DARTS_PRIMITIVES, ('normal', 'normal', 'normal'), (1, 2, 4))
DSARA = SearchSpace('dsara', ops.DSARA_PRIMITIVES, ('accurate', 'accurate', 'robust'), (1, 2, 2))
SPACES = {'darts': DARTS, 'dsara': DSARA}

PLACEMENTS = {'A-A-R': ('accurate', 'accurate', 'robust'), 'R-A-A': ('robust', 'accurate', 'accurate'),
              'A-R-A': ('accurate', 'robust', 'accurate'), 'A-A-A': ('accurate',) * 3,
              'R-R-R': ('robust',) * 3, 'A-R-R': ('accurate', 'robust', 'robust')}


def make_space(name: str = 'darts', placement: str | None = None, widths: Sequence[int] | None = None,
               primitives: Sequence[str] | None = None) -> SearchSpace:
  """A search space by name, with DSARA's ablation switches (placement like 'A-A-R', widths like 1-2-4)."""
  if name not in SPACES:
    raise ValueError(f'unknown search space {name!r}: choose one of {sorted(SPACES)}')
  space = SPACES[name]
  if placement is not None:
    if placement not in PLACEMENTS:
      raise ValueError(f'unknown cell placement {placement!r}: choose one of {sorted(PLACEMENTS)}')
    space = dataclasses.replace(space, stage_types=PLACEMENTS[placement])
  if widths is not None:
    space = dataclasses.replace(space, widths=tuple(int(w) for w in widths))
  if primitives is not None:
    for p in primitives:
      ops.check_primitive(p)
    space = dataclasses.replace(space, primitives=tuple(primitives))
  return space


# ------------------------------------------------------------------------------------------------
# Mixed operation and search cell.
# ------------------------------------------------------------------------------------------------
def mixed_op(primitives, params, stats, x, weights, stride, train, depthwise):
  """DARTS Eq. (2): sum over ops of softmax(alpha)_o * o(x); 'none' contributes exactly zero."""
  out, new_stats = 0.0, {}
  for k, name in enumerate(primitives):
    if name == 'none':
      new_stats[name] = stats[name]
      continue
    y, new_stats[name] = ops.OPS[name].apply(params[name], stats[name], x, stride, train, depthwise)
    out = out + weights[k].astype(y.dtype) * y
  return out, new_stats


@functools.partial(jax.jit, static_argnames=('primitives', 'stride', 'train', 'depthwise'))
def _traced_mixed_op(params, stats, x, weights, *, primitives, stride, train, depthwise):
  """``mixed_op`` under ``jax.jit``: cells whose edges have equal shapes (the normal cells of a stage, and
  a reduction cell's stride-1 edges with the next stage's) share one traced and differentiated copy, which
  shortens tracing of a supernet. XLA inlines it; the compiled program is unchanged."""
  return mixed_op(primitives, params, stats, x, weights, stride, train, depthwise)


def _mixed_op_init(primitives, rng, C, stride):
  params, stats = {}, {}
  for name in primitives:
    params[name], stats[name] = ops.OPS[name].init(rng, C, stride, False, True)
  return params, stats


def search_cell_init(rng, spec: cells.CellSpec, primitives, steps):
  """Edge weights are stacked on a leading axis in the original edge order (node-major)."""
  params, stats = cells.preprocess_init(rng, spec, affine=False)
  per_edge = [_mixed_op_init(primitives, rng, spec.c, 2 if spec.reduction and j < 2 else 1)
              for _, j in genotypes.edge_index(steps)]
  if spec.reduction:  # stride-2 edges (FactorizedReduce skip) and stride-1 edges differ in structure
    groups = _input_edges(steps)
    params['edges'] = [cells.stack_trees([per_edge[e][0] for e in es], np) for es in groups]
    stats['edges'] = [cells.stack_trees([per_edge[e][1] for e in es], np) for es in groups]
  else:
    params['edges'] = cells.stack_trees([p for p, _ in per_edge], np)
    stats['edges'] = cells.stack_trees([s for _, s in per_edge], np)
  return params, stats


@jax.custom_vjp
def _read_state(buffer, index):
  """``buffer[index]`` (``0 <= index < len(buffer)``), with a gradient that XLA:CPU computes fast.

  The gradient of the read is the edge's whole input gradient (every primitive's backward window sums),
  added into the buffer's cotangent by an in-place dynamic-update-slice. XLA:CPU fuses the computation into
  that update and runs it far slower than as ordinary loops (70-85 ms per edge, a third of a first-stage
  cell's step at batch 32), so the gradient passes ``ops.fusion_barrier`` first.
  """
  return buffer[index]


def _read_state_fwd(buffer, index):
  return buffer[index], (jnp.zeros(buffer.shape[:1] + (0,), buffer.dtype), index)


def _read_state_bwd(res, g):
  marker, index = res
  g = ops.fusion_barrier(g, g[(0,) * g.ndim])
  return jnp.zeros(marker.shape[:1] + g.shape, g.dtype).at[index].set(g), None


_read_state.defvjp(_read_state_fwd, _read_state_bwd)


def _skippable(run):
  """``run(p, s, x, w)`` for an ``active`` edge, else zeros and the statistics unchanged, under ``lax.cond``.

  Inactive edges let a reduction cell's stride-1 edges share a normal cell's scan (``search_stage``). The
  conditional also shortens compilation: XLA's while-loop passes see one instruction per edge instead of the
  mixed op's ~1000 (8-cell supernet step: HLO passes 14.3 -> 10.4 s, tracing 1.5 s shorter; same step
  time; benchmarks/RESULTS.md)."""
  def edge(p, s, x, w, active):
    out = jax.eval_shape(run, p, s, x, w)[0]
    skip = lambda p, s, x, w: (jnp.zeros(out.shape, out.dtype), s)
    return jax.lax.cond(active, run, skip, p, s, x, w)
  return edge


def _rematerialised(run):
  """``_skippable(run)`` with a custom VJP (reverse mode only) whose backward pass is one ``lax.cond``: the
  active edge's forward pass recomputed and its VJP, or zeros. Under ``jax.checkpoint`` the skipped branch
  must also return zeros for every value the computed branch's VJP reads (about 20 activation-sized
  arrays per edge); without them the 8-cell supernet step took 2.50 s instead of 2.69 s (medians of five
  alternated processes, benchmarks/RESULTS.md), at the same compile time.

  The running statistics are not differentiated (as PyTorch's BatchNorm buffers): their cotangent is
  dropped and none is returned for them."""
  skippable = _skippable(run)
  edge = jax.custom_vjp(skippable)

  def fwd(p, s, x, w, active):
    return skippable(p, s, x, w, active), (p, s, x, w, active)

  def bwd(res, g):
    p, s, x, w, active = res
    vjp = lambda p, x, w: jax.vjp(lambda p, x, w: run(p, s, x, w)[0], p, x, w)[1](g[0])
    zeros = lambda *primals: jax.tree.map(jnp.zeros_like, primals)
    g_p, g_x, g_w = jax.lax.cond(active, vjp, zeros, p, x, w)
    return g_p, None, g_x, g_w, None

  edge.defvjp(fwd, bwd)
  return edge


def _scan_edges(edge, params, stats, weights, active, buffer, sources, targets, read, inputs=None):
  """Runs edges in order under ``lax.scan``: buffer[t] += mixed_op(states[s]) for every ``active`` edge, with
  ``states`` the buffer itself (node-major order guarantees every state an edge reads is complete) or the
  fixed ``inputs``. One mixed-op body is compiled for all the edges. ``edge(p, s, x, w, active)`` runs one
  edge, ``read(states, index)`` reads a state (``_edge_runner``).

  The mixed op is rematerialised in the backward pass: the scan then stores only each edge's input, where
  stacking every primitive's intermediate values per edge cost more than recomputing the forward pass
  (about 10% of a cell's step at batch 32 on XLA:CPU), and uses far less memory."""
  def body(buf, xs):
    p, s, w, on, src, dst = xs
    y, new_s = edge(p, s, read(buf if inputs is None else inputs, src), w, on)
    return buf.at[dst].add(y), new_s
  xs = (params, stats, weights, jnp.asarray(active), jnp.asarray(sources), jnp.asarray(targets))
  return jax.lax.scan(body, buffer, xs)


def _edge_runner(stride, primitives, train, depthwise):
  """``(edge, read)`` of ``_scan_edges``: for the reverse-mode-only 'shift' formulation ``_rematerialised``
  and ``_read_state``, else (every AD mode) the edge under ``jax.checkpoint`` and plain indexing."""
  run = functools.partial(_traced_mixed_op, primitives=tuple(primitives), stride=stride, train=train,
                          depthwise=depthwise)
  if ops.resolve_depthwise(depthwise) == 'shift':
    return _rematerialised(run), _read_state
  return jax.checkpoint(_skippable(run)), lambda buf, index: buf[index]


def cell_edges(params, stats, buffer, weights, active, *, primitives, steps, multiplier, train, depthwise):
  """Node i = sum of mixed ops over all earlier states (DARTS Eq. 1), stride 1, over ``buffer`` =
  [s0, s1, node_0, ..., node_{steps-1}] (the preprocessed inputs, then zeros or, for a reduction cell, the
  sums of its stride-2 edges); edges not ``active`` add nothing. Returns the concatenation of the last
  ``multiplier`` nodes (the cell output) and the edges' statistics."""
  edges = genotypes.edge_index(steps)
  edge, read = _edge_runner(1, primitives, train, depthwise)
  buffer, new_stats = _scan_edges(edge, params, stats, weights, active, buffer, [j for _, j in edges],
                                  [i + 2 for i, _ in edges], read)
  return jnp.concatenate(list(buffer[2 + steps - multiplier:]), axis=-1), new_stats


def _place_rows(a, indices, length):
  """Rows of ``a`` at static increasing ``indices`` of ``length`` rows, zeros elsewhere, as one concatenation
  of runs (a slice of ``a`` per run of consecutive indices, a zero block per gap): XLA:CPU compiles the
  scatter of ``.at[indices].set`` and its transpose into ~4x the kernels, and a row at a time traced ~2x the
  operations (benchmarks/RESULTS.md)."""
  slot = {int(e): k for k, e in enumerate(indices)}
  pieces = []
  for placed, run in itertools.groupby(range(length), key=lambda e: e in slot):
    run = list(run)
    pieces.append(a[slot[run[0]]:slot[run[-1]] + 1] if placed
                  else jnp.zeros((len(run),) + a.shape[1:], a.dtype))
  return jnp.concatenate(pieces)


def _input_edges(steps):
  """Indices of the edges from the cell inputs (stride 2 in a reduction cell), and of those between nodes."""
  edges = genotypes.edge_index(steps)
  return (np.array([e for e, (_, j) in enumerate(edges) if j < 2]),
          np.array([e for e, (_, j) in enumerate(edges) if j >= 2]))


def reduction_start(spec: cells.CellSpec, params, stats, s0, s1, weights, *, primitives, steps, multiplier,
                    train, depthwise):
  """A reduction cell's preprocessing and its stride-2 edges from the two inputs (a second scan, a second
  mixed-op body; a vmap over them made the first reduction cell's step 4x slower on XLA:CPU at batch 32).
  Returns ``cell_edges``' buffer [0, 0, nodes] and the statistics so far; its stride-1 edges between nodes
  then run with the next stage's cells (``reduction_pending``)."""
  del multiplier
  s0, s1, new_stats = cells.preprocess(spec, params, stats, s0, s1, train)
  edges, (first, _) = genotypes.edge_index(steps), _input_edges(steps)
  edge, read = _edge_runner(2, primitives, train, depthwise)
  half = (s1.shape[0], (s1.shape[1] + 1) // 2, (s1.shape[2] + 1) // 2, s1.shape[3])
  buffer, edge_stats = _scan_edges(edge, params['edges'][0], stats['edges'][0], weights[first],
                                   np.ones(len(first), bool), jnp.zeros((steps + 2,) + half, s1.dtype),
                                   [edges[e][1] for e in first], [edges[e][0] + 2 for e in first], read,
                                   inputs=jnp.stack([s0, s1]))
  new_stats['edges'] = [edge_stats]
  return buffer, new_stats


def reduction_pending(params, stats, buffer, weights, steps) -> dict:
  """A started reduction cell's stride-1 edges laid out as a normal cell's (``cell_edges``): their weights and
  statistics at their edges' places, zeros at the (inactive) input edges'."""
  n_edges = len(genotypes.edge_index(steps))
  _, rest = _input_edges(steps)
  place = lambda tree: jax.tree.map(lambda a: _place_rows(a, rest, n_edges), tree)
  return {'buffer': buffer, 'params': place(params['edges'][1]), 'stats': place(stats['edges'][1]),
          'weights': weights, 'active': np.isin(np.arange(n_edges), rest)}


def reduction_finish(pending, **options):
  """A started reduction cell's stride-1 edges on their own (when no normal cell follows it)."""
  return cell_edges(pending['params'], pending['stats'], pending['buffer'], pending['weights'],
                    pending['active'], **options)


def _node_edge_stats(edge_stats, steps):
  """The stride-1 edges' entries of a reduction cell's statistics in a normal cell's layout."""
  _, rest = _input_edges(steps)
  return jax.tree.map(lambda a: a[rest], edge_stats)


def _stages(plan: Sequence[cells.CellSpec]) -> list[list[int]]:
  """Cell indices in runs: each stage's consecutive normal cells, and every reduction cell alone."""
  runs: list[list[int]] = []
  for spec in plan:
    if runs and not spec.reduction and not plan[runs[-1][-1]].reduction:
      runs[-1].append(spec.index)
    else:
      runs.append([spec.index])
  return runs


def _pad_inputs(rcb_params, width):
  """A ReLUConvBN's 1x1 kernel with zero input channels appended up to ``width``."""
  kernel = rcb_params['conv']['kernel']
  pad = [(0, 0)] * (kernel.ndim - 2) + [(0, width - kernel.shape[-2]), (0, 0)]
  return {**rcb_params, 'conv': {'kernel': jnp.pad(kernel, pad)}}


def _pad_channels(x, width):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def search_stage(specs, params, stats, edge_params, edge_stats, s0, s1, weights, *, remat, pending=None,
                 **options):
  """A stage's normal cells under one ``lax.scan``, so the compiled program holds one normal-cell body per
  stage whatever the depth. ``params``/``stats`` list the cells' preprocessing; ``edge_params``/``edge_stats``
  are their edges' weights stacked as the scan reads them (``(cells, edges, ...)``, ``Supernet.init``).

  The cells differ only in how their inputs are preprocessed: the first cell's ``s0`` may come from before
  the reduction (FactorizedReduce) and the first cells of the network read the stem (3C channels, not 4C).
  So iteration k carries ``(preprocess0_k(state_{k-2}), state_{k-1})`` and computes, besides cell k, the
  next cell's ``preprocess0`` of ``state_{k-1}``; the first cell's ``preprocess0`` runs before the scan,
  and narrower states (the stem's 3C channels, or cells' outputs when ``multiplier`` < ``stem_multiplier``)
  and their 1x1 kernels are zero-padded to one width (exactly the same sums). The last iteration's
  look-ahead reuses that cell's ``preprocess1`` and is discarded.

  With a ``pending`` reduction cell (``reduction_pending``; then ``s1`` is unused) the scan's first iteration
  runs its stride-1 edges, which have the shapes of this stage's edges, in the same body: its buffer and
  weights replace the cell's, only those edges are active, and its preprocessing and look-ahead are skipped
  (``lax.cond``; zero kernels stand in for their weights). So a supernet compiles five mixed-op bodies, not
  seven.

  Returns ``(s0, s1, new_stats, new_edge_stats, outputs, pending_stats)`` with the states the next cell
  reads, the cells' preprocessing statistics, their edges' statistics (stacked), the cells' outputs in order
  (the pending reduction cell's first), and the pending cell's stride-1 edges' statistics (a normal cell's
  layout; None without one).
  """
  n, train = len(specs), options['train']
  width = max([options['multiplier'] * specs[0].c] + [spec.c_prev for spec in specs]
              + [spec.c_prev_prev for spec in specs[1:]])  # of every state a cell of the stage reads
  q, st_first = cells.preprocess0(specs[0], params[0], stats[0], s0, train)
  look_ahead = [k + 1 if k + 1 < n else k for k in range(n)]
  look_key = ['preprocess0' if k + 1 < n else 'preprocess1' for k in range(n)]
  p1_params = [_pad_inputs(p['preprocess1'], width) for p in params]
  next_params = [_pad_inputs(params[j][key], width) for j, key in zip(look_ahead, look_key)]
  next_stats = [stats[j][key] for j, key in zip(look_ahead, look_key)]
  xs = [cells.stack_trees(p1_params), cells.stack_trees([s['preprocess1'] for s in stats]), edge_params,
        edge_stats, jnp.broadcast_to(weights, (n,) + weights.shape), np.ones((n, len(weights)), bool),
        cells.stack_trees(next_params), cells.stack_trees(next_stats)]
  if pending is None:
    r = _pad_channels(s1, width)
  else:
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    first = [zeros(p1_params[0]), stats[0]['preprocess1'], pending['params'], pending['stats'],
             pending['weights'], pending['active'], zeros(next_params[0]), next_stats[0]]
    prepend = lambda f, x: jnp.concatenate([jnp.asarray(f)[None], x])
    xs = [jax.tree.map(prepend, f, x) for f, x in zip(first, xs)]
    r = jnp.zeros(pending['buffer'].shape[1:4] + (width,), q.dtype)
  offset = 0 if pending is None else 1

  def body(carry, xs):
    q, r = carry
    p1_params, p1_stats, edge_params, edge_stats, w, active, next_params, next_stats, finishing = xs
    rcb = lambda params, stats, default: ops.relu_conv_bn(params, stats, r, train)
    if pending is not None:  # the pending cell's iteration skips the preprocessing
      rcb = functools.partial(jax.lax.cond, finishing, lambda params, stats, default: (default, stats), rcb)
    p1, st1 = rcb(p1_params, p1_stats, jnp.zeros_like(q))
    buffer = jnp.concatenate([jnp.stack([q, p1]), jnp.zeros((options['steps'],) + p1.shape, p1.dtype)])
    buffer = buffer if pending is None else jnp.where(finishing, pending['buffer'], buffer)
    out, edge_st = cell_edges(edge_params, edge_stats, buffer, w, active, **options)
    q_next, next_st = rcb(next_params, next_stats, q)
    return (q_next, _pad_channels(out, width)), (st1, edge_st, next_st, out)

  body = jax.checkpoint(body) if remat else body
  _, (st1, edge_st, next_st, outs) = jax.lax.scan(body, (q, r), tuple(xs) + (jnp.arange(n + offset) < offset,))
  st1 = cells.unstack_tree(st1, n + offset)[offset:]
  next_st = [st_first] + cells.unstack_tree(next_st, n + offset)[offset:-1]  # cell k's ran in iteration k - 1
  new_stats = [{'preprocess0': p0, 'preprocess1': p1} for p0, p1 in zip(next_st, st1)]
  outs = [outs[k] for k in range(n + offset)]
  s0_next = s1 if len(outs) == 1 else outs[-2]
  pending_stats = jax.tree.map(lambda a: a[0], edge_st) if offset else None
  return s0_next, outs[-1], new_stats, jax.tree.map(lambda a: a[offset:], edge_st), outs, pending_stats


@dataclasses.dataclass(frozen=True)
class Supernet:
  """The DARTS-family search network (quark0/darts ``model_search.Network``; DSARA with its space).

  ``variables = net.init(rng, x)``; ``alphas = net.init_alphas(rng)``;
  ``logits, new_batch_stats = net.apply(variables, alphas, x, train=True)``;
  ``net.apply(variables, alphas, x)`` (inference: running statistics) returns logits only.
  Inputs are NHWC in [0, 1] when ``mean``/``std`` are given (normalisation is inside the model).

  Variables: ``cells[i]`` holds cell i's preprocessing (and a reduction cell's edges, ``search_cell_init``);
  ``stages[k]`` the edges of the normal cells ``stage_cells[k]``, stacked ``(cells, edges, ...)`` as
  ``search_stage`` scans them, so neither the step nor the optimizer stacks or slices them per cell.
  """
  space: SearchSpace = DARTS
  init_channels: int = 16
  layers: int = 8
  num_classes: int = 10
  steps: int = 4
  multiplier: int = 4
  stem_multiplier: int = 3
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  depthwise: str = 'auto'
  remat: bool = False  # recompute cell activations in the backward pass (jax.checkpoint per cell)
  compute_dtype: str = 'float32'  # 'bfloat16': activations in bf16, float32 weights / BN statistics / logits

  def __post_init__(self):
    parallel.check_compute_dtype(self.compute_dtype)

  @property
  def plan(self) -> list[cells.CellSpec]:
    return cells.cell_plan(self.layers, self.init_channels, self.space.stage_types, self.space.widths,
                           self.multiplier, self.stem_multiplier)

  @property
  def stage_cells(self) -> list[list[int]]:
    """The normal cells of each run between reductions that has any (``variables['params']['stages'][k]``
    stacks the edges of run k's cells)."""
    return [run for run in _stages(self.plan) if not self.plan[run[0]].reduction]

  @property
  def num_edges(self) -> int:
    return sum(i + 2 for i in range(self.steps))

  def init_alphas(self, rng) -> dict[str, jax.Array]:
    """alphas ~ 1e-3 * N(0, 1), shape (n_edges, n_ops), one tensor per cell type."""
    shape = (self.num_edges, len(self.space.primitives))
    return {t: 1e-3 * jax.random.normal(jax.random.fold_in(rng, k), shape)
            for k, t in enumerate(self.space.cell_types)}

  def init(self, rng, x) -> dict:
    """Weights with PyTorch's default initialisation, seeded by ``rng``; ``x`` gives the input shape."""
    gen = ops.numpy_rng(rng)
    stem_p, stem_s = cells.stem_init(gen, x.shape[-1], self.stem_multiplier * self.init_channels)
    cell_p, cell_s = [], []
    for spec in self.plan:
      p, s = search_cell_init(gen, spec, self.space.primitives, self.steps)
      cell_p.append(p)
      cell_s.append(s)
    head = cells.linear_init(gen, self.multiplier * self.plan[-1].c, self.num_classes)
    stage_p = [cells.stack_trees([cell_p[i].pop('edges') for i in run], np) for run in self.stage_cells]
    stage_s = [cells.stack_trees([cell_s[i].pop('edges') for i in run], np) for run in self.stage_cells]
    return cells.as_variables({'stem': stem_p, 'cells': cell_p, 'stages': stage_p, 'classifier': head},
                              {'stem': stem_s, 'cells': cell_s, 'stages': stage_s}, x.dtype)

  def apply(self, variables, alphas: Mapping[str, jax.Array], x, train: bool = False,
            return_features: bool = False):
    """Forward pass. Train mode returns ``(logits, new_batch_stats)``; inference returns ``logits``.
    With ``return_features`` the list of every cell's output is appended (RNAS' feature distortion).
    Computes in ``compute_dtype``; logits and features come back in ``x``'s dtype."""
    params, stats = parallel.compute_cast(self.compute_dtype, variables['params']), variables['batch_stats']
    missing = set(self.space.cell_types) - set(alphas)
    if missing:
      raise ValueError(f'alphas lack cell types {sorted(missing)}: expected keys {self.space.cell_types}')
    weights = {t: jax.nn.softmax(a, axis=-1) for t, a in alphas.items()}
    out_dtype = x.dtype
    h = cells.normalize(parallel.compute_cast(self.compute_dtype, x), self.mean, self.std)
    h, stem_s = cells.stem_apply(params['stem'], stats['stem'], h, train)

    options = dict(primitives=self.space.primitives, steps=self.steps, multiplier=self.multiplier, train=train,
                   depthwise=ops.resolve_depthwise(self.depthwise, supernet=True))
    plan, s0, s1 = self.plan, h, h
    cell_s, stage_s, features, pending = [None] * len(plan), [], [], None

    def finish(out, node_stats):  # the pending reduction cell's output and statistics
      cell_s[pending['index']]['edges'].append(_node_edge_stats(node_stats, self.steps))
      features.append(out)
      return out

    for run in _stages(plan):
      specs, p, s = [plan[i] for i in run], [params['cells'][i] for i in run], [stats['cells'][i] for i in run]
      if specs[0].reduction:
        if pending is not None:  # two reductions in a row
          s1 = finish(*reduction_finish(pending, **options))
        start = functools.partial(reduction_start, **options)
        start = jax.checkpoint(start, static_argnums=(0,)) if self.remat else start
        buffer, cell_s[run[0]] = start(specs[0], p[0], s[0], s0, s1, weights['reduce'])
        pending = dict(reduction_pending(p[0], s[0], buffer, weights['reduce'], self.steps), index=run[0])
        s0, s1 = s1, None
        continue
      k = len(stage_s)
      s0, s1, new_s, edge_s, outs, node_stats = search_stage(
          specs, p, s, params['stages'][k], stats['stages'][k], s0, s1, weights[specs[0].cell_type],
          remat=self.remat, pending=pending, **options)
      stage_s.append(edge_s)
      if pending is not None:
        finish(outs.pop(0), node_stats)
      for i, ns in zip(run, new_s):
        cell_s[i] = ns
      features.extend(outs)
      pending = None
    if pending is not None:
      s1 = finish(*reduction_finish(pending, **options))
    logits = cells.classifier_head(params['classifier'], s1).astype(out_dtype)
    out = (logits, {'stem': stem_s, 'cells': cell_s, 'stages': stage_s}) if train else (logits,)
    out = out + ([f.astype(out_dtype) for f in features],) if return_features else out
    return out if len(out) > 1 else out[0]

  def logits_fn(self, variables, alphas):
    """``x -> logits`` in inference mode (running BN statistics), for attacks and certification."""
    fn = lambda x: self.apply(variables, alphas, x, train=False)
    fn.inference_mode = True
    return fn

  def derive(self, alphas) -> genotypes.Genotype:
    """The genotype of the alphas by the original ``_parse`` rule."""
    return genotypes.derive({t: np.asarray(alphas[t]) for t in self.space.cell_types},
                            self.space.primitives, self.steps, self.multiplier)
