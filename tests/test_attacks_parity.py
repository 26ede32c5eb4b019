"""Parity of jaxnas.attacks with the reference AutoAttack (PyPI ``pyautoattack``, PyTorch) on identical weights.

Runs only where torch and pyautoattack are installed (``.ci/run`` installs both).

- The deterministic parts must agree example by example: given the same random start an APGD run has no other
  randomness, and FAB-T none at all. Checked in float64 on a small trained CNN (same weights on both sides),
  and in float32 on the trained DARTS_V2 network of ``../shared/fixtures``.
- The ensemble draws different random numbers on each side (and the reference's Square shares its windows
  across the batch): robust accuracies after each attack must agree within 2 points.
- Building blocks against the reference's: DLR losses, hyperplane projections, APGD checkpoints, Square windows
  and the l_2 Square pattern.
"""
import copy
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('pyautoattack')

from pyautoattack import fab_projections  # noqa: E402
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # noqa: E402
from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402
from pyautoattack.square import SquareAttack  # noqa: E402

from jaxnas import attacks  # noqa: E402
from jaxnas.attacks import apgd_attack, ball, ensemble, fab_attack, losses, square_attack  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import autoattack_parity  # noqa: E402  pylint: disable=g-import-not-at-top

TOL = 0.02
TORCH_NORM = autoattack_parity.TORCH_NORM


@pytest.fixture(autouse=True, scope='module')
def one_torch_thread():
  """The reference runs single-threaded (multi-threaded small CPU kernels only spin on a shared machine)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------ building blocks


def test_dlr_losses_match_reference(x64):
  rng = np.random.RandomState(0)
  z = rng.randn(64, 10) * 3
  z[:8, 3] = z[:8].max(1) + 1.0                      # label is the most likely class on the first rows
  y, y_target = np.full(64, 3), rng.randint(0, 10, 64)
  ref = APGDAttack_targeted(None, eps=0.1)
  ref.y_target = torch.tensor(y_target)
  np.testing.assert_allclose(losses.dlr_loss(jnp.asarray(z), jnp.asarray(y)),
                             ref.dlr_loss(torch.tensor(z), torch.tensor(y)).numpy(), rtol=1e-12)
  np.testing.assert_allclose(losses.dlr_loss_targeted(jnp.asarray(z), jnp.asarray(y), jnp.asarray(y_target)),
                             ref.dlr_loss_targeted(torch.tensor(z), torch.tensor(y)).numpy(), rtol=1e-12)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_hyperplane_projection_matches_reference(norm):
  rng = np.random.RandomState(0)
  n, dim = 64, 50
  t = rng.rand(n, dim).astype(np.float32)
  w = rng.randn(n, dim).astype(np.float32)
  w[:4, :10] = 0.0
  b = ((w * t).sum(1) + rng.randn(n) * np.abs(w).sum(1) * rng.choice([0.01, 0.1, 1.0], n)).astype(np.float32)
  ref_fn = fab_projections.projection_linf if norm == 'linf' else fab_projections.projection_l2
  ref = ref_fn(torch.tensor(t), torch.tensor(w), torch.tensor(b)).numpy()
  ours = jax.jit(fab_attack.project_hyperplane_box, static_argnums=3)(t, w, b, norm)
  np.testing.assert_allclose(ours, ref, atol=2e-5)


@pytest.mark.parametrize('n_iter', [10, 37, 100, 250])
def test_apgd_checkpoints_match_reference_counters(n_iter):
  ref = APGDAttack(None, n_iter=n_iter, eps=0.1)
  expected, window, counter = [], ref.n_iter_2, 0
  for i in range(n_iter):     # the reference's bookkeeping: a check whenever ``window`` steps have passed
    counter += 1
    if counter == window:
      expected.append((i, window))
      window, counter = max(window - ref.size_decr, ref.n_iter_min), 0
  assert apgd_attack.checkpoints(n_iter) == expected


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_square_window_sides_match_reference(norm):
  ref = SquareAttack(None, norm=TORCH_NORM[norm], n_queries=5000, eps=0.1, p_init=0.8, resc_schedule=False)
  h = w = 32
  sides = square_attack.square_sides(h, w, 0.8, norm)
  for i in range(0, 10000, 7):
    s = int(round(math.sqrt(ref.p_selection(i) * 3 * h * w / 3)))
    s = max(s, 1) if norm == 'linf' else max(s, 3) + (1 - max(s, 3) % 2)
    level = int(np.sum(i > np.asarray(square_attack.P_SCHEDULE)))
    assert sides[level] == min(s, h, w), i


def test_l2_square_pattern_matches_reference():
  ref = SquareAttack(None, norm='L2', eps=0.1, device='cpu')
  eta = jax.jit(square_attack._eta, static_argnums=(0, 1, 4))
  torch.manual_seed(0)
  for s in (1, 3, 6, 7, 12):
    ours = [np.asarray(eta(s, s, 0, 0, s, t)) for t in (False, True)]      # the two orientations
    seen = set()
    for _ in range(16):                                                     # the reference draws one at random
      pattern = ref.eta(s).numpy()
      matches = [i for i, o in enumerate(ours) if np.allclose(pattern, o, rtol=1e-5, atol=1e-7)]
      assert matches, s
      seen.update(matches)
    assert seen == {0, 1}, s


# ------------------------------------------------------------------ a small CNN on sklearn digits


class TorchDigitsCNN(torch.nn.Module):
  """A 2-conv CNN for 8x8 digits (NCHW); its flatten follows the NHWC order of the JAX twin ``digits_cnn``."""

  def __init__(self):
    super().__init__()
    self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
    self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    self.fc = torch.nn.Linear(256, 10)

  def forward(self, x):
    h = torch.relu(self.c2(torch.relu(self.c1(x))))
    return self.fc(h.permute(0, 2, 3, 1).reshape(x.shape[0], -1))

  def jax_logits_fn(self, dtype=jnp.float32):
    t = lambda a: jnp.asarray(a.detach().numpy(), dtype)
    p = {'c1': t(self.c1.weight.permute(2, 3, 1, 0)), 'b1': t(self.c1.bias),
         'c2': t(self.c2.weight.permute(2, 3, 1, 0)), 'b2': t(self.c2.bias),
         'fc': t(self.fc.weight.T), 'bf': t(self.fc.bias)}
    return lambda x: digits_cnn(p, x)


def digits_cnn(p, x):
  dn = ('NHWC', 'HWIO', 'NHWC')
  hp = jax.lax.Precision.HIGHEST
  h = jax.lax.conv_general_dilated(x, p['c1'], (1, 1), 'SAME', dimension_numbers=dn, precision=hp)
  h = jax.lax.conv_general_dilated(jax.nn.relu(h + p['b1']), p['c2'], (2, 2), ((1, 1), (1, 1)),
                                   dimension_numbers=dn, precision=hp)
  return jnp.dot(jax.nn.relu(h + p['b2']).reshape(h.shape[0], -1), p['fc'], precision=hp) + p['bf']


def train_digits_cnn():
  """The CNN trained briefly (Adam, 200 steps) on sklearn's digits; returns (net, x_test NHWC, y_test)."""
  from sklearn.datasets import load_digits
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int64)
  perm = np.random.RandomState(0).permutation(len(x))
  x, y = x[perm], y[perm]
  torch.manual_seed(0)
  net = TorchDigitsCNN()
  opt = torch.optim.Adam(net.parameters(), lr=5e-3)
  batches = np.random.RandomState(1)
  xt, yt = to_torch(x[:1400]), torch.tensor(y[:1400])
  for _ in range(200):
    b = torch.tensor(batches.randint(0, 1400, 64))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
    opt.step()
  net.eval()
  x, y = x[1400:1600], y[1400:1600].astype(np.int32)
  with torch.no_grad():
    np.testing.assert_allclose(net(to_torch(x)).numpy(), np.asarray(net.jax_logits_fn()(x)), atol=1e-4)
  return net, x, y


@pytest.fixture(scope='module')
def digits():
  """``(torch net, its float32 JAX twin, x, y)``: one ``logits_fn`` object, so jitted attacks are shared."""
  net, x, y = train_digits_cnn()
  return net, net.jax_logits_fn(), x, y


def assert_same_examples(ours, ref, min_fraction, atol):
  """At least ``min_fraction`` of the examples equal (max abs difference <= ``atol``)."""
  diff = np.abs(np.asarray(ours, np.float64) - ref).reshape(len(ref), -1).max(1)
  assert np.mean(diff <= atol) >= min_fraction, (np.flatnonzero(diff > atol), diff.max())


@pytest.mark.parametrize('norm,eps,targeted', [('l2', 0.7, False), ('linf', 0.1, True)])
def test_apgd_run_matches_reference_from_the_same_start(digits, norm, eps, targeted, x64):
  """One APGD-CE / APGD-T (targeted DLR) run of 100 iterations (step-size halving at the checkpoints,
  momentum, restarts from the best point) from the same random start, in float64: the same points are
  broken, at the same adversarial examples (the last misclassified iterate)."""
  net, _, x, y = digits
  x, y = x[:64].astype(np.float64), y[:64]
  ref_net, logits_fn = copy.deepcopy(net).double(), net.jax_logits_fn(jnp.float64)
  keys = ball.example_keys(jax.random.PRNGKey(0), jnp.arange(len(x)))
  x_init = np.asarray(apgd_attack._start(keys, jnp.asarray(x), eps, norm))
  if targeted:
    y_target = np.argsort(np.asarray(logits_fn(x)), axis=1)[:, -2]
    loss_fn = lambda logits, yy: losses.dlr_loss_targeted(logits, yy, jnp.asarray(y_target))
    ref = APGDAttack_targeted(ref_net, n_iter=100, norm=TORCH_NORM[norm], eps=eps)
    ref.y_target = torch.tensor(y_target)
  else:
    loss_fn = losses.cross_entropy
    ref = APGDAttack(ref_net, n_iter=100, norm=TORCH_NORM[norm], eps=eps, loss='ce')
  ref.init_hyperparam(to_torch(x))
  _, robust, _, ref_adv = ref.attack_single_run(to_torch(x), torch.tensor(y).long(), x_init=to_torch(x_init))
  ours, fooled = jax.jit(lambda a, b, k: apgd_attack.single_run(logits_fn, loss_fn, a, b, k, eps=eps, norm=norm,
                                                                n_iter=100, rho=0.75))(x, y, keys)
  assert 0.2 < np.mean(fooled) < 0.9                  # a non-trivial operating point
  np.testing.assert_array_equal(np.asarray(fooled), ~robust.numpy())
  # Rounding differences between the frameworks may tip a near-tie (a loss comparison at a checkpoint) and
  # fork a trajectory late in the run: all but such rare examples coincide.
  assert_same_examples(ours, to_nhwc(ref_adv), min_fraction=0.95, atol=1e-7)


@pytest.mark.parametrize('norm,eps,targeted', [('linf', 0.12, True), ('l2', 0.5, False)])
def test_fab_matches_reference(digits, norm, eps, targeted):
  """FAB-T (3 targets) and untargeted FAB, one restart, 100 iterations: no randomness, so the same points are
  broken at the same adversarial examples (to float32 rounding: the reference's FAB runs in float32)."""
  net, logits_fn, x, y = digits
  x, y = x[:64], y[:64]
  ref = FABAttack_PT(net, norm=TORCH_NORM[norm], n_restarts=1, n_iter=100, eps=eps, targeted=targeted,
                     n_target_classes=3)
  ref_adv = to_nhwc(ref.perturb(to_torch(x), torch.tensor(y).long()))
  ours = np.asarray(jax.jit(lambda a, b: attacks.fab(logits_fn, a, b, jax.random.PRNGKey(0), eps=eps, norm=norm,
                                                     n_iter=100, targeted=targeted, n_target_classes=3))(x, y))
  broken = np.any(ref_adv != x, axis=(1, 2, 3))
  assert 0.2 < broken.mean() < 0.9
  np.testing.assert_array_equal(np.any(ours != x, axis=(1, 2, 3)), broken)
  assert_same_examples(ours, ref_adv, min_fraction=0.9, atol=1e-4)


def test_standard_autoattack_matches_reference_on_a_trained_cnn(digits):
  """The standard ensemble (APGD-CE with its 100 iterations; APGD-T and FAB-T with 3 targets and Square with
  1000 queries on both sides, for CI time), l_inf, 200 points: accuracy after each attack within 2 points.
  The reference runs attack by attack on the points still robust, as its ``run_standard_evaluation``."""
  net, logits_fn, x, y = digits
  budget = dict(n_iter=100, n_target_classes=3, n_queries=1000)
  ours = attacks.autoattack(logits_fn, x, y, eps=0.15, batch_size=len(x), **budget)
  ref, _ = autoattack_parity.reference_autoattack(torch, net, x, y, eps=0.15, norm='linf',
                                                  attack_names=list(ensemble.STANDARD), seed=0, batch_size=len(x),
                                                  **budget)
  acc = ours['robust_accuracy']
  assert acc['clean'] == ref['clean'] > 0.9
  assert 0.05 < ref['apgd-ce'] < ref['clean'] - 0.5                           # a non-trivial operating point
  for name in ref:
    assert abs(acc[name] - ref[name]) <= TOL, (name, acc, ref)
  assert ours['warnings'] == []


def test_square_l2_matches_reference_statistically(digits):
  """Square alone (l_2, eps 1), 300 queries, 200 points. Its random windows differ between the sides (the
  reference draws one window per query for the whole batch), so robust accuracies differ by chance: across
  seeds 0-2 both implementations spread over 3-6 points; the bound is 6 points, and the attack must bite."""
  net, logits_fn, x, y = digits
  norm, eps = 'l2', 1.0
  ours = attacks.autoattack(logits_fn, x, y, eps=eps, norm=norm, attacks=['square'], n_queries=300,
                            batch_size=len(x), run_checks=False)['final_robust_accuracy']
  ref = SquareAttack(net, norm=TORCH_NORM[norm], n_queries=300, eps=eps, p_init=0.8, n_restarts=1, seed=0,
                     resc_schedule=False)
  with torch.no_grad():
    ref_acc = (net(ref.perturb(to_torch(x), torch.tensor(y).long())).argmax(1).numpy() == y).mean()
  assert ref_acc < 0.5 and abs(ours - ref_acc) <= 0.06, (ours, ref_acc)


# ------------------------------------------------------- the trained DARTS_V2 network (../shared)


def test_apgd_matches_reference_on_trained_darts_network(shared_dir):
  """APGD-CE on the trained DARTS_V2 weights (float32), 16 CIFAR-10 images, 20 iterations, eps 1/255, from the
  same random start on both sides: the same points are broken."""
  logits_fn, net, _ = autoattack_parity.load_models(shared_dir / 'fixtures' / 'trained_darts_v2_c8l5.npz', torch)
  data = np.load(shared_dir / 'data' / 'cifar10_subset_train.npz')
  x = data['image'][:16].astype(np.float32) / 255.0
  y = data['label'][:16].astype(np.int32)
  eps, n_iter = 1 / 255, 20
  keys = ball.example_keys(jax.random.PRNGKey(0), jnp.arange(len(x)))
  x_init = np.asarray(apgd_attack._start(keys, jnp.asarray(x), eps, 'linf'))
  ref = APGDAttack(net, n_iter=n_iter, norm='Linf', eps=eps, loss='ce')
  ref.init_hyperparam(to_torch(x))
  _, robust, _, _ = ref.attack_single_run(to_torch(x), torch.tensor(y).long(), x_init=to_torch(x_init))
  ours, fooled = jax.jit(lambda a, b, k: apgd_attack.single_run(logits_fn, losses.cross_entropy, a, b, k, eps=eps,
                                                                norm='linf', n_iter=n_iter, rho=0.75))(x, y, keys)
  with torch.no_grad():
    clean = net(to_torch(x)).argmax(1).numpy() == y
  assert 0.2 < np.mean(fooled & clean) < np.mean(clean) - 0.1
  np.testing.assert_array_equal(np.asarray(fooled), ~robust.numpy())
  assert np.abs(np.asarray(ours) - x).max() <= eps + 1e-6
