"""Differentiable resource objectives of E2RNAS (Sec. III-C, Eqs. 5-6).

``alphas`` is a pytree of ``[..., E, O]`` logit arrays (one per cell type); ``costs`` has the same structure
with the cost of every operation on every edge, summed over the cells that share those alphas (per-op cost
tables broadcast, e.g. ``[O]``). Units are the caller's (E2RNAS: millions of parameters / FLOPs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def expected_cost(alphas, costs):
  """``N_hat(alpha) = sum_edges sum_o softmax(alpha)_o n_o`` (E2RNAS Sec. III-C; likewise ``F_hat``).

  Equals the cost of the derived architecture when every softmax is one-hot.
  """
  if jax.tree.structure(alphas) != jax.tree.structure(costs):
    raise ValueError('costs must have the same pytree structure as alphas (one cost table per alpha array)')
  terms = jax.tree.map(lambda a, c: jnp.sum(jax.nn.softmax(a, axis=-1) * c), alphas, costs)
  return sum(jax.tree.leaves(terms))


def resource_objective(alphas, costs, lower_bound):
  """``|N_hat(alpha) - L|`` (E2RNAS Eq. 5 for parameters, Eq. 6 with F for FLOPs)."""
  return jnp.abs(expected_cost(alphas, costs) - lower_bound)
