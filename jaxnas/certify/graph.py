"""A JAX program as a bound-propagation graph.

``build(fn, args, bounded)`` traces ``fn`` with ``jax.make_jaxpr`` and interprets the jaxpr once. Every value
that does not depend on the bounded input is *exact*: it is computed on the spot (constant folding; these
values may be tracers, so bounds stay differentiable w.r.t. weights and alphas). Every value that depends on
the input becomes a node of the graph:

* ``input``      the perturbed input;
* ``linear``     an affine map of its input nodes, ``fn(*inputs)``, with the exact operands closed over (conv,
                 dot, add, BN in inference mode, pooling by sums, pad, slice, concat, reshape, ...);
* ``max``        the elementwise maximum of a node and a node or an exact value (ReLU is ``max(x, 0)``,
                 max-pooling a chain of maxima over shifted slices);
* ``reduce_max`` a maximum over axes;
* ``scan``       a ``lax.scan`` kept as a loop (its outputs are read by ``part`` nodes): its body is rebuilt as a
                 graph inside the bound computation's own ``lax.scan``, so compile time does not grow with the
                 number of iterations (``ScanInfo``). With ``unroll=True`` scans are unrolled instead (needed
                 by full CROWN, whose intermediate bounds need backward passes across iterations), and small
                 scans (at most ``_UNROLL_SIZE`` equations in all iterations) always are.

Calls (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``) are inlined, ``cond`` with an exact
index selects its branch (a traced index selects among all branches), and ``min``, ``clamp``, ``abs``,
``reduce_min`` and ``reduce_window_max`` are rewritten into the forms above. Any other primitive applied to an
input-dependent value raises a ``ValueError`` that names it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore


class Sym(NamedTuple):
  """An input-dependent value: the output of graph node ``node``."""
  node: int
  shape: tuple[int, ...]
  dtype: Any


class Node(NamedTuple):
  """One node. ``ibp`` is ``('mono', signs)`` (monotone in each input with the given sign: apply ``fn`` to the
  lower/upper bounds) or ``('scaled', fn_abs)`` (``fn`` on the centre, ``fn_abs`` — the same map with absolute
  weights — on the radius). ``exact_ibp``: each output element is one input element times an exact factor
  plus an exact offset, so interval bounds pass through without loss. ``offset``: ``fn(0)`` may be nonzero.
  ``ball``: how an l_p ball reaching this node directly is bounded (first-layer IBP, see ``propagation``).
  ``infinite``: an exact operand may hold infinities (-inf padding of max-pooling), so products with it must
  treat ``0 * inf`` as 0."""
  kind: str
  inputs: tuple[int, ...]
  shape: tuple[int, ...]
  dtype: Any
  name: str
  fn: Callable | None = None
  ibp: tuple = ()
  exact_ibp: bool = False
  offset: bool = False
  ball: tuple = ()
  const: Any = None
  infinite: bool = False


class Graph(NamedTuple):
  nodes: tuple[Node, ...]
  output: Any  # a Sym or an exact array (a tuple of them for a scan body)


class ScanInfo(NamedTuple):
  """A ``lax.scan`` applied to input-dependent operands. ``bounded[k]``: body input ``k`` (consts, carry,
  xs) is input-dependent (for the carry: after a fixed point over iterations); ``exact[k]``: the scan operand
  ``k`` when it is exact (None for a symbolic one); ``out_bounded[j]``: scan output ``j`` is input-dependent."""
  body: Any
  length: int
  reverse: bool
  n_consts: int
  n_carry: int
  bounded: tuple[bool, ...]
  exact: tuple
  out_bounded: tuple[bool, ...]


_MONO = {'add', 'add_any', 'pad', 'slice', 'reshape', 'transpose', 'broadcast_in_dim', 'squeeze',
         'convert_element_type', 'reduce_sum', 'select_n', 'dynamic_slice', 'dynamic_update_slice', 'gather',
         'concatenate', 'rev', 'copy', 'copy_p', 'reduce_window_sum', 'cumsum', 'split', 'stop_gradient',
         'reduce_precision', 'sharding_constraint', 'reshard', 'scatter-add', 'scatter', 'stack'}
_SCALED = {'mul', 'div', 'dot_general', 'conv_general_dilated'}
# Each output element is a single input element (times / plus an exact value): bounds pass exactly.
_SELECT = {'pad', 'slice', 'reshape', 'transpose', 'broadcast_in_dim', 'squeeze', 'convert_element_type',
           'select_n', 'dynamic_slice', 'dynamic_update_slice', 'gather', 'concatenate', 'rev', 'copy',
           'copy_p', 'split', 'stop_gradient', 'reduce_precision', 'sharding_constraint', 'reshard', 'neg', 'stack'}
_ELEMENTWISE = {'add', 'add_any', 'sub', 'mul', 'div', 'neg', 'convert_element_type', 'copy', 'copy_p',
                'stop_gradient', 'reduce_precision'}
# Exact operands of these enter additively, so fn(0) can be nonzero.
_ADDITIVE = {'add', 'add_any', 'sub', 'pad', 'select_n', 'concatenate', 'dynamic_update_slice', 'scatter',
             'scatter-add', 'stack'}
# The operands of these that must be exact (indices, predicates); the others may be bounded.
_INDEX_OPERANDS = {'select_n': (0,), 'dynamic_slice': 'tail1', 'dynamic_update_slice': 'tail2',
                   'gather': (1,), 'scatter': (1,), 'scatter-add': (1,)}
_CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr',
          'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr', 'checkpoint': 'jaxpr',
          'remat2': 'jaxpr', 'remat': 'jaxpr'}
# Scans with at most this many equations in all iterations together are unrolled (a loop costs more to
# compile and run than a few inlined bodies, e.g. loops over kernel taps).
_UNROLL_SIZE = 256
SUPPORTED = sorted(_MONO | _SCALED | set(_CALLS) | {'sub', 'neg', 'max', 'min', 'reduce_max', 'reduce_min',
                                                     'clamp', 'abs', 'reduce_window_max', 'scan', 'cond'})


def _unsupported(name: str, why: str = '') -> ValueError:
  return ValueError(f"certify: no bound rule for primitive '{name}' applied to an input-dependent value"
                    f"{why}; supported primitives: {', '.join(SUPPORTED)}")


class _Builder:
  """Interprets jaxprs, folding exact values and recording nodes for input-dependent ones."""

  def __init__(self, unroll: bool):
    self.unroll = unroll
    self.nodes: list[Node] = []

  def add(self, node: Node) -> Sym:
    self.nodes.append(node)
    return Sym(len(self.nodes) - 1, tuple(node.shape), node.dtype)

  # -- interpretation --------------------------------------------------------------------------------
  def run(self, jaxpr, consts, args):
    env = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts):
      env[v] = val
    for v, val in zip(jaxpr.invars, args):
      env[v] = val
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if any(isinstance(a, Sym) for a in ins):
        outs = self.eqn(eqn, ins)
      else:
        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
          outs = [outs]
      for v, val in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = val
    return [read(v) for v in jaxpr.outvars]

  def run_closed(self, closed, args):
    if isinstance(closed, jcore.ClosedJaxpr):
      return self.run(closed.jaxpr, closed.consts, args)
    return self.run(closed, [], args)

  def run_fn(self, f, args):
    """Interprets ``f(*args)`` (a rewrite written with jnp, one output) on exact / symbolic arguments."""
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, Sym) else a for a in args]
    sym_pos = [i for i, a in enumerate(args) if isinstance(a, Sym)]

    def traced(*syms):
      full = list(args)
      for i, s in zip(sym_pos, syms):
        full[i] = s
      return f(*full)

    closed = jax.make_jaxpr(traced)(*[avals[i] for i in sym_pos])
    (out,) = self.run(closed.jaxpr, closed.consts, [args[i] for i in sym_pos])
    return out

  # -- one equation with input-dependent operands ------------------------------------------------------
  def eqn(self, eqn, ins):
    name = eqn.primitive.name
    params = eqn.params
    if name in _CALLS:
      return self.run_closed(params[_CALLS[name]], ins)
    if name == 'scan':
      small = params['length'] * _size(params['jaxpr'].jaxpr) <= _UNROLL_SIZE
      return self.scan(params, ins) if self.unroll or small else self.scan_node(eqn.primitive, params, ins)
    if name == 'cond':
      return self.cond(params, ins)
    if name in ('max', 'min', 'clamp', 'abs', 'reduce_min', 'reduce_window_max'):
      return [self.nonlinear(name, params, ins, eqn.outvars[0].aval)]
    if name == 'reduce_max':
      return [self.add(Node('reduce_max', (ins[0].node,), eqn.outvars[0].aval.shape,
                            eqn.outvars[0].aval.dtype, name, const=tuple(params['axes'])))]
    if name in _MONO or name in _SCALED or name in ('sub', 'neg'):
      outs = self.linear_eqn(eqn, ins)
      return outs if eqn.primitive.multiple_results else [outs]
    raise _unsupported(name)

  def linear_eqn(self, eqn, ins):
    name, prim, params = eqn.primitive.name, eqn.primitive, eqn.params
    bind_params = prim.get_bind_params(params)
    fixed = _INDEX_OPERANDS.get(name, ())
    if fixed == 'tail1':
      fixed = tuple(range(1, len(ins)))
    elif fixed == 'tail2':
      fixed = tuple(range(2, len(ins)))
    for i in fixed:
      if isinstance(ins[i], Sym):
        raise _unsupported(name, ' as an index or predicate')
    if name == 'convert_element_type' and not jnp.issubdtype(params['new_dtype'], jnp.floating):
      raise _unsupported(name, f" to {params['new_dtype']}")
    sym_pos = [i for i, a in enumerate(ins) if isinstance(a, Sym)]
    if name in _SCALED and len(sym_pos) > 1:
      raise _unsupported(name, ' between two input-dependent values (products are not affine)')
    if name == 'div' and sym_pos != [0]:
      raise _unsupported(name, ' with an input-dependent divisor')
    # stop_gradient is the identity on values; its zero transpose must not reach the backward pass.
    bind = (lambda a: a) if name == 'stop_gradient' else (lambda *a: prim.bind(*a, **bind_params))
    if name in _SCALED:
      fn_abs = _with_exact(bind, ins, sym_pos, transform=jnp.abs)
      ibp = ('scaled', fn_abs)
    else:
      sign = {'sub': (1, -1), 'neg': (-1,)}.get(name)
      ibp = ('mono', tuple(sign[i] if sign else 1 for i in sym_pos))
    ball = ()
    if name in _ELEMENTWISE and len(sym_pos) == 1 and tuple(ins[sym_pos[0]].shape) == tuple(
        eqn.outvars[0].aval.shape):
      ball = ('elementwise',)
    elif name == 'conv_general_dilated' and sym_pos == [0] and params['batch_group_count'] == 1:
      ball = ('conv', ins[1], params['dimension_numbers'].rhs_spec[0],
              params['dimension_numbers'].out_spec[1])
    elif name == 'dot_general':
      ball = ('dot', _with_exact(bind, ins, sym_pos, transform=jnp.square))
    info = dict(ibp=ibp, ball=ball,
                exact_ibp=name in _SELECT or (name in _ELEMENTWISE and len(sym_pos) == 1),
                offset=name in _ADDITIVE and len(sym_pos) < len(ins),
                infinite=any(_may_be_infinite(a) for a in ins))
    avals = [v.aval for v in eqn.outvars]
    return self.linear(name, bind, ins, avals, prim.multiple_results, **info)

  def linear(self, name, bind, ins, avals, multiple, **info):
    """Adds one affine node per output of ``bind(*ins)`` (symbolic operands substituted)."""
    sym_pos = [i for i, a in enumerate(ins) if isinstance(a, Sym)]
    full_fn = _with_exact(bind, ins, sym_pos)
    outs = []
    for k, aval in enumerate(avals):
      fn = (lambda *b, k=k: full_fn(*b)[k]) if multiple else full_fn
      outs.append(self.add(Node('linear', tuple(ins[i].node for i in sym_pos), tuple(aval.shape),
                                aval.dtype, name, fn=fn, **info)))
    return outs if multiple else outs[0]

  def select(self, name, f, ins, aval):
    """An affine node that selects / stacks elements (``f`` monotone, each output one input element)."""
    sym_pos = [i for i, a in enumerate(ins) if isinstance(a, Sym)]
    return self.linear(name, f, ins, [aval], False, ibp=('mono', (1,) * len(sym_pos)), ball=(),
                       exact_ibp=True, offset=len(sym_pos) < len(ins),
                       infinite=any(_may_be_infinite(a) for a in ins))

  # -- nonlinear primitives -----------------------------------------------------------------------------
  def nonlinear(self, name, params, ins, aval):
    if name == 'max':
      a, b = ins
      if not isinstance(a, Sym):
        a, b = b, a
      const = None if isinstance(b, Sym) else b
      inputs = (a.node,) if const is not None else (a.node, b.node)
      return self.add(Node('max', inputs, tuple(aval.shape), aval.dtype, name, const=const,
                           infinite=_may_be_infinite(const)))
    if name == 'min':
      return self.run_fn(lambda a, b: -jnp.maximum(-a, -b), ins)
    if name == 'clamp':
      return self.run_fn(lambda lo, x, hi: jnp.minimum(jnp.maximum(x, lo), hi), ins)
    if name == 'abs':
      return self.run_fn(lambda x: jnp.maximum(x, -x), ins)
    if name == 'reduce_min':
      return self.run_fn(lambda x: -jnp.max(-x, axis=tuple(params['axes'])), ins)
    if name == 'reduce_window_max':
      if any(d != 1 for d in params['base_dilation']):
        raise _unsupported(name, ' with base dilation')
      return self.run_fn(lambda x: _window_max(x, params), ins)
    raise _unsupported(name)

  # -- control flow -------------------------------------------------------------------------------------
  def scan(self, params, ins):
    """Unrolls ``lax.scan``: the body is interpreted ``length`` times."""
    n_consts, n_carry, length = params['num_consts'], params['num_carry'], params['length']
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
    body = params['jaxpr']
    ys_steps = []
    steps = range(length - 1, -1, -1) if params['reverse'] else range(length)
    for t in steps:
      x_t = [self.index(x, t) for x in xs]
      outs = self.run_closed(body, list(consts) + list(carry) + x_t)
      carry, ys = outs[:n_carry], outs[n_carry:]
      ys_steps.append(ys)
    if params['reverse']:
      ys_steps.reverse()
    stacked = []
    for k, aval in enumerate(body.out_avals[n_carry:]):
      parts = [ys[k] for ys in ys_steps]
      if not any(isinstance(p, Sym) for p in parts):
        stacked.append(jnp.stack(parts))
      else:
        out_aval = jax.ShapeDtypeStruct((length,) + tuple(aval.shape), aval.dtype)
        stacked.append(self.select('stack', lambda *p: jnp.stack(p), parts, out_aval))
    return list(carry) + stacked

  def scan_node(self, prim, params, ins):
    """A ``scan`` node; exact outputs are computed now (the scan run with zeros for the symbolic operands)."""
    n_consts, n_carry = params['num_consts'], params['num_carry']
    body = params['jaxpr']
    is_sym = [isinstance(a, Sym) for a in ins]
    carry = is_sym[n_consts:n_consts + n_carry]
    while True:  # a carry is input-dependent if its initial value or its update is
      outs = dependence(body.jaxpr, is_sym[:n_consts] + carry + is_sym[n_consts + n_carry:])
      updated = [c or o for c, o in zip(carry, outs[:n_carry])]
      if updated == carry:
        break
      carry = updated
    bounded = tuple(is_sym[:n_consts] + carry + is_sym[n_consts + n_carry:])
    info = ScanInfo(body, params['length'], params['reverse'], n_consts, n_carry, bounded,
                    tuple(None if isinstance(a, Sym) else a for a in ins), tuple(outs))
    exact_outs = [None] * len(outs)
    if not all(outs):
      zeros = [jnp.zeros(a.shape, a.dtype) if isinstance(a, Sym) else a for a in ins]
      exact_outs = prim.bind(*zeros, **prim.get_bind_params(params))
    node = self.add(Node('scan', tuple(a.node for a in ins if isinstance(a, Sym)), (), None, 'scan',
                         const=info))
    results = []
    for j, (aval, b) in enumerate(zip(body.out_avals[:n_carry], outs[:n_carry])):
      results.append(self.add(Node('part', (node.node,), tuple(aval.shape), aval.dtype, 'scan', const=j))
                     if b else exact_outs[j])
    for j, (aval, b) in enumerate(zip(body.out_avals[n_carry:], outs[n_carry:]), start=n_carry):
      shape = (params['length'],) + tuple(aval.shape)
      results.append(self.add(Node('part', (node.node,), shape, aval.dtype, 'scan', const=j))
                     if b else exact_outs[j])
    return results

  def index(self, x, t):
    if not isinstance(x, Sym):
      return x[t]
    aval = jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return self.select('slice', lambda v: v[t], [x], aval)

  def cond(self, params, ins):
    """``lax.cond``/``switch`` with an exact index: the chosen branch, or all branches and a select."""
    index, ops = ins[0], ins[1:]
    if isinstance(index, Sym):
      raise _unsupported('cond', ' as its branch index')
    branches = params['branches']
    if not isinstance(index, jax.core.Tracer):
      return self.run_closed(branches[int(np.clip(int(index), 0, len(branches) - 1))], ops)
    outs = [self.run_closed(b, ops) for b in branches]
    result = []
    for k, aval in enumerate(branches[0].out_avals):
      parts = [o[k] for o in outs]
      if not any(isinstance(p, Sym) for p in parts):
        result.append(lax.select_n(index, *parts))
      else:
        result.append(self.select('select_n', lambda *p: lax.select_n(index, *p), parts, aval))
    return result


def _may_be_infinite(value) -> bool:
  """False only for values known to be finite (concrete, non-symbolic, all finite)."""
  if value is None or isinstance(value, Sym):
    return False
  if isinstance(value, jax.core.Tracer):
    return True
  return not bool(np.all(np.isfinite(np.asarray(value))))


def _with_exact(bind, ins, sym_pos, transform=None):
  """``bind`` as a function of the symbolic operands only; ``transform`` is applied to the exact ones."""
  fixed = [a if (isinstance(a, Sym) or transform is None) else transform(jnp.asarray(a)) for a in ins]

  def fn(*syms):
    full = list(fixed)
    for i, s in zip(sym_pos, syms):
      full[i] = s
    return bind(*full)

  return fn


def _window_max(x, params):
  """``reduce_window_max`` as a maximum over strided slices of the (-inf) padded input."""
  pad = [(lo, hi, 0) for lo, hi in params['padding']]
  xp = lax.pad(x, jnp.asarray(-jnp.inf, x.dtype), pad)
  dims, strides, wdil = params['window_dimensions'], params['window_strides'], params['window_dilation']
  out_shape = [(s - (d - 1) * w - 1) // st + 1 for s, d, w, st in zip(xp.shape, dims, wdil, strides)]
  out = None
  for offsets in np.ndindex(*dims):
    start = [o * w for o, w in zip(offsets, wdil)]
    limit = [s + (n - 1) * st + 1 for s, n, st in zip(start, out_shape, strides)]
    window = lax.slice(xp, start, limit, strides)
    out = window if out is None else jnp.maximum(out, window)
  return out


def _size(jaxpr) -> int:
  """Equations of a jaxpr, counting scan bodies once per iteration, a conditional as its largest branch and
  inlining calls."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in _CALLS:
      sub = eqn.params[_CALLS[name]]
      total += _size(getattr(sub, 'jaxpr', sub))
    elif name == 'scan':
      total += eqn.params['length'] * _size(eqn.params['jaxpr'].jaxpr)
    elif name == 'cond':
      total += max(_size(branch.jaxpr) for branch in eqn.params['branches'])
    else:
      total += 1
  return total


def dependence(jaxpr, bounded_in) -> list[bool]:
  """Which outputs of ``jaxpr`` depend on the inputs flagged in ``bounded_in`` (recursing into scans and calls,
  conservative for other higher-order primitives)."""
  dep = {v for v, b in zip(jaxpr.invars, bounded_in) if b}
  touched = lambda v: not isinstance(v, jcore.Literal) and v in dep
  for eqn in jaxpr.eqns:
    flags = [touched(v) for v in eqn.invars]
    if not any(flags):
      continue
    name = eqn.primitive.name
    if name in _CALLS:
      sub = eqn.params[_CALLS[name]]
      outs = dependence(getattr(sub, 'jaxpr', sub), flags)
    elif name == 'scan':
      p = eqn.params
      n_consts, n_carry = p['num_consts'], p['num_carry']
      carry = flags[n_consts:n_consts + n_carry]
      while True:
        outs = dependence(p['jaxpr'].jaxpr, flags[:n_consts] + carry + flags[n_consts + n_carry:])
        updated = [c or o for c, o in zip(carry, outs[:n_carry])]
        if updated == carry:
          break
        carry = updated
    else:
      outs = [True] * len(eqn.outvars)
    dep.update(v for v, o in zip(eqn.outvars, outs) if o)
  return [touched(v) for v in jaxpr.outvars]


def body_graph(info: ScanInfo, exact_inputs) -> Graph:
  """The graph of one iteration of a scan node's body; ``exact_inputs[k]`` is the value of body input ``k``
  when it is exact (None otherwise). The symbolic body inputs become ``input`` nodes with ``const=k``."""
  builder = _Builder(unroll=False)
  args = []
  for k, (aval, b) in enumerate(zip(info.body.in_avals, info.bounded)):
    args.append(builder.add(Node('input', (), tuple(aval.shape), aval.dtype, 'input', const=k)) if b
                else exact_inputs[k])
  outs = builder.run_closed(info.body, args)
  return Graph(tuple(builder.nodes), tuple(outs))


def build(fn: Callable, args: tuple, bounded: int, unroll: bool = False) -> Graph:
  """The graph of ``fn(*args)`` with ``args[bounded]`` perturbed (node 0); the other args are exact."""
  x = args[bounded]
  avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) if i == bounded else a for i, a in enumerate(args)]
  flat_args, in_tree = jax.tree.flatten(tuple(avals))
  closed, out_shape = jax.make_jaxpr(lambda *flat: fn(*jax.tree.unflatten(in_tree, flat)),
                                     return_shape=True)(*flat_args)
  if not isinstance(out_shape, jax.ShapeDtypeStruct):
    raise ValueError(f'certify: the function must return one array of logits, got {out_shape}')
  builder = _Builder(unroll)
  leaves_before = len(jax.tree.leaves(tuple(args[:bounded])))
  sym = builder.add(Node('input', (), tuple(x.shape), x.dtype, 'input'))
  flat_vals = jax.tree.leaves(tuple(args))
  flat_vals[leaves_before] = sym
  (out,) = builder.run(closed.jaxpr, closed.consts, flat_vals)
  return Graph(tuple(builder.nodes), out)


def num_elements(shape) -> int:
  return int(math.prod(shape))
