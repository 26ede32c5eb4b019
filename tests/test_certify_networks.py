"""jaxnas.certify on the networks of jaxnas: the DARTS mixed operation (softmax(alpha)-weighted sum of all
primitives, as in the supernet) and a DARTS_V2 evaluation network."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import certify, genotypes, networks, ops, search_space


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


def test_mixed_op_bounds_and_alpha_gradients(x64):
  """Every DARTS primitive (stride 1 and the reduction form with FactorizedReduce), pool ops with BN."""
  prims = ops.DARTS_PRIMITIVES
  key = jax.random.PRNGKey(0)
  x = jax.random.uniform(key, (2, 4, 4, 4), jnp.float64)
  for stride in (1, 2):
    params, stats = {}, {}
    for k, name in enumerate(prims):
      params[name], stats[name] = ops.OPS[name].init(np.random.default_rng(k), 4, stride, False, True)
    params, stats = _randomised((params, stats), jax.random.fold_in(key, stride))

    def model(alpha, x):
      weights = jax.nn.softmax(alpha)
      out, _ = search_space.mixed_op(prims, params, stats, x, weights, stride, False, 'shift')
      return out.reshape(out.shape[0], -1)[:, :6]

    alpha = jax.random.normal(jax.random.fold_in(key, 9), (len(prims),), jnp.float64)
    outs = jax.vmap(lambda z: model(alpha, z))(_samples(key, x, 0.05, 200))
    found = {}
    for method in certify.METHODS:
      lower, upper = certify.bounds(model, x, 0.05, 'linf', method, params=alpha)
      assert np.all(outs >= lower[None] - 1e-9) and np.all(outs <= upper[None] + 1e-9), (stride, method)
      found[method] = (lower, upper)
    assert np.all(found['crown'][0] >= found['ibp'][0] - 1e-9)
    # d(sum of CROWN-IBP lower bounds)/d(alpha) against central differences.
    objective = lambda a: jnp.sum(certify.bounds(model, x, 0.05, 'linf', 'crown-ibp', params=a,
                                                 upper=False)[0])
    grad = jax.grad(objective)(alpha)
    h, direction = 1e-6, jnp.arange(len(prims), dtype=jnp.float64) - 3.5
    fd = (objective(alpha + h * direction) - objective(alpha - h * direction)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=1e-5, atol=1e-8)


def test_darts_v2_eval_network(x64):
  """The interpreter handles EvalNetwork.logits_fn (normalisation inside, stem, cells, FactorizedReduce,
  separable / dilated convs, pooling, GAP, classifier): bounds contain sampled logits, exact at eps = 0."""
  net = networks.EvalNetwork(genotypes.get('DARTS_V2'), init_channels=4, layers=5, num_classes=10,
                             mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
  key = jax.random.PRNGKey(0)
  x = jax.random.uniform(key, (1, 16, 16, 3), jnp.float64)
  variables = _randomised(net.init(key, x), key)
  fn = net.logits_fn(variables)
  outs = jax.jit(jax.vmap(fn))(_samples(key, x, 2e-3, 100))
  for method in ('ibp', 'crown-ibp'):
    lower, upper = certify.bounds(fn, x, 2e-3, 'linf', method)
    assert np.all(outs >= lower[None] - 1e-9) and np.all(outs <= upper[None] + 1e-9), method
  lower, upper = certify.bounds(fn, x, 0.0, 'linf', 'ibp')
  np.testing.assert_allclose(lower, fn(x), atol=1e-9)
  np.testing.assert_allclose(upper, fn(x), atol=1e-9)
