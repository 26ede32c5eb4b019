"""Curvature of the input loss landscape (AdvRush Sec. 4.2, Eqs. 8-10; CURE, Moosavi-Dezfooli et al. 2019).

``loss_fn_x(x, y)`` returns the per-example losses ``[B]`` of a model in inference mode (or their sum or
mean): the input gradient of their sum is then the per-example gradient, and the input Hessian is block
diagonal with one block ``H_i`` per example. A mean-reduced loss (the original's ``CrossEntropyLoss``) scales
every gradient, hence every value below, by ``1/B``; per-example losses make the value independent of the
batch size. Returned values are means over the batch.

``h`` and the gradients live in the space of ``x``. The original works in mean/std-normalised input space;
with jaxnas' [0, 1] inputs (normalisation inside the model) a step ``h_orig`` there is about
``h_orig * std`` here (CIFAR-10 stds 0.247-0.261), and input gradients are ``1/std`` times larger.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def per_example_norm(v):
  """l2 norm over all but the leading axis, with a zero (not NaN) gradient at 0."""
  sq = jnp.sum(jnp.reshape(v, (v.shape[0], -1))**2, axis=1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def input_grad(loss_fn_x: Callable, x, y):
  """Per-example input gradients ``grad_x l(x_i, y_i)``, shaped like ``x``."""
  return jax.grad(lambda x_: jnp.sum(loss_fn_x(x_, y)))(x)


def _direction(g, h):
  s = jnp.sign(g)
  n = per_example_norm(s).reshape((-1,) + (1,) * (g.ndim - 1))
  return jax.lax.stop_gradient(h * s / jnp.where(n > 0, n, 1.0))


def cure_direction(loss_fn_x: Callable, x, y, h):
  """AdvRush's high-curvature direction ``z = h sign(g) / ||sign(g)||_2`` per example, ``g = grad_x l``.

  ``||z_i||_2 = h`` (0 where ``g_i = 0``). ``z`` is a constant (``stop_gradient``), as in CURE.
  """
  return _direction(input_grad(loss_fn_x, x, y), h)


def cure_regularizer(loss_fn_x: Callable, x, y, h):
  """AdvRush Eq. 10: ``mean_i ||grad_x l(x_i + z_i) - grad_x l(x_i)||_2`` with ``z = cure_direction``.

  The finite-difference approximation of ``h ||H_i z_i / h||`` (Eq. 9, the ``1/h`` absorbed into the
  regularisation strength). Differentiable w.r.t. everything ``loss_fn_x`` closes over (double backprop);
  ``z`` is held constant.
  """
  g = input_grad(loss_fn_x, x, y)
  z = _direction(g, h)
  return jnp.mean(per_example_norm(input_grad(loss_fn_x, x + z, y) - g))


def hessian_vector_product(loss_fn_x: Callable, x, y, v):
  """Per-example ``H_i v_i`` (input Hessian of the loss) as the ``jax.jvp`` of ``jax.grad``: exact, no FD."""
  return jax.jvp(lambda x_: input_grad(loss_fn_x, x_, y), (x,), (v,))[1]


def hessian_vector_norm(loss_fn_x: Callable, x, y, z):
  """Exact directional curvature ``mean_i ||H_i z_i||_2``: the ``h -> 0`` limit of ``cure_regularizer``
  along ``z`` (AdvRush Eq. 9 without finite differences). Use ``z = cure_direction(...)`` for AdvRush."""
  return jnp.mean(per_example_norm(hessian_vector_product(loss_fn_x, x, y, jax.lax.stop_gradient(z))))


def hessian_frobenius_hutchinson(loss_fn_x: Callable, x, y, rng, n_samples: int = 1):
  """Unbiased Hutchinson estimate of ``mean_i ||H_i||_F^2`` (AdvRush Eq. 8's ideal ``L_lambda``, squared).

  ``||H||_F^2 = tr(H^T H) = E_v ||H v||_2^2`` for Rademacher ``v`` (the paper writes
  ``||H||_F = E_z ||H z||_2``, which holds only in this squared form). Averages ``n_samples`` draws, one
  exact HVP each.
  """
  if n_samples < 1:
    raise ValueError(f'n_samples must be >= 1, got {n_samples}')

  def one(key):
    v = jax.random.rademacher(key, x.shape, dtype=x.dtype)
    return jnp.sum(hessian_vector_product(loss_fn_x, x, y, v)**2) / x.shape[0]

  return jnp.mean(jax.vmap(one)(jax.random.split(rng, n_samples)))
