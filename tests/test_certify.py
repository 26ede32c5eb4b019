"""IBP / CROWN bounds, certified margins and radii (jaxnas.certify).

References: auto_LiRPA 0.7.1 values on a small conv net (../shared fixture), closed forms for affine networks
(Jacobian and dual norms; scipy for the l2 ball ∩ box), central differences for gradients, Python loops for
scans, and attacks: sampled and PGD-100 points never go below a lower bound, and a point certified at radius
r is never broken by PGD at r.

Each test compiles its bound computations as one program, most without XLA's backend optimisations
(``fast_jit``): the programs are small and many, and compiling dominates. The programs that run long (full
CROWN on the fixture's 2048-neuron layers, the model's training) use ``jax.jit``: unoptimised, the l2 CROWN
of the fixture ran 378 s instead of 5 s.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax import lax

from jaxnas import certify, ops
from jaxnas.certify import graph

fast_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0,
                                                        'xla_llvm_disable_expensive_passes': True})
BOXES = {'free': None, 'box': (0.0, 1.0)}


# ------------------------------------------------------------------------------------------------------
# Helpers: an independent PGD on the margins and a random net using every supported construct.
# ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def pgd(fn, norm, steps=100):
  """``(x, C, eps, lo, hi) -> [B, S]``: per example and spec row, the smallest ``C f(x')`` that PGD (signed /
  normalised gradient steps, projection on the ball of radius ``eps[b]`` and on the box [lo, hi]) finds."""
  def one_row(x0, c, eps, lo, hi):
    obj = lambda z: jnp.dot(c, fn(z[None])[0])
    step = 2.5 * eps / steps

    def body(z, _):
      g = jax.grad(obj)(z)
      if norm == 'linf':
        z = jnp.clip(z - step * jnp.sign(g), x0 - eps, x0 + eps)
      else:
        z = z - step * g / (jnp.linalg.norm(g) + 1e-30)
        d = z - x0
        z = x0 + d * jnp.minimum(1.0, eps / (jnp.linalg.norm(d) + 1e-30))
      z = jnp.clip(z, lo, hi)
      return z, obj(z)

    start = jnp.clip(x0, lo, hi)
    _, values = lax.scan(body, start, None, length=steps)
    return jnp.minimum(jnp.min(values), obj(start))

  rows = jax.vmap(one_row, (None, 0, None, None, None))
  attack = fast_jit(jax.vmap(rows, (0, 0, 0, None, None)))
  return lambda x, C, eps, box=None: attack(x, C, eps, *((-jnp.inf, jnp.inf) if box is None else box))


def random_points(key, x, eps, norm, n, box=None):
  """``n`` points per example in the ball: half on its boundary."""
  shape = (n,) + x.shape
  if norm == 'linf':
    d = jax.random.uniform(key, shape, x.dtype, -eps, eps)
    d = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, shape), jnp.sign(d) * eps, d)
  else:
    d = jax.random.normal(key, shape, x.dtype)
    d = d / jnp.sqrt(jnp.sum(d * d, axis=tuple(range(2, d.ndim)), keepdims=True)) * eps
    d = d * jnp.where(jnp.arange(n) % 2 == 0, 1.0, jax.random.uniform(key, (n,), x.dtype)).reshape(
        (n,) + (1,) * (d.ndim - 1))
  pts = x[None] + d
  return pts if box is None else jnp.clip(pts, *box)


def conv(x, w, stride=1, pad=0, dilation=1, groups=1):
  return lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2, rhs_dilation=(dilation, dilation),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def random_net(seed, c=4, k=3):
  """Conv, BN, ReLU, a softmax(alpha)-weighted mixed op (dilated depthwise + pointwise, -inf padded max-pool,
  avg-pool without padding counts, skip), a strided conv, FactorizedReduce, a max over space (reduce_max),
  global average pooling, concat and a dense layer."""
  rng = np.random.default_rng(seed)
  w = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(np.prod(s[:-1])))
  p = {'stem': w(3, 3, 3, c), 'scale': jnp.asarray(rng.uniform(0.5, 1.5, c)), 'shift': w(1, c),
       'dw': w(3, 3, 1, c), 'pw': w(1, 1, c, c), 'red': w(3, 3, c, c), 'fr1': w(1, 1, c, c // 2),
       'fr2': w(1, 1, c, c // 2), 'fc': w(3 * c, k), 'b': w(1, k), 'alpha': jnp.asarray(rng.normal(size=4))}

  def net(x):
    h = conv(x, p['stem'], pad=1) * p['scale'] + p['shift'][0]
    a = jax.nn.softmax(p['alpha'])
    dil = conv(conv(jax.nn.relu(h), p['dw'], pad=2, dilation=2, groups=c), p['pw'])
    mixed = a[0] * dil + a[1] * ops.max_pool(h, 3, 1, 1) + a[2] * ops.avg_pool(h, 3, 1, 1) + a[3] * h
    r = jax.nn.relu(mixed)
    red = conv(r, p['red'], stride=2, pad=1)
    fr = jnp.concatenate([conv(r, p['fr1'], stride=2), conv(r[:, 1:, 1:, :], p['fr2'], stride=2)], axis=-1)
    s = jax.nn.relu(red + fr)
    feats = jnp.concatenate([jnp.mean(s, axis=(1, 2)), jnp.max(s, axis=(1, 2)), jnp.mean(h, axis=(1, 2))], -1)
    return feats @ p['fc'] + p['b'][0]

  return net


# ------------------------------------------------------------------------------------------------------
# auto_LiRPA parity.
# ------------------------------------------------------------------------------------------------------
def _fixture_net(sd):
  """The fixture's net (see ../shared/fixtures/README.md), NHWC, from its PyTorch state_dict."""
  hwio = lambda name: jnp.transpose(sd[name], (2, 3, 1, 0))

  def bn(x, name, affine=True):
    y = (x - sd[name + '.running_mean']) / jnp.sqrt(sd[name + '.running_var'] + 1e-5)
    return y * sd[name + '.weight'] + sd[name + '.bias'] if affine else y

  def net(x):
    h = bn(conv(x, hwio('stem.weight'), pad=1), 'bn0')
    h = h + bn(conv(conv(jax.nn.relu(h), hwio('dw.weight'), pad=2, dilation=2, groups=8), hwio('pw.weight')),
               'bn1', affine=False)
    h = bn(conv(jax.nn.relu(h), hwio('red.weight'), stride=2, pad=1), 'bn2')
    h = ops.avg_pool(jax.nn.relu(h), 2, 2, 0)
    h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)  # PyTorch flattens NCHW
    return h @ sd['fc.weight'].T + sd['fc.bias']

  return net


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_matches_auto_lirpa(shared_dir, x64, norm):
  data = np.load(shared_dir / 'fixtures' / 'certified_bounds_small_net.npz')
  sd = {k.split('/', 1)[1]: jnp.asarray(data[k], jnp.float64) for k in data.files if k.startswith('state_dict/')}
  net = _fixture_net(sd)
  x = jnp.transpose(jnp.asarray(data['input_nchw'], jnp.float64), (0, 2, 3, 1))
  np.testing.assert_allclose(net(x), data['logits'], atol=1e-5)
  C, eps = jnp.asarray(data['margin_spec_C'], jnp.float64), float(data[f'eps_{norm}'])
  ibp, crown = jax.jit(lambda x: [certify.bounds(net, x, eps, norm, m, C=C, upper=False)[0]
                                  for m in ('ibp', 'crown')])(x)
  np.testing.assert_allclose(ibp, data[f'lb_{norm}_IBP'], rtol=0, atol=1e-5)
  np.testing.assert_allclose(crown, data[f'lb_{norm}_CROWN'], rtol=0, atol=1e-4)
  assert np.all(np.asarray(crown) >= np.asarray(ibp))
  # As the README states: at these eps CROWN certifies all five points and IBP none.
  assert np.all(np.min(crown, axis=1) > 0) and np.all(np.min(ibp, axis=1) < 0)
  # margin_lower_bounds builds the same specification from the labels.
  np.testing.assert_allclose(certify.margin_spec(jnp.asarray(data['pred']), 10), C)


# ------------------------------------------------------------------------------------------------------
# Soundness on random nets.
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('norm,eps', [('linf', 0.03), ('l2', 0.15)])
def test_bounds_are_sound_on_random_nets(x64, norm, eps):
  """Sampled and PGD-100 points never beat the bounds of any method, with and without the [0, 1] box."""
  net = random_net(seed=len(norm))
  key = jax.random.PRNGKey(0)
  x = jax.random.uniform(key, (2, 4, 4, 3), jnp.float64)
  x = x.at[0, 0, 0, 0].set(0.0)  # a pixel on the box boundary
  logits = net(x)
  C = certify.margin_spec(jnp.argmax(logits, axis=1), logits.shape[1])

  @fast_jit
  def everything(x):
    found = {(m, b): certify.bounds(net, x, eps, norm, m, C=C, box=box) for m in certify.METHODS
             for b, box in BOXES.items()}
    margins = {b: jnp.einsum('bsk,nbk->nbs', C, jax.vmap(net)(random_points(key, x, eps, norm, 300, box)))
               for b, box in BOXES.items()}
    return found, margins

  found, margins = everything(x)
  attack = pgd(net, norm)
  for b, box in BOXES.items():
    attacked = attack(x, C, jnp.full((2,), eps), box)
    for method in certify.METHODS:
      lower, upper = found[method, b]
      assert np.all(np.isfinite(lower)) and np.all(upper >= lower)
      assert np.all(margins[b] >= lower[None] - 1e-9) and np.all(margins[b] <= upper[None] + 1e-9), method
      assert np.all(attacked >= lower - 1e-9), method
    lower = {m: found[m, b][0] for m in certify.METHODS}
    # CROWN is the tightest here, and not vacuous.
    assert np.all(lower['crown'] >= lower['ibp'] - 1e-9)
    assert np.all(lower['crown'] >= lower['crown-ibp'] - 1e-9)
    assert np.mean(attacked - lower['crown']) < 0.5 * np.mean(attacked - lower['ibp'])
  for method in certify.METHODS:  # clipping the input set to the box only tightens the bounds
    assert np.all(found[method, 'box'][0] >= found[method, 'free'][0] - 1e-9), method
    assert np.any(found[method, 'box'][0] > found[method, 'free'][0] + 1e-6), method


def test_crown_bounds_do_not_depend_on_chunks_or_batch(x64):
  """Full CROWN's intermediate bounds run ``chunk_rows // B`` elements per example per backward pass: any
  chunking (one element, uneven chunks, all at once) and any batch give each example the same bounds."""
  net = random_net(seed=3)
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 4, 4, 3), jnp.float64)
  C = certify.margin_spec(jnp.argmax(net(x), axis=1), net(x).shape[1])
  bound = lambda x, C, rows: certify.bounds(net, x, 0.03, 'linf', 'crown', C=C, box=(0.0, 1.0), chunk_rows=rows)
  found = fast_jit(lambda x: [bound(x, C, rows) for rows in (1, 14, 10 ** 6)]
                   + [bound(x[i:i + 1], C[i:i + 1], 5) for i in range(3)])(x)
  one_by_one = [np.concatenate(parts) for parts in zip(*found[3:])]
  for lower, upper in found[:3]:
    np.testing.assert_allclose(lower, one_by_one[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(upper, one_by_one[1], rtol=0, atol=1e-10)
  crown_ibp = fast_jit(lambda x: certify.bounds(net, x, 0.03, 'linf', 'crown-ibp', C=C, box=(0.0, 1.0))[0])(x)
  assert np.any(one_by_one[0] > crown_ibp + 1e-6)  # CROWN's intermediate bounds were computed and used


# ------------------------------------------------------------------------------------------------------
# Exactness on affine networks: closed forms.
# ------------------------------------------------------------------------------------------------------
def _affine_net(seed):
  rng = np.random.default_rng(seed)
  w1, w2 = jnp.asarray(rng.normal(size=(3, 3, 2, 3))), jnp.asarray(rng.normal(size=(12, 4)))
  mean, std = jnp.asarray([0.4, 0.6]), jnp.asarray([0.2, 0.3])

  def net(x):
    h = conv((x - mean) / std, w1, stride=2, pad=1) * 0.7 - 0.1
    h = ops.avg_pool(h, 3, 1, 1)
    return h.reshape(h.shape[0], -1) @ w2 + 1.0

  return net


def _l2_box_minimum(a, x0, eps, lo, hi):
  """min a.x' over ||x' - x0||_2 <= eps, lo <= x' <= hi, by scipy SLSQP."""
  res = scipy.optimize.minimize(lambda d: a @ d, np.zeros_like(x0), jac=lambda d: a, method='SLSQP',
                                bounds=list(zip(lo - x0, hi - x0)),
                                constraints=[{'type': 'ineq', 'fun': lambda d: eps ** 2 - d @ d,
                                              'jac': lambda d: -2 * d}], options={'ftol': 1e-14, 'maxiter': 500})
  return a @ x0 + res.fun


def test_exact_for_affine_networks(x64):
  net = _affine_net(0)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 2), jnp.float64)
  C = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)))
  eps_box = 0.3

  @fast_jit
  def everything(x):
    free = {(n, m): certify.bounds(net, x, 0.1, n, m, C=C) for n in certify.NORMS for m in ('ibp', 'crown')}
    boxed = {n: certify.bounds(net, x, eps_box, n, 'crown', C=C, box=(0.0, 1.0))[0] for n in certify.NORMS}
    return free, boxed, certify.bounds(net, x, 0.0, 'linf', 'crown')

  free, boxed, point = everything(x)
  J = jax.vmap(lambda xi: jax.jacobian(lambda z: net(z[None])[0])(xi).reshape(4, -1))(x)
  A = jnp.einsum('sk,bkd->bsd', C, J)
  centre = net(x) @ C.T
  expected = {'linf': 0.1 * jnp.sum(jnp.abs(A), -1), 'l2': 0.1 * jnp.linalg.norm(A, axis=-1)}
  for (norm, method), (lower, upper) in free.items():  # (no maxima: 'crown-ibp' is 'crown')
    np.testing.assert_allclose(lower, centre - expected[norm], atol=1e-10, err_msg=f'{norm} {method}')
    np.testing.assert_allclose(upper, centre + expected[norm], atol=1e-10, err_msg=f'{norm} {method}')
  # With the [0, 1] box: l_inf by the box corners, l_2 against a numerical optimum (scipy).
  xf = np.asarray(x.reshape(2, -1))
  lo_box, hi_box = np.maximum(xf - eps_box, 0), np.minimum(xf + eps_box, 1)
  corner = centre + jnp.sum(jnp.minimum(A * (lo_box - xf)[:, None], A * (hi_box - xf)[:, None]), -1)
  np.testing.assert_allclose(boxed['linf'], corner, atol=1e-10)
  for b in range(2):
    for s in range(3):
      a = np.asarray(A[b, s])
      ref = _l2_box_minimum(a, xf[b], eps_box, np.zeros_like(xf[b]), np.ones_like(xf[b])) - a @ xf[b]
      assert abs(float(boxed['l2'][b, s] - centre[b, s]) - ref) < 1e-6 * max(1.0, abs(ref))
  # eps = 0 gives the point value.
  np.testing.assert_allclose(point[0], net(x), atol=1e-12)
  np.testing.assert_allclose(point[1], net(x), atol=1e-12)


# ------------------------------------------------------------------------------------------------------
# Gradients w.r.t. captured weights / alphas (DSRNA-CB).
# ------------------------------------------------------------------------------------------------------
def test_margin_bounds_are_differentiable_in_params(x64):
  rng = np.random.default_rng(0)

  def model(p, x):
    a = jax.nn.softmax(p['alpha'])
    h = conv(x, p['w'], pad=1)
    mixed = a[0] * ops.max_pool(h, 3, 1, 1) + a[1] * ops.avg_pool(h, 3, 1, 1) + a[2] * jax.nn.relu(h)
    return jnp.mean(jax.nn.relu(mixed), axis=(1, 2)) @ p['fc']

  p = {'alpha': jnp.asarray(rng.normal(size=3)), 'w': jnp.asarray(rng.normal(size=(3, 3, 2, 3))),
       'fc': jnp.asarray(rng.normal(size=(3, 3)))}
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 3, 3, 2), jnp.float64)
  y = jnp.argmax(model(p, x), axis=1)
  objective = lambda p, method: jnp.sum(certify.margin_lower_bounds(model, x, y, 0.02, 'linf', method, params=p))
  values = fast_jit(lambda p: jnp.stack([objective(p, m) for m in certify.METHODS]))

  @fast_jit
  def gradients(p):
    grads = [jax.grad(lambda q, m=m: objective(q, m))(p) for m in certify.METHODS]
    # A model closing over its parameters is differentiated through the closure the same way.
    closed = jax.grad(lambda p: jnp.sum(certify.margin_lower_bounds(
        lambda x: model(p, x), x, y, 0.02, 'linf', 'crown-ibp')))(p)
    return grads, closed

  grads, closed = gradients(p)
  direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p)
  h = 1e-6
  shifted = lambda s: values(jax.tree.map(lambda a, d: a + s * h * d, p, direction))
  fd = (shifted(1) - shifted(-1)) / (2 * h)
  for k, grad in enumerate(grads):
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, fd[k], rtol=1e-5, atol=1e-7, err_msg=certify.METHODS[k])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-12), closed,
               grads[certify.METHODS.index('crown-ibp')])


# ------------------------------------------------------------------------------------------------------
# Certified radius on a trained model.
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def digits_model():
  """A small CNN trained for a few hundred full-batch Adam steps on sklearn digits (8x8, [0, 1])."""
  from sklearn.datasets import load_digits
  import optax
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target
  rng = np.random.default_rng(0)
  p = {'w': jnp.asarray(rng.normal(size=(3, 3, 1, 8)) / 3, jnp.float32),
       'fc': jnp.asarray(rng.normal(size=(128, 10)) / 12, jnp.float32), 'b': jnp.zeros(10, jnp.float32)}

  def model(p, x):
    h = jax.nn.relu(conv(x, p['w'].astype(x.dtype), stride=2, pad=1))
    return h.reshape(h.shape[0], -1) @ p['fc'].astype(x.dtype) + p['b'].astype(x.dtype)

  opt = optax.adam(1e-2)
  state = opt.init(p)
  xt, yt = jnp.asarray(x[:1500]), jnp.asarray(y[:1500])

  @jax.jit
  def train(p, state):
    def step(carry, _):
      p, state = carry
      loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model(p, xt), yt).mean()
      updates, state = opt.update(jax.grad(loss)(p), state)
      return (optax.apply_updates(p, updates), state), None
    return lax.scan(step, (p, state), None, length=300)[0][0]

  p = train(p, state)
  acc = np.mean(np.asarray(jnp.argmax(model(p, jnp.asarray(x[1500:])), 1)) == y[1500:])
  assert acc > 0.85
  return model, p, x[1500:1512], y[1500:1512]


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_certified_radius_is_not_broken_by_pgd(x64, digits_model, norm):
  model, p, x, y = digits_model
  p = jax.tree.map(lambda a: a.astype(jnp.float64), p)
  x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y)
  fn = functools.partial(model, p)
  radii = {m: certify.certified_radius(fn, x, y, norm, m) for m in ('ibp', 'crown')}
  r = radii['crown']
  correct = np.asarray(jnp.argmax(fn(x), 1) == y)
  assert np.all(r[~correct] == 0) and np.all(r[correct] > 0)
  assert np.mean(radii['crown']) > np.mean(radii['ibp'])
  # The radius is a certified eps of the search: all margin lower bounds are positive there ...
  lower = jax.jit(lambda x, y, r: certify.margin_lower_bounds(fn, x, y, r, norm, 'crown'))(
      x[correct], y[correct], jnp.asarray(r[correct]))
  assert np.all(np.asarray(lower) > 0)
  # ... and PGD at that radius changes no prediction, while it finds adversarial points at 4r.
  attack = pgd(fn, norm)
  C = certify.margin_spec(y[correct], 10)
  assert np.all(attack(x[correct], C, jnp.asarray(r[correct])) > 0)
  broken = np.min(attack(x[correct], C, jnp.asarray(4 * r[correct])), axis=1) < 0
  assert np.mean(broken) > 0.5


def test_certified_radii_report(digits_model):
  """The evaluation report's entry: radii of the search (float32, [0, 1] box), their mean, JSON values."""
  model, p, x, y = digits_model
  fn = functools.partial(model, p)
  lines = []
  report = certify.certified_radii_report(fn, x, y, norms=('linf', 'l2'), method='ibp', steps=6, batch_size=5,
                                          progress=lines.append)
  assert set(report) == {'linf', 'l2'}
  # A progress line per bisection step of each batch (12 examples: batches of 5, 5 and 2), counting down.
  assert len(lines) == 2 * 3 * 6
  assert lines[0].startswith('certify ibp linf: examples 1-5 of 12, bisection step 1/6, ')
  assert lines[0].endswith('the first step includes compiling')
  assert lines[17].startswith('certify ibp linf: examples 11-12 of 12, bisection step 6/6, ')
  assert lines[17].endswith('about 0 s left') and lines[-1].startswith('certify ibp l2: examples 11-12 of 12')
  for norm, entry in report.items():
    assert set(entry) == {'method', 'mean_radius', 'radii', 'certified_at_eps0_fraction', 'seconds'}
    assert entry['method'] == 'ibp' and entry['seconds'] > 0
    assert all(type(r) is float for r in entry['radii']) and len(entry['radii']) == len(y)  # pylint: disable=unidiomatic-typecheck
    expected = certify.certified_radius(fn, x, y, norm, 'ibp', box=(0.0, 1.0), steps=6)
    np.testing.assert_allclose(entry['radii'], expected)  # batches of 5 (the last one padded): the same radii
    assert entry['mean_radius'] == pytest.approx(np.mean(expected))
    assert entry['certified_at_eps0_fraction'] == pytest.approx(np.mean(expected >= 0.05 * (1 - 1e-6)))
  with pytest.raises(ValueError, match='float images'):
    certify.certified_radii_report(fn, (x * 255).astype(np.uint8), y)


# ------------------------------------------------------------------------------------------------------
# Interpretation: control flow, rewrites and errors.
# ------------------------------------------------------------------------------------------------------
def _python_scan(f, carry, xs):
  """``lax.scan`` as a Python loop (the unrolled reference)."""
  ys = []
  for x in xs:
    carry, y = f(carry, x)
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys[0] is not None else None


def _looped_net(loop):
  """Nested loops, a carry with an exact initial value, cond, and min / clip / abs / reduce_max /
  reduce_window_max (flax max_pool) on bounded values."""
  def net(ws, x):
    def block(h, w):
      h2, sums = loop(lambda c, v: (c + jax.nn.relu(c * v), jnp.sum(c, axis=1)), h, w[:2])
      return h + jax.nn.relu(h @ w) + 0.1 * h2, (jnp.max(h, axis=1), sums)
    h, (maxima, sums) = loop(block, x, ws)
    acc, _ = loop(lambda c, v: (jnp.maximum(c, v * x), None), jnp.zeros_like(x), jnp.arange(3.0))
    h = lax.cond(ws[0, 0, 0] > -100, lambda h: jnp.clip(h, -1.0, 2.0), lambda h: 2 * h, h)
    h = jnp.minimum(h, jnp.abs(h - 0.5))
    pooled = nn.max_pool(h[:, :, None], (2,), (1,), 'SAME')[:, :, 0]
    return jnp.concatenate([h, maxima.T, jnp.transpose(sums, (2, 0, 1)).reshape(x.shape[0], -1), acc, pooled],
                           axis=1)

  return net


def test_scans_cond_and_rewritten_primitives(x64, monkeypatch):
  """Scans are propagated as loops (IBP, CROWN-IBP; small scans too, here) or unrolled (CROWN): the same
  bounds as Python loops, and the same gradients w.r.t. the weights; cond with a concrete index takes its
  branch, with a traced one (params under jit) selects among all."""
  monkeypatch.setattr(graph, '_UNROLL_SIZE', 0)
  ws = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4)) / 2)
  scanned, looped = _looped_net(lax.scan), _looped_net(_python_scan)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4), jnp.float64)
  cases = [('linf', 0.1, m) for m in certify.METHODS] + [('l2', 0.2, 'crown-ibp')]

  @fast_jit
  def everything(ws):
    out = {}
    for norm, eps, method in cases:
      out[f'{norm} {method}'] = certify.bounds(functools.partial(scanned, ws), x, eps, norm, method)
      if method != 'crown':  # (CROWN unrolls scans)
        out[f'{norm} {method} looped'] = certify.bounds(functools.partial(looped, ws), x, eps, norm, method)
    # ws traced: the cond index is a tracer.
    out['traced'] = certify.bounds(scanned, x, 0.1, 'linf', 'crown-ibp', params=ws)
    for name, net in (('scanned', scanned), ('looped', looped)):  # loops forward and backward
      total = lambda w, net=net: jnp.sum(certify.bounds(net, x, 0.1, 'linf', 'crown-ibp', params=w)[0])
      out[f'grad {name}'] = jax.grad(total)(ws)
    out['point'] = certify.bounds(functools.partial(scanned, ws), x, 0.0, 'linf', 'crown-ibp')
    return out

  out = everything(ws)
  for norm, eps, method in cases:
    samples = jax.vmap(functools.partial(scanned, ws))(random_points(jax.random.PRNGKey(1), x, eps, norm, 500))
    lower, upper = out[f'{norm} {method}']
    assert np.all(samples >= lower[None] - 1e-9) and np.all(samples <= upper[None] + 1e-9), (norm, method)
    if method != 'crown':
      np.testing.assert_allclose(lower, out[f'{norm} {method} looped'][0], atol=1e-12)
      np.testing.assert_allclose(upper, out[f'{norm} {method} looped'][1], atol=1e-12)
  np.testing.assert_allclose(out['traced'][0], out['linf crown-ibp looped'][0], atol=1e-12)
  assert np.any(out['grad looped'] != 0)
  np.testing.assert_allclose(out['grad scanned'], out['grad looped'], atol=1e-10)
  np.testing.assert_allclose(out['point'][0], scanned(ws, x), atol=1e-12)
  np.testing.assert_allclose(out['point'][1], scanned(ws, x), atol=1e-12)


def test_small_scans_are_unrolled():
  """Loops over a few cheap iterations (e.g. kernel taps) are inlined; long or large ones stay loops."""
  body = lambda c, v: (jnp.maximum(c, v * c), None)
  small = lambda x: lax.scan(body, x, jnp.arange(3.0))[0]
  large = lambda x: lax.scan(body, x, jnp.arange(1000.0))[0]
  kinds = lambda fn: {n.kind for n in graph.build(fn, (jnp.ones((1, 3)),), 0).nodes}
  assert 'scan' not in kinds(small) and 'scan' in kinds(large)


def test_errors_name_the_problem():
  x = jnp.ones((1, 3))
  with pytest.raises(ValueError, match="'tanh'"):
    certify.bounds(lambda x: jnp.tanh(x), x, 0.1)
  with pytest.raises(ValueError, match="'mul'.*two input-dependent"):
    certify.bounds(lambda x: x * x, x, 0.1)
  with pytest.raises(ValueError, match='unknown norm'):
    certify.bounds(lambda x: x, x, 0.1, 'l1')
  with pytest.raises(ValueError, match='unknown bound method'):
    certify.bounds(lambda x: x, x, 0.1, 'linf', 'deeppoly')
  with pytest.raises(ValueError, match='one array of logits'):
    certify.bounds(lambda x: (x, x), x, 0.1)
