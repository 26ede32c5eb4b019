"""Combiners: MGDA closed form vs a brute-force grid, min-norm vs scipy SLSQP, projection vs closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy import special

from jaxnas import combine

min_norm = jax.jit(combine.min_norm, static_argnames=('normalize', 'max_iters'))
mgda_two = jax.jit(combine.mgda_two)


def _tree(rng, scale=1.0):
  return {'normal': scale * rng.standard_normal((14, 8)), 'reduce': scale * rng.standard_normal((3, 2))}


def _flat(tree):
  return np.concatenate([np.ravel(tree[k]) for k in sorted(tree)])


def test_weighted_sum_scalars_and_pytrees():
  rng = np.random.default_rng(0)
  a, b = _tree(rng), _tree(rng)
  out = combine.weighted_sum([a, b], jnp.array([0.25, 0.75]))
  np.testing.assert_allclose(out['normal'], 0.25 * a['normal'] + 0.75 * b['normal'], rtol=1e-6)
  assert float(combine.weighted_sum([1.0, 2.0, 3.0], [1.0, 0.5, 2.0])) == pytest.approx(8.0)
  with pytest.raises(ValueError, match='one weight per term'):
    combine.weighted_sum([a, b], [1.0])


@pytest.mark.parametrize('case', ['random', 'aligned', 'one_zero', 'opposed'])
def test_mgda_two_matches_grid(x64, case):
  rng = np.random.default_rng(1)
  g1, g2 = _tree(rng), _tree(rng)
  if case == 'aligned':  # g2 = 3 g1: optimum at the shorter one, gamma = 1
    g2 = jax.tree.map(lambda v: 3.0 * v, g1)
  elif case == 'one_zero':
    g2 = jax.tree.map(jnp.zeros_like, g1)
  elif case == 'opposed':
    g2 = jax.tree.map(lambda v: -2.0 * v, g1)
  combined, gamma = mgda_two(g1, g2)
  v1, v2 = _flat(g1), _flat(g2)
  grid = np.linspace(0.0, 1.0, 200001)
  norms = np.linalg.norm(grid[:, None] * v1 + (1 - grid[:, None]) * v2, axis=1)
  best = grid[np.argmin(norms)]
  assert float(gamma) == pytest.approx(best, abs=2e-5)
  # DSARA Eq. 8 convention: gamma weights g1 (natural), 1 - gamma weights g2 (adversarial).
  np.testing.assert_allclose(_flat(combined), float(gamma) * v1 + (1 - float(gamma)) * v2, atol=1e-12)
  assert np.linalg.norm(_flat(combined)) <= norms.min() + 1e-9


def test_mgda_two_equal_gradients(x64):
  g = _tree(np.random.default_rng(2))
  combined, gamma = mgda_two(g, g)
  assert float(gamma) == 0.5
  np.testing.assert_allclose(_flat(combined), _flat(g), rtol=1e-12)
  # Gradients through the combiner stay finite at the degenerate point.
  grad = jax.jit(jax.grad(lambda s: combine.mgda_two(g, jax.tree.map(lambda v: s * v, g))[1]))(1.0)
  assert np.isfinite(float(grad))


def _slsqp_min_norm(gram):
  n = gram.shape[0]
  res = optimize.minimize(lambda w: w @ gram @ w, np.full(n, 1.0 / n), jac=lambda w: 2 * gram @ w,
                          bounds=[(0, 1)] * n, constraints=[{'type': 'eq', 'fun': lambda w: w.sum() - 1}],
                          method='SLSQP', options={'ftol': 1e-15, 'maxiter': 1000})
  return res.x


@pytest.mark.parametrize('n,dim,seed', [(3, 40, 0), (5, 40, 1), (5, 3, 2), (4, 112, 3)])
def test_min_norm_matches_slsqp(x64, n, dim, seed):
  rng = np.random.default_rng(seed)
  shift = rng.standard_normal(dim)  # a common component makes the optimum lie on a face or inside
  vecs = [rng.standard_normal(dim) + (1.5 if i % 2 else 0.3) * shift for i in range(n)]
  grads = [{'a': v[:dim // 2], 'b': v[dim // 2:]} for v in vecs]
  w = np.asarray(min_norm(grads))
  gram = np.stack(vecs) @ np.stack(vecs).T
  w_ref = _slsqp_min_norm(gram)
  assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-12)
  assert w @ gram @ w == pytest.approx(w_ref @ gram @ w_ref, rel=1e-6, abs=1e-9 * np.trace(gram))
  if dim >= n:  # positive definite Gram: unique weights
    np.testing.assert_allclose(w, w_ref, atol=1e-4)
  # Optimality certificate: the Frank-Wolfe gap at the returned point is within the tolerance.
  g = gram @ w
  assert g @ w - g.min() <= 1e-6 * np.diag(gram).max() + 1e-12


def test_min_norm_two_tasks_is_closed_form(x64):
  rng = np.random.default_rng(4)
  for _ in range(5):
    g1, g2 = _tree(rng), _tree(rng, scale=rng.uniform(0.2, 3.0))
    w = min_norm([g1, g2])
    _, gamma = mgda_two(g1, g2)
    np.testing.assert_allclose(np.asarray(w), [float(gamma), 1 - float(gamma)], atol=1e-12)


def test_min_norm_normalize_and_iteration_cap(x64):
  rng = np.random.default_rng(5)
  vecs = [rng.standard_normal(10) * s for s in (0.01, 1.0, 100.0)]
  unit = [v / np.linalg.norm(v) for v in vecs]
  w = np.asarray(min_norm(vecs, normalize=True))
  gram = np.stack(unit) @ np.stack(unit).T
  w_ref = _slsqp_min_norm(gram)
  assert w @ gram @ w == pytest.approx(w_ref @ gram @ w_ref, rel=1e-6)
  # max_iters=0 returns the best-pair start; one gradient gets weight one.
  start = np.asarray(jax.jit(combine.min_norm_gram, static_argnames='max_iters')(gram, max_iters=0))
  assert np.count_nonzero(start) <= 2 and start.sum() == pytest.approx(1.0)
  np.testing.assert_allclose(combine.min_norm([vecs[0]]), [1.0])
  with pytest.raises(ValueError, match='square'):
    combine.min_norm_gram(np.ones((2, 3)))


def test_project_linear_constraint_closed_form(x64):
  rng = np.random.default_rng(6)
  alphas = _tree(rng)
  c = _tree(rng)
  H = -3.0
  F = lambda a: sum(jnp.vdot(a[k], c[k]) for k in a) + 0.7
  res = jax.jit(lambda a: combine.project_constraint(a, F, H))(alphas)
  x, cv = _flat(alphas), _flat(c)
  excess = x @ cv + 0.7 - H
  assert excess > 0
  expected = x - excess / (cv @ cv) * cv  # projection onto the half-space c.a + 0.7 <= H
  np.testing.assert_allclose(_flat(res.alphas), expected, rtol=1e-5, atol=1e-5)
  assert float(res.value) <= H
  assert float(res.mu) == pytest.approx(excess / (cv @ cv), rel=2e-6)
  # Already feasible: unchanged, multiplier 0.
  same = jax.jit(lambda a: combine.project_constraint(a, F, 1e6))(alphas)
  np.testing.assert_array_equal(_flat(same.alphas), x)
  assert float(same.mu) == 0.0


def test_project_ball_known_answer(x64):
  alphas = _tree(np.random.default_rng(7))
  H = 4.0  # ||a||^2 <= 4: the nearest point is the radial scaling onto the sphere of radius 2
  res = jax.jit(lambda a: combine.project_constraint(
      a, lambda b: sum(jnp.sum(v**2) for v in jax.tree.leaves(b)), H))(alphas)
  x = _flat(alphas)
  np.testing.assert_allclose(_flat(res.alphas), 2.0 * x / np.linalg.norm(x), rtol=1e-5)
  assert float(res.value) <= H


def test_project_convex_constraint_matches_slsqp(x64):
  rng = np.random.default_rng(8)
  x = rng.standard_normal(12)
  w = rng.uniform(0.5, 2.0, 12)
  F = lambda a: jax.nn.logsumexp(w * a) + 0.1 * jnp.sum(a**4)  # smooth, convex, not quadratic
  H = 2.5
  assert float(F(x)) > H + 1.0
  res = jax.jit(lambda a: combine.project_constraint(a, F, H, inner_steps=30))(jnp.asarray(x))
  f_np = lambda a: special.logsumexp(w * a) + 0.1 * np.sum(a**4)
  df_np = lambda a: w * special.softmax(w * a) + 0.4 * a**3
  ref = optimize.minimize(lambda a: 0.5 * np.sum((a - x)**2), x, jac=lambda a: a - x, method='SLSQP',
                          constraints=[{'type': 'ineq', 'fun': lambda a: H - f_np(a), 'jac': lambda a: -df_np(a)}],
                          options={'ftol': 1e-14, 'maxiter': 500})
  assert float(res.value) <= H
  np.testing.assert_allclose(np.asarray(res.alphas), ref.x, atol=1e-5)


def test_project_holds_one_inner_solver():
  """The compiled projection traces F four times (F at alphas; its value and gradient at alphas; the inner
  step's linearisation; the line search), however many doublings and bisections run. With a solver copy per
  phase (17 traces) the RNAS smoke search's projected step compiled in 103 s instead of 61 s."""
  traces = []

  def F(a):
    traces.append(1)
    return jnp.sum(a['x']**2)

  res = jax.jit(lambda a: combine.project_constraint(a, F, 4.0))({'x': jnp.arange(5.0)})
  assert len(traces) == 4
  np.testing.assert_allclose(float(jnp.linalg.norm(res.alphas['x'])), 2.0, rtol=1e-5)
