"""The network skeleton shared by the search supernet and the evaluation networks.

Both follow DARTS' ``Network``/``NetworkCIFAR``: a 3x3 stem conv + BN, ``layers`` cells with reductions at
``layers // 3`` and ``2 * layers // 3``, global average pooling and a linear classifier. A cell reads the
outputs of the two previous cells (``s0``, ``s1``).

Speed: ``run_cells`` (evaluation networks) executes runs of consecutive cells with identical shapes and cell
type with ``lax.scan`` over their stacked weights, so the compiled program holds one copy of each distinct
cell, and compile time stays flat in the number of cells. The supernet scans whole stages
(``search_space.search_stage``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxnas import ops


@dataclasses.dataclass(frozen=True)
class CellSpec:
  """Static description of one cell: its type (e.g. 'normal', 'reduce', 'accurate', 'robust') and widths."""
  index: int
  cell_type: str
  reduction: bool
  reduction_prev: bool
  c_prev_prev: int
  c_prev: int
  c: int

  @property
  def shape_key(self):
    return (self.cell_type, self.reduction, self.reduction_prev, self.c_prev_prev, self.c_prev, self.c)


def reduction_indices(layers: int) -> tuple[int, int]:
  return layers // 3, 2 * layers // 3


def cell_plan(layers: int, init_channels: int, stage_types: Sequence[str], widths: Sequence[int],
              multiplier: int = 4, stem_multiplier: int = 3) -> list[CellSpec]:
  """Cell types and channel widths of every cell.

  ``stage_types[k]`` is the type of the non-reduction cells after k reductions (DARTS: all 'normal'; DSARA
  A-A-R: 'accurate', 'accurate', 'robust'); ``widths[k]`` multiplies ``init_channels`` after k reductions
  (DARTS 1-2-4, DSARA 1-2-2).
  """
  if len(stage_types) != 3 or len(widths) != 3:
    raise ValueError(f'stage_types and widths need one entry per stage (3), got {stage_types}, {widths}')
  if layers < 3:
    raise ValueError(f'a network needs at least 3 cells (two of them reductions), got layers={layers}')
  c_pp = c_p = stem_multiplier * init_channels
  plan, stage, reduction_prev = [], 0, False
  reductions = reduction_indices(layers)
  for i in range(layers):
    reduction = i in reductions
    if reduction:
      stage += 1
    c = widths[stage] * init_channels
    cell_type = 'reduce' if reduction else stage_types[stage]
    plan.append(CellSpec(i, cell_type, reduction, reduction_prev, c_pp, c_p, c))
    reduction_prev = reduction
    c_pp, c_p = c_p, multiplier * c
  return plan


def segments(plan: Sequence[CellSpec], split_after: Sequence[int] = ()) -> list[list[int]]:
  """Groups consecutive cells with equal ``shape_key`` (scan candidates); a group ends after ``split_after``."""
  groups: list[list[int]] = []
  for spec in plan:
    if groups and plan[groups[-1][-1]].shape_key == spec.shape_key and groups[-1][-1] not in split_after:
      groups[-1].append(spec.index)
    else:
      groups.append([spec.index])
  return groups


def stack_trees(trees, xp=jnp):
  return jax.tree.map(lambda *leaves: xp.stack(leaves), *trees)


def unstack_tree(tree, n: int) -> list:
  """The inverse of ``stack_trees``: the ``n`` trees along the leading axis."""
  return [jax.tree.map(lambda leaf, k=k: leaf[k], tree) for k in range(n)]


def run_cells(cell_fn: Callable, plan: Sequence[CellSpec], params: Sequence, stats: Sequence, s0, s1,
              rng, *, split_after: Sequence[int] = (), on_output: Callable | None = None,
              collect: bool = False, remat: bool = False):
  """Runs all cells; ``cell_fn(spec, params, stats, s0, s1, rng) -> (out, new_stats)``.

  Segments of identical cells run under ``lax.scan``. ``on_output(index, s1)`` is called after each
  segment's last cell (used for the auxiliary head). Returns ``(s1, new_stats_list, features)`` where
  ``features`` lists every cell's output when ``collect`` is set. ``remat`` recomputes each cell's
  activations in the backward pass instead of storing them (``jax.checkpoint``: memory for compute).
  """
  if remat:
    cell_fn = jax.checkpoint(cell_fn, static_argnums=(0,))
  new_stats, features = [None] * len(plan), []
  for seg in segments(plan, split_after):
    spec = plan[seg[0]]
    keys = None if rng is None else jnp.stack([jax.random.fold_in(rng, i) for i in seg])
    if len(seg) == 1:
      out, new_stats[seg[0]] = cell_fn(spec, params[seg[0]], stats[seg[0]], s0, s1,
                                       None if keys is None else keys[0])
      s0, s1 = s1, out
      outs = [out]
    else:
      def body(carry, xs, spec=spec):
        c0, c1 = carry
        p, s, k = xs
        out, ns = cell_fn(spec, p, s, c0, c1, k)
        return (c1, out), (ns, out if collect else None)

      (s0, s1), (seg_stats, seg_outs) = lax.scan(
          body, (s0, s1), (stack_trees([params[i] for i in seg]), stack_trees([stats[i] for i in seg]), keys))
      for i, seg_stat in zip(seg, unstack_tree(seg_stats, len(seg))):
        new_stats[i] = seg_stat
      outs = [seg_outs[t] for t in range(len(seg))] if collect else []
    if collect:
      features.extend(outs)
    if on_output is not None:
      on_output(seg[-1], s1)
  return s1, new_stats, features


# ------------------------------------------------------------------------------------------------
# Stem, classifier, normalisation: shared by all networks.
# ------------------------------------------------------------------------------------------------
def stem_init(rng, in_channels, c_stem):
  bn_p, bn_s = ops.bn_init(c_stem, affine=True)
  return {'conv': ops.conv_init(rng, 3, in_channels, c_stem), 'bn': bn_p}, {'bn': bn_s}


def stem_apply(params, stats, x, train):
  y = ops.conv2d(x, params['conv']['kernel'], 1, 1)
  y, s = ops.batch_norm(params['bn'], stats['bn'], y, train)
  return y, {'bn': s}


def linear_init(rng, c_in, c_out):
  return {'kernel': ops.torch_uniform(rng, (c_in, c_out), c_in), 'bias': ops.torch_uniform(rng, (c_out,), c_in)}


def linear(params, x):
  return x @ params['kernel'] + params['bias']


def classifier_head(params, s1):
  """Global average pooling + linear."""
  return linear(params, jnp.mean(s1, axis=(1, 2)))


def as_variables(params, stats, dtype) -> dict:
  """Flax-style variables ``{'params', 'batch_stats'}`` as JAX arrays of the input's float dtype."""
  dtype = jax.dtypes.canonicalize_dtype(dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32)
  to_jax = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
  return {'params': to_jax(params), 'batch_stats': to_jax(stats)}


def normalize(x, mean, std):
  """Per-channel input normalisation inside the model, so attacks work in [0, 1] pixel space."""
  if mean is None:
    return x
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def preprocess_init(rng, spec: CellSpec, affine: bool):
  if spec.reduction_prev:
    p0, s0 = ops.factorized_reduce_init(rng, spec.c_prev_prev, spec.c, affine)
  else:
    p0, s0 = ops.relu_conv_bn_init(rng, spec.c_prev_prev, spec.c, affine)
  p1, s1 = ops.relu_conv_bn_init(rng, spec.c_prev, spec.c, affine)
  return {'preprocess0': p0, 'preprocess1': p1}, {'preprocess0': s0, 'preprocess1': s1}


def preprocess0(spec: CellSpec, params, stats, s0, train):
  """The cell's ``s0`` input: FactorizedReduce after a reduction cell, ReLUConvBN otherwise."""
  reduce_or_conv = ops.factorized_reduce if spec.reduction_prev else ops.relu_conv_bn
  return reduce_or_conv(params['preprocess0'], stats['preprocess0'], s0, train)


def preprocess(spec: CellSpec, params, stats, s0, s1, train):
  s0, st0 = preprocess0(spec, params, stats, s0, train)
  s1, st1 = ops.relu_conv_bn(params['preprocess1'], stats['preprocess1'], s1, train)
  return s0, s1, {'preprocess0': st0, 'preprocess1': st1}
