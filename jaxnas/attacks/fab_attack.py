"""Fast Adaptive Boundary attack (FAB), Croce & Hein, ICML 2020 ("Minimally distorted adversarial examples
with a fast adaptive boundary attack"), l_inf and l_2, untargeted and targeted (FAB-T), with the reference
implementation's defaults (100 iterations, alpha_max 0.1, eta 1.05, beta 0.9).

Each iteration linearises the decision boundary at the current iterate, projects both the iterate and the
original point onto that hyperplane within the [0, 1] box (eq. (6), the minimal-norm projection), and moves
to a convex combination of the two projections extrapolated by ``eta`` (eq. (8)); once adversarial, it steps
back towards the original point by ``beta``. The attack minimises the perturbation norm; a point counts as
broken when the smallest adversarial perturbation found is within ``eps``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxnas.attacks import ball


def project_hyperplane_box(t, w, b, norm: str, max_iter: int = 100):
  """Minimal-norm ``d`` with ``w . (t + d) = b`` and ``t + d`` in ``[0, 1]^n``, rows of ``t, w`` ``[N, n]``.

  The optimum moves every coordinate towards the plane until it hits the box: ``d_i = -sign(w_i) min(lam,
  p_i)`` for l_inf and ``d_i = -w_i min(lam, p_i / |w_i|)`` for l_2, ``p_i`` the room to the box face, where
  the scalar ``lam`` solves ``h(lam) = sum_i omega_i min(lam, beta_i) = |w . t - b|`` (``omega = |w|`` or
  ``w^2``). ``h`` is increasing, concave and piecewise linear, so Newton's method from ``lam = 0`` climbs
  monotonically and stops exactly once a step crosses no breakpoint (no sort, which is slow on CPU). When the
  plane cannot be reached inside the box, the box corner closest to it is returned.
  """
  c = jnp.sum(w * t, axis=1) - b
  w = jnp.where((c < 0)[:, None], -w, w)   # now the plane lies on the side of decreasing w . z
  c = jnp.abs(c)
  room = jnp.where(w < 0, 1.0 - t, t)      # distance to the face each coordinate moves towards
  if norm == 'linf':
    active = w != 0
    weight, brk = jnp.abs(w), room
  else:
    active = jnp.abs(w) > 1e-8
    weight = w * w
    brk = room / jnp.where(active, jnp.abs(w), 1.0)
  weight = jnp.where(active, weight, 0.0)
  reachable = c < jnp.sum(weight * brk, axis=1)

  def h_and_slope(lam):
    return (jnp.sum(weight * jnp.minimum(lam[:, None], brk), axis=1),
            jnp.sum(jnp.where(brk > lam[:, None], weight, 0.0), axis=1))

  def cond(carry):
    k, _, _, _, moving = carry
    return (k < max_iter) & jnp.any(moving)

  def body(carry):
    k, lam, h, slope, moving = carry
    lam = jnp.where(moving, lam + (c - h) / jnp.where(slope > 0, slope, 1.0), lam)
    h_new, slope_new = h_and_slope(lam)
    return k + 1, lam, h_new, slope_new, moving & (slope_new != slope)

  lam0 = jnp.zeros_like(c)
  h0, slope0 = h_and_slope(lam0)
  _, lam, _, _, _ = lax.while_loop(cond, body, (0, lam0, h0, slope0, reachable))
  move = jnp.minimum(jnp.where(reachable, lam, jnp.inf)[:, None], brk)
  d = -jnp.sign(w) * move if norm == 'linf' else -w * move
  return jnp.where(active, d, 0.0)


def _diff_logits_grads(logits_fn, x1, y, y_target):
  """Linearised decision functions ``f_k = z_k - z_y`` at ``x1`` and their input gradients.

  Targeted: the single function ``z_t - z_y`` (``[B, 1]``, ``[B, 1, ...]``). Untargeted: all classes, the true
  class masked with a huge value.
  """
  if y_target is not None:
    def f(z):
      logits = logits_fn(z)
      diff = (jnp.take_along_axis(logits, y_target[:, None], 1) - jnp.take_along_axis(logits, y[:, None], 1))
      return diff[:, 0].sum(), diff
    g, df = jax.grad(f, has_aux=True)(x1)
    return df, g[:, None]
  logits, vjp = jax.vjp(logits_fn, x1)
  n_classes = logits.shape[1]
  eye = jnp.eye(n_classes, dtype=logits.dtype)
  jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, logits.shape))[0])(eye)   # [K, B, ...]
  jac = jnp.moveaxis(jac, 0, 1)
  one_hot = jax.nn.one_hot(y, n_classes, dtype=bool)
  df = logits - jnp.take_along_axis(logits, y[:, None], 1)
  dg = jac - jnp.take_along_axis(jac, y.reshape((-1, 1) + (1,) * (jac.ndim - 2)), 1)
  return jnp.where(one_hot, 1e10, df), dg


def single_run(logits_fn, x, y, keys, *, eps, norm: str, n_iter: int, y_target=None, start_radius=0.0,
               alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9):
  """One FAB run from a random point at ``start_radius`` around ``x`` (0: from ``x`` itself).

  Returns ``(x_adv, dist)``: the smallest adversarial found and its norm (inf if none).
  """
  batch = x.shape[0]
  flat = lambda a: a.reshape(a.shape[0], -1)
  expand = lambda v: jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))
  shape = x.shape[1:]
  if norm == 'linf':
    t = jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0))(keys)
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, shape, x.dtype))(keys)
  x1 = jnp.clip(x + start_radius * ball.normalize(t, norm), 0.0, 1.0)
  dual = 'l1' if norm == 'linf' else 'l2'

  def body(_, carry):
    x1, adv, dist = carry
    df, dg = _diff_logits_grads(logits_fn, x1, y, y_target)
    dg_flat = dg.reshape(dg.shape[0], dg.shape[1], -1)
    dual_norm = jnp.abs(dg_flat).sum(-1) if dual == 'l1' else jnp.sqrt(jnp.sum(dg_flat ** 2, -1))
    closest = jnp.argmin(jnp.abs(df) / (1e-12 + dual_norm), axis=1)
    w = jnp.take_along_axis(dg_flat, closest[:, None, None], 1)[:, 0]
    f = jnp.take_along_axis(df, closest[:, None], 1)[:, 0]
    b = -f + jnp.sum(w * flat(x1), axis=1)
    d = project_hyperplane_box(jnp.concatenate([flat(x1), flat(x)]), jnp.concatenate([w, w]),
                               jnp.concatenate([b, b]), norm)
    a = jnp.maximum(ball.lp_norm(d, norm), 1e-8)
    a1, a2 = a[:batch], a[batch:]
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)
    d1, d2 = d[:batch].reshape(x.shape), d[batch:].reshape(x.shape)
    x1 = jnp.clip((x1 + eta * d1) * (1 - expand(alpha)) + (x + eta * d2) * expand(alpha), 0.0, 1.0)
    is_adv = jnp.argmax(logits_fn(x1), axis=1) != y
    norm_now = ball.lp_norm(x1 - x, norm)
    better = is_adv & (norm_now < dist)
    adv = jnp.where(expand(better), x1, adv)
    dist = jnp.where(better, norm_now, dist)
    x1 = jnp.where(expand(is_adv), x + (x1 - x) * beta, x1)
    return x1, adv, dist

  _, adv, dist = lax.fori_loop(0, n_iter, body, (x1, x, jnp.full((batch,), jnp.inf, x.dtype)))
  return adv, dist


def fab(logits_fn, x, y, key, *, eps: float, norm: str = 'linf', n_iter: int = 100, targeted: bool = True,
        n_target_classes: int = 9, n_restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
        beta: float = 0.9, idx=None):
  """FAB (``targeted=False``) or FAB-T against the 2nd..(n+1)-th most likely classes of the clean input
  (``n = n_target_classes``, at most ``K - 1``).

  Runs restart ``r`` (random start at radius ``eps / 2`` for ``r > 0``, as the reference) for each target on
  the examples still robust; returns the adversarial found within ``eps`` where one is, else the clean image.
  """
  norm = ball.check_norm(norm)
  logits = logits_fn(x)
  order = jnp.argsort(logits, axis=1)
  n_classes = order.shape[1]
  n_targets = min(n_target_classes, n_classes - 1) if targeted else 1
  keys = ball.example_keys(key, ball.default_idx(x, idx))
  expand = lambda v: jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))

  def cond(c):
    j, _, robust = c
    return (j < n_targets * n_restarts) & jnp.any(robust)

  def body(c):
    j, out, robust = c
    restart = j % n_restarts
    y_target = order[:, n_classes - 2 - j // n_restarts] if targeted else None
    adv, dist = single_run(logits_fn, x, y, ball.fold_keys(keys, j), eps=eps, norm=norm, n_iter=n_iter,
                           y_target=y_target, start_radius=jnp.where(restart > 0, 0.5 * eps, 0.0),
                           alpha_max=alpha_max, eta=eta, beta=beta)
    take = robust & (dist <= eps)
    return j + 1, jnp.where(expand(take), adv, out), robust & ~take

  robust0 = jnp.argmax(logits, axis=1) == y
  _, out, _ = lax.while_loop(cond, body, (0, x, robust0))
  return lax.stop_gradient(out)
