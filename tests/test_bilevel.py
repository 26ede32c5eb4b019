"""Bi-level steps: second-order hypergradient vs the exact gradient through the unroll, optimizer semantics
(PyTorch SGD/Adam formulas), combiners, adversarial objectives and the no-retrace property.

A tiny mixed-op model with BatchNorm-like running statistics stands in for the supernet (same ``apply``
signature), so everything here runs in seconds; the supernet itself is exercised in test_main.py.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnas import bilevel, schedules
from jaxnas.attacks import pgd_attack
from jaxnas.objectives import compose


@dataclasses.dataclass(frozen=True)
class ToyNet:
  """Two mixed edges: hidden = sum_o softmax(a0)_o op_o(x) (linear, tanh, zero), batch-normalised in train
  mode (running mean updated), logits = sum_o softmax(a1)_o op_o(hidden). Features: [hidden]."""
  hidden: int = 5
  num_classes: int = 3

  def init(self, rng, x):
    d = int(np.prod(x.shape[1:]))
    k = jax.random.split(rng, 4)
    init = lambda key, shape: jax.random.normal(key, shape, x.dtype) / np.sqrt(shape[0])
    params = {'w0': init(k[0], (d, self.hidden)), 'w1': init(k[1], (d, self.hidden)),
              'v0': init(k[2], (self.hidden, self.num_classes)), 'v1': init(k[3], (self.hidden, self.num_classes))}
    return {'params': params, 'batch_stats': {'mean': jnp.zeros((self.hidden,), x.dtype)}}

  def init_alphas(self, rng):
    return {'normal': 1e-3 * jax.random.normal(rng, (2, 3))}

  def apply(self, variables, alphas, x, train=False, return_features=False):
    p, s = variables['params'], variables['batch_stats']
    a = jax.nn.softmax(alphas['normal'], axis=-1).astype(x.dtype)
    x = x.reshape(x.shape[0], -1)
    h = a[0, 0] * (x @ p['w0']) + a[0, 1] * jnp.tanh(x @ p['w1'])
    if train:
      mean = jnp.mean(h, axis=0)
      new_s = {'mean': jax.lax.stop_gradient(0.9 * s['mean'] + 0.1 * mean)}
    else:
      mean, new_s = s['mean'], s
    h = h - mean
    logits = a[1, 0] * (h @ p['v0']) + a[1, 1] * jnp.tanh(h @ p['v1'])
    out = (logits, new_s) if train else (logits,)
    out = out + ([h[:, None, None, :]],) if return_features else out
    return out if len(out) > 1 else out[0]


def _batch(rng, n=8, shape=(2, 2, 1), k=3, dtype=jnp.float32):
  kx, ky = jax.random.split(rng)
  return {'image': jax.random.uniform(kx, (n,) + shape, dtype), 'label': jax.random.randint(ky, (n,), 0, k),
          'epoch': jnp.int32(0)}


def _uint8(batch):
  return {**batch, 'image': jnp.round(batch['image'] * 255).astype(jnp.uint8)}


def _spec(name, label=None, weight=1.0, **kwargs):
  return compose.spec_from_config({'name': name, 'label': label or name, 'weight': weight, 'kwargs': kwargs}, 'test')


# ------------------------------------------------------------------------------------------------
# Second-order architecture gradient vs the exact hypergradient.
# ------------------------------------------------------------------------------------------------
def _toy_losses(net, batch_stats, train, val):
  def lower(w, a):
    logits, _ = net.apply({'params': w, 'batch_stats': batch_stats}, a, train['image'], train=True)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, train['label']))

  def upper(w, a):
    logits, _ = net.apply({'params': w, 'batch_stats': batch_stats}, a, val['image'], train=True)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, val['label'])), {}
  return lower, upper


def _toy_problem(dtype):
  net = ToyNet()
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  train, val = _batch(keys[0], dtype=dtype), _batch(keys[1], dtype=dtype)
  variables = net.init(keys[2], train['image'])
  alphas = {'normal': jax.random.normal(keys[3], (2, 3), dtype)}
  buf = jax.tree.map(lambda w: 0.1 * jnp.ones_like(w), variables['params'])
  return net, variables, alphas, buf, train, val


def test_second_order_exact_hvp_is_the_gradient_through_the_unroll(x64):
  net, variables, alphas, buf, train, val = _toy_problem(jnp.float64)
  lower, upper = _toy_losses(net, variables['batch_stats'], train, val)
  w, xi, momentum, wd = variables['params'], 0.3, 0.9, 3e-4
  unroll = lambda a: bilevel.unrolled_weights(lower, w, a, buf, xi, momentum, wd)

  @jax.jit
  def grads(a):
    reference = jax.grad(lambda a_: upper(unroll(a_), a_)[0])(a)['normal']
    exact = bilevel.unrolled_arch_grad(lower, upper, w, a, unroll(a), xi, 'exact')[0]['normal']
    fd = bilevel.unrolled_arch_grad(lower, upper, w, a, unroll(a), xi, 'finite_difference')[0]['normal']
    partial = jax.grad(lambda a_: upper(unroll(a), a_)[0])(a)['normal']
    return reference, exact, fd, partial

  reference, exact, fd, partial = grads(alphas)
  np.testing.assert_allclose(exact, reference, rtol=1e-10, atol=1e-14)
  # The second-order term itself (hypergradient minus the partial gradient at w'): DARTS' central difference
  # with radius 0.01 matches it up to O(radius^2).
  term = reference - partial
  assert np.max(np.abs(term)) > 1e-6
  np.testing.assert_allclose(fd - partial, term, rtol=1e-3, atol=1e-3 * np.max(np.abs(term)))


def test_finite_difference_hvp_exact_for_quadratic_lower_level(x64):
  # L_train(w, a) = 1/2 ||A(a) w - b||^2 is quadratic in w: the central difference of grad_a is exact.
  rng = np.random.default_rng(0)
  A0, A1, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=4)
  lower = lambda w, a: 0.5 * jnp.sum((jnp.tanh(a[0]) * A0 @ w['w'] + a[1] ** 2 * A1 @ w['w'] - b) ** 2)
  upper = lambda w, a: (jnp.sum(jnp.sin(w['w'])) + jnp.sum(a * w['w'][:2]) ** 2, {})
  w, a = {'w': jnp.asarray(rng.normal(size=3))}, jnp.asarray(rng.normal(size=2))
  buf = {'w': jnp.asarray(rng.normal(size=3))}
  unroll = lambda a_: bilevel.unrolled_weights(lower, w, a_, buf, 0.05, 0.9, 3e-4)
  reference = jax.jit(jax.grad(lambda a_: upper(unroll(a_), a_)[0]))(a)
  fd = jax.jit(lambda a_: bilevel.unrolled_arch_grad(lower, upper, w, a_, unroll(a_), 0.05)[0])(a)
  np.testing.assert_allclose(fd, reference, rtol=1e-9)


def test_unrolled_weights_is_the_next_sgd_step_without_clipping(x64):
  net, variables, alphas, _, train, val = _toy_problem(jnp.float64)
  lower, _ = _toy_losses(net, variables['batch_stats'], train, val)
  w = variables['params']
  cfg = bilevel.WeightOptim(momentum=0.9, weight_decay=3e-4, grad_clip=0.0)
  opt = bilevel.weight_optimizer(cfg, 0.1)
  state = opt.init(w)
  g0 = jax.grad(lower)(w, alphas)
  _, state = opt.update(g0, state, w)  # fills the momentum buffer
  buf = bilevel.momentum_buffer(state)
  updates, _ = opt.update(jax.grad(lower)(w, alphas), state, w)
  np.testing.assert_allclose(optax.apply_updates(w, updates)['w0'],
                             bilevel.unrolled_weights(lower, w, alphas, buf, 0.1, 0.9, 3e-4)['w0'], rtol=1e-12)


def test_arch_step_second_order_matches_the_unrolled_objective(x64):
  """The jitted arch_step (Program, objectives, data preparation, momentum buffer, weight decay) equals
  Adam's first step on the exact hypergradient of CE_val(w'(a), a)."""
  net, variables, alphas, _, train, val = _toy_problem(jnp.float64)
  train, val = _uint8(train), _uint8(val)
  program = bilevel.Program(model=net, input_shape=(2, 2, 1), lower=(_spec('ce'),), upper=(_spec('ce'),),
                            arch=bilevel.ArchOptim(order=2, hvp='exact'))
  state = bilevel.init_state(program, jax.random.PRNGKey(0), train['image'])
  state = state.replace(params=variables['params'], alphas=alphas)
  phase = schedules.Phase(('ce',), ('ce',), True, False)
  lr, a_lr = 0.025, 3e-4
  new_state, metrics = bilevel.arch_step(program, phase, state, train, val, {'w_lr': lr, 'a_lr': a_lr})
  to_float = lambda b: {**b, 'image': jnp.asarray(b['image'], jnp.float32) / 255.0}
  lower, upper = _toy_losses(net, state.batch_stats, to_float(train), to_float(val))
  zero_buf = jax.tree.map(jnp.zeros_like, state.params)
  unroll = lambda a: bilevel.unrolled_weights(lower, state.params, a, zero_buf, lr, 0.9, 3e-4)
  hyper = jax.jit(jax.grad(lambda a: upper(unroll(a), a)[0]))(alphas)['normal']
  g = hyper + 1e-3 * alphas['normal']                  # Adam's L2 weight decay, added to the gradient
  m, v = 0.5 * g / (1 - 0.5), 0.001 * g**2 / (1 - 0.999)  # bias-corrected first moments
  expected = alphas['normal'] - a_lr * m / (np.sqrt(v) + 1e-8)
  np.testing.assert_allclose(new_state.alphas['normal'], expected, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(metrics['val/ce'], upper(unroll(alphas), alphas)[0], rtol=1e-10)
  assert int(new_state.step) == int(state.step)


# ------------------------------------------------------------------------------------------------
# Optimizer semantics (PyTorch formulas).
# ------------------------------------------------------------------------------------------------
def test_weight_optimizer_is_torch_sgd_with_clip_grad_norm(x64):
  rng = np.random.default_rng(1)
  w = {'a': jnp.asarray(rng.normal(size=(3, 2))), 'b': jnp.asarray(rng.normal(size=4))}
  cfg = bilevel.WeightOptim(momentum=0.9, weight_decay=3e-4, grad_clip=5.0)
  state = bilevel.weight_optimizer(cfg, 0.0).init(w)
  w_ref = {k: np.asarray(v) for k, v in w.items()}
  buf = {k: np.zeros_like(v) for k, v in w_ref.items()}
  for t, (scale, lr) in enumerate([(10.0, 0.025), (0.1, 0.02), (30.0, 0.01)]):
    g = {k: scale * rng.normal(size=v.shape) for k, v in w_ref.items()}
    updates, state = bilevel.weight_optimizer(cfg, lr).update(jax.tree.map(jnp.asarray, g), state, w)
    w = optax.apply_updates(w, updates)
    # torch: clip_grad_norm_(max 5, eps 1e-6), then SGD: d = g + wd w; buf = m buf + d; w -= lr buf.
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    coef = min(1.0, 5.0 / (norm + 1e-6))
    for k in w_ref:
      d = coef * g[k] + 3e-4 * w_ref[k]
      buf[k] = d if t == 0 else 0.9 * buf[k] + d
      w_ref[k] = w_ref[k] - lr * buf[k]
    for k in w_ref:
      np.testing.assert_allclose(w[k], w_ref[k], rtol=1e-12)


def test_tree_norm_and_all_finite_on_one_vector(x64):
  rng = np.random.default_rng(4)
  tree = {'a': rng.normal(size=(3, 2, 5)), 'b': [rng.normal(size=7), rng.normal(size=())]}
  expected = np.sqrt(sum(np.sum(v**2) for v in jax.tree.leaves(tree)))
  np.testing.assert_allclose(bilevel.tree_norm(jax.tree.map(jnp.asarray, tree)), expected, rtol=1e-14)
  assert bool(bilevel.all_finite(tree))
  for bad in (np.nan, np.inf, -np.inf):
    broken = jax.tree.map(np.copy, tree)
    broken['b'][0][3] = bad
    assert not bool(bilevel.all_finite(broken))
  assert float(bilevel.tree_norm({})) == 0.0 and bool(bilevel.all_finite({}))


def test_arch_optimizer_is_torch_adam_with_l2_weight_decay(x64):
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(14, 8)))
  cfg = bilevel.ArchOptim()
  state = bilevel.arch_optimizer(cfg, 0.0).init(a)
  a_ref, m, v = np.asarray(a), 0.0, 0.0
  for t in range(1, 4):
    g = rng.normal(size=a.shape)
    updates, state = bilevel.arch_optimizer(cfg, 3e-4).update(jnp.asarray(g), state, a)
    a = optax.apply_updates(a, updates)
    d = g + 1e-3 * a_ref
    m, v = 0.5 * m + 0.5 * d, 0.999 * v + 0.001 * d**2
    a_ref = a_ref - 3e-4 * (m / (1 - 0.5**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(a, a_ref, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Combiners and objectives.
# ------------------------------------------------------------------------------------------------
def test_combine_gradients_mgda_min_norm_and_sum():
  g1, g2 = {'a': jnp.array([1.0, 0.0])}, {'a': jnp.array([0.0, 2.0])}
  combine = lambda name, grads, normalize=False: jax.jit(
      lambda gs: compose.combine_gradients(name, gs, normalize))(grads)
  direction, gammas = combine('mgda', [g1, g2])
  # min over gamma of ||gamma g1 + (1 - gamma) g2||^2 = gamma^2 + 4 (1 - gamma)^2: gamma* = 0.8.
  np.testing.assert_allclose(gammas, [0.8, 0.2], rtol=1e-6)
  np.testing.assert_allclose(direction['a'], [0.8, 0.4], rtol=1e-6)
  grid = np.linspace(0, 1, 10001)
  brute = grid[np.argmin(grid**2 + 4 * (1 - grid)**2)]
  np.testing.assert_allclose(gammas[0], brute, atol=1e-4)
  _, gammas_n = combine('min_norm', [g1, g2])
  np.testing.assert_allclose(gammas_n, [0.8, 0.2], atol=1e-5)
  _, gammas_norm = combine('min_norm', [g1, g2], normalize=True)
  np.testing.assert_allclose(gammas_norm, [0.5, 0.5], atol=1e-5)  # equal after l2 normalisation
  direction, _ = combine('sum', [g1, g2])
  np.testing.assert_allclose(direction['a'], [1.0, 2.0])
  with pytest.raises(ValueError, match="'mgda' is the closed form for two objectives, got 3"):
    compose.combine_gradients('mgda', [g1, g2, g1])
  with pytest.raises(ValueError, match="unknown combiner 'avg'"):
    compose.combine_gradients('avg', [g1, g2])


def test_adv_ce_objective_is_ce_on_pgd_examples_of_the_train_mode_network():
  net = ToyNet()
  batch = _batch(jax.random.PRNGKey(0))
  variables = net.init(jax.random.PRNGKey(1), batch['image'])
  alphas = net.init_alphas(jax.random.PRNGKey(2))
  key = jax.random.PRNGKey(4)
  train_logits = lambda x: net.apply(variables, alphas, x, train=True)[0]
  ce = lambda x: optax.softmax_cross_entropy_with_integer_labels(train_logits(x), batch['label']).mean()
  run = lambda spec: compose.build(spec, net, (2, 2, 1))(variables['params'], variables['batch_stats'], alphas,
                                                          batch, key)

  @jax.jit
  def compute():
    loss, aux = run(_spec('adv_ce', eps=0.1, steps=3))
    x_adv = pgd_attack.pgd(train_logits, batch['image'], batch['label'], key, eps=0.1, step_size=0.025, steps=3)
    # FGSM with a random start: one step of 1.25 eps (E2RNAS).
    fgsm = run(_spec('adv_ce', attack='fgsm', eps=0.1))[0]
    x_fgsm = pgd_attack.pgd(train_logits, batch['image'], batch['label'], key, eps=0.1, step_size=0.125,
                            steps=1)
    stats = net.apply(variables, alphas, x_adv, train=True)[1]
    return loss, ce(x_adv), run(_spec('ce'))[0], aux.batch_stats, stats, fgsm, ce(x_fgsm)

  loss, expected, clean, stats, expected_stats, fgsm, expected_fgsm = compute()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert loss > clean  # the attack increases the loss
  # The running statistics come from the train-mode forward pass on the adversarial batch.
  np.testing.assert_allclose(stats['mean'], expected_stats['mean'], rtol=1e-6)
  np.testing.assert_allclose(fgsm, expected_fgsm, rtol=1e-6)


@pytest.mark.parametrize('entry, match', [
    ({'name': 'cee'}, r"unknown objective 'cee': choose one of"),
    ({'name': 'ce', 'eps': 0.1}, r"unknown field 'eps': an objective entry has the fields"),
    ({'name': 'adv_ce', 'kwargs': {'epsilon': 0.1}}, r"objective 'adv_ce' has no argument 'epsilon'"),
])
def test_objective_config_errors(entry, match):
  with pytest.raises(ValueError, match=match):
    compose.spec_from_config(entry, 'config.search.upper[0]')
  with pytest.raises(ValueError, match="two objectives labelled 'ce'"):
    compose.specs_from_config([{'name': 'ce'}, {'name': 'ce'}], 'config.search.upper')


# ------------------------------------------------------------------------------------------------
# Whole steps: weighted lower level, MGDA upper level, no retracing.
# ------------------------------------------------------------------------------------------------
def test_steps_trace_once_search_step_is_both_steps_and_mgda_gammas_are_reported():
  net = ToyNet()
  program = bilevel.Program(model=net, input_shape=(2, 2, 1),
                            lower=(_spec('ce'), _spec('adv_ce', weight=0.5, eps=0.05, steps=1)),
                            upper=(_spec('ce'), _spec('adv_ce', eps=0.05, steps=1)),
                            arch=bilevel.ArchOptim(combiner='mgda'),
                            augment=bilevel.Augment(crop_padding=1, flip=True, fill=(0.5,)))
  state = bilevel.init_state(program, jax.random.PRNGKey(0), np.zeros((8, 2, 2, 1), np.uint8))
  phase = schedules.Phase(('ce', 'adv_ce'), ('ce', 'adv_ce'), True, False)
  before = dict(bilevel.TRACES)
  both = state
  for t in range(3):
    batch = {k: np.asarray(v) for k, v in _uint8(_batch(jax.random.PRNGKey(10 + t))).items()}
    batch['epoch'] = np.int32(t)
    hparams = {'w_lr': np.float32(0.1 / (t + 1)), 'a_lr': np.float32(3e-4)}
    state, arch_metrics = bilevel.arch_step(program, phase, state, batch, batch, hparams)
    state, metrics = bilevel.weight_step(program, phase, state, batch, hparams)
    both, both_metrics = bilevel.search_step(program, phase, both, batch, batch, hparams)
    # The one-program search step is the architecture step followed by the weight step.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), both, state)
    assert both_metrics.keys() == {**arch_metrics, **metrics}.keys()
    for k, v in {**arch_metrics, **metrics}.items():
      np.testing.assert_allclose(both_metrics[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
  traced = {k: bilevel.TRACES[k] - before.get(k, 0) for k in ('arch_step', 'weight_step', 'search_step')}
  assert traced == {'arch_step': 2, 'weight_step': 2, 'search_step': 1}  # each alone and inside search_step
  assert int(state.step) == 3
  gammas = float(arch_metrics['arch/gamma_ce']), float(arch_metrics['arch/gamma_adv_ce'])
  assert 0.0 <= gammas[0] <= 1.0 and abs(sum(gammas) - 1.0) < 1e-6
  np.testing.assert_allclose(metrics['train/loss'], metrics['train/ce'] + 0.5 * metrics['train/adv_ce'],
                             rtol=1e-5)


def test_projection_hook_makes_the_alphas_feasible():
  net = ToyNet()
  batch = _uint8(_batch(jax.random.PRNGKey(5)))
  base = bilevel.Program(model=net, input_shape=(2, 2, 1), lower=(_spec('ce'),), upper=(_spec('ce'),))
  state = bilevel.init_state(base, jax.random.PRNGKey(0), batch['image'])
  state = state.replace(alphas={'normal': 2.0 * jax.random.normal(jax.random.PRNGKey(6), (2, 3))})
  hparams = {'w_lr': np.float32(0.025), 'a_lr': np.float32(3e-4)}
  constraint_spec = compose.spec_from_config({'name': 'ce', 'label': 'constraint'}, 'config.arch.projection')
  constraint = jax.jit(lambda a: compose.build(constraint_spec, net, (2, 2, 1))(
      state.params, state.batch_stats, a, {**batch, 'image': jnp.asarray(batch['image'], jnp.float32) / 255.0},
      None)[0])
  free, _ = bilevel.arch_step(base, schedules.Phase(('ce',), ('ce',), True, False), state, batch, batch, hparams)
  bound = float(constraint(free.alphas)) - 0.05  # infeasible without the projection
  program = dataclasses.replace(base, projection=bilevel.Projection(constraint_spec, bound, 30, 20))
  projected, metrics = bilevel.arch_step(program, schedules.Phase(('ce',), ('ce',), True, True), state, batch,
                                         batch, hparams)
  assert float(constraint(projected.alphas)) <= bound + 1e-5
  np.testing.assert_allclose(metrics['arch/constraint'], constraint(projected.alphas), rtol=1e-5)
  # The Adam state is the unprojected step's; only the alphas moved onto the constraint set.
  np.testing.assert_array_equal(jax.tree.leaves(projected.a_opt_state)[1], jax.tree.leaves(free.a_opt_state)[1])
