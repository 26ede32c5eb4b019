"""Carlini & Wagner attacks (IEEE S&P 2017).

``cw_linf`` is the "CW_inf" row of the robust-NAS tables: PGD on the C&W margin loss with confidence
``kappa = 50``. ``cw_l2`` is the original l_2 attack: Adam on ``||x' - x||^2 + c * max(z_y - max_{j != y} z_j,
-kappa)`` in the tanh change of variables ``x' = (tanh(w) + 1) / 2`` (Sec. V-A), with a per-example binary
search over ``c``; it returns the smallest adversarial it finds (a minimum-norm attack).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxnas.attacks import losses
from jaxnas.attacks import pgd_attack


def cw_linf(logits_fn, x, y, key, *, eps: float, step_size: float, steps: int, kappa: float = 50.0,
            restarts: int = 1, idx=None):
  """PGD with the C&W margin loss ``-max(z_y - max_{j != y} z_j + kappa, 0)`` in the l_inf ball."""
  return pgd_attack.pgd(logits_fn, x, y, key, eps=eps, step_size=step_size, steps=steps, norm='linf',
                     loss='cw', kappa=kappa, restarts=restarts, idx=idx)


def cw_l2(logits_fn, x, y, *, binary_steps: int = 9, steps: int = 100, lr: float = 0.01,
          initial_const: float = 1e-3, kappa: float = 0.0):
  """C&W l_2. Returns, per example, the adversarial of smallest l_2 norm found (``x`` where none was).

  An iterate counts as adversarial when ``z_y + kappa < max_{j != y} z_j``. After each binary step the
  constant is bisected between the largest failing and smallest succeeding value (x10 while none succeeded);
  Adam's state and the perturbation restart at each binary step, as in the original.
  """
  optimizer = optax.adam(lr)
  expand = lambda v: jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))
  w0 = jnp.arctanh((2.0 * x - 1.0) * 0.999999)
  to_image = lambda w: (jnp.tanh(w) + 1.0) / 2.0

  def objective(w, const):
    x_new = to_image(w)
    logits = logits_fn(x_new)
    dist = jnp.sum((x_new - x).reshape(x.shape[0], -1) ** 2, axis=1)
    loss = dist + const * jax.nn.relu(losses.margin(logits, y) + kappa)
    return loss.sum(), (dist, losses.margin(logits, y) < -kappa, x_new)

  grad_fn = jax.grad(objective, has_aux=True)

  def binary_step(_, carry):
    const, lower, upper, best_dist, best_x = carry

    def step(_, inner):
      w, opt_state, success, best_dist, best_x = inner
      g, (dist, fooled, x_new) = grad_fn(w, const)
      better = fooled & (dist < best_dist)
      best_x = jnp.where(expand(better), x_new, best_x)
      best_dist = jnp.where(better, dist, best_dist)
      updates, opt_state = optimizer.update(g, opt_state)
      return optax.apply_updates(w, updates), opt_state, success | fooled, best_dist, best_x

    inner = (w0, optimizer.init(w0), jnp.zeros(y.shape, bool), best_dist, best_x)
    _, _, success, best_dist, best_x = lax.fori_loop(0, steps, step, inner)
    upper = jnp.where(success, jnp.minimum(upper, const), upper)
    lower = jnp.where(success, lower, jnp.maximum(lower, const))
    found = upper < 1e10
    const = jnp.where(found, (lower + upper) / 2, const * 10)
    return const, lower, upper, best_dist, best_x

  batch = y.shape[0]
  init = (jnp.full((batch,), initial_const, x.dtype), jnp.zeros((batch,), x.dtype),
          jnp.full((batch,), 1e10, x.dtype), jnp.full((batch,), jnp.inf, x.dtype), x)
  carry = lax.fori_loop(0, binary_steps, binary_step, init)
  return lax.stop_gradient(carry[4])
