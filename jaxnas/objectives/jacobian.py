"""Jacobian norm of the logits w.r.t. the input (DSRNA Sec. 3.1.2, Eqs. 12-15; Hoffman et al. 2019).

``logits_fn(x) -> [B, K]`` is a model in inference mode, so examples do not interact and one VJP with a
cotangent ``V [B, K]`` returns every example's ``v_i^T J(x_i)`` at once. ``J(x_i)`` is ``K x D``, its k-th row
``J_k = d f_k / d x``. DSRNA's robustness metric is ``R = -delta * mean_i (1/K) sum_k ||J_k(x_i)||_q`` (Eq. 15)
with ``q`` the dual of the attack norm: ``q = 1`` for l_inf attacks (the entrywise l1 norm of J, "l1 norm of
the Jacobian"), ``q = 2`` for l_2 attacks (row l2 norms, which the paper calls the Frobenius norm and
estimates, after Hoffman et al., through ``||J||_F^2``). ``delta`` is a constant absorbed by the trade-off
``gamma`` of Eq. 16, so the functions return the norms without it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _pullback(logits_fn: Callable, x):
  logits, vjp = jax.vjp(logits_fn, x)
  if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
    raise ValueError(f'logits_fn must map [B, ...] inputs to [B, K] logits, got {logits.shape}')
  return logits, lambda v: vjp(v.astype(logits.dtype))[0]


def _flat(v):
  return jnp.reshape(v, (v.shape[0], -1))


def jacobian_frobenius_sq(logits_fn: Callable, x, rng, n_proj: int = 1):
  """Hoffman et al. (2019) random-projection estimate of ``mean_i ||J(x_i)||_F^2``, unbiased.

  ``||J||_F^2 = K E_v ||v^T J||_2^2`` with ``v`` uniform on the unit sphere of R^K (a normalised N(0, I)
  draw, independent per example); averages ``n_proj`` projections, one VJP each.
  """
  if n_proj < 1:
    raise ValueError(f'n_proj must be >= 1, got {n_proj}')
  logits, pullback = _pullback(logits_fn, x)
  k = logits.shape[1]

  def one(key):
    v = jax.random.normal(key, logits.shape, logits.dtype)
    v = v / jnp.linalg.norm(v, axis=1, keepdims=True)
    return k * jnp.sum(pullback(v)**2) / x.shape[0]

  return jnp.mean(jax.vmap(one)(jax.random.split(rng, n_proj)))


def jacobian_norm_bound(logits_fn: Callable, x, q: float = 1, rng=None, n_proj: int = 1):
  """DSRNA's Jacobian norm bound ``mean_i (1/K) sum_k ||J_k(x_i)||_q`` (Eq. 15 without ``delta``).

  ``q = 1`` is the l_inf-attack variant (entrywise l1 norm of J / K). With ``rng=None`` all K rows are
  computed (K VJPs, exact). With a key, each of ``n_proj`` projections picks one row ``k ~ U{1..K}`` per
  example (a projection on a random basis vector ``e_k``) and returns the mean of ``||e_k^T J||_q``: an
  unbiased estimate of the same quantity at one VJP per projection.
  """
  logits, pullback = _pullback(logits_fn, x)
  k = logits.shape[1]
  row_norm = lambda v: jnp.linalg.norm(_flat(pullback(v)), ord=q, axis=1)
  if rng is None:
    eye = jnp.eye(k, dtype=logits.dtype)
    rows = jax.vmap(lambda e: row_norm(jnp.broadcast_to(e, logits.shape)))(eye)  # [K, B]
    return jnp.mean(rows)
  if n_proj < 1:
    raise ValueError(f'n_proj must be >= 1, got {n_proj}')

  def one(key):
    picks = jax.random.randint(key, (x.shape[0],), 0, k)
    return jnp.mean(row_norm(jax.nn.one_hot(picks, k, dtype=logits.dtype)))

  return jnp.mean(jax.vmap(one)(jax.random.split(rng, n_proj)))
