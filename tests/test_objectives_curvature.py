"""Curvature objectives (AdvRush) against explicit input Hessians (jax.hessian) of a tiny net, in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas.objectives import curvature

B, SHAPE, K = 3, (3, 3, 2), 4
D = int(np.prod(SHAPE))


def _problem():
  rng = np.random.default_rng(0)
  params = {'w1': rng.standard_normal((D, 6)) / 2, 'w2': rng.standard_normal((6, K))}
  x = rng.uniform(0, 1, (B,) + SHAPE)
  y = rng.integers(0, K, B)
  return params, jnp.asarray(x), jnp.asarray(y)


def _logits(params, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ params['w1']) @ params['w2']


def _loss(params):
  """Per-example cross-entropy of the tiny net: [B]."""
  def loss_fn_x(x, y):
    logp = jax.nn.log_softmax(_logits(params, x))
    return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
  return loss_fn_x


def _explicit_hessians(params, x, y):
  """Per-example D x D input Hessians via jax.hessian of the single-example loss."""
  single = lambda xi, yi: _loss(params)(xi[None], yi[None])[0]
  return np.asarray(jax.jit(jax.vmap(jax.hessian(single)))(x, y)).reshape(B, D, D)


def test_direction_and_exact_hvp(x64):
  params, x, y = _problem()
  f = _loss(params)
  h = 0.7
  z = jax.jit(lambda x_, y_: curvature.cure_direction(f, x_, y_, h))(x, y)
  g = np.asarray(jax.vmap(jax.grad(lambda xi, yi: f(xi[None], yi[None])[0]))(x, y))
  np.testing.assert_allclose(np.asarray(z), h * np.sign(g) / np.sqrt(D), rtol=1e-12)
  hess = _explicit_hessians(params, x, y)
  hz = np.einsum('bij,bj->bi', hess, np.asarray(z).reshape(B, D))
  hvp, hvn = jax.jit(lambda z_: (curvature.hessian_vector_product(f, x, y, z_),
                                  curvature.hessian_vector_norm(f, x, y, z_)))(z)
  np.testing.assert_allclose(np.asarray(hvp).reshape(B, D), hz, rtol=1e-10, atol=1e-14)
  assert float(hvn) == pytest.approx(np.linalg.norm(hz, axis=1).mean(), rel=1e-10)


def test_finite_difference_converges_to_exact(x64):
  params, x, y = _problem()
  f = _loss(params)
  both = jax.jit(lambda h: (curvature.cure_regularizer(f, x, y, h),
                            curvature.hessian_vector_norm(f, x, y, curvature.cure_direction(f, x, y, h))))
  errors = []
  for h in (1e-2, 1e-3):
    fd, exact = map(float, both(h))
    errors.append(abs(fd - exact) / exact)
  assert errors[1] < 2e-3 and errors[1] < 0.2 * errors[0]  # O(h) error of the one-sided difference
  # At a finite h the regulariser is the exact gradient difference along z (AdvRush Eq. 10).
  h = 1.5
  z = np.asarray(jax.jit(lambda x_: curvature.cure_direction(f, x_, y, h))(x))
  grad_at = jax.jit(lambda xx: jax.grad(lambda v: jnp.sum(f(v, y)))(xx).reshape(B, D))
  expected = np.linalg.norm(np.asarray(grad_at(x + z)) - np.asarray(grad_at(x)), axis=1).mean()
  assert float(both(h)[0]) == pytest.approx(expected, rel=1e-12)


def test_regularizer_gradient_wrt_weights(x64):
  params, x, y = _problem()
  h = 0.5
  reg = lambda s: curvature.cure_regularizer(_loss({'w1': params['w1'], 'w2': s * params['w2']}), x, y, h)
  g = float(jax.jit(jax.grad(reg))(1.0))
  reg = jax.jit(reg)
  eps = 1e-5
  fd = (float(reg(1.0 + eps)) - float(reg(1.0 - eps))) / (2 * eps)  # z is locally constant in the weights
  assert np.isfinite(g) and g == pytest.approx(fd, rel=1e-6)


def test_hutchinson_unbiased(x64):
  params, x, y = _problem()
  f = _loss(params)
  exact = np.mean(np.sum(_explicit_hessians(params, x, y)**2, axis=(1, 2)))
  estimate = lambda k, n: curvature.hessian_frobenius_hutchinson(f, x, y, k, n_samples=n)
  draws, many = jax.jit(lambda keys, k: (jax.vmap(lambda kk: estimate(kk, 1))(keys), estimate(k, 500)))(
      jax.random.split(jax.random.key(0), 2000), jax.random.key(1))
  draws = np.asarray(draws)
  se = draws.std(ddof=1) / np.sqrt(draws.size)
  assert abs(draws.mean() - exact) < 4 * se
  assert abs(float(many) - exact) < 4 * draws.std(ddof=1) / np.sqrt(500)
  with pytest.raises(ValueError, match='n_samples'):
    curvature.hessian_frobenius_hutchinson(f, x, y, jax.random.key(1), n_samples=0)


def test_zero_gradient_and_zero_curvature_are_finite():
  x = jnp.zeros((2, 3))
  linear = lambda x_, y_: jnp.sum(x_, axis=1) * 0.0  # zero gradient: z = 0, regulariser 0, finite gradients
  assert float(jax.jit(lambda x_: curvature.cure_regularizer(linear, x_, None, 1.0))(x)) == 0.0
  g = jax.jit(jax.grad(
      lambda s: curvature.cure_regularizer(lambda x_, y_: s * jnp.sum(x_, axis=1), x, None, 1.0)))(1.0)
  assert float(g) == 0.0
