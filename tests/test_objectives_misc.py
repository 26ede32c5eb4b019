"""Feature distortion (RNAS), OoD KL (E2RNAS) and resource objectives (E2RNAS) vs hand / scipy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special
from scipy import stats

from jaxnas.objectives import distortion
from jaxnas.objectives import ood
from jaxnas.objectives import resources


def test_distortion_zero_for_identical_and_shift_invariant(x64):
  rng = np.random.default_rng(0)
  feats = [rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((2, 2, 2, 6))]
  assert float(distortion.feature_distortion(feats, feats)) == pytest.approx(0.0, abs=1e-15)
  shifted = [f + rng.standard_normal((2, 1, 1, f.shape[-1])) for f in feats]  # per-(example, channel) shift
  assert float(distortion.feature_distortion(feats, shifted)) == pytest.approx(0.0, abs=1e-13)
  adv = [f + 0.3 * rng.standard_normal(f.shape) for f in feats]
  assert float(distortion.feature_distortion(feats, adv)) > 0


def test_distortion_hand_value(x64):
  # One example, one channel, two positions: p = softmax(0, log 3) = (1/4, 3/4), q = softmax(0, 0) = (1/2, 1/2).
  clean = jnp.array([0.0, np.log(3.0)]).reshape(1, 1, 2, 1)
  adv = jnp.zeros((1, 1, 2, 1))
  expected = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
  assert float(distortion.feature_distortion([clean], [adv])) == pytest.approx(expected, rel=1e-12)


def test_distortion_means_match_scipy(x64):
  rng = np.random.default_rng(1)
  clean = [rng.standard_normal((3, 2, 3, 4)), rng.standard_normal((3, 4, 1, 2))]
  adv = [c + rng.standard_normal(c.shape) for c in clean]
  cells = []
  for c, a in zip(clean, adv):
    b, h, w, ch = c.shape
    p = special.softmax(c.reshape(b, h * w, ch), axis=1)
    q = special.softmax(a.reshape(b, h * w, ch), axis=1)
    per_channel = np.array([[stats.entropy(p[i, :, k], q[i, :, k]) for k in range(ch)] for i in range(b)])
    np.testing.assert_allclose(distortion.channel_distortion(c, a), per_channel.mean(0), rtol=1e-10)
    cells.append(per_channel.mean())  # Eq. 5: mean over channels (and the expectation over examples)
  assert float(distortion.feature_distortion(clean, adv)) == pytest.approx(np.mean(cells), rel=1e-10)
  with pytest.raises(ValueError, match='differ in shape'):
    distortion.channel_distortion(clean[0], adv[1])
  with pytest.raises(ValueError, match='one adversarial feature map per clean one'):
    distortion.feature_distortion(clean, adv[:1])


def test_ood_kl_to_uniform_matches_scipy(x64):
  rng = np.random.default_rng(2)
  logits = 3.0 * rng.standard_normal((6, 10))
  uniform = np.full(10, 0.1)
  expected = np.mean([stats.entropy(uniform, special.softmax(l)) for l in logits])
  assert float(ood.ood_kl_uniform(jnp.asarray(logits))) == pytest.approx(expected, rel=1e-12)
  assert float(ood.ood_kl_uniform(jnp.full((2, 10), 4.2))) == pytest.approx(0.0, abs=1e-14)
  with pytest.raises(ValueError, match=r'\[B, K\]'):
    ood.ood_kl_uniform(jnp.zeros(10))


def test_resources_softmax_weighted_and_one_hot(x64):
  rng = np.random.default_rng(3)
  alphas = {'normal': rng.standard_normal((14, 8)), 'reduce': rng.standard_normal((14, 8))}
  costs = {'normal': rng.uniform(0, 1, (14, 8)), 'reduce': rng.uniform(0, 1, 8)}  # per-edge / per-op tables
  expected = sum(np.sum(special.softmax(alphas[k], axis=-1) * costs[k]) for k in alphas)
  value = jax.jit(resources.expected_cost)(alphas, costs)
  assert float(value) == pytest.approx(expected, rel=1e-12)
  assert float(resources.resource_objective(alphas, costs, expected + 0.5)) == pytest.approx(0.5, rel=1e-9)
  # One-hot alphas: the cost of the derived architecture (argmax op on every edge).
  ops = {k: rng.integers(0, 8, 14) for k in alphas}
  one_hot = {k: 1e3 * np.eye(8)[ops[k]] for k in alphas}
  counted = costs['normal'][np.arange(14), ops['normal']].sum() + costs['reduce'][ops['reduce']].sum()
  assert float(resources.expected_cost(one_hot, costs)) == pytest.approx(counted, rel=1e-12)
  grad = jax.grad(lambda a: resources.resource_objective(a, costs, 0.0))(alphas)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
  with pytest.raises(ValueError, match='same pytree structure'):
    resources.expected_cost(alphas, {'normal': costs['normal']})
