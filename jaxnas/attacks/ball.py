"""Threat-model geometry shared by the attacks: l_inf / l_2 balls intersected with the [0, 1] image box,
and per-example PRNG keys.

Per-example randomness is derived from ``(key, global example index)`` with ``fold_in``, so an example's
random start, squares and restarts never depend on which batch it is in or on the batch size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NORMS = ('linf', 'l2')


def check_norm(norm: str) -> str:
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
  return norm


def _expand(v, x):
  """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against ``x``."""
  return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def lp_norm(d, norm: str):
  """Per-example norm of ``d`` ``[B, ...]`` -> ``[B]``."""
  flat = d.reshape(d.shape[0], -1)
  if norm == 'linf':
    return jnp.abs(flat).max(axis=1)
  return jnp.sqrt(jnp.sum(flat * flat, axis=1))


def normalize(d, norm: str):
  """``d / (||d|| + 1e-12)`` per example (the AutoAttack convention)."""
  return d / _expand(lp_norm(d, norm) + 1e-12, d)


def project(x_adv, x, eps, norm: str):
  """Projects ``x_adv`` onto ``{x + d : ||d|| <= eps} ∩ [0, 1]^n`` (l_2: radial shrink, then box clip)."""
  d = x_adv - x
  if norm == 'linf':
    d = jnp.clip(d, -eps, eps)
  else:
    n = _expand(lp_norm(d, 'l2'), d)
    d = d * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
  return jnp.clip(x + d, 0.0, 1.0)


def steepest_ascent(g, norm: str):
  """The unit-norm steepest-ascent direction for ``g``: ``sign(g)`` (l_inf) or ``g / ||g||_2`` (l_2)."""
  return jnp.sign(g) if norm == 'linf' else normalize(g, 'l2')


def example_keys(key, idx):
  """One PRNG key per example: ``fold_in(key, idx[i])``."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)


def fold_keys(keys, data):
  """``fold_in`` every per-example key with the same integer ``data`` (a restart, target or step)."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def uniform_ball(keys, shape, eps, norm: str, dtype):
  """A uniform sample from the l_p ball of radius ``eps`` per example (``shape`` excludes the batch axis)."""
  def one(k):
    if norm == 'linf':
      return jax.random.uniform(k, shape, dtype, -eps, eps)
    k_dir, k_rad = jax.random.split(k)
    d = jax.random.normal(k_dir, shape, dtype)
    n = jnp.sqrt(jnp.sum(d * d))
    r = eps * jax.random.uniform(k_rad, (), dtype) ** (1.0 / d.size)
    return d / n * r
  return jax.vmap(one)(keys)


def default_idx(x, idx):
  """The global example indices, ``arange(B)`` when none are given."""
  return jnp.arange(x.shape[0]) if idx is None else jnp.asarray(idx)
