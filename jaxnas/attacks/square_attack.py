"""Square Attack, Andriushchenko, Croce, Flammarion & Hein, ECCV 2020: a score-based black-box random search
on the margin loss, l_inf and l_2, with the reference implementation's AutoAttack settings (p_init 0.8,
5000 queries, the un-rescaled p schedule).

l_inf (Alg. 2 with Alg. 1's sampling): start from vertical stripes ``±eps``; each query proposes one square
window of side ``s ≈ sqrt(p h w)`` set to ``±2 eps`` per channel on top of the current best, projected on the
ball. l_2 (Alg. 3): a window of the centre-weighted "eta" pattern redistributes the perturbation mass of two
windows. A proposal is accepted when it lowers the margin. Windows, signs and orientations are drawn per
example from ``(key, example index, query)``, so results do not depend on the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnas.attacks import ball
from jaxnas.attacks import losses

# p is halved after each of these query counts (the reference's ``p_selection`` without rescaling).
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_sides(h: int, w: int, p_init: float, norm: str) -> np.ndarray:
  """Side of the square window for each of the 10 p levels (l_2: odd and >= 3), capped by the image."""
  sides = []
  for level in range(len(P_SCHEDULE) + 1):
    s = int(round(float(np.sqrt(p_init / 2 ** level * h * w))))
    if norm == 'linf':
      s = max(s, 1)
    else:
      s = max(s, 3)
      s += 1 - s % 2
    sides.append(min(s, h, w))
  return np.asarray(sides, np.int32)


def _window(h, w, vh, vw, s):
  """``[H, W]`` indicator of the ``s x s`` window with top-left corner ``(vh, vw)``."""
  r, q = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  return (r >= vh) & (r < vh + s) & (q >= vw) & (q < vw + s)


def _eta(h, w, vh, vw, s, transpose):
  """The l_2 Square pattern ``eta(s)`` placed in the window at ``(vh, vw)`` (zero elsewhere), ``[H, W]``.

  The window's upper ``s // 2`` rows hold positive and the rest negative nested squares: inside each half
  (an ``n x s`` rectangle) the value at Chebyshev distance ``d`` from the half's centre is
  ``sum_{j=d+1}^{C} 1 / j^2``, ``C = max(n // 2, s // 2) + 1``. Each half has unit l_2 norm, then the whole.
  """
  r, q = jnp.arange(h)[:, None] - vh, jnp.arange(w)[None, :] - vw
  r, q = jnp.where(transpose, q, r), jnp.where(transpose, r, q)
  inside = (r >= 0) & (r < s) & (q >= 0) & (q < s)
  inv_sq = jnp.concatenate([jnp.zeros(1), 1.0 / jnp.arange(1, max(h, w) + 2) ** 2])
  cum = jnp.cumsum(inv_sq)                         # cum[k] = sum_{j <= k} 1 / j^2
  n_top = s // 2

  def half(rows, n):
    d = jnp.maximum(jnp.abs(rows - n // 2), jnp.abs(q - s // 2))
    big_c = jnp.maximum(n // 2, s // 2) + 1
    v = cum[big_c] - cum[jnp.clip(d, 0, big_c)]
    v = jnp.where(inside & (rows >= 0) & (rows < n), v, 0.0)
    return v / jnp.where(jnp.sum(v * v) > 0, jnp.sqrt(jnp.sum(v * v)), 1.0)

  pattern = half(r, n_top) - half(r - n_top, s - n_top)
  total = jnp.sum(pattern * pattern)
  return pattern / jnp.where(total > 0, jnp.sqrt(total), 1.0)   # a window off the image stays empty


def _randint(key, high):
  """Uniform integer in ``[0, high)`` (0 when ``high == 0``), the reference's ``random_int(0, high)``."""
  return jax.random.randint(key, (), 0, jnp.maximum(high, 1))


def _init_linf(keys, x, eps):
  """Vertical stripes: one random sign per (column, channel)."""
  _, _, w, c = x.shape
  stripes = jax.vmap(lambda k: jax.random.rademacher(k, (1, w, c), x.dtype))(keys)
  return jnp.clip(x + eps * stripes, 0.0, 1.0)


def _init_l2(keys, x, eps):
  """A grid of ``h // 5``-sided eta patterns with random per-channel signs, rescaled to norm ``eps``."""
  _, h, w, c = x.shape
  s = h // 5
  start = (h - 5 * s) // 2
  corners = jnp.asarray([(start + a * s, start + b * s) for a in range(h // s) for b in range(w // s)])

  def one(k):
    k_sign, k_t = jax.random.split(k)
    signs = jax.random.rademacher(k_sign, (len(corners), c), x.dtype)
    flips = jax.random.bernoulli(k_t, shape=(len(corners),))
    etas = jax.vmap(lambda vh, vw, t: _eta(h, w, vh, vw, s, t))(corners[:, 0], corners[:, 1], flips)
    return jnp.einsum('thw,tc->hwc', etas.astype(x.dtype), signs)

  delta = jax.vmap(one)(keys)
  return jnp.clip(x + ball.normalize(delta, 'l2') * eps, 0.0, 1.0)


def _propose_linf(key, x, x_best, eps, s):
  h, w, c = x.shape
  k_h, k_w, k_sign = jax.random.split(key, 3)
  window = _window(h, w, _randint(k_h, h - s), _randint(k_w, w - s), s)
  sign = jax.random.rademacher(k_sign, (c,), x.dtype)
  x_new = x_best + jnp.where(window[:, :, None], 2.0 * eps * sign, 0.0)
  return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)


def _propose_l2(key, x, x_best, eps, s):
  h, w, c = x.shape
  k_h, k_w, k_h2, k_w2, k_sign, k_t = jax.random.split(key, 6)
  vh, vw = _randint(k_h, h - s), _randint(k_w, w - s)
  win1 = _window(h, w, vh, vw, s)[:, :, None]
  win2 = _window(h, w, _randint(k_h2, h - s), _randint(k_w2, w - s), s)[:, :, None]
  delta = x_best - x
  channel_norm = lambda a: jnp.sqrt(jnp.sum(a * a, axis=(0, 1)))
  norm_win1 = channel_norm(delta * win1)
  norm_image = jnp.sqrt(jnp.sum(delta * delta))
  norm_windows = channel_norm(delta * (win1 | win2))
  eta = _eta(h, w, vh, vw, s, jax.random.bernoulli(k_t))[:, :, None].astype(x.dtype)
  new = eta * jax.random.rademacher(k_sign, (c,), x.dtype) + delta * win1 / (1e-12 + norm_win1)
  target = jnp.sqrt(jnp.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_windows ** 2)
  new = new / (1e-12 + channel_norm(new)) * target
  delta = jnp.where(win1, new, jnp.where(win2, 0.0, delta))
  return jnp.clip(x + delta / (jnp.sqrt(jnp.sum(delta * delta)) + 1e-12) * eps, 0.0, 1.0)


def square(logits_fn, x, y, key, *, eps: float, norm: str = 'linf', n_queries: int = 5000, p_init: float = 0.8,
           idx=None):
  """Untargeted Square Attack on the margin loss (one restart, the AutoAttack setting).

  Only clean-correct examples are attacked; the search of an example stops once it is misclassified, and the
  loop ends when all are (or after ``n_queries`` queries). Returns the adversarial where found, else ``x``.
  """
  norm = ball.check_norm(norm)
  _, h, w, _ = x.shape
  if norm == 'l2' and min(h, w) < 5:
    raise ValueError(f'l2 Square needs images of at least 5x5 pixels (its start tiles them in h // 5 squares), '
                     f'got {h}x{w}: use the l_inf threat model or larger images')
  sides = jnp.asarray(square_sides(h, w, p_init, norm))
  keys = ball.example_keys(key, ball.default_idx(x, idx))
  expand = lambda v: jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))
  robust0 = jnp.argmax(logits_fn(x), axis=1) == y
  x_best = (_init_linf if norm == 'linf' else _init_l2)(keys, x, eps)
  margin_min = losses.margin(logits_fn(x_best), y)
  propose = jax.vmap(_propose_linf if norm == 'linf' else _propose_l2, in_axes=(0, 0, 0, None, None))

  def cond(c):
    i, _, margin_min = c
    return (i < n_queries) & jnp.any(robust0 & (margin_min > 0))

  def body(c):
    i, x_best, margin_min = c
    s = sides[jnp.sum(i > jnp.asarray(P_SCHEDULE))]
    x_new = propose(ball.fold_keys(keys, i), x, x_best, eps, s)
    m = losses.margin(logits_fn(x_new), y)
    accept = robust0 & (margin_min > 0) & (m < margin_min)
    return i + 1, jnp.where(expand(accept), x_new, x_best), jnp.where(accept, m, margin_min)

  _, x_best, _ = lax.while_loop(cond, body, (0, x_best, margin_min))
  fooled = robust0 & (jnp.argmax(logits_fn(x_best), axis=1) != y)
  return lax.stop_gradient(jnp.where(expand(fooled), x_best, x))
