"""Interval bound propagation (IBP) and CROWN on any JAX model function.

The model is interpreted as a graph of affine maps and maxima (``graph.build``). Methods:

* ``'ibp'`` (Gowal et al. 2018): intervals pushed forward; an affine map ``W h + b`` gives centre ``W m + b``
  and radius ``|W| r``. For an l_2 ball the first conv / dense layer uses the dual norm of its weights
  (``eps ||W_o||_2`` per output; for a conv the whole kernel, ignoring padding, as auto_LiRPA does). The
  specification ``C`` is folded into the trailing affine layers before concretisation (auto_LiRPA folds it into
  the last linear layer), so IBP bounds of ``C f(x)`` are never looser than ``C`` applied to logit intervals.
* ``'crown'`` (Zhang et al. 2018, "full" CROWN as auto_LiRPA's ``method='CROWN'``): linear coefficients are
  propagated backwards through the transposes of the affine maps (``jax.vjp``) and through linear relaxations of
  every maximum; the input bounds of each maximum are themselves computed by CROWN, in topological order, and
  intersected with their IBP bounds.
* ``'crown-ibp'`` (Zhang et al. 2020): CROWN for the output, IBP for the intermediate bounds (cheap: one
  backward pass with a few rows).

Relaxation of ``y = max(a, b)`` with ``a in [la, ua]``, ``b in [lb, ub]`` (ReLU: ``b = 0``): if one operand
dominates (``la >= ub``), ``y`` is that operand; otherwise with ``d = a - b in [ld, ud]`` and ``s = ud / (ud - ld)``
the upper bound is the chord ``y <= s a + (1 - s) b - s ld`` and the lower bound ``y >= a`` if ``s > 1/2`` else
``y >= b`` (CROWN's adaptive ReLU slope). ``max`` over axes (``reduce_max``): lower bound the operand with the
largest lower bound, upper bound that operand when it dominates, else the largest upper bound (DeepPoly).

Bounds are computed per example, so they are exact for models that act on examples independently (inference
mode). A batch runs together: each node's rule is mapped over the examples (``jax.vmap``), while scans and
backward passes are written for the batch, so no ``lax.scan`` is batched by ``jax.vmap`` (whose rule traces
a scan's body again, at every level of nesting). Everything is a pure JAX function: bounds can be jitted and
differentiated, w.r.t. ``params`` when the model is given as ``fn(params, x)`` (DSRNA-CB).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnas.certify import domain as domain_lib
from jaxnas.certify import graph as graph_lib

METHODS = ('ibp', 'crown', 'crown-ibp')


class Interval(NamedTuple):
  lo: Any
  hi: Any


class Ball(NamedTuple):
  """``centre + scale * d`` with ``||d||_2 <= eps`` (before the first non-elementwise map); ``box`` is the
  interval of the same value over the input box, or None."""
  centre: Any
  scale: Any
  box: Any


# ------------------------------------------------------------------------------------------------------
# IBP.
# ------------------------------------------------------------------------------------------------------
def _as_interval(val, dom: domain_lib.Domain) -> Interval:
  if isinstance(val, Interval):
    return val
  radius = dom.eps * jnp.abs(val.scale)
  return _intersect(Interval(val.centre - radius, val.centre + radius), val.box)


def _intersect(a: Interval, b: Interval | None) -> Interval:
  return a if b is None else Interval(jnp.maximum(a.lo, b.lo), jnp.minimum(a.hi, b.hi))


def _interval_rule(node: graph_lib.Node, ins: list[Interval]) -> Interval:
  if node.ibp[0] == 'mono':
    signs = node.ibp[1]
    return Interval(node.fn(*[i.lo if s > 0 else i.hi for i, s in zip(ins, signs)]),
                    node.fn(*[i.hi if s > 0 else i.lo for i, s in zip(ins, signs)]))
  (iv,) = ins
  if node.exact_ibp:  # an elementwise product: the ends map to the ends
    a, b = node.fn(iv.lo), node.fn(iv.hi)
    return Interval(jnp.minimum(a, b), jnp.maximum(a, b))
  centre = node.fn((iv.hi + iv.lo) * 0.5)
  radius = node.ibp[1]((iv.hi - iv.lo) * 0.5)
  return Interval(centre - radius, centre + radius)


def _ball_rule(node: graph_lib.Node, ball: Ball, dom: domain_lib.Domain):
  """IBP of an affine map applied directly to an l_2 ball (kept exact through elementwise maps)."""
  box = None if ball.box is None else _interval_rule(node, [ball.box])
  kind = node.ball[0]
  if kind == 'elementwise':
    scale = node.fn(ball.scale)
    if node.offset:
      scale = scale - node.fn(jnp.zeros_like(ball.scale))
    return Ball(node.fn(ball.centre), scale, box)
  centre = node.fn(ball.centre)
  if kind == 'conv':
    kernel, kernel_out, out_feature = node.ball[1:]
    norms = domain_lib.safe_sqrt(jnp.sum(jnp.square(kernel), axis=tuple(d for d in range(kernel.ndim)
                                                                        if d != kernel_out)))
    shape = [1] * centre.ndim
    shape[out_feature] = -1
    radius = dom.eps * jnp.max(jnp.abs(ball.scale)) * norms.reshape(shape)
  else:  # dense: exact row norms of the map scaled by the ball's scale
    radius = dom.eps * domain_lib.safe_sqrt(node.ball[1](jnp.square(ball.scale)))
  return _intersect(Interval(centre - radius, centre + radius), box)


def _ibp_step(node: graph_lib.Node, ins: list, dom: domain_lib.Domain):
  if node.kind == 'linear':
    if len(ins) == 1 and isinstance(ins[0], Ball) and node.ball:
      return _ball_rule(node, ins[0], dom)
    return _interval_rule(node, [_as_interval(v, dom) for v in ins])
  ins = [_as_interval(v, dom) for v in ins]
  if node.kind == 'max':
    b = ins[1] if len(ins) > 1 else Interval(node.const, node.const)
    return Interval(jnp.maximum(ins[0].lo, b.lo), jnp.maximum(ins[0].hi, b.hi))
  if node.kind == 'reduce_max':
    return Interval(jnp.max(ins[0].lo, axis=node.const), jnp.max(ins[0].hi, axis=node.const))
  raise AssertionError(node.kind)


# ------------------------------------------------------------------------------------------------------
# CROWN backward pass.
# ------------------------------------------------------------------------------------------------------
def _rowsum(t):
  """``[B, S, ...] -> [B, S]``: the sum of each row of each example."""
  return jnp.sum(t.reshape(t.shape[:2] + (-1,)), axis=2)


def _per_example(tree):
  """Per-example values ``[B, ...]`` (a state) as ``[B, 1, ...]``, to broadcast against coefficient rows."""
  return jax.tree.map(lambda t: t[:, None], tree)


def _dot(a, c, safe=True):
  """Row-wise ``sum(a * c)`` (``c`` broadcastable to ``a``); ``safe``: with ``0 * inf = 0`` (infinite constants
  come from -inf max-pool padding and -inf lower bounds of padded windows)."""
  c = jnp.asarray(c, a.dtype)
  if not safe:
    return _rowsum(a * c)
  finite = jnp.isfinite(c)
  out = _rowsum(a * jnp.where(finite, c, 0))
  infinite = lax.stop_gradient(jnp.where(~finite & (a != 0), a * jnp.where(finite, 1, c), 0))
  return out + _rowsum(infinite)


def _interval_dot(a, iv: Interval):
  """Lower bound of ``a . y`` for ``y`` in the interval (per example: ``[B, ...]``)."""
  iv = _per_example(iv)
  return _dot(jnp.maximum(a, 0), iv.lo) + _dot(jnp.minimum(a, 0), iv.hi)


def _max_relaxation(a: Interval, b: Interval):
  """Coefficients of ``a`` in the lower / upper relaxations of ``max(a, b)`` (``b`` gets one minus them) and
  the upper relaxation's intercept."""
  a_dom = a.lo >= b.hi
  b_dom = (b.lo >= a.hi) & ~a_dom
  mixed = ~(a_dom | b_dom)
  ld = jnp.where(mixed, a.lo - b.hi, -1)
  ud = jnp.where(mixed, a.hi - b.lo, 1)
  s = ud / (ud - ld)
  dtype = s.dtype
  lower = jnp.where(a_dom, 1, jnp.where(b_dom, 0, (s > 0.5).astype(dtype))).astype(dtype)
  upper = jnp.where(a_dom, 1, jnp.where(b_dom, 0, s)).astype(dtype)
  return lower, upper, jnp.where(mixed, -s * ld, 0).astype(dtype)


def _reduce_max_relaxation(iv: Interval, axes):
  """One-hot of the operand with the largest lower bound, whether it dominates, and the largest upper bound."""
  nd = iv.lo.ndim
  keep = [d for d in range(nd) if d not in axes]
  perm = keep + list(axes)
  lo = jnp.transpose(iv.lo, perm)
  hi = jnp.transpose(iv.hi, perm)
  flat_shape = lo.shape[:len(keep)] + (-1,)
  lo_f, hi_f = lo.reshape(flat_shape), hi.reshape(flat_shape)
  onehot = jax.nn.one_hot(jnp.argmax(lo_f, axis=-1), lo_f.shape[-1], dtype=lo.dtype)
  best_lo = jnp.sum(jnp.where(onehot > 0, lo_f, 0), axis=-1)
  others_hi = jnp.max(jnp.where(onehot > 0, -jnp.inf, hi_f), axis=-1)
  dominated = best_lo >= others_hi
  onehot = jnp.transpose(onehot.reshape(lo.shape), tuple(perm.index(d) for d in range(nd)))
  return onehot, dominated, jnp.max(hi_f, axis=-1)


def _relaxation(node, ins: list[Interval]):
  """The linear relaxation of a maximum from its inputs' intervals (computed once, used by every pass)."""
  if node.kind == 'max':
    b = ins[1] if len(ins) > 1 else Interval(node.const, node.const)
    return _max_relaxation(ins[0], b)
  return _reduce_max_relaxation(ins[0], node.const)


def _backward(nodes, state, starts: dict, relax: bool):
  """CROWN backward pass for a batch of examples: lower bounds of ``sum_v starts[v] . node[v]`` (coefficients
  ``[B, S, *shape]``: S rows per example) as a linear function of the graph's input nodes. Returns
  ``(bias [B, S], {input node: coefficients})``.

  ``state[v]`` is the relaxation of maximum ``v`` (``relax=True``) or its interval, per example: with
  ``relax=False`` the pass stops at the maxima and concretises against their intervals (IBP with the
  specification folded in). Affine maps act on every row of every example alike (their transpose is mapped
  over examples and rows), and no scan is batched by ``jax.vmap``."""
  coeffs = dict(starts)
  parts: dict[int, dict] = {}
  some = next(iter(starts.values()))
  bias = jnp.zeros(some.shape[:2], some.dtype)
  at_inputs = {}

  def accumulate(v, a):
    coeffs[v] = coeffs[v] + a if v in coeffs else a

  for v in range(max(starts), -1, -1):
    node = nodes[v]
    if node.kind == 'scan':
      if v in parts:
        b, cts = _scan_backward(node, parts.pop(v), state[v], relax)
        bias = bias + b
        for i, ct in zip(node.inputs, cts):
          accumulate(i, ct)
      continue
    a = coeffs.pop(v, None)
    if a is None:
      continue
    if node.kind == 'input':
      at_inputs[v] = a
    elif node.kind == 'part':
      got = parts.setdefault(node.inputs[0], {})
      got[node.const] = got[node.const] + a if node.const in got else a
    elif node.kind == 'linear':
      zeros = [jnp.zeros(nodes[i].shape, nodes[i].dtype) for i in node.inputs]
      if node.offset:
        bias = bias + _dot(a, node.fn(*zeros), node.infinite)
      transpose = jax.linear_transpose(node.fn, *zeros)  # of the linear part: the offset is dropped
      for i, ct in zip(node.inputs, jax.vmap(jax.vmap(transpose))(a.astype(node.dtype))):
        accumulate(i, ct.astype(a.dtype))
    elif not relax:
      bias = bias + _interval_dot(a, state[v])
    elif node.kind == 'max':
      lower, upper, intercept = _per_example(state[v])
      pos, neg = jnp.maximum(a, 0), jnp.minimum(a, 0)
      accumulate(node.inputs[0], pos * lower + neg * upper)
      coeff_b = pos * (1 - lower) + neg * (1 - upper)
      if len(node.inputs) > 1:
        accumulate(node.inputs[1], coeff_b)
      else:
        bias = bias + _dot(coeff_b, node.const, node.infinite)
      bias = bias + _rowsum(neg * intercept)
    elif node.kind == 'reduce_max':
      onehot, dominated, top = _per_example(state[v])
      pos, neg = jnp.maximum(a, 0), jnp.minimum(a, 0)
      expand = lambda t: jnp.expand_dims(t, tuple(ax + 2 for ax in node.const))
      exact_neg = jnp.where(dominated, neg, 0)
      accumulate(node.inputs[0], onehot * expand(pos + exact_neg))
      bias = bias + _rowsum(jnp.where(dominated, 0, neg) * top)
    else:
      raise AssertionError(node.kind)
  return bias, at_inputs


# ------------------------------------------------------------------------------------------------------
# Scans: the bound computation runs as a lax.scan whose body rebuilds the scan body's graph, for the whole
# batch: per-iteration values are [T, B, ...] in the loop and [B, T, ...] outside it.
# ------------------------------------------------------------------------------------------------------
def _exact_interval(value, aval, batch: int) -> Interval:
  value = jnp.broadcast_to(jnp.asarray(value, aval.dtype), (batch,) + tuple(aval.shape))
  return Interval(value, value)


def _time_major(tree):
  return jax.tree.map(lambda t: jnp.swapaxes(t, 0, 1), tree)


def _tangent_anchor(*trees):
  """A scalar 0 that depends on the first element of every floating leaf of ``trees``, for ``_anchored``."""
  leaves = [t for t in jax.tree.leaves(trees) if isinstance(t, jax.Array) and jnp.issubdtype(t.dtype, jnp.floating)
            and t.size]
  if not leaves:
    return 0
  firsts = jnp.concatenate([lax.slice(t, (0,) * t.ndim, (1,) * t.ndim).reshape(1) for t in leaves])
  return jnp.sum(jnp.where(False, firsts, 0))


def _anchored(tree, anchor):
  """``tree`` plus ``anchor`` (0), so a loop's initial carries have a tangent whenever the loop's operands do.

  Autodiff finds which carries of a ``lax.scan`` have tangents by a fixpoint that linearises the loop's body
  again each time a carry gains one. The bound loops' carries start exact (zero-initialised sums, exact
  buffers) and gain one in the first iteration, so every loop, and every loop nested in it, was linearised
  twice or more: tracing the gradient of DSRNA-CB's bound took 1.5x as long. XLA folds the zero away."""
  return jax.tree.map(lambda t: t + jnp.asarray(anchor, t.dtype), tree)


def _split_exact(info, values):
  """Per body input group (consts, carry, xs): exact values where the input is exact, None elsewhere."""
  nc, nk = info.n_consts, info.n_carry
  pick = lambda lo, hi: [None if info.bounded[k] else values[k] for k in range(lo, hi)]
  return pick(0, nc), pick(nc, nc + nk), pick(nc + nk, len(info.bounded))


def _fill(template, values):
  """``template`` with its non-None entries replaced, in order, by ``values``."""
  values = iter(values)
  return [None if t is None else next(values) for t in template]


def _scan_forward(node, ins, dom, relax, keep_state):
  """Bounds of a scan node's outputs for a batch of examples: a ``lax.scan`` over the body's bound
  propagation. Returns the outputs (None for exact ones) and, when ``keep_state``, per iteration the body's
  state (``[T, B, ...]``) and exact carries."""
  info = node.const
  nc, nk = info.n_consts, info.n_carry
  in_avals, out_avals = info.body.in_avals, info.body.out_avals
  sym_values = iter(ins)
  operands = [next(sym_values) if e is None else e for e in info.exact]
  batch = dom.x.shape[0]

  def interval(value, aval):
    if isinstance(value, Interval):
      return Interval(value.lo.astype(aval.dtype), value.hi.astype(aval.dtype))
    return jax.vmap(_as_interval)(value, dom) if isinstance(value, Ball) else _exact_interval(value, aval, batch)

  bounded = [k for k, b in enumerate(info.bounded) if b]
  consts_b = {k: interval(operands[k], in_avals[k]) for k in bounded if k < nc}
  carry_pos = [k for k in bounded if nc <= k < nc + nk]
  xs_pos = [k for k in bounded if k >= nc + nk]
  carry_b = [interval(operands[k], in_avals[k]) for k in carry_pos]
  xs_b = _time_major([interval(operands[k], in_avals[k]) for k in xs_pos])  # symbolic: intervals or balls
  e_consts, e_carry, e_xs = _split_exact(info, operands)

  def body(carry, x_t):
    cb, ce = carry
    xb_t, xe_t = x_t
    g = graph_lib.body_graph(info, e_consts + _fill(e_carry, ce) + _fill(e_xs, xe_t))
    given = consts_b | dict(zip(carry_pos, cb)) | dict(zip(xs_pos, xb_t))
    init = {v: given[n.const] for v, n in enumerate(g.nodes) if n.kind == 'input'}
    syms = [o.node for o in g.output if isinstance(o, graph_lib.Sym)]
    keep = _state_nodes(g.nodes, relax, syms) if keep_state else set()
    vals, st = _forward(g.nodes, init, syms, dom, relax, keep)
    found = dict(zip(syms, vals))
    outs = [found[o.node] if isinstance(o, graph_lib.Sym) else o for o in g.output]
    new_cb = [interval(outs[k - nc], out_avals[k - nc]) for k in carry_pos]
    new_ce = [outs[j] for j in range(nk) if not info.bounded[nc + j]]
    ys = [interval(outs[j], out_avals[j]) for j in range(nk, len(outs)) if info.out_bounded[j]]
    return (new_cb, new_ce), (ys, st, list(ce) if keep_state else [])

  carry_e = [v for v in e_carry if v is not None]
  xs_e = [v for v in e_xs if v is not None]
  carry_b = _anchored(carry_b, _tangent_anchor(operands))
  (cb, _), (ys, st, carries) = lax.scan(body, (carry_b, carry_e), (xs_b, xs_e), length=info.length,
                                        reverse=info.reverse)
  finals = dict(zip([k - nc for k in carry_pos], cb)) | dict(
      zip([j for j in range(nk, len(out_avals)) if info.out_bounded[j]], _time_major(ys)))
  return [finals[j] if b else None for j, b in enumerate(info.out_bounded)], (st, carries)


def _scan_backward(node, coeffs: dict, state, relax):
  """Coefficients ``[B, S, ...]`` on a scan node's symbolic operands from those on its outputs (reverse
  ``lax.scan``)."""
  info = node.const
  nc, nk = info.n_consts, info.n_carry
  st, carries = state
  some = next(iter(coeffs.values()))
  lead, dtype = some.shape[:2], some.dtype
  in_avals, out_avals = info.body.in_avals, info.body.out_avals
  zeros = lambda shape: jnp.zeros(lead + tuple(shape), dtype)
  carried = [j for j in range(nk) if info.bounded[nc + j]]
  ys_out = [j for j in range(nk, len(out_avals)) if info.out_bounded[j]]
  a_carry = [coeffs.get(j, zeros(out_avals[j].shape)) for j in carried]
  a_ys = [jnp.moveaxis(coeffs.get(j, zeros((info.length,) + tuple(out_avals[j].shape))), 2, 0) for j in ys_out]
  consts_b = [k for k in range(nc) if info.bounded[k]]
  xs_b = [k for k in range(nc + nk, len(in_avals)) if info.bounded[k]]
  e_consts, e_carry, e_xs = _split_exact(info, list(info.exact))
  xs_e = [v for v in e_xs if v is not None]

  def body(carry, x_t):
    a_c, a_k, bias = carry
    st_t, ce_t, xe_t, a_y_t = x_t
    g = graph_lib.body_graph(info, e_consts + _fill(e_carry, ce_t) + _fill(e_xs, xe_t))
    starts = {}
    wanted = dict(zip(carried, a_c)) | dict(zip(ys_out, a_y_t))
    for j, out in enumerate(g.output):
      if j not in wanted:
        continue
      if isinstance(out, graph_lib.Sym):
        starts[out.node] = starts[out.node] + wanted[j] if out.node in starts else wanted[j]
      else:
        bias = bias + _dot(wanted[j], out)
    if starts:
      b, at_inputs = _backward(g.nodes, st_t, starts, relax)
      bias = bias + b
    else:
      at_inputs = {}
    by_input = {n.const: at_inputs[v] for v, n in enumerate(g.nodes) if n.kind == 'input' and v in at_inputs}
    get = lambda k: by_input.get(k, zeros(in_avals[k].shape))
    new_a_c = [get(nc + j) for j in carried]
    a_k = [acc + get(k) for acc, k in zip(a_k, consts_b)]
    return (new_a_c, a_k, bias), [get(k) for k in xs_b]

  init = (a_carry, [zeros(in_avals[k].shape) for k in consts_b], jnp.zeros(lead, dtype))
  init = _anchored(init, _tangent_anchor(coeffs, list(info.exact)))
  (a_c, a_k, bias), a_xs = lax.scan(body, init, (st, carries, xs_e, a_ys), length=info.length,
                                    reverse=not info.reverse)
  by_operand = dict(zip(consts_b, a_k)) | dict(zip([nc + j for j in carried], a_c))
  by_operand |= {k: jnp.moveaxis(a, 0, 2) for k, a in zip(xs_b, a_xs)}
  out = []
  for k, a in sorted(by_operand.items()):
    if info.exact[k] is None:
      out.append(a)
    else:  # an exact operand treated as a (degenerate) interval, e.g. a zero initial carry
      bias = bias + _dot(a, info.exact[k])
  return bias, out


# ------------------------------------------------------------------------------------------------------
# Forward pass over a graph.
# ------------------------------------------------------------------------------------------------------
def _initial(dom: domain_lib.Domain):
  lo, hi = dom.interval()
  if dom.norm == 'linf':
    return Interval(lo, hi)
  return Ball(dom.x, jnp.ones_like(dom.x), None if dom.box is None else Interval(lo, hi))


def _state_nodes(nodes, relax: bool, outputs) -> set[int]:
  """The maxima and scans whose state a backward pass from ``outputs`` reads: all of them for CROWN; for IBP
  (``relax=False``) those reached through affine nodes only (the folding of the specification)."""
  if relax:
    return {v for v, n in enumerate(nodes) if n.kind in ('max', 'reduce_max', 'scan')}
  reached, stack = set(), list(outputs)
  while stack:
    v = stack.pop()
    if v not in reached:
      reached.add(v)
      if nodes[v].kind in ('linear', 'part', 'scan'):
        stack.extend(nodes[v].inputs)
  return {v for v in reached if nodes[v].kind in ('max', 'reduce_max', 'scan')}


def _forward(nodes, init, outputs, dom, relax, keep_state, lookahead=None, chunk_rows=0):
  """Bounds of every node in topological order (IBP, refined by CROWN on the targets, the keys of
  ``lookahead`` (``_lookahead``)) for a batch of examples (the leading axis of every value; ``dom`` batched):
  each node's rule per example (``jax.vmap``), a scan as one loop over the batch. ``init``: values of the
  input nodes. Returns the values of ``outputs`` and, for the nodes in ``keep_state``, what backward passes
  need: the relaxation (``relax``) or the interval of each maximum, and the per-iteration state of each scan."""
  keep = set(outputs)
  last_use = {i: v for v, n in enumerate(nodes) for i in n.inputs}
  vals: dict[int, Any] = {}
  state: dict[int, Any] = {}
  for v, node in enumerate(nodes):
    ins = [vals[i] for i in node.inputs]
    if node.kind == 'input':
      val = init[v]
    elif node.kind == 'part':
      val = ins[0][node.const]
    elif node.kind == 'scan':
      val, scan_state = _scan_forward(node, ins, dom, relax, v in keep_state)
      if v in keep_state:
        state[v] = scan_state
    else:
      val = jax.vmap(lambda i, d: _ibp_step(node, i, d))(ins, dom)
    if lookahead and v in lookahead:
      val = jax.vmap(_as_interval)(val, dom)
      need = _needed(nodes, v, val, vals, dom, *lookahead[v])
      val = _intersect(val, Interval(*_node_bounds(nodes, state, v, dom, need, chunk_rows)))
    vals[v] = val
    if node.kind in ('max', 'reduce_max') and v in keep_state:
      if relax:
        state[v] = jax.vmap(lambda i, d: _relaxation(node, [_as_interval(a, d) for a in i]))(ins, dom)
      else:
        state[v] = jax.vmap(_as_interval)(val, dom)
    for i in set(node.inputs):
      if last_use[i] == v and i not in keep:
        del vals[i]
  return [vals[o] for o in outputs], state


# ------------------------------------------------------------------------------------------------------
# Full CROWN: intermediate bounds by backward passes (unrolled graphs, batched over examples).
# ------------------------------------------------------------------------------------------------------
def _crown_targets(nodes) -> set[int]:
  """Nodes that need CROWN bounds: inputs of maxima, looking through element-selecting affine maps."""
  targets: set[int] = set()

  def mark(v):
    node = nodes[v]
    if node.kind != 'linear' or v in targets:
      return
    if node.exact_ibp:
      for i in node.inputs:
        mark(i)
    else:
      targets.add(v)

  for node in nodes:
    if node.kind in ('max', 'reduce_max'):
      for i in node.inputs:
        mark(i)
  return targets


def _lookahead(nodes, targets) -> dict[int, tuple[list[int], list[int]]]:
  """For each target: the element-selecting affine nodes it reaches through such nodes, and the maxima that it
  or they feed (topological order): the part of the graph that decides which of its elements need bounds."""
  consumers: dict[int, list[int]] = {}
  for c, node in enumerate(nodes):
    for i in set(node.inputs):
      consumers.setdefault(i, []).append(c)
  plan = {}
  for v in targets:
    chain, maxima, stack = set(), set(), [v]
    while stack:
      for c in consumers.get(stack.pop(), ()):
        if nodes[c].kind in ('max', 'reduce_max'):
          maxima.add(c)
        elif nodes[c].kind == 'linear' and nodes[c].exact_ibp and c not in chain:
          chain.add(c)
          stack.append(c)
    plan[v] = (sorted(chain), sorted(maxima))
  return plan


def _needed(nodes, v, val, vals: dict, dom, chain, maxima):
  """The elements of target ``v`` whose CROWN bounds can change a relaxation: those that reach an unstable
  maximum through element-selecting maps (auto_LiRPA's sparse intermediate bounds), judged by the bounds known
  when ``v`` is reached: ``val``, its IBP interval from its inputs' refined bounds, pushed through ``chain`` to
  ``maxima`` (``_lookahead``), with other operands at their refined bounds, or unbounded when not computed yet.
  An element stable there stays stable under the tighter bounds the forward pass finds, so skipping the others
  loses nothing. Judged by plain IBP instead, the quick start's network needed 1.13x / 1.28x the rows at eps
  0.01 / 0.001 (full CROWN 1.06x / 1.23x slower, benchmarks/RESULTS.md)."""
  ivs = {v: val}

  def interval(u):
    if u in ivs:
      return ivs[u]
    if u in vals:
      return jax.vmap(_as_interval)(vals[u], dom)
    inf = jnp.full(ivs[v].lo.shape[:1] + tuple(nodes[u].shape), jnp.inf, nodes[u].dtype)
    return Interval(-inf, inf)

  for c in chain:
    ivs[c] = jax.vmap(lambda i, d, c=c: _ibp_step(nodes[c], i, d))([interval(i) for i in nodes[c].inputs], dom)
  masks: dict[int, Any] = {}

  def mark(u, mask):
    if u in ivs:
      masks[u] = mask if u not in masks else masks[u] | mask

  for m in maxima:
    node = nodes[m]
    a = interval(node.inputs[0])
    if node.kind == 'reduce_max':
      mark(node.inputs[0], jnp.ones(a.lo.shape, bool))
      continue
    b = interval(node.inputs[1]) if len(node.inputs) > 1 else Interval(node.const, node.const)
    mixed = ~((a.lo >= b.hi) | (b.lo >= a.hi))
    for i in node.inputs:
      mark(i, mixed)
  for c in reversed(chain):
    if c in masks:
      zeros = [jnp.zeros(nodes[i].shape, nodes[i].dtype) for i in nodes[c].inputs]
      pulled = jax.vmap(jax.linear_transpose(nodes[c].fn, *zeros))(masks[c].astype(nodes[c].dtype))
      for i, m in zip(nodes[c].inputs, pulled):
        mark(i, m != 0)
  return masks.get(v, jnp.zeros(ivs[v].lo.shape, bool))


def _linear_bound(nodes, state, starts: dict, dom: domain_lib.Domain, relax: bool):
  """Lower bounds ``[B, S]`` of ``sum_v starts[v] . node[v]``: the CROWN backward pass (``_backward``), its
  coefficients on the input concretised over each example's domain (``dom`` batched)."""
  bias, at_inputs = _backward(nodes, state, starts, relax)
  if 0 not in at_inputs:
    return bias
  return bias + jax.vmap(lambda d, a: d.concretize(a))(dom, at_inputs[0])


def _node_bounds(nodes, state, v, dom, need, chunk_rows):
  """CROWN bounds of the needed elements of node ``v`` for a batch of examples; (-inf, inf) elsewhere, also
  where a chunk computed bounds of an element only another example needs (an example's bounds would otherwise
  depend on the batch it is in and on the chunk size).

  Each example's needed elements are sorted first; chunks of ``chunk_rows // B`` elements per example (rows
  ``+e_i`` and ``-e_i``) run one backward pass each, and chunks needed by no example are skipped
  (``lax.cond``). So a pass's coefficients hold ``2 * chunk_rows`` rows whatever the batch size ``B``: with
  ``chunk_rows`` elements per example, XLA:CPU's temporary memory grew faster than the batch (DARTS_V2 C=4, 3
  cells, 16x16: 0.38 GB at 4 examples, 4.9 GB at 8; C=8, 5 cells, 32x32: 123 GB at 16, out of memory)."""
  shape = nodes[v].shape
  n = graph_lib.num_elements(shape)
  chunk = min(max(chunk_rows // need.shape[0], 1), n)
  n_chunks = -(-n // chunk)
  dtype = dom.x.dtype
  need = need.reshape(need.shape[0], n)
  order = jnp.argsort((~need).astype(jnp.int32), axis=1, stable=True)
  order = jnp.pad(order, ((0, 0), (0, n_chunks * chunk - n)), constant_values=n)
  count = jnp.max(jnp.sum(need, axis=1))
  inf = jnp.full((need.shape[0], 2 * chunk), jnp.inf, dtype)

  def one(rows):
    e = jax.nn.one_hot(rows, n, dtype=dtype).reshape(rows.shape + tuple(shape))
    return _linear_bound(nodes, state, {v: jnp.concatenate([e, -e], axis=1)}, dom, relax=True)

  def run(k):
    rows = lax.dynamic_slice_in_dim(order, k * chunk, chunk, axis=1)
    return lax.cond(k * chunk < count, lambda: one(rows), lambda: -inf)

  out = run(0)[None] if n_chunks == 1 else lax.map(run, jnp.arange(n_chunks))
  out = out.reshape(n_chunks, -1, 2, chunk)
  lo = jnp.transpose(out[:, :, 0], (1, 0, 2)).reshape(-1, n_chunks * chunk)
  hi = -jnp.transpose(out[:, :, 1], (1, 0, 2)).reshape(-1, n_chunks * chunk)
  examples = jnp.arange(need.shape[0])[:, None]

  def scatter(t, fill):
    placed = jnp.full((need.shape[0], n), fill, dtype).at[examples, order].set(t, mode='drop')
    return jnp.where(need, placed, fill)

  full = (need.shape[0],) + tuple(shape)
  return scatter(lo, -jnp.inf).reshape(full), scatter(hi, jnp.inf).reshape(full)


def _propagate(graph: graph_lib.Graph, dom: domain_lib.Domain, method: str, chunk_rows: int):
  """The state for the output's backward pass, for a batch of domains."""
  nodes = graph.nodes
  lookahead = _lookahead(nodes, _crown_targets(nodes)) if method == 'crown' else None
  relax = method != 'ibp'
  keep_state = _state_nodes(nodes, relax, [graph.output.node])
  _, state = _forward(nodes, {0: jax.vmap(_initial)(dom)}, [], dom, relax, keep_state, lookahead, chunk_rows)
  return state


# ------------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------------
def check_method(method: str) -> str:
  if method not in METHODS:
    raise ValueError(f"unknown bound method {method!r}: use one of {', '.join(METHODS)}")
  return method


def _spec_bounds(graph, dom, C, method, upper, chunk_rows):
  """(lower, upper or None) ``[B, S]`` of ``C @ output``; ``C``: ``[B, S, K]``; ``dom`` batched."""
  out = graph.output
  if not isinstance(out, graph_lib.Sym):
    value = C @ jnp.asarray(out, C.dtype).reshape(-1)
    return value, (value if upper else None)
  state = _propagate(graph, dom, method, chunk_rows)
  rows = C.shape[1]
  A0 = C.reshape(C.shape[:2] + tuple(out.shape))
  A0 = jnp.concatenate([A0, -A0], axis=1) if upper else A0
  res = _linear_bound(graph.nodes, state, {out.node: A0}, dom, method != 'ibp')
  return (res[:, :rows], -res[:, rows:]) if upper else (res, None)


def bounds(fn: Callable, x, eps, norm: str = 'linf', method: str = 'crown', *, C=None, params=None,
           box=None, upper: bool = True, chunk_rows: int = 256):
  """Lower and upper bounds of ``C @ fn(x')`` over ``||x' - x||_norm <= eps`` (∩ ``box``), per example.

  Args:
    fn: ``x -> logits [B, K]``, or ``(params, x) -> logits`` when ``params`` is given (bounds are then
      differentiable functions of ``params``). It must treat examples independently (inference mode).
    x: inputs ``[B, ...]``. eps: scalar or ``[B]``. norm: 'linf' or 'l2'. method: 'ibp', 'crown', 'crown-ibp'.
    C: specification ``[S, K]`` or ``[B, S, K]``; identity (bounds of the logits) when None.
    box: ``(lo, hi)`` bounds of valid inputs (e.g. ``(0., 1.)``), broadcastable to ``x``; None: no clipping.
    upper: also compute upper bounds (else the second output is None).
    chunk_rows: elements of the whole batch per backward pass when CROWN bounds intermediate nodes
      (``chunk_rows // B`` per example; memory vs speed).

  Returns:
    ``(lower [B, S], upper [B, S] or None)``.
  """
  domain_lib.check_norm(norm)
  check_method(method)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'certify: inputs must be floating point, got {x.dtype}')
  batch = x.shape[0]
  args = (x[:1],) if params is None else (params, x[:1])
  graph = graph_lib.build(fn, args, bounded=len(args) - 1, unroll=method == 'crown')
  out_shape = jnp.shape(graph.output)
  if len(out_shape) < 1 or out_shape[0] != 1:
    raise ValueError(f'certify: the function must map a batch [B, ...] to logits [B, K]; got {out_shape} '
                     'for one example')
  k = math.prod(out_shape[1:])
  C = jnp.eye(k, dtype=x.dtype) if C is None else jnp.asarray(C, x.dtype)
  if C.shape[-1] != k or C.ndim not in (2, 3):
    raise ValueError(f'certify: C must be [S, {k}] or [B, S, {k}], got {C.shape}')
  C = jnp.broadcast_to(C, (batch,) + C.shape[-2:])
  eps = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (batch,))
  if box is not None:
    box = tuple(jnp.broadcast_to(jnp.asarray(b, x.dtype), x.shape)[:, None] for b in box)
  dom = domain_lib.Domain(x[:, None], eps, norm, box)
  return _spec_bounds(graph, dom, C, method, upper, chunk_rows)


def ibp_bounds(fn: Callable, x, eps, norm: str = 'linf', C=None, **kwargs):
  """IBP bounds ``(lower, upper)`` of ``C @ fn(x')``; see ``bounds``."""
  return bounds(fn, x, eps, norm, 'ibp', C=C, **kwargs)


def crown_bounds(fn: Callable, x, eps, norm: str = 'linf', C=None, *, intermediate: str = 'crown', **kwargs):
  """CROWN bounds ``(lower, upper)`` of ``C @ fn(x')``; ``intermediate='ibp'`` gives CROWN-IBP."""
  if intermediate not in ('crown', 'ibp'):
    raise ValueError(f"unknown intermediate bounds {intermediate!r}: use 'crown' or 'ibp'")
  return bounds(fn, x, eps, norm, 'crown' if intermediate == 'crown' else 'crown-ibp', C=C, **kwargs)


def margin_spec(y, num_classes: int):
  """``C [B, K-1, K]`` with rows ``e_y - e_j`` for ``j != y`` in increasing ``j``."""
  y = jnp.asarray(y)
  eye = jnp.eye(num_classes)
  others = jnp.arange(num_classes - 1)[None, :]
  others = others + (others >= y[:, None])
  return eye[y][:, None, :] - eye[others]


def margin_lower_bounds(logits_fn: Callable, x, y, eps, norm: str = 'linf', method: str = 'crown', **kwargs):
  """Lower bounds ``[B, K-1]`` of the margins ``f_y(x') - f_j(x')``, ``j != y`` (a point is certified when all
  are positive). ``kwargs``: ``params``, ``box``, ``chunk_rows`` as in ``bounds``."""
  x = jnp.asarray(x)
  num_classes = _num_classes(logits_fn, x, kwargs.get('params'))
  C = margin_spec(y, num_classes).astype(x.dtype)
  lower, _ = bounds(logits_fn, x, eps, norm, method, C=C, upper=False, **kwargs)
  return lower


def _num_classes(fn, x, params) -> int:
  args = (x[:1],) if params is None else (params, x[:1])
  return math.prod(jax.eval_shape(fn, *args).shape[1:])
