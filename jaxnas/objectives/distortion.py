"""Feature distortion / network vulnerability (RNAS Sec. 4.1, Eqs. 3-6).

A channel's feature values are turned into a distribution by a softmax over its spatial positions, per
example: ``p_{b,c} = softmax_{h,w}(z[b, h, w, c])``. This is the normalisation of knowledge distillation and
deep mutual learning, which the paper cites for its KL; it is defined for features of any sign (cell outputs
are not ReLU'd), is shift-invariant per channel, and keeps the channel's spatial pattern, which is what an
adversarial perturbation distorts. Channel vulnerability (Eq. 3) is ``E_x KL(p_clean || p_adv)``; cell
vulnerability (Eq. 5) the mean over the cell's output channels; network vulnerability (Eq. 6) the mean over
cells. Features are NHWC.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def channel_distortion(feats_clean, feats_adv):
  """Per-channel ``E_x KL(p_clean || p_adv)`` (RNAS Eq. 3) for NHWC features: returns ``[C]``."""
  if feats_clean.shape != feats_adv.shape:
    raise ValueError(f'clean and adversarial features differ in shape: {feats_clean.shape} vs {feats_adv.shape}')
  if feats_clean.ndim < 3:
    raise ValueError(f'expected [B, ..., C] features with spatial axes, got shape {feats_clean.shape}')
  axes = tuple(range(1, feats_clean.ndim - 1))
  log_p = jax.nn.log_softmax(feats_clean, axis=axes)
  log_q = jax.nn.log_softmax(feats_adv, axis=axes)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axes)  # [B, C]
  return jnp.mean(kl, axis=0)


def cell_distortion(feats_clean, feats_adv):
  """Cell vulnerability (RNAS Eq. 5): the mean channel vulnerability of the cell's output."""
  return jnp.mean(channel_distortion(feats_clean, feats_adv))


def feature_distortion(feats_clean_list: Sequence, feats_adv_list: Sequence):
  """Network vulnerability (RNAS Eq. 6): mean over cells of ``cell_distortion``."""
  if len(feats_clean_list) != len(feats_adv_list) or not feats_clean_list:
    raise ValueError(f'need one adversarial feature map per clean one (got {len(feats_clean_list)} and '
                     f'{len(feats_adv_list)}), at least one')
  return jnp.mean(jnp.stack([cell_distortion(c, a) for c, a in zip(feats_clean_list, feats_adv_list)]))
