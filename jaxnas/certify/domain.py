"""Input sets: an l_inf or l_2 ball around ``x``, optionally intersected with a box (e.g. the [0, 1] pixel range).

``concretize(A)`` is the exact minimum of the linear forms ``A x'`` over the set (the dual-norm step of CROWN,
Zhang et al. 2018, Eq. 3 / Weng et al. 2018):

* l_inf ball ∩ box = a box: ``A c - |A| r`` with the box's centre ``c`` and radius ``r``;
* l_2 ball: ``A x - eps ||A||_2``;
* l_2 ball ∩ box: the Lagrangian dual ``max_{lam >= 0} min_{d in box} A d + lam/2 (||d||^2 - eps^2)``, whose inner
  minimiser is ``clip(-A / lam, box)``. Every ``lam`` gives a valid lower bound (weak duality), so the bisection
  for the optimal ``lam`` only affects tightness; the result is also never below the l_2 bound without box.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

NORMS = ('linf', 'l2')
_DUAL_STEPS = 40


def safe_sqrt(t):
  """``sqrt`` with a finite gradient at 0 (zero rows of coefficient matrices are common)."""
  return jnp.sqrt(jnp.maximum(t, jnp.finfo(t.dtype).tiny))


def check_norm(norm: str) -> str:
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
  return norm


@functools.partial(jax.tree_util.register_dataclass, data_fields=['x', 'eps', 'box'], meta_fields=['norm'])
@dataclasses.dataclass(frozen=True)
class Domain:
  """``{x' : ||x' - x||_norm <= eps} ∩ box`` for one example; ``box`` is ``(lo, hi)`` shaped like ``x``, or
  None. A pytree (``norm`` static), so a batch of domains can be ``jax.vmap``-ped."""
  x: Any
  eps: Any
  norm: str
  box: Any = None

  def interval(self):
    """Elementwise bounds of the set (the ball's bounding box, intersected with the box)."""
    lo, hi = self.x - self.eps, self.x + self.eps
    if self.box is not None:
      lo, hi = jnp.maximum(lo, self.box[0]), jnp.minimum(hi, self.box[1])
    return lo, hi

  def concretize(self, A):
    """Lower bounds of the rows of ``A`` (shape ``[S, *x.shape]``) dotted with any point of the set."""
    flat = A.reshape(A.shape[0], -1)
    x = self.x.reshape(-1)
    if self.norm == 'linf':
      lo, hi = self.interval()
      centre, radius = (hi + lo).reshape(-1) / 2, (hi - lo).reshape(-1) / 2
      return flat @ centre - jnp.abs(flat) @ radius
    ball = flat @ x - self.eps * safe_sqrt(jnp.sum(flat * flat, axis=1))
    if self.box is None:
      return ball
    lo = jnp.minimum(self.box[0] - self.x, 0).reshape(-1)
    hi = jnp.maximum(self.box[1] - self.x, 0).reshape(-1)
    return flat @ x + jnp.maximum(_l2_box_dual(flat, lo, hi, self.eps), ball - flat @ x)


def _l2_box_dual(a, lo, hi, eps):
  """``max_lam g(lam)`` for ``g(lam) = min_{lo <= d <= hi} a.d + lam/2 (||d||^2 - eps^2)``, rows of ``a``."""
  tiny = jnp.finfo(a.dtype).tiny
  if_point = eps <= 0  # the set is one point: the dual's value is 0
  eps = jnp.where(if_point, 1, eps)

  def minimiser(lam):
    return jnp.clip(-a / jnp.maximum(lam, tiny)[:, None], lo, hi)

  def g(lam):
    d = minimiser(lam)
    return jnp.sum(a * d, axis=1) + lam / 2 * (jnp.sum(d * d, axis=1) - eps * eps)

  # ||d(lam)|| decreases in lam and is <= eps at lam = ||a|| / eps: bisect log(lam) for ||d(lam)|| = eps.
  log_hi = jnp.log(safe_sqrt(jnp.sum(a * a, axis=1)) / eps + tiny)
  log_lo = log_hi - 30.0
  for _ in range(_DUAL_STEPS):
    mid = (log_lo + log_hi) / 2
    inside = jnp.sum(minimiser(jnp.exp(mid)) ** 2, axis=1) <= eps * eps
    log_lo, log_hi = jnp.where(inside, log_lo, mid), jnp.where(inside, mid, log_hi)
  corner = jnp.sum(jnp.minimum(a * lo, a * hi), axis=1)  # g(0): the box alone
  return jnp.where(if_point, 0, jnp.maximum(jnp.maximum(g(jnp.exp(log_hi)), g(jnp.exp(log_lo))), corner))
