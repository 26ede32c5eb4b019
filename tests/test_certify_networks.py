"""jaxnas.certify on the networks of jaxnas: the DARTS mixed operation (softmax(alpha)-weighted sum of all
primitives, as in the supernet, at strides 1 and 2) and DARTS_V2 / DSARA evaluation networks in inference mode
(normalisation, stem, every cell type: 4 cells are DSARA's A, R, R, robust; FactorizedReduce, separable /
dilated convs, pooling, GAP; bounds through scans of cells: tests/test_certify.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import certify, genotypes, networks, ops, search_space

fast_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0,
                                                        'xla_llvm_disable_expensive_passes': True})


def _randomised(tree, key):
  """Random BatchNorm statistics and affine parameters (as the parity fixtures), float64 everywhere."""
  def leaf(path, value):
    name = jax.tree_util.keystr(path)
    r = jax.random.normal(jax.random.fold_in(key, hash(name) % 2 ** 31), value.shape, jnp.float64)
    for field, new in (("'var'", jnp.exp(0.3 * r)), ("'mean'", 0.1 * r), ("'scale'", 1 + 0.1 * r),
                       ("'bias'", 0.1 * r)):
      if name.endswith(f'[{field}]'):
        return new
    return jnp.asarray(value, jnp.float64)
  return jax.tree_util.tree_map_with_path(leaf, tree)


def _samples(key, x, eps, n):
  d = jax.random.uniform(key, (n,) + x.shape, x.dtype, -eps, eps)
  return x[None] + jnp.where(jax.random.bernoulli(key, 0.5, d.shape), jnp.sign(d) * eps, d)


def _contained(samples, lower, upper):
  return np.all(samples >= lower[None] - 1e-9) and np.all(samples <= upper[None] + 1e-9)


def test_mixed_op_bounds_and_alpha_gradients(x64):
  """Every DARTS primitive (stride 1, and the reduction form with FactorizedReduce), pool ops with BN."""
  prims = ops.DARTS_PRIMITIVES
  key = jax.random.PRNGKey(0)
  x = jax.random.uniform(key, (2, 4, 4, 4), jnp.float64)
  models = {}
  for stride in (1, 2):
    params, stats = {}, {}
    for k, name in enumerate(prims):
      params[name], stats[name] = ops.OPS[name].init(np.random.default_rng(k), 4, stride, False, True)
    params, stats = _randomised((params, stats), jax.random.fold_in(key, stride))

    def model(alpha, x, stride=stride, params=params, stats=stats):
      out, _ = search_space.mixed_op(prims, params, stats, x, jax.nn.softmax(alpha), stride, False, 'grouped')
      return out.reshape(out.shape[0], -1)[:, :6]
    models[stride] = model

  alpha = jax.random.normal(jax.random.fold_in(key, 9), (len(prims),), jnp.float64)
  # d(sum of CROWN-IBP lower bounds)/d(alpha) against central differences.
  objective = lambda a, stride: jnp.sum(certify.bounds(models[stride], x, 0.05, 'linf', 'crown-ibp', params=a,
                                                       upper=False)[0])
  values = fast_jit(lambda a: jnp.stack([objective(a, s) for s in models]))

  @fast_jit
  def everything(alpha):
    found = {(s, m): certify.bounds(models[s], x, 0.05, 'linf', m, params=alpha) for s in models
             for m in certify.METHODS}
    outs = {s: jax.vmap(lambda z, s=s: models[s](alpha, z))(_samples(key, x, 0.05, 200)) for s in models}
    return found, outs, [jax.grad(lambda a, s=s: objective(a, s))(alpha) for s in models]

  found, outs, grads = everything(alpha)
  h, direction = 1e-6, jnp.arange(len(prims), dtype=jnp.float64) - 3.5
  fd = (values(alpha + h * direction) - values(alpha - h * direction)) / (2 * h)
  for k, stride in enumerate(models):
    for method in certify.METHODS:
      assert _contained(outs[stride], *found[stride, method]), (stride, method)
    assert np.all(found[stride, 'crown'][0] >= found[stride, 'ibp'][0] - 1e-9)
    np.testing.assert_allclose(jnp.vdot(grads[k], direction), fd[k], rtol=1e-5, atol=1e-8)


def test_darts_v2_and_dsara_eval_networks(x64):
  """EvalNetwork.logits_fn of both spaces: IBP and CROWN-IBP bounds contain sampled logits; eps = 0 gives the
  logits."""
  key = jax.random.PRNGKey(0)
  x = jax.random.uniform(key, (1, 16, 16, 3), jnp.float64)
  fns = {}
  for name in ('DARTS_V2', 'DSARA'):
    net = networks.EvalNetwork(genotypes.get(name), init_channels=4, layers=4, num_classes=10,
                               mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    fns[name] = net.logits_fn(_randomised(net.init(key, x), key))

  @fast_jit
  def everything(x):
    found = {(name, m): certify.bounds(fn, x, 2e-3, 'linf', m) for name, fn in fns.items()
             for m in ('ibp', 'crown-ibp')}
    outs = {name: jax.vmap(fn)(_samples(key, x, 2e-3, 100)) for name, fn in fns.items()}
    return found, outs, certify.bounds(fns['DARTS_V2'], x, 0.0, 'linf', 'ibp')

  found, outs, point = everything(x)
  for (name, method), (lower, upper) in found.items():
    assert _contained(outs[name], lower, upper), (name, method)
  np.testing.assert_allclose(point[0], fns['DARTS_V2'](x), atol=1e-9)
  np.testing.assert_allclose(point[1], fns['DARTS_V2'](x), atol=1e-9)
