"""The registered objectives of the robust methods against independent references, as the search builds them.

E2RNAS' resources with ``network=(C, layers)`` vs the counted parameters / MACs of the derived evaluation
network (``analysis`` on ``networks.EvalNetwork``); AdvRush's curvature objective (each estimator) vs
explicit input Hessians (``jax.hessian``) of a tiny model in float64. The module-level math (curvature,
Jacobian, distortion, OoD, min-norm, MGDA, projection) is tested in test_objectives_*.py and test_combine.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import analysis, genotypes, networks, search_space
from jaxnas.objectives import compose, distortion

# ------------------------------------------------------------------------------------------------
# E2RNAS: params / FLOPs of the derived network.
# ------------------------------------------------------------------------------------------------
SHAPE = (8, 8, 3)


def _one_hot_alphas(rng, space, steps=4):
  """Alphas peaked on a random op (not 'none') on two random inputs of every node and on 'none' elsewhere,
  and the chosen ``{node: {(op, input)}}`` per cell type."""
  primitives, none = space.primitives, space.primitives.index('none')
  alphas, chosen = {}, {}
  for t in space.cell_types:
    rows, picks = [], {}
    for node in range(steps):
      kept = rng.choice(node + 2, 2, replace=False)
      picks[node] = set()
      for j in range(node + 2):
        op = int(rng.choice([o for o in range(len(primitives)) if o != none])) if j in kept else none
        rows.append(np.where(np.arange(len(primitives)) == op, 40.0, -40.0))
        if j in kept:
          picks[node].add((primitives[op], j))
    alphas[t], chosen[t] = np.stack(rows), picks
  return alphas, chosen


@pytest.mark.parametrize('network', [(4, 5), (2, 3)])
def test_resources_with_one_hot_alphas_count_the_derived_network(network):
  model = search_space.Supernet(init_channels=2, layers=3, num_classes=10)  # the alphas' supernet
  alphas, chosen = _one_hot_alphas(np.random.default_rng(sum(network)), model.space)
  genotype = model.derive(alphas)
  for t in model.space.cell_types:  # the derivation keeps exactly the chosen edges
    assert {n: {genotype[t][2 * n], genotype[t][2 * n + 1]} for n in range(4)} == chosen[t]
  net = networks.EvalNetwork(genotype, init_channels=network[0], layers=network[1], num_classes=10)
  counted = {'params': analysis.count_params(net, (1,) + SHAPE), 'flops': analysis.count_macs(net, (1,) + SHAPE)}
  for kind, count in counted.items():
    spec = compose.spec_from_config({'name': kind, 'kwargs': {'scale': 1.0, 'lower_bound': 100.0,
                                                              'network': network}}, kind)
    value, aux = compose.build(spec, model, SHAPE)(None, {}, {t: jnp.asarray(a) for t, a in alphas.items()},
                                                   {}, None)
    assert float(aux.metrics['expected']) == pytest.approx(count, rel=1e-6), kind
    assert float(value) == pytest.approx(abs(count - 100.0), rel=1e-6), kind


def test_resources_network_errors():
  model = search_space.Supernet(init_channels=2, layers=3, num_classes=10, steps=3, multiplier=3)
  with pytest.raises(ValueError, match='evaluation network has 4 nodes per cell'):
    compose.op_costs(model, SHAPE, 'params', network=(2, 3))
  with pytest.raises(ValueError, match=r'give \(init_channels, layers\)'):
    compose.derived_network(search_space.Supernet(), (36,), genotypes.get('DARTS_V2'))


# ------------------------------------------------------------------------------------------------
# AdvRush: the curvature objective vs explicit input Hessians.
# ------------------------------------------------------------------------------------------------
B, D, K = 3, 6, 4


class _TinyModel:
  """``Supernet.apply``'s signature over a tiny net whose hidden activation is a softmax(alpha) mixture of
  tanh and sin. With ``batch_stats`` (``mean``, ``var``) its hidden layer is normalised like BatchNorm: by the
  batch's statistics in train mode, by the stored ones in eval mode; without, train and eval mode agree."""

  def apply(self, variables, alphas, x, train=False, return_features=False):
    p, stats = variables['params'], variables['batch_stats']
    w = jax.nn.softmax(alphas['normal'])
    hidden = x.reshape(x.shape[0], -1) @ p['w1']
    if stats:
      mean, var = (jnp.mean(hidden, 0), jnp.var(hidden, 0)) if train else (stats['mean'], stats['var'])
      hidden = (hidden - mean) / jnp.sqrt(var + 1e-5)
    features = w[0] * jnp.tanh(hidden) + w[1] * jnp.sin(hidden)
    out = (features @ p['w2'],) + ((stats,) if train else ())
    out += ([features[:, None, :, None]],) if return_features else ()  # one "cell": [B, 1, 5, 1]
    return out if len(out) > 1 else out[0]


def _curvature_problem():
  rng = np.random.default_rng(0)
  params = {'w1': jnp.asarray(rng.standard_normal((D, 5))), 'w2': jnp.asarray(rng.standard_normal((5, K)))}
  alphas = {'normal': jnp.asarray(rng.standard_normal(2))}
  batch = {'image': jnp.asarray(rng.uniform(0, 1, (B, 2, 3))), 'label': jnp.asarray(rng.integers(0, K, B)),
           'epoch': jnp.int32(7)}
  return params, alphas, batch


def _running_stats():
  return {'mean': jnp.asarray([0.5, -0.2, 0.1, 0.0, 0.3]), 'var': jnp.asarray([1.5, 0.8, 2.0, 1.0, 0.6])}


def _hessians(params, alphas, batch, batch_stats):
  """Per-example D x D input Hessians of the cross-entropy by jax.hessian (the model in eval mode, each
  example alone), and the input gradients."""
  model = _TinyModel()

  def loss(xi, yi):
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, alphas, xi[None])
    return -jax.nn.log_softmax(logits)[0, yi]
  x = batch['image']
  hess = jax.vmap(jax.hessian(loss))(x, batch['label']).reshape(B, D, D)
  grads = jax.vmap(jax.grad(loss))(x, batch['label']).reshape(B, D)
  return np.asarray(hess), np.asarray(grads)


def _objective(**kwargs):
  spec = compose.spec_from_config({'name': 'curvature', 'start_epoch': 5, 'kwargs': kwargs}, 'x')
  return jax.jit(compose.build(spec, _TinyModel(), (2, 3)))


def test_curvature_objective_estimators_match_explicit_hessians(x64):
  """In inference mode (running statistics, as the original's ``net.eval()``), with ``h`` indexed by the search
  epoch (the original's ``h_all[epoch]``), not counted from the objective's start epoch."""
  params, alphas, batch = _curvature_problem()
  stats = _running_stats()
  hess, grads = _hessians(params, alphas, batch, stats)
  ramp = tuple(0.1 * k for k in range(9))  # epoch 7: h = 0.7 (counted from start_epoch 5 it would be 0.2)
  z = 0.7 * np.sign(grads) / np.sqrt(D)  # the CURE direction, ||z_i|| = h
  exact = np.mean(np.linalg.norm(np.einsum('bij,bj->bi', hess, z), axis=1))
  args = (params, stats, alphas, batch, jax.random.key(0))
  value, aux = _objective(h=ramp, estimator='hvp')(*args)
  assert float(aux.metrics['h']) == pytest.approx(0.7) and float(value) == pytest.approx(exact, rel=1e-10)
  # The batch's statistics would give another value (and couple the examples' input gradients).
  train_value, _ = _objective(h=ramp, estimator='hvp', mode='train', direction_mode='train')(*args)
  assert abs(float(train_value) - exact) > 0.01 * exact
  # The finite difference converges to it at O(h) (Eq. 10 -> Eq. 9 as h -> 0, z scaled with h).
  errors = []
  for h in (1e-2, 1e-3):
    fd, _ = _objective(h=h)(*args)
    errors.append(abs(float(fd) / h - exact / 0.7) / (exact / 0.7))
  assert errors[1] < 2e-3 and errors[1] < 0.2 * errors[0]
  # Hutchinson: unbiased for mean_i ||H_i||_F^2 (many single-probe draws, within 4 standard errors).
  frobenius = np.mean(np.sum(hess**2, axis=(1, 2)))
  one = compose.build(compose.spec_from_config({'name': 'curvature', 'kwargs': {'estimator': 'frobenius'}}, 'x'),
                      _TinyModel(), (2, 3))
  draws = np.asarray(jax.jit(jax.vmap(lambda k: one(params, stats, alphas, batch, k)[0]))(
      jax.random.split(jax.random.key(1), 4000)))
  assert abs(draws.mean() - frobenius) < 4 * draws.std(ddof=1) / np.sqrt(draws.size)
  with pytest.raises(ValueError, match="curvature estimator='cure'"):
    _objective(estimator='cure')



# ------------------------------------------------------------------------------------------------
# RNAS: the projection's constraint keeps the adversarial examples of its starting alphas.
# ------------------------------------------------------------------------------------------------
def test_fixed_adversarial_examples_make_the_distortion_a_function_of_alpha(x64):
  params, alphas, batch = _curvature_problem()
  model, key = _TinyModel(), jax.random.key(3)
  spec = compose.spec_from_config({'name': 'distortion', 'kwargs': {'eps': 0.1, 'steps': 3, 'mode': 'eval',
                                                                    'attack_mode': 'eval'}}, 'x')
  fn = jax.jit(compose.build(spec, model, (2, 3)))
  fixed = compose.fix_adversarial(spec, model, (2, 3), params, {}, alphas, batch, key)
  assert 0 < float(np.max(np.abs(fixed['adv_image'] - batch['image']))) <= 0.1 + 1e-12  # in the eps ball
  # At the starting alphas the fixed examples are the ones the objective draws itself.
  start = float(fn(params, {}, alphas, batch, key)[0])
  assert start > 0 and float(fn(params, {}, alphas, fixed, key)[0]) == pytest.approx(start, rel=1e-12)
  # Elsewhere: the distortion between the clean and those fixed examples' features at the new alphas.
  moved = {'normal': alphas['normal'] + jnp.array([0.7, -0.4])}
  features = lambda x: model.apply({'params': params, 'batch_stats': {}}, moved, x, return_features=True)[1]
  expected = distortion.feature_distortion(features(batch['image']), features(fixed['adv_image']))
  assert float(fn(params, {}, moved, fixed, key)[0]) == pytest.approx(float(expected), rel=1e-12)
  ce = compose.spec_from_config({'name': 'ce'}, 'x')
  assert compose.fix_adversarial(ce, model, (2, 3), params, {}, alphas, batch, key) is batch
