"""Certified radius per example by CNN-Cert's search (Boopathy et al. 2019), as reported by DSRNA (Tables 5-6).

Starting from ``eps0``, ``steps`` rounds of bisection in log space: a certified ``eps`` (all margin lower bounds
positive) raises the lower end and the next try is ``min(log eps + 1, midpoint)``, an uncertified one lowers the
upper end and the next try is ``max(log eps - 1, midpoint)``. The radius is the largest certified ``eps`` tried
(0 if none, and 0 for misclassified points); the reported number is its mean over the dataset.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.certify import domain as domain_lib
from jaxnas.certify import propagation


def _search(logits_fn: Callable, x, y, norm: str, method: str, params, box, eps0: float, steps: int,
            batch_size: int | None, chunk_rows: int, progress: Callable[[str], None] | None = None):
  """``(radii [N], certified at eps0 [N])``; batches are padded to ``batch_size`` (one compilation).
  ``progress`` gets a line after every bisection step of every batch (full CROWN may take minutes per step)."""
  domain_lib.check_norm(norm)
  propagation.check_method(method)
  if eps0 <= 0 or steps < 1:
    raise ValueError(f'certified radius needs eps0 > 0 and steps >= 1, got eps0={eps0}, steps={steps}')
  x, y = jnp.asarray(x), jnp.asarray(y)
  if len(x) == 0:
    return np.zeros(0), np.zeros(0, bool)
  apply = logits_fn if params is None else (lambda p, xb: logits_fn(p, xb))

  @jax.jit
  def worst_margin(p, xb, yb, eps):
    lower = propagation.margin_lower_bounds(logits_fn, xb, yb, eps, norm, method, params=p, box=box,
                                           chunk_rows=chunk_rows)
    return jnp.min(lower, axis=1)

  @jax.jit
  def correct(p, xb, yb):
    logits = apply(xb) if p is None else apply(p, xb)
    return jnp.argmax(logits, axis=-1) == yb

  size = min(batch_size or len(x), len(x))
  radii, first = [], []
  clock, first_step_s, done, total = time.perf_counter(), 0.0, 0, steps * -(-len(x) // size)
  for start in range(0, len(x), size):
    n = min(size, len(x) - start)
    pad = lambda t: jnp.concatenate([t[start:start + n], jnp.repeat(t[start:start + 1], size - n, axis=0)])
    xb, yb = pad(x), pad(y)
    right = np.asarray(correct(params, xb, yb))[:n]
    log_eps = np.full(size, np.log(eps0))
    log_lo, log_hi = np.full_like(log_eps, -np.inf), np.full_like(log_eps, np.inf)
    for step in range(steps):
      ok = np.asarray(worst_margin(params, xb, yb, jnp.asarray(np.exp(log_eps), x.dtype))) > 0
      if step == 0:
        first.append(ok[:n] & right)
      log_lo, log_hi = np.where(ok, log_eps, log_lo), np.where(ok, log_hi, log_eps)
      mid = (log_lo + log_hi) / 2
      log_eps = np.where(ok, np.minimum(log_eps + 1, mid), np.maximum(log_eps - 1, mid))
      done += 1
      if progress is not None:
        now = time.perf_counter()
        first_step_s = first_step_s or now - clock  # it includes the compilation
        left = (f'about {(now - clock - first_step_s) / (done - 1) * (total - done):.0f} s left' if done > 1
                else 'the first step includes compiling')
        progress(f'certify {method} {norm}: examples {start + 1}-{start + n} of {len(x)}, bisection step '
                 f'{step + 1}/{steps}, {int(np.sum(ok[:n] & right))}/{n} certified at the radii tried, '
                 f'{now - clock:.0f} s elapsed, {left}')
    radii.append(np.where(right, np.exp(log_lo[:n]), 0.0))
  return np.concatenate(radii), np.concatenate(first)


def certified_radius(logits_fn: Callable, x, y, norm: str = 'linf', method: str = 'crown', *, params=None,
                     box=None, eps0: float = 0.05, steps: int = 15, batch_size: int | None = None,
                     chunk_rows: int = 256) -> np.ndarray:
  """Certified radii ``[N]`` of the points ``x`` with labels ``y`` (CNN-Cert protocol: eps0 0.05, 15 steps).

  ``logits_fn`` is ``x -> logits`` or ``(params, x) -> logits`` with ``params``; ``method``: 'ibp', 'crown' or
  'crown-ibp'; ``box`` clips the input set as in ``bounds``. Average the result for the dataset figure.
  """
  return _search(logits_fn, x, y, norm, method, params, box, eps0, steps, batch_size, chunk_rows)[0]


def certified_radii_report(logits_fn: Callable, images, labels, *, norms=('linf',), method: str = 'crown',
                           eps0: float = 0.05, steps: int = 15, batch_size: int | None = None,
                           box=(0.0, 1.0), progress: Callable[[str], None] | None = None) -> dict:
  """Certified radii of a model on a dataset, for the evaluation report (DSRNA Tables 5-6).

  ``logits_fn``: the inference-mode ``x -> logits`` of a network (``EvalNetwork.logits_fn(variables)``);
  ``images`` float in [0, 1] ``[N, H, W, C]``; ``box`` the valid pixel range (None: unclipped balls).
  Full CROWN (``method='crown'``) suits small networks; 'crown-ibp' and 'ibp' scale to large ones but are
  loose on networks not trained for them (0 on the quick start's network). ``progress`` gets a line after
  every bisection step.

  Returns ``{norm: {'method', 'mean_radius', 'radii': [N floats], 'certified_at_eps0_fraction', 'seconds'}}``
  (plain JSON values).
  """
  x = jnp.asarray(images)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'certified_radii_report needs float images in [0, 1], got {x.dtype}: convert uint8 '
                     'images with images / 255')
  report = {}
  for norm in norms:
    start = time.perf_counter()
    radii, first = _search(logits_fn, x, labels, norm, method, None, box, eps0, steps, batch_size, 256, progress)
    report[norm] = {'method': method, 'mean_radius': float(np.mean(radii)) if len(radii) else 0.0,
                    'radii': [float(r) for r in radii],
                    'certified_at_eps0_fraction': float(np.mean(first)) if len(first) else 0.0,
                    'seconds': time.perf_counter() - start}
  return report
