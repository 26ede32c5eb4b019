"""Jacobian norm estimators (DSRNA-Jacobian) against explicit jax.jacfwd Jacobians of a tiny net, float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas.objectives import jacobian

B, SHAPE, K = 4, (3, 3, 2), 5
D = int(np.prod(SHAPE))


def _problem():
  rng = np.random.default_rng(0)
  params = {'w1': rng.standard_normal((D, 7)), 'w2': rng.standard_normal((7, K))}
  logits_fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ params['w1']) @ params['w2']
  x = jnp.asarray(rng.uniform(0, 1, (B,) + SHAPE))
  # Independent reference: per-example K x D Jacobians by forward-mode differentiation.
  jac = jax.vmap(jax.jacfwd(lambda xi: logits_fn(xi[None])[0]))(x)
  return logits_fn, x, np.asarray(jac).reshape(B, K, D)


def _check_unbiased(draws, exact):
  draws = np.asarray(draws)
  se = draws.std(ddof=1) / np.sqrt(draws.size)
  assert abs(draws.mean() - exact) < 4 * se, (draws.mean(), exact, se)


def test_frobenius_projection_estimator_unbiased(x64):
  logits_fn, x, jac = _problem()
  exact = np.mean(np.sum(jac**2, axis=(1, 2)))
  keys = jax.random.split(jax.random.key(0), 3000)
  draws = jax.jit(jax.vmap(lambda k: jacobian.jacobian_frobenius_sq(logits_fn, x, k)))(keys)
  _check_unbiased(draws, exact)
  with pytest.raises(ValueError, match='n_proj'):
    jacobian.jacobian_frobenius_sq(logits_fn, x, keys[0], n_proj=0)


@pytest.mark.parametrize('q', [1, 2])
def test_norm_bound_exact_and_row_sampling_unbiased(x64, q):
  logits_fn, x, jac = _problem()
  exact = np.mean(np.linalg.norm(jac, ord=q, axis=2))  # mean over examples and rows of ||J_k||_q (Eq. 15)
  both = jax.jit(lambda keys: (jacobian.jacobian_norm_bound(logits_fn, x, q=q),
                               jax.vmap(lambda k: jacobian.jacobian_norm_bound(logits_fn, x, q=q, rng=k))(keys)))
  full, draws = both(jax.random.split(jax.random.key(1), 3000))
  assert float(full) == pytest.approx(exact, rel=1e-12)
  _check_unbiased(draws, exact)


def test_l_inf_variant_is_entrywise_l1_over_k(x64):
  logits_fn, x, jac = _problem()
  value = jax.jit(lambda x_: jacobian.jacobian_norm_bound(logits_fn, x_, q=1))(x)
  assert float(value) == pytest.approx(np.abs(jac).sum(axis=(1, 2)).mean() / K, rel=1e-12)


def test_rejects_non_batched_logits():
  with pytest.raises(ValueError, match=r'\[B, K\]'):
    jacobian.jacobian_norm_bound(lambda x: jnp.sum(x), jnp.ones((2, 3)))
