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
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_macs(jaxpr) -> int:
  """Multiply-accumulates of every ``conv_general_dilated`` and ``dot_general`` in a jaxpr (scans count
  ``length`` times)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_feature_dim]
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    else:
      repeat = eqn.params.get('length', 1) if name == 'scan' else 1
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += repeat * jaxpr_macs(sub)
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
  return jaxpr_macs(jax.make_jaxpr(fn)(variables, x).jaxpr)
