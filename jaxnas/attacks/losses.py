"""Per-example attack losses on logits ``[B, K]`` (higher = more adversarial).

All return one value per example; attacks maximise them (Square minimises the margin).
"""
from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(logits, y):
  """Softmax cross-entropy ``-log p_y``."""
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def margin(logits, y):
  """``z_y - max_{j != y} z_j``: positive iff the example is correctly classified."""
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  others = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
  return z_y - others.max(axis=1)


def cw_loss(logits, y, kappa: float = 0.0):
  """Carlini & Wagner (2017) margin loss for l_inf PGD: ``-max(z_y - max_{j != y} z_j + kappa, 0)``.

  With ``kappa = 50`` this is the "CW_inf" attack of the robust-NAS tables (maximised, it keeps pushing the
  wrong class until it leads by ``kappa``).
  """
  return -jax.nn.relu(margin(logits, y) + kappa)


def dlr_loss(logits, y):
  """Difference of Logits Ratio, Croce & Hein (2020) eq. (6), untargeted.

  ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)`` with ``z_pi`` sorted decreasingly; shift and scale
  invariant in the logits.
  """
  z_sorted = jnp.sort(logits, axis=1)
  return -margin(logits, y) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_loss_targeted(logits, y, y_target):
  """Targeted DLR, Croce & Hein (2020) eq. (7): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``."""
  z_sorted = jnp.sort(logits, axis=1)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  z_t = jnp.take_along_axis(logits, y_target[:, None], axis=1)[:, 0]
  return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def resolve(loss: Union[str, LossFn], kappa: float = 0.0) -> LossFn:
  """A loss by name ('ce', 'cw', 'dlr') or a callable ``(logits, y) -> [B]`` passed through."""
  if callable(loss):
    return loss
  table = {'ce': cross_entropy, 'cw': lambda z, y: cw_loss(z, y, kappa), 'dlr': dlr_loss}
  if loss not in table:
    raise ValueError(f"unknown attack loss {loss!r}: use 'ce', 'cw', 'dlr' or a callable (logits, y) -> [B]")
  return table[loss]
