"""AutoAttack's sanity checks (Croce & Hein 2020; the reference's ``checks.py``), for pure ``logits_fn``.

Each returns a warning message (``None`` when the check passes); ``run_checks`` collects them. They flag
evaluations that AutoAttack may overestimate: a randomised forward pass, an output that is already a
probability vector, inputs with zero gradient (gradient masking), too few classes for the targeted attacks,
and Square (black-box) succeeding where the white-box attacks failed.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.attacks import losses


def check_randomized(logits_fn, x, y, n: int = 5, tol: float = 1e-4) -> Optional[str]:
  """The forward pass must be deterministic: ``n`` calls agree on the accuracy and on the l_2-normalised
  logits to ``tol``. The calls are not jitted, so host-side randomness (frozen by a trace) shows too."""
  outs = [np.asarray(logits_fn(x)) for _ in range(n)]
  correct = [int((o.argmax(1) == np.asarray(y)).sum()) for o in outs]
  unit = [o / (np.linalg.norm(o, axis=1, keepdims=True) + 1e-10) for o in outs]
  max_diff = max((np.linalg.norm(a - b, axis=1).max() for i, a in enumerate(unit) for b in unit[i + 1:]),
                 default=0.0)
  if len(set(correct)) > 1 or max_diff > tol:
    return ('the forward pass is randomised (outputs differ between identical calls): AutoAttack standard '
            'underestimates such defences; evaluate with expectation over transformation')
  return None


def check_range_output(logits_fn, x, tol: float = 1e-5) -> Optional[str]:
  """The model must return logits, not probabilities (rows in [0, 1] summing to 1)."""
  out = np.asarray(logits_fn(x))
  if out.max() < 1 + tol and out.min() > -tol and np.all(np.abs(out.sum(-1) - 1) < tol):
    return 'the model output looks like a probability distribution: pass a function returning logits'
  return None


@functools.lru_cache(maxsize=64)
def _dlr_gradient(logits_fn):
  """Jitted ``(x, y) -> (correct, input gradient of the summed untargeted DLR loss)``, cached per model."""
  def fn(x, y):
    def total(z):
      logits = logits_fn(z)
      return losses.dlr_loss(logits, y).sum(), logits
    grad, logits = jax.grad(total, has_aux=True)(x)
    return jnp.argmax(logits, axis=1) == y, grad
  return jax.jit(fn)


def check_zero_gradients(logits_fn, x, y) -> Optional[str]:
  """Correctly classified inputs where the DLR loss has an all-zero input gradient make gradient-based attacks
  unreliable. (Misclassified points are skipped: there DLR is constant when the label is the third most
  likely class, and they need no attack.)"""
  correct, grad = _dlr_gradient(logits_fn)(x, y)
  n_zero = int(jnp.sum(correct & jnp.all(grad.reshape(grad.shape[0], -1) == 0, axis=1)))
  if n_zero:
    return (f'{n_zero} points have a zero input gradient: gradient-based attacks may be unreliable '
            '(gradient masking)')
  return None


def check_n_classes(n_classes: int, attacks, apgd_targets: int, fab_targets: int) -> Optional[str]:
  """Targeted DLR needs at least 4 classes; each targeted attack at most ``n_classes - 1`` targets."""
  msgs = []
  if 'apgd-t' in attacks or 'apgd-dlr' in attacks:
    if n_classes <= 3:
      msgs.append(f'with {n_classes} classes the (targeted) DLR loss is undefined: drop apgd-t/apgd-dlr')
    elif 'apgd-t' in attacks and apgd_targets + 1 > n_classes:
      msgs.append(f'apgd-t uses {apgd_targets} target classes but only {n_classes - 1} exist')
  if 'fab-t' in attacks and fab_targets + 1 > n_classes:
    msgs.append(f'fab-t uses {fab_targets} target classes but only {n_classes - 1} exist')
  return '; '.join(msgs) or None


def check_square_sr(robust_accuracy: Mapping[str, float], tol: float = 0.002) -> Optional[str]:
  """Square must not beat the white-box attacks: robust accuracy after it dropping by more than ``tol``
  below the best white-box result suggests gradient masking."""
  if 'square' not in robust_accuracy or len(robust_accuracy) <= 2:
    return None
  best = min(v for k, v in robust_accuracy.items() if k != 'square')
  if robust_accuracy['square'] < best - tol:
    return (f'Square (black-box) lowered robust accuracy by {best - robust_accuracy["square"]:.2%} after the '
            'white-box attacks: possible gradient masking; run Square with more queries and restarts or an '
            'adaptive attack')
  return None
