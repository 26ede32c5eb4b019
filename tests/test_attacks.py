"""Unit tests of jaxnas.attacks against independent references: closed forms on linear models, hand-computed
losses, scipy LP/QP projections, the APGD paper's checkpoint formula, threat-model constraints, determinism
and the inference-mode guard."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import attacks
from jaxnas.attacks import apgd_attack
from jaxnas.attacks import batching
from jaxnas.attacks import checks
from jaxnas.attacks import ensemble
from jaxnas.attacks import fab_attack
from jaxnas.attacks import square_attack


def linear_model(w, b=None):
  """``logits = flat(x) @ w + b``."""
  w = jnp.asarray(w)
  b = jnp.zeros(w.shape[1], w.dtype) if b is None else jnp.asarray(b)
  return lambda x: x.reshape(x.shape[0], -1) @ w + b


def binary_problem(norm_ord, margin=0.8, batch=8, side=6, dtype=np.float32, seed=0):
  """A linear model whose classes 0 and 1 compete (classes 2, 3 trail by 50) and points in the box interior
  with margin ``z_0 - z_1 = margin``.

  Returns ``(logits_fn, x, y, w, d_star)``: the distance to the decision boundary is ``d_star = margin /
  ||w_0 - w_1||_dual`` for every point (box inactive).
  """
  rng = np.random.RandomState(seed)
  dim = side * side
  w = (rng.randn(dim, 4) * 0.5).astype(dtype)
  w[:, 2:] = 0.0
  u = w[:, 0] - w[:, 1]
  x = 0.5 + 0.1 * rng.rand(batch, dim)
  x = x + ((margin - x @ u) / (u @ u))[:, None] * u[None]
  x = x.reshape(batch, side, side, 1).astype(dtype)
  bias = np.array([0.0, 0.0, -50.0, -50.0], dtype)
  return linear_model(w, bias), x, np.zeros(batch, np.int32), w, margin / np.linalg.norm(u, ord=norm_ord)


def jit_attack(attack, logits_fn, *arrays, **kwargs):
  """Runs ``attack(logits_fn, *arrays, **kwargs)`` jitted: one compilation instead of many eager ones."""
  return jax.jit(lambda *a: attack(logits_fn, *a, **kwargs))(*arrays)


def norms(x_adv, x):
  d = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
  d = d.reshape(len(d), -1)
  return np.abs(d).max(1), np.sqrt((d ** 2).sum(1))


@functools.lru_cache(maxsize=None)
def tiny_model(seed=0, classes=10):
  """A fixed random ReLU network on 8x8x1 inputs (one object per seed, so jitted attacks are reused)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  w1, w2 = jax.random.normal(k1, (64, 32)) * 0.4, jax.random.normal(k2, (32, classes)) * 0.4
  return lambda x: jax.nn.relu(x.reshape(x.shape[0], -1) @ w1) @ w2


def model_batch(n=24, seed=1):
  """Images in [0, 1] (some pixels saturated) labelled with the tiny model's own predictions."""
  x = np.clip(np.random.RandomState(seed).rand(n, 8, 8, 1) * 1.4 - 0.2, 0, 1).astype(np.float32)
  y = np.asarray(tiny_model()(x)).argmax(1).astype(np.int32)
  return x, y


SMALL_AA = dict(n_iter=10, n_target_classes=2, n_queries=60)


def assert_in_ball_and_box(x_adv, x, eps, norm, what=''):
  x_adv = np.asarray(x_adv)
  dist = norms(x_adv, x)[0 if norm == 'linf' else 1]
  assert dist.max() <= eps * (1 + 1e-5), what
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0 and np.isfinite(x_adv).all(), what


# ---------------------------------------------------------------------------------------------- losses


def test_losses_equal_hand_computations():
  z = jnp.array([[1.0, 3.0, 2.0, 0.5], [0.0, -1.0, 4.0, 2.0]])
  y = jnp.array([0, 2])
  # margins: 1 - 3 = -2; 4 - 2 = 2.
  np.testing.assert_allclose(attacks.margin(z, y), [-2.0, 2.0])
  np.testing.assert_allclose(attacks.cw_loss(z, y, kappa=0.0), [0.0, -2.0])
  np.testing.assert_allclose(attacks.cw_loss(z, y, kappa=50.0), [-48.0, -52.0])
  ce0 = -1.0 + math.log(math.exp(1) + math.exp(3) + math.exp(2) + math.exp(0.5))
  np.testing.assert_allclose(attacks.cross_entropy(z, y)[0], ce0, rtol=1e-6)
  # DLR: sorted row 0 = 3, 2, 1, 0.5 -> -(1 - 3) / (3 - 1) = 1; row 1 = 4, 2, 0, -1 -> -(4 - 2) / (4 - 0).
  np.testing.assert_allclose(attacks.dlr_loss(z, y), [1.0, -0.5], rtol=1e-6)
  # Targeted DLR, targets 1 and 3: -(1 - 3) / (3 - (1 + 0.5) / 2); -(4 - 2) / (4 - (0 - 1) / 2).
  np.testing.assert_allclose(attacks.dlr_loss_targeted(z, y, jnp.array([1, 3])), [2 / 2.25, -2 / 4.5],
                             rtol=1e-6)


def test_dlr_is_shift_and_scale_invariant():
  z = jax.random.normal(jax.random.PRNGKey(0), (5, 10))
  y = jnp.arange(5)
  np.testing.assert_allclose(attacks.dlr_loss(3.0 * z + 7.0, y), attacks.dlr_loss(z, y), rtol=1e-5)


# ------------------------------------------------------------------------------------------ FGSM / PGD


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_pgd_on_linear_model_reaches_closed_form_worst_case(norm, x64):
  logits_fn, x, y, w, _ = binary_problem(1 if norm == 'linf' else 2, dtype=np.float64)
  u = (w[:, 0] - w[:, 1]).reshape(1, 6, 6, 1)
  eps = 0.03 if norm == 'linf' else 0.2
  # argmax over the ball of CE = argmin of the margin (w_y - w_j) . x: x - eps sign(u) or x - eps u / ||u||.
  x_star = x - eps * (np.sign(u) if norm == 'linf' else u / np.linalg.norm(u))
  x_adv = jit_attack(attacks.pgd, logits_fn, x, y, jax.random.PRNGKey(0), eps=eps, step_size=eps / 2, steps=60,
                     norm=norm)
  loss = lambda a: np.asarray(attacks.cross_entropy(logits_fn(jnp.asarray(a)), jnp.asarray(y)))
  np.testing.assert_allclose(loss(x_adv), loss(x_star), rtol=1e-9)
  np.testing.assert_allclose(x_adv, x_star, atol=1e-9)
  if norm == 'linf':
    x_fgsm = jit_attack(attacks.fgsm, logits_fn, x, y, eps=eps)
    np.testing.assert_allclose(x_fgsm, x_star, atol=1e-12)


def test_pgd_restarts_and_best_iterate_never_worse():
  f = tiny_model()
  x, y = model_batch()
  kw = dict(eps=0.05, step_size=0.025, steps=4)
  key = jax.random.PRNGKey(3)
  loss = lambda a: np.asarray(attacks.cross_entropy(f(a), jnp.asarray(y)))
  fooled = lambda a: np.asarray(f(a)).argmax(1) != y
  one = jit_attack(attacks.pgd, f, x, y, key, **kw)
  best = jit_attack(attacks.pgd, f, x, y, key, scoring='best', **kw)
  many = jit_attack(attacks.pgd, f, x, y, key, restarts=3, scoring='best', **kw)
  # Restart 0 of ``many`` is ``best``; iterates and restarts are ranked misclassified first, then by loss.
  assert np.all(fooled(best) >= fooled(one))
  assert np.all((fooled(best) > fooled(one)) | (loss(best) >= loss(one) - 1e-6))
  assert np.all((fooled(many) > fooled(best)) | ((fooled(many) == fooled(best)) & (loss(many) >= loss(best) - 1e-6)))
  assert fooled(one).any()
  assert_in_ball_and_box(many, x, 0.05, 'linf')


@pytest.mark.parametrize('norm,eps', [('linf', 0.05), ('l2', 0.5)])
def test_pgd_fgsm_cw_stay_in_ball_and_box(norm, eps):
  f = tiny_model()
  x, y = model_batch()
  key = jax.random.PRNGKey(3)
  results = dict(fgsm=jit_attack(attacks.fgsm, f, x, y, eps=eps, norm=norm))
  if norm == 'linf':   # l_inf PGD with restarts: test_pgd_restarts_and_best_iterate_never_worse
    results['cw_linf'] = jit_attack(attacks.cw_linf, f, x, y, key, eps=eps, step_size=eps / 2, steps=4)
  else:
    results['pgd'] = jit_attack(attacks.pgd, f, x, y, key, eps=eps, step_size=eps / 2, steps=4, norm=norm, restarts=2)
  for name, x_adv in results.items():
    assert_in_ball_and_box(x_adv, x, eps, norm, name)


def test_pgd_random_starts():
  """With no steps PGD returns its start: 'normal' is x + 0.001 N(0, I) (TRADES' and AdvRush's start), inside
  the ball and the box; 'uniform' fills the ball; 'none' (False) is x."""
  x = jnp.full((64, 8, 8, 3), 0.5)
  y = jnp.zeros(64, jnp.int32)
  f = lambda z: jnp.zeros((z.shape[0], 10))
  start = lambda kind, eps=8 / 255, **kw: np.asarray(
      attacks.pgd(f, x, y, jax.random.PRNGKey(0), eps=eps, step_size=0.01, steps=0, random_start=kind, **kw) - x)
  d = start('normal')
  assert abs(d.std() - 1e-3) < 3e-5 and abs(d.mean()) < 2e-5   # 12288 draws: 3 standard errors
  np.testing.assert_array_equal(start('normal'), d)   # deterministic given the key
  assert np.abs(start('normal', eps=5e-4)).max() == pytest.approx(5e-4, rel=1e-4)   # projected onto the ball
  np.testing.assert_array_equal(start('normal', norm='l2', eps=1.0), d)  # well inside the l_2 ball: unchanged
  u = start(True)
  np.testing.assert_array_equal(start('uniform'), u)
  assert np.abs(u).max() <= 8 / 255 and np.abs(u).mean() == pytest.approx(4 / 255, rel=0.05)
  assert not np.any(start(False)) and not np.any(start('none'))
  with pytest.raises(ValueError, match=r"unknown PGD random_start 'gauss': use one of \['uniform', 'normal', 'none'\]"):
    start('gauss')


def test_pgd_inside_jitted_train_step_stops_gradients():
  f_of = lambda params, x: x.reshape(x.shape[0], -1) @ params
  params = jax.random.normal(jax.random.PRNGKey(0), (36, 3))
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 6, 6, 1))
  y = jnp.array([0, 1, 2, 0])

  def adv_loss(p, key):
    x_adv = attacks.pgd(lambda z: f_of(p, z), x, y, key, eps=0.1, step_size=0.05, steps=3)
    return attacks.cross_entropy(f_of(p, x_adv), y).mean(), x_adv

  (_, x_adv), g = jax.jit(jax.value_and_grad(adv_loss, has_aux=True))(params, jax.random.PRNGKey(2))
  g_fixed = jax.grad(lambda p: attacks.cross_entropy(f_of(p, x_adv), y).mean())(params)
  np.testing.assert_allclose(g, g_fixed, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ APGD


def test_apgd_checkpoints_follow_the_paper_formula():
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); checkpoint after ceil(p_j N) steps.
  p = [0.0, 0.22]
  while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  paper = [round(q * 100) for q in p[1:]]
  ours = apgd_attack.checkpoints(100)
  assert [i + 1 for i, _ in ours] == paper == [22, 41, 57, 70, 80, 87, 93, 99]
  assert [k for _, k in ours] == [22, 19, 16, 13, 10, 7, 6, 6]
  assert apgd_attack.checkpoints(10) == [(1, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (9, 1)]


@pytest.mark.parametrize('norm,loss', [('linf', 'ce'), ('l2', 'dlr')])
def test_apgd_on_linear_model_breaks_exactly_the_breakable_points(norm, loss):
  logits_fn, x, y, _, d_star = binary_problem(1 if norm == 'linf' else 2)
  run = jax.jit(lambda eps: attacks.apgd(logits_fn, x, y, jax.random.PRNGKey(0), eps=eps, norm=norm, n_iter=20,
                                         loss=loss, n_restarts=2))
  for mult, breakable in ((1.05, True), (0.95, False)):
    x_adv = run(d_star * mult)
    assert np.all((np.asarray(logits_fn(x_adv)).argmax(1) != y) == breakable)
    assert norms(x_adv, x)[0 if norm == 'linf' else 1].max() <= d_star * mult * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------- FAB


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_hyperplane_box_projection_matches_scipy(norm, x64):
  from scipy import optimize
  rng = np.random.RandomState(0)
  n, dim = 6, 9
  t, w = rng.rand(n, dim), rng.randn(n, dim)
  w[0, :3] = 0.0                                      # zero weights must not move
  b = (w * t).sum(1) + rng.randn(n) * 1.5
  b[1] = (w[1] * t[1]).sum()                          # already on the plane
  d = np.asarray(fab_attack.project_hyperplane_box(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b), norm))
  for i in range(n):
    lo, hi, target = -t[i], 1 - t[i], b[i] - w[i] @ t[i]
    if norm == 'linf':   # min s  s.t.  |d_j| <= s, w . d = target, box
      a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
      res = optimize.linprog(np.r_[np.zeros(dim), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * dim),
                             A_eq=np.r_[w[i], 0.0][None], b_eq=[target], bounds=list(zip(lo, hi)) + [(0, None)])
      ref = res.x[-1] if res.status == 0 else None
      ours = np.abs(d[i]).max()
    else:
      res = optimize.minimize(lambda z: z @ z, np.zeros(dim), jac=lambda z: 2 * z, bounds=list(zip(lo, hi)),
                              constraints=[{'type': 'eq', 'fun': lambda z, i=i: w[i] @ z - target,
                                            'jac': lambda z, i=i: w[i]}],
                              method='SLSQP', options={'ftol': 1e-15, 'maxiter': 1000})
      feasible = res.success and abs(w[i] @ res.x - target) < 1e-8
      ref = np.sqrt(res.fun) if feasible else None
      ours = np.linalg.norm(d[i])
    assert np.all(t[i] + d[i] >= -1e-12) and np.all(t[i] + d[i] <= 1 + 1e-12)
    if ref is None:   # unreachable inside the box: the closest corner, i.e. maximal progress
      corner = np.where(w[i] * np.sign(w[i] @ t[i] - b[i]) > 0, -t[i], 1 - t[i]) * (w[i] != 0)
      np.testing.assert_allclose(d[i], corner, atol=1e-12)
    else:
      np.testing.assert_allclose(w[i] @ (t[i] + d[i]), b[i], atol=1e-10)
      np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(d[1], 0.0, atol=1e-12)
  assert np.all(d[0, :3] == 0)


@pytest.mark.parametrize('norm,targeted', [('linf', True), ('l2', False)])
def test_fab_finds_the_linear_decision_boundary(norm, targeted):
  logits_fn, x, y, _, d_star = binary_problem(1 if norm == 'linf' else 2)
  run = jax.jit(lambda eps: attacks.fab(logits_fn, x, y, jax.random.PRNGKey(0), eps=eps, norm=norm, n_iter=30,
                                        targeted=targeted, n_target_classes=1, n_restarts=1 if targeted else 2))
  x_adv = run(1.1 * d_star)   # untargeted: a second restart from a random point at eps / 2 where the first fails
  dist = norms(x_adv, x)[0 if norm == 'linf' else 1]
  assert np.all(np.asarray(logits_fn(x_adv)).argmax(1) != y)
  assert np.all(dist >= d_star * (1 - 1e-4)) and np.all(dist <= 1.02 * d_star)
  np.testing.assert_array_equal(run(0.97 * d_star), x)


# ---------------------------------------------------------------------------------------------- Square


def test_square_schedule_and_sides():
  # p halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 queries; side = round(sqrt(p h w)).
  sides = square_attack.square_sides(32, 32, 0.8, 'linf')
  assert sides.tolist() == [min(32, max(1, round(math.sqrt(0.8 / 2 ** k * 1024)))) for k in range(10)]
  l2 = square_attack.square_sides(32, 32, 0.8, 'l2')
  assert all(s % 2 == 1 and s >= 3 for s in l2.tolist())


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_square_finds_points_beyond_the_linear_boundary_only(norm):
  logits_fn, x, y, _, d_star = binary_problem(1 if norm == 'linf' else 2)
  run = jax.jit(lambda eps: attacks.square(logits_fn, x, y, jax.random.PRNGKey(0), eps=eps, norm=norm,
                                           n_queries=600))
  x_adv = run(3.0 * d_star)
  assert np.all(np.asarray(logits_fn(x_adv)).argmax(1) != y)
  assert_in_ball_and_box(x_adv, x, 3.0 * d_star, norm)
  np.testing.assert_array_equal(run(0.97 * d_star), x)


def test_l2_square_pattern_has_unit_norm_and_signed_halves():
  eta = np.asarray(square_attack._eta(8, 8, 1, 2, 5, False))
  window = eta[1:6, 2:7]
  np.testing.assert_allclose((eta ** 2).sum(), 1.0, rtol=1e-6)
  assert np.all(eta[:1] == 0) and np.all(eta[6:] == 0) and np.all(eta[:, :2] == 0)
  assert np.all(window[:2] > 0) and np.all(window[2:] < 0)   # upper s // 2 rows positive
  # The centre of each half carries the largest magnitude; the pattern is symmetric left-right.
  np.testing.assert_allclose(window, window[:, ::-1], rtol=1e-6)
  assert abs(window[1, 2]) == np.abs(window[:2]).max() and abs(window[3, 2]) == np.abs(window[2:]).max()


# ---------------------------------------------------------------------------------------------- C&W


def test_cw_l2_finds_the_minimum_norm_point_of_a_linear_model():
  logits_fn, x, y, _, d_star = binary_problem(2)
  x_adv = jit_attack(attacks.cw_l2, logits_fn, x, y, binary_steps=9, steps=100)
  dist = norms(x_adv, x)[1]
  assert np.all(np.asarray(logits_fn(x_adv)).argmax(1) != y)
  assert np.all(dist >= d_star * (1 - 1e-4)) and np.all(dist <= 1.01 * d_star)
  assert np.asarray(x_adv).min() >= 0.0 and np.asarray(x_adv).max() <= 1.0


# ------------------------------------------------------------- threat model, determinism, batch size


@pytest.fixture(scope='module')
def tiny_aa():
  """AutoAttack (small budgets) on the tiny model, 20 points with 3 clean errors: ``(x, y, runs)`` with runs
  keyed by ``(seed, batch_size)``; the jitted components compile once per batch shape and are reused."""
  f = tiny_model()
  x, y = model_batch(20)
  y[:3] = (y[:3] + 1) % 10   # a few clean errors
  runs = {(seed, bs): attacks.autoattack(f, x, y, eps=0.05, seed=seed, batch_size=bs, **SMALL_AA)
          for seed, bs in ((0, 8), (0, 4), (1, 8))}
  return x, y, runs


def test_autoattack_stays_in_ball_and_box_and_reports_consistently(tiny_aa):
  x, y, runs = tiny_aa
  res = runs[0, 8]
  assert_in_ball_and_box(res['x_adv'], x, 0.05, 'linf')   # l_2 components are checked on linear models above
  acc = res['robust_accuracy']
  assert list(acc) == ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  assert all(a >= b for a, b in zip(list(acc.values()), list(acc.values())[1:]))
  assert acc['square'] == res['final_robust_accuracy'] == res['robust'].mean() < acc['clean']
  assert list(res['broken_by'][:3]) == ['clean'] * 3
  broken = res['broken_by'] != ''
  assert np.all(broken == ~res['robust'])
  assert np.all(np.asarray(tiny_model()(res['x_adv'])).argmax(1)[broken] != y[broken])
  np.testing.assert_array_equal(res['x_adv'][~broken], x[~broken])
  assert res['warnings'] == []


def test_same_seed_identical_examples_and_batch_size_does_not_matter(tiny_aa):
  f = tiny_model()
  x, y, runs = tiny_aa
  again = attacks.autoattack(f, x, y, eps=0.05, seed=0, batch_size=8, **SMALL_AA)
  np.testing.assert_array_equal(runs[0, 8]['x_adv'], again['x_adv'])             # bitwise identical
  # Batch size 4 vs 8: the ensemble and every component alone give the same examples and accuracies.
  for field in ('x_adv', 'robust', 'broken_by'):
    np.testing.assert_array_equal(runs[0, 4][field], runs[0, 8][field], err_msg=field)
  assert runs[0, 4]['robust_accuracy'] == runs[0, 8]['robust_accuracy']
  for name in ensemble.STANDARD:
    alone = [attacks.autoattack(f, x, y, eps=0.05, batch_size=bs, attacks=[name], n_restarts=1, run_checks=False,
                                **SMALL_AA) for bs in (4, 8)]
    assert alone[0]['robust_accuracy'] == alone[1]['robust_accuracy'], name
    np.testing.assert_array_equal(alone[0]['x_adv'], alone[1]['x_adv'], err_msg=name)
    assert alone[0]['final_robust_accuracy'] >= runs[0, 8]['final_robust_accuracy']
  assert not np.array_equal(runs[0, 8]['x_adv'], runs[1, 8]['x_adv'])              # the seed matters
  # The jitted cores (as compiled by the runs above): an example's result does not depend on its batch when its
  # global index is passed.
  key = jax.random.PRNGKey(5)
  for name in ensemble.STANDARD:
    fn = ensemble.attack_fn(name, f, norm='linf', **SMALL_AA, n_restarts=1)
    full = fn(x[:8], y[:8], key, np.arange(8), 0.05)
    np.testing.assert_array_equal(full[4:], fn(x[4:8], y[4:8], key, np.arange(4, 8), 0.05), err_msg=name)


def test_run_batched_pads_to_powers_of_two():
  assert [batching.padded_size(m, 256) for m in (1, 8, 9, 100, 256)] == [8, 8, 16, 128, 256]
  assert batching.padded_size(100, 64) == 64
  seen = []
  out = batching.run_batched(lambda a: (seen.append(a.shape[0]), a * 2)[1], [np.arange(21.0)], 16)
  np.testing.assert_array_equal(out, np.arange(21.0) * 2)
  assert seen == [16, 8]


# --------------------------------------------------------------------------------- inference guard


def test_training_mode_models_are_refused():
  x, y = model_batch(4)
  f = tiny_model()
  attacks.check_inference_mode(f, x)

  def batch_norm_train(z):   # normalises with the batch's own statistics
    h = f(z)
    return (h - h.mean(0)) / (h.std(0) + 1e-5)

  with pytest.raises(ValueError, match='depends on the other examples'):
    attacks.check_inference_mode(batch_norm_train, x)
  marked = lambda z: f(z)
  marked.inference_mode = False
  with pytest.raises(ValueError, match='inference_mode=False'):
    attacks.autoattack(marked, x, y, eps=0.03)

  def apply(z, train):
    return (f(z), {'batch_stats': 0}) if train else f(z)

  with pytest.raises(ValueError, match='train=True'):
    attacks.check_inference_mode(functools.partial(apply, train=True), x)
  with pytest.raises(ValueError, match='one logits array'):
    attacks.check_inference_mode(lambda z: apply(z, True), x)


# ------------------------------------------------------------------------------------------- checks


def test_sanity_checks_flag_what_they_should():
  f = tiny_model()
  x, y = model_batch(8)
  assert checks.check_randomized(f, x, y) is None
  noisy = lambda z: f(z) + np.random.randn(len(z), 10)   # a host-side random forward pass
  assert 'randomised' in checks.check_randomized(noisy, x, y)
  assert checks.check_range_output(f, x) is None
  assert 'probability' in checks.check_range_output(lambda z: jax.nn.softmax(f(z)), x)
  assert checks.check_zero_gradients(f, x, y) is None
  masked = lambda z: f(jnp.round(z))            # piecewise-constant input: zero gradient everywhere
  y_masked = np.asarray(masked(x)).argmax(1)
  y_masked[:3] = (y_masked[:3] + 1) % 10        # misclassified points are not counted
  assert '5 points have a zero input gradient' in checks.check_zero_gradients(masked, x, y_masked)
  assert checks.check_n_classes(10, ensemble.STANDARD, 9, 9) is None
  assert 'apgd-t uses 9 target classes' in checks.check_n_classes(5, ensemble.STANDARD, 9, 9)
  assert 'undefined' in checks.check_n_classes(3, ensemble.STANDARD, 2, 2)
  assert checks.check_square_sr({'clean': 0.9, 'apgd-ce': 0.5, 'square': 0.5}) is None
  assert 'gradient masking' in checks.check_square_sr({'clean': 0.9, 'apgd-ce': 0.5, 'square': 0.4})


def test_autoattack_warns_on_gradient_masking():
  f = tiny_model()
  masked = lambda z: f(jnp.round(z * 4) / 4)    # white-box attacks see zero gradients
  x, _ = model_batch(16)
  y = np.asarray(masked(x)).argmax(1)
  with pytest.warns(attacks.AttackWarning) as record:
    res = attacks.autoattack(masked, x, y, eps=0.2, attacks=['apgd-ce', 'square'], n_iter=5, n_queries=100)
  messages = ' '.join(str(r.message) for r in record)
  assert '16 points have a zero input gradient' in messages
  # APGD only gets its random start; the black-box search succeeds where it failed.
  assert res['robust_accuracy']['square'] < res['robust_accuracy']['apgd-ce'] - 0.1
  assert 'Square (black-box) lowered robust accuracy' in messages


# ------------------------------------------------------------------------------------------ transfer


def test_transfer_matrix():
  f, g = tiny_model(), tiny_model(seed=7)
  x, y = model_batch(16)
  res = attacks.transfer_matrix({'f': f, 'g': g}, x, y, eps=0.1, steps=5)
  acc = res['accuracy']
  assert res['names'] == ['f', 'g'] and res['clean']['f'] == 1.0
  # The diagonal is the white-box attack: the same PGD run directly.
  x_adv = jit_attack(attacks.pgd, f, x, y, jax.random.PRNGKey(0), idx=np.arange(16), eps=0.1, step_size=0.025,
                     steps=5)
  assert acc['f']['f'] == np.mean(np.asarray(f(x_adv)).argmax(1) == y) < 1.0
  assert acc['f']['g'] == np.mean(np.asarray(g(x_adv)).argmax(1) == y)
  assert acc['g']['g'] <= acc['f']['g']   # white-box beats transfer


def test_restarts_are_the_reference_versions(monkeypatch):
  """pyautoattack's AutoAttack: 'standard' sets APGD and FAB to 1 restart, 'plus' to 5, and version 'custom' (a
  list of attacks) keeps the constructor's 5; APGD-T, FAB-T and Square take no restarts argument."""
  calls = []

  def spy(name, logits_fn, **kw):
    calls.append((name, kw.get('n_restarts')))
    return lambda x, y, key, idx, eps: x   # no attack: only the wiring is under test
  monkeypatch.setattr(ensemble, 'attack_fn', spy)
  f = tiny_model()
  x, y = model_batch(4)
  y = np.asarray(f(x)).argmax(1)  # all clean-correct, so every attack runs
  for kwargs, restarts in ((dict(), 1), (dict(version='plus'), 5), (dict(attacks=['fab-t', 'fab', 'apgd-dlr']), 5),
                           (dict(version='plus', n_restarts=2), 2)):
    calls.clear()
    attacks.autoattack(f, x, y, eps=0.05, run_checks=False, **kwargs)
    assert calls and {r for _, r in calls} == {restarts}, (kwargs, calls)


def test_bad_arguments_raise_clear_errors():
  f = tiny_model()
  x, y = model_batch(4)
  with pytest.raises(ValueError, match="unknown norm 'l1'"):
    attacks.pgd(f, x, y, jax.random.PRNGKey(0), eps=0.1, step_size=0.1, steps=1, norm='l1')
  with pytest.raises(ValueError, match='unknown attack loss'):
    attacks.pgd(f, x, y, jax.random.PRNGKey(0), eps=0.1, step_size=0.1, steps=1, loss='hinge')
  with pytest.raises(ValueError, match='unknown AutoAttack component'):
    attacks.autoattack(f, x, y, eps=0.1, attacks=['apgd-ce', 'deepfool'])
  with pytest.raises(ValueError, match='as many labels'):
    attacks.autoattack(f, x, y[:2], eps=0.1)
  with pytest.raises(ValueError, match=r'images must be floats in \[0, 1\], got uint8 .*divide uint8 images by 255'):
    attacks.autoattack(f, np.asarray(np.asarray(x) * 255, np.uint8), y, eps=0.1)
  with pytest.raises(ValueError, match='at least 5x5 pixels'):
    attacks.square(f, x[:, :4, :4], y, jax.random.PRNGKey(0), eps=0.1, norm='l2')
