"""Counting: parameters (excluding the auxiliary head, as the papers do) and MACs of conv + linear layers."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


def _is_network(obj) -> bool:
  return hasattr(obj, 'init') and hasattr(obj, 'apply')


def count_params(net_or_params, input_shape=(1, 32, 32, 3), include_aux: bool = False) -> int:
  """Number of learned parameters (BN affine included, running statistics not), like PyTorch's
  ``sum(p.numel() for p in model.parameters())``; the auxiliary head is excluded unless ``include_aux``.

  Accepts a network (``EvalNetwork``/``Supernet``, initialised for ``input_shape``), its variables, or a
  params pytree.
  """
  params = net_or_params
  if _is_network(net_or_params):
    params = net_or_params.init(jax.random.PRNGKey(0), np.zeros(input_shape, np.float32))
  params = params.get('params', params) if isinstance(params, dict) else params
  if not include_aux and isinstance(params, dict):
    params = {k: v for k, v in params.items() if k != 'aux_head'}
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def _sub_jaxprs(value):
  if isinstance(value, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


_FOLD_SIZE = 4096  # elements: small constants (edge flags, indices) are evaluated, nothing large
_UNROLL_LENGTH = 64  # a longer scan counts its body once, per-iteration inputs unknown (CROWN's chunk loops)


def _open(sub, args):
  """A sub-jaxpr and what is known of its inputs: its own constants, and the caller's ``args`` (None:
  unknown) when they map one to one onto its inputs."""
  jaxpr, consts = (sub.jaxpr, sub.consts) if isinstance(sub, jex_core.ClosedJaxpr) else (sub, [])
  known = {v: np.asarray(c) for v, c in zip(jaxpr.constvars, consts) if np.size(c) <= _FOLD_SIZE}
  if len(args) == len(jaxpr.invars):
    known.update({v: a for v, a in zip(jaxpr.invars, args) if a is not None})
  return jaxpr, known


def jaxpr_macs(jaxpr, known=None) -> int:
  """Multiply-accumulates of every ``conv_general_dilated`` and ``dot_general`` in a jaxpr (a
  ``ClosedJaxpr`` or a ``Jaxpr``; scans count ``length`` times).

  Small constants are folded through the program (``known``: values of some input variables), so a
  conditional whose index they decide counts its branch taken, also per iteration of a scan over constant
  flags (the supernet's inactive edges); any other conditional counts its largest branch.
  """
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    jaxpr, known = _open(jaxpr, [])
  env = dict(known or {})
  read = lambda v: np.asarray(v.val) if isinstance(v, jex_core.Literal) else env.get(v)
  total = 0
  for eqn in jaxpr.eqns:
    name, ins = eqn.primitive.name, [read(v) for v in eqn.invars]
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_feature_dim]
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    elif name == 'cond':
      branches = eqn.params['branches']
      if ins[0] is not None:
        total += jaxpr_macs(*_open(branches[int(np.clip(ins[0], 0, len(branches) - 1))], ins[1:]))
      else:
        total += max(jaxpr_macs(*_open(b, ins[1:])) for b in branches)
    elif name == 'scan':
      total += _scan_macs(eqn.params, ins)
    elif not any(_sub_jaxprs(list(eqn.params.values()))):
      if all(a is not None for a in ins) and all(math.prod(v.aval.shape) <= _FOLD_SIZE for v in eqn.outvars):
        with jax.ensure_compile_time_eval():
          outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results else [outs]
        env.update({v: np.asarray(o) for v, o in zip(eqn.outvars, outs)})
    else:
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += jaxpr_macs(*_open(sub, ins))
  return total


def _scan_macs(params, ins) -> int:
  """A scan's MACs: ``length`` times its body's, or the sum over iterations when constant per-iteration
  inputs are known (each distinct iteration counted once) and there are at most ``_UNROLL_LENGTH`` of them.
  Where a jax version's scan does not name how its operands split (no ``num_consts``), its body with unknown
  inputs, ``length`` times."""
  length = params['length']
  if 'num_consts' not in params or 'num_carry' not in params:
    return length * jaxpr_macs(*_open(params['jaxpr'], [None] * len(ins)))
  n_consts, n_carry = params['num_consts'], params['num_carry']
  consts, xs = ins[:n_consts], ins[n_consts + n_carry:]
  if all(x is None for x in xs) or length > _UNROLL_LENGTH:
    return length * jaxpr_macs(*_open(params['jaxpr'], consts + [None] * (len(ins) - n_consts)))
  counts, total = {}, 0
  for t in range(length):
    x_t = [None if x is None else x[t] for x in xs]
    key = tuple(None if x is None else x.tobytes() for x in x_t)
    if key not in counts:
      counts[key] = jaxpr_macs(*_open(params['jaxpr'], consts + [None] * n_carry + x_t))
    total += counts[key]
  return total


def count_macs(net, input_shape=(1, 32, 32, 3), alphas=None) -> int:
  """MACs of conv + linear layers for one forward pass in inference mode (no auxiliary head).

  Depthwise convolutions are counted as grouped convolutions (k*k MACs per output element), whatever
  formulation runs on the backend. A ``Supernet`` counts every op of every mixed edge.
  """
  net = dataclasses.replace(net, depthwise='grouped')
  x = jnp.zeros(input_shape, jnp.float32)
  variables = net.init(jax.random.PRNGKey(0), x)
  if alphas is None and hasattr(net, 'init_alphas'):
    alphas = net.init_alphas(jax.random.PRNGKey(0))
  fn = (lambda v, x: net.apply(v, alphas, x)) if alphas is not None else (lambda v, x: net.apply(v, x))
  return jaxpr_macs(jax.make_jaxpr(fn)(variables, x))
