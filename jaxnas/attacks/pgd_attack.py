"""FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018) in l_inf and l_2.

``pgd`` is a pure function usable inside a jitted training step (adversarial training, adversarial
objectives): the loop is a ``lax.fori_loop``, the model is any ``logits_fn`` (it may close over traced
parameters), and the result carries ``stop_gradient`` so no gradient flows back into the attack.
"""
from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
from jax import lax

from jaxnas.attacks import ball
from jaxnas.attacks import losses


def _value_and_grad(logits_fn, loss_fn, x, y):
  """Per-example loss, logits and ``d sum(loss) / dx``."""
  def total(xa):
    logits = logits_fn(xa)
    per_example = loss_fn(logits, y)
    return per_example.sum(), (per_example, logits)
  (_, (per_example, logits)), g = jax.value_and_grad(total, has_aux=True)(x)
  return per_example, logits, g


def fgsm(logits_fn, x, y, *, eps: float, norm: str = 'linf', loss: Union[str, losses.LossFn] = 'ce',
         kappa: float = 0.0):
  """One step of size ``eps`` along the steepest-ascent direction of the loss (FGSM; FGM for l_2)."""
  norm = ball.check_norm(norm)
  _, _, g = _value_and_grad(logits_fn, losses.resolve(loss, kappa), x, y)
  return lax.stop_gradient(ball.project(x + eps * ball.steepest_ascent(g, norm), x, eps, norm))


def _better(mis, val, best_mis, best_val):
  """Lexicographic order used to pick among iterates/restarts: misclassified first, then higher loss."""
  return (mis > best_mis) | ((mis == best_mis) & (val > best_val))


STARTS = ('uniform', 'normal', 'none')
START_ALIASES = {True: 'uniform', False: 'none'}
NORMAL_START_SCALE = 1e-3   # TRADES' trades.py and AdvRush's training code: x + 0.001 * randn


def _select(mask, a, b):
  return jnp.where(jnp.reshape(mask, (-1,) + (1,) * (a.ndim - 1)), a, b)


def pgd(logits_fn, x, y, key, *, eps: float, step_size: float, steps: int, norm: str = 'linf',
        loss: Union[str, losses.LossFn] = 'ce', kappa: float = 0.0, restarts: int = 1,
        random_start: bool | str = True, scoring: str = 'final', idx=None):
  """Projected gradient ascent on ``loss`` inside the ``eps`` ball ∩ [0, 1] (Madry et al. 2018, eq. (2)).

  Args:
    logits_fn: ``x -> logits [B, K]``.
    x, y: images in [0, 1] ``[B, ...]`` and integer labels ``[B]``.
    key: PRNG key; example ``i`` draws its random start from ``fold_in(fold_in(key, idx[i]), restart)``.
    eps, step_size, steps: radius, step length and number of steps (l_inf: sign steps; l_2: normalised).
    norm: 'linf' or 'l2'.
    loss: 'ce', 'cw' (margin loss with confidence ``kappa``, the CW_inf attack), 'dlr' or a callable
      ``(logits, y) -> [B]`` to maximise.
    restarts: independent runs; per example the best run is kept (misclassified first, then higher loss).
    random_start: where each run starts: True or 'uniform': uniformly in the ball; 'normal': at
      ``x + 0.001 N(0, I)`` (projected), the start of the TRADES and AdvRush training code; False or 'none': at
      ``x``.
    scoring: 'final' returns each run's last iterate; 'best' its best iterate over all steps (same order).
    idx: global example indices ``[B]`` (defaults to ``arange(B)``); pass them for batch-size-independent
      results.

  Returns:
    Adversarial images ``[B, ...]`` (``stop_gradient`` applied).
  """
  norm = ball.check_norm(norm)
  start = START_ALIASES.get(random_start, random_start)
  if start not in STARTS:
    raise ValueError(f'unknown PGD random_start {random_start!r}: use one of {list(STARTS)} (or True / False)')
  if scoring not in ('final', 'best'):
    raise ValueError(f"unknown PGD scoring {scoring!r}: use 'final' or 'best'")
  loss_fn = losses.resolve(loss, kappa)
  keys = ball.example_keys(key, ball.default_idx(x, idx))
  track = scoring == 'best'
  neg_inf = jnp.full(y.shape, -jnp.inf, x.dtype)
  no = jnp.zeros(y.shape, bool)

  def score(xa):
    logits = logits_fn(xa)
    return jnp.argmax(logits, axis=1) != y, loss_fn(logits, y)

  def run(r):
    x0 = x
    if start == 'uniform':
      x0 = jnp.clip(x + ball.uniform_ball(ball.fold_keys(keys, r), x.shape[1:], eps, norm, x.dtype), 0.0, 1.0)
    elif start == 'normal':
      noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(ball.fold_keys(keys, r))
      x0 = ball.project(x + NORMAL_START_SCALE * noise, x, eps, norm)

    def body(_, carry):
      xa, best_x, best_mis, best_val = carry
      per_example, logits, g = _value_and_grad(logits_fn, loss_fn, xa, y)
      if track:
        mis = jnp.argmax(logits, axis=1) != y
        better = _better(mis, per_example, best_mis, best_val)
        best_x = _select(better, xa, best_x)
        best_mis, best_val = jnp.where(better, mis, best_mis), jnp.where(better, per_example, best_val)
      xa = ball.project(xa + step_size * ball.steepest_ascent(g, norm), x, eps, norm)
      return xa, best_x, best_mis, best_val

    xa, best_x, best_mis, best_val = lax.fori_loop(0, steps, body, (x0, x0, no, neg_inf))
    if restarts == 1 and not track:
      return xa, no, neg_inf
    mis, val = score(xa)
    if track:
      better = _better(mis, val, best_mis, best_val)
      return _select(better, xa, best_x), jnp.where(better, mis, best_mis), jnp.where(better, val, best_val)
    return xa, mis, val

  def restart(r, carry):
    out_x, out_mis, out_val = carry
    xa, mis, val = run(r)
    better = _better(mis, val, out_mis, out_val)
    return _select(better, xa, out_x), jnp.where(better, mis, out_mis), jnp.where(better, val, out_val)

  if restarts == 1:
    return lax.stop_gradient(run(0)[0])
  out = lax.fori_loop(0, restarts, restart, (x, no, neg_inf))
  return lax.stop_gradient(out[0])
