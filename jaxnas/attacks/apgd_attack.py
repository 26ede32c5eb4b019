"""Auto-PGD (APGD), Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, Algorithm 1, with the reference implementation's defaults.

Step size starts at ``2 * eps`` and is halved at checkpoints (Sec. 3.2) when the loss oscillated (increased
in at most ``rho`` of the steps since the last checkpoint, condition 1) or when the step size was not
reduced at the last checkpoint and the best loss has not improved since (condition 2); after a halving the
iterate restarts from the best point. Momentum 0.75 (eq. (2)). The reported adversarial example is the last
misclassified iterate. APGD-T uses the targeted DLR loss against the 2nd..(n+1)-th most likely classes.
"""
from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnas.attacks import ball
from jaxnas.attacks import losses


def checkpoints(n_iter: int) -> list[tuple[int, int]]:
  """``(iteration, window)`` of every step-size checkpoint, 0-based, as in the reference code.

  The first window is ``int(0.22 n)`` steps; each next one is shorter by ``int(0.03 n)`` steps but at least
  ``int(0.06 n)`` long (all at least 1): the paper's ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``.
  For ``n = 100``: after iterations 21, 40, 56, 69, 79, 86, 92, 98.
  """
  window = max(int(0.22 * n_iter), 1)
  window_min, decrease = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
  out, i = [], window - 1
  while i < n_iter:
    out.append((i, window))
    window = max(window - decrease, window_min)
    i += window
  return out


def _expand(v, x):
  return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def _project(z, x, eps, norm):
  """The reference's projection: l_inf clip, or l_2 radial shrink ``x + d/||d|| * min(eps, ||d||)``; then box."""
  if norm == 'linf':
    return jnp.clip(jnp.clip(z, x - eps, x + eps), 0.0, 1.0)
  d = z - x
  return jnp.clip(x + ball.normalize(d, 'l2') * jnp.minimum(eps, _expand(ball.lp_norm(d, 'l2'), d)), 0.0, 1.0)


def _start(keys, x, eps, norm):
  """Random start on the sphere's l_inf-scaled box (uniform noise / its max) or l_2 sphere, then [0, 1]."""
  shape = x.shape[1:]
  if norm == 'linf':
    t = jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0))(keys)
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, shape, x.dtype))(keys)
  return jnp.clip(x + eps * ball.normalize(t, norm), 0.0, 1.0)


def single_run(logits_fn, loss_fn, x, y, keys, *, eps, norm: str, n_iter: int, rho: float):
  """One APGD run (Algorithm 1). Returns ``(x_adv, fooled)``: the last misclassified iterate per example."""
  def value_and_grad(xa):
    def total(z):
      logits = logits_fn(z)
      per_example = loss_fn(logits, y)
      return per_example.sum(), (per_example, logits)
    (_, (per_example, logits)), g = jax.value_and_grad(total, has_aux=True)(xa)
    return per_example, jnp.argmax(logits, axis=1) != y, g

  schedule = checkpoints(n_iter)
  is_check = np.zeros(n_iter, bool)
  window = np.ones(n_iter, np.int32)
  for i, k in schedule:
    is_check[i], window[i] = True, k
  is_check, window = jnp.asarray(is_check), jnp.asarray(window)
  steps_axis = jnp.arange(n_iter)

  x_adv = _start(keys, x, eps, norm)
  loss, fooled, grad = value_and_grad(x_adv)
  batch = y.shape[0]
  state = dict(
      x_adv=x_adv, x_old=x_adv, grad=grad, step=jnp.full((batch,), 2.0 * eps, x.dtype),
      x_best=x_adv, grad_best=grad, loss_best=loss, x_fooled=x_adv, fooled=fooled,
      # The reference compares the first loss with an unwritten (zero) history entry.
      loss_prev=jnp.zeros_like(loss), increased=jnp.zeros((n_iter, batch), jnp.int32),
      loss_best_last_check=loss, reduced_last_check=jnp.ones((batch,), bool))

  def body(i, s):
    a = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)
    x_cur, momentum = s['x_adv'], s['x_adv'] - s['x_old']
    z = _project(x_cur + _expand(s['step'], x) * ball.steepest_ascent(s['grad'], norm), x, eps, norm)
    z = _project(x_cur + (z - x_cur) * a + momentum * (1 - a), x, eps, norm)
    loss, mis, grad = value_and_grad(z)
    x_fooled = jnp.where(_expand(mis, x), z, s['x_fooled'])
    improved = loss > s['loss_best']
    x_best = jnp.where(_expand(improved, x), z, s['x_best'])
    grad_best = jnp.where(_expand(improved, x), grad, s['grad_best'])
    loss_best = jnp.where(improved, loss, s['loss_best'])
    increased = s['increased'].at[i].set((loss > s['loss_prev']).astype(jnp.int32))
    # Checkpoint: condition 1 (oscillation) and condition 2 (no reduction last time and no improvement).
    k = window[i]
    in_window = (steps_axis > i - k) & (steps_axis <= i)
    n_increased = jnp.sum(increased * in_window[:, None], axis=0)
    oscillating = n_increased <= k * rho
    stalled = ~s['reduced_last_check'] & (s['loss_best_last_check'] >= loss_best)
    reduce = is_check[i] & (oscillating | stalled)
    return dict(
        x_adv=jnp.where(_expand(reduce, x), x_best, z), x_old=x_cur,
        grad=jnp.where(_expand(reduce, x), grad_best, grad),
        step=jnp.where(reduce, s['step'] / 2, s['step']),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best, x_fooled=x_fooled,
        fooled=s['fooled'] | mis, loss_prev=loss, increased=increased,
        loss_best_last_check=jnp.where(is_check[i], loss_best, s['loss_best_last_check']),
        reduced_last_check=jnp.where(is_check[i], oscillating | stalled, s['reduced_last_check']))

  s = lax.fori_loop(0, n_iter, body, state)
  return s['x_fooled'], s['fooled']


def _runs(logits_fn, x, y, key, idx, n_runs, run):
  """Runs ``run(j, keys_j) -> (x_adv, fooled)`` for ``j < n_runs`` while any example is still robust.

  Only clean-correct, still-robust examples take a run's result; the loop stops early once none is left.
  """
  keys = ball.example_keys(key, ball.default_idx(x, idx))
  robust0 = jnp.argmax(logits_fn(x), axis=1) == y

  def cond(c):
    j, _, robust = c
    return (j < n_runs) & jnp.any(robust)

  def body(c):
    j, adv, robust = c
    x_run, fooled = run(j, ball.fold_keys(keys, j))
    take = robust & fooled
    return j + 1, jnp.where(_expand(take, x), x_run, adv), robust & ~take

  _, adv, _ = lax.while_loop(cond, body, (0, x, robust0))
  return lax.stop_gradient(adv)


def apgd(logits_fn, x, y, key, *, eps: float, norm: str = 'linf', n_iter: int = 100,
         loss: Union[str, losses.LossFn] = 'ce', n_restarts: int = 1, rho: float = 0.75, idx=None):
  """Untargeted APGD (APGD-CE with ``loss='ce'``, APGD-DLR with ``loss='dlr'``).

  Returns adversarial images for the examples it breaks and the clean images elsewhere (the reference's
  ``perturb``). Randomness: restart ``r`` of example ``i`` uses ``fold_in(fold_in(key, idx[i]), r)``.
  """
  norm = ball.check_norm(norm)
  loss_fn = losses.resolve(loss)
  run = lambda j, keys: single_run(logits_fn, loss_fn, x, y, keys, eps=eps, norm=norm, n_iter=n_iter, rho=rho)
  return _runs(logits_fn, x, y, key, idx, n_restarts, run)


def apgd_targeted(logits_fn, x, y, key, *, eps: float, norm: str = 'linf', n_iter: int = 100,
                  n_target_classes: int = 9, n_restarts: int = 1, rho: float = 0.75, idx=None):
  """APGD-T: APGD on the targeted DLR loss against each of the ``n_target_classes`` most likely wrong classes
  (ranked on the clean input, at most ``K - 1``), one after the other on the examples still robust."""
  norm = ball.check_norm(norm)
  order = jnp.argsort(logits_fn(x), axis=1)
  n_classes = order.shape[1]
  n_target_classes = min(n_target_classes, n_classes - 1)

  def run(j, keys):
    y_target = order[:, n_classes - 2 - j // n_restarts]
    loss_fn = lambda logits, yy: losses.dlr_loss_targeted(logits, yy, y_target)
    return single_run(logits_fn, loss_fn, x, y, keys, eps=eps, norm=norm, n_iter=n_iter, rho=rho)

  return _runs(logits_fn, x, y, key, idx, n_target_classes * n_restarts, run)
