"""Combiners of several upper-level objectives and the constraint projection, as pure functions.

* ``weighted_sum``: ``sum_i w_i x_i`` over losses or gradient pytrees (DARTS, AdvRush, DSRNA, RNAS).
* ``mgda_two``: closed-form MGDA for two objectives (DSARA Eq. 7-8).
* ``min_norm`` / ``min_norm_gram``: the min-norm point of the convex hull of n gradients (MGDA, E2RNAS Eq. 1;
  Sener & Koltun 2018), solved by Frank-Wolfe with away steps on the Gram matrix.
* ``project_constraint``: the nearest point of ``{a : F(a) <= H}`` (RNAS Eq. 9) by a Lagrangian method.

Gradients are arbitrary pytrees (e.g. the dict of alpha arrays); all functions are jittable.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree


def weighted_sum(grads_or_losses: Sequence, weights) -> object:
  """``sum_i weights[i] * x_i`` for scalars or pytrees of identical structure (E2RNAS Eq. 10, DSARA Eq. 9)."""
  if len(grads_or_losses) != len(weights):
    raise ValueError(f'got {len(grads_or_losses)} terms and {len(weights)} weights: pass one weight per term')
  weights = jnp.asarray(weights)
  return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *grads_or_losses)


def _tree_vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _pair_gamma(m11, m12, m22):
  """argmin over gamma in [0, 1] of ||gamma v1 + (1 - gamma) v2||^2 from the Gram entries; 0.5 if v1 == v2."""
  denom = m11 - 2.0 * m12 + m22  # ||v1 - v2||^2
  safe = jnp.where(denom > 0, denom, 1.0)
  return jnp.where(denom > 0, jnp.clip((m22 - m12) / safe, 0.0, 1.0), 0.5)


def mgda_two(g1, g2):
  """Closed-form two-task MGDA (DSARA Eq. 8): returns ``(gamma * g1 + (1 - gamma) * g2, gamma)``.

  ``gamma* = clip(<g2 - g1, g2> / ||g1 - g2||^2, 0, 1)`` minimises ``||gamma g1 + (1 - gamma) g2||^2`` over
  ``[0, 1]`` (Eq. 7). DSARA's convention: ``g1 = theta`` is the natural-loss gradient and receives weight
  ``gamma*``; ``g2 = theta_bar`` is the adversarial-loss gradient and receives ``1 - gamma*`` (Eq. 9). When
  ``g1 == g2`` every gamma gives the same direction and ``gamma = 0.5`` is returned.
  """
  m11, m12, m22 = _tree_vdot(g1, g1), _tree_vdot(g1, g2), _tree_vdot(g2, g2)
  gamma = _pair_gamma(m11, m12, m22)
  return jax.tree.map(lambda a, b: gamma * a + (1.0 - gamma) * b, g1, g2), gamma


def _best_pair_start(gram):
  """Sener & Koltun's initialisation: the best closed-form two-point solution over all pairs (exact for n=2)."""
  n = gram.shape[0]
  i, j = jnp.triu_indices(n, k=1)
  gam = _pair_gamma(gram[i, i], gram[i, j], gram[j, j])
  value = gam**2 * gram[i, i] + 2 * gam * (1 - gam) * gram[i, j] + (1 - gam)**2 * gram[j, j]
  best = jnp.argmin(value)
  eye = jnp.eye(n, dtype=gram.dtype)
  return gam[best] * eye[i[best]] + (1 - gam[best]) * eye[j[best]]


def min_norm_gram(gram, tol: float = 1e-6, max_iters: int = 250):
  """Weights on the simplex minimising ``gamma^T G gamma`` for a Gram matrix G (E2RNAS Eq. 1).

  Frank-Wolfe with away steps (Guelat & Marcotte 1986; linear convergence: Lacoste-Julien & Jaggi 2015)
  and exact line search, started from the best closed-form pair. Stops when the Frank-Wolfe duality gap
  ``(G gamma) . gamma - min_t (G gamma)_t`` (half the certified bound on the suboptimality) falls below
  ``tol * max_i G_ii`` or after ``max_iters`` iterations (a real counter: the copied solver never increments
  its own). For n = 2 the start is already optimal, so the result is ``mgda_two``'s closed form.
  """
  gram = jnp.asarray(gram)
  n = gram.shape[0]
  if gram.ndim != 2 or gram.shape[1] != n or n < 1:
    raise ValueError(f'Gram matrix must be square and non-empty, got shape {gram.shape}')
  if n == 1:
    return jnp.ones((1,), gram.dtype)
  threshold = tol * jnp.max(jnp.diag(gram))

  def gaps(gamma):
    grad = gram @ gamma  # half the gradient of gamma^T G gamma
    value = grad @ gamma
    t = jnp.argmin(grad)
    a = jnp.argmax(jnp.where(gamma > 0, grad, -jnp.inf))
    return grad, value, t, a, value - grad[t], grad[a] - value

  def cond(carry):
    gamma, it = carry
    return (it < max_iters) & (gaps(gamma)[4] > threshold)

  def body(carry):
    gamma, it = carry
    grad, _, t, a, fw_gap, away_gap = gaps(gamma)
    eye = jnp.eye(n, dtype=gram.dtype)
    use_fw = fw_gap >= away_gap
    d = jnp.where(use_fw, eye[t] - gamma, gamma - eye[a])
    lim = jnp.where(use_fw, 1.0, gamma[a] / jnp.maximum(1.0 - gamma[a], jnp.finfo(gram.dtype).tiny))
    slope = d @ grad  # < 0 along a descent direction
    curv = d @ gram @ d
    step = jnp.where(curv > 0, -slope / jnp.where(curv > 0, curv, 1.0), lim)
    step = jnp.clip(step, 0.0, lim)
    gamma = jnp.clip(gamma + step * d, 0.0, None)
    return gamma / jnp.sum(gamma), it + 1

  gamma, _ = lax.while_loop(cond, body, (_best_pair_start(gram), 0))
  return gamma


def gram_matrix(grads: Sequence, normalize: bool = False):
  """Gram matrix ``G_ij = <g_i, g_j>`` of gradient pytrees; ``normalize`` divides each by its l2 norm first."""
  flat = jnp.stack([ravel_pytree(g)[0] for g in grads])
  if normalize:
    norms = jnp.linalg.norm(flat, axis=1, keepdims=True)
    flat = flat / jnp.where(norms > 0, norms, 1.0)
  return flat @ flat.T


def min_norm(grads: Sequence, normalize: bool = False, tol: float = 1e-6, max_iters: int = 250):
  """Simplex weights of the min-norm point of the convex hull of gradient pytrees (E2RNAS Eq. 1, MGDA).

  ``normalize=True`` l2-normalises each gradient before the solve (E2RNAS); the weights then apply to the
  unnormalised losses (Eq. 10) via ``weighted_sum``. See ``min_norm_gram`` for the solver.
  """
  if len(grads) < 1:
    raise ValueError('min_norm needs at least one gradient')
  return min_norm_gram(gram_matrix(grads, normalize), tol=tol, max_iters=max_iters)


class Projection(NamedTuple):
  """Result of ``project_constraint``: the projected pytree, the Lagrange multiplier (0 when ``alphas`` was
  already feasible) and F at the projected point."""
  alphas: object
  mu: jax.Array
  value: jax.Array


def project_constraint(alphas, constraint_fn: Callable, H, bisection_steps: int = 40,
                       inner_steps: int = 20, max_doublings: int = 30, rtol: float = 1e-6) -> Projection:
  """Nearest point (l2) of ``{a : F(a) <= H}`` to ``alphas`` (RNAS Eq. 9), by a Lagrangian method.

  If ``F(alphas) <= H`` it returns ``alphas``. Otherwise, for a multiplier ``mu >= 0`` let
  ``a(mu) = argmin_a 1/2 ||a - alphas||^2 + mu (F(a) - H)`` (the Lagrangian; inner solver: ``inner_steps``
  gradient steps warm-started at the previous ``a``, each with the Newton step length along the gradient
  (one Hessian-vector product) and Armijo backtracking). The constraint is active at the
  solution, so ``mu*`` solves ``F(a(mu)) = H``: start from the linearised value
  ``(F(alphas) - H) / ||grad F(alphas)||^2``, double until feasible, then bisect for ``bisection_steps`` or until
  the bracket is within ``rtol``. The feasible end of the bracket is returned, so ``F <= H`` holds whenever a
  feasible multiplier was found. ``constraint_fn`` maps a pytree like ``alphas`` to a scalar.

  Exactness: for linear F each inner solve is exact in one step and the result is the closed-form projection
  onto the half-space (up to the bisection tolerance). For convex smooth F the inner problem is strongly
  convex, ``F(a(mu))`` is non-increasing in ``mu`` and, given enough inner steps, the KKT point found is the
  unique projection. For non-convex F (the RNAS vulnerability) it is a KKT point of Eq. 9, i.e. a local
  projection. Cost: (1 + doublings + bisections) x ``inner_steps`` x (one gradient, one Hessian-vector
  product and at least one evaluation of F); lower the step counts when F is a network forward pass.
  """
  x0, unravel = ravel_pytree(alphas)
  f = lambda v: constraint_fn(unravel(v))
  H = jnp.asarray(H, x0.dtype)

  def solve(mu, start, f_start):
    """``inner_steps`` steps from ``start`` (where F is ``f_start``): the new point and F there."""
    phi = lambda v, fv: 0.5 * jnp.sum((v - x0)**2) + mu * fv

    def step(_, c):
      v, _ = c
      # F, its gradient and the Hessian-vector product along the Lagrangian's gradient from one linearisation.
      (fv, gv), jvp = jax.linearize(jax.value_and_grad(f), v)
      d = v - x0 + mu * gv  # gradient of the Lagrangian
      dd = jnp.sum(d * d)
      # Newton step length along d (exact for F with Hessian proportional to I), then Armijo backtracking.
      curv = dd + mu * jnp.sum(d * jvp(d)[1])
      s0 = jnp.where((curv > 0) & (dd > 0), dd / jnp.where(curv > 0, curv, 1.0), 1.0)
      phi_v = phi(v, fv)

      def halve(b):  # the next trial step length, F there, and whether it lacks sufficient decrease
        s = 0.5 * b[0]
        f_s = f(v - s * d)
        return s, f_s, phi(v - s * d, f_s) > phi_v - 1e-4 * s * dd

      s, f_s, rejected = lax.while_loop(lambda b: b[2] & (b[0] > 1e-10 * s0), halve,
                                        (2.0 * s0, fv, jnp.asarray(True)))
      return jnp.where(rejected, v, v - s * d), jnp.where(rejected, fv, f_s)

    return lax.fori_loop(0, inner_steps, step, (start, f_start))

  def project(f_start):
    f0, g0 = jax.value_and_grad(f)(x0)
    gg = jnp.sum(g0 * g0)
    mu0 = jnp.where(gg > 0, (f0 - H) / jnp.where(gg > 0, gg, 1.0), 1.0)  # exact for linear F

    # One loop, so the program holds one inner solver: first grow mu (from mu0, doubling) until a(mu) is
    # feasible, then bisect [lo, hi], warm-starting each solve at the last (growing) or feasible (bisecting) a.
    def searching(c):
      growing, lo, hi, _, _, k = c
      return growing | ((k < bisection_steps) & (hi - lo > rtol * hi))

    def next_solve(c):
      growing, lo, hi, v, fv, k = c
      mu = jnp.where(growing, hi, 0.5 * (lo + hi))
      v_mu, f_mu = solve(mu, v, fv)
      ok = f_mu <= H
      done_growing = ok | (k >= max_doublings)
      grown = (~done_growing, jnp.where(done_growing, jnp.where(mu > mu0, 0.5 * mu, 0.0), lo),
               jnp.where(done_growing, mu, 2.0 * mu), v_mu, f_mu, jnp.where(done_growing, 0, k + 1))
      bisected = (growing, jnp.where(ok, lo, mu), jnp.where(ok, mu, hi), jnp.where(ok, v_mu, v),
                  jnp.where(ok, f_mu, fv), k + 1)
      return jax.tree.map(lambda a, b: jnp.where(growing, a, b), grown, bisected)

    zero = jnp.zeros_like(mu0)
    _, _, mu_hi, v_hi, f_hi, _ = lax.while_loop(searching, next_solve,
                                                (jnp.asarray(True), zero, mu0, x0, f_start, jnp.asarray(0)))
    return v_hi, mu_hi, f_hi

  f_start = f(x0)
  v, mu, value = lax.cond(f_start <= H, lambda f0: (x0, jnp.zeros_like(f0), f0), project, f_start)
  return Projection(unravel(v), mu, value)
