"""Out-of-distribution objective of E2RNAS (Eq. 3, after Hendrycks et al.'s outlier exposure)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ood_kl_uniform(logits):
  """``mean_x KL(U || softmax(f(x)))`` over OoD logits ``[B, K]`` (E2RNAS Eq. 3), ``U = (1/K, ..., 1/K)``.

  ``KL(U || p) = -log K - (1/K) sum_k log p_k``; zero iff the prediction is uniform.
  """
  if logits.ndim != 2:
    raise ValueError(f'expected [B, K] logits, got shape {logits.shape}')
  k = logits.shape[-1]
  return jnp.mean(-jnp.log(k) - jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=-1))
