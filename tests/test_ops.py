"""Primitive operations: PyTorch semantics (checked with torch when installed) and the hand-written VJPs
of the fast 'shift' formulation against plain autodiff and the grouped convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import ops

CASES = [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (5, 2, 2, 1), (3, 1, 2, 2), (3, 2, 2, 2), (5, 1, 4, 2),
         (5, 2, 4, 2)]  # (k, stride, padding, dilation): sep and dil convs at both strides


@pytest.mark.parametrize('k, stride, padding, dilation, size', [
    case + (size,) for case in CASES for size in (8, 7)] + [(3, 3, 3, 3, 9), (3, 1, 3, 3, 9)])
def test_depthwise_formulations_agree_with_gradients(x64, k, stride, padding, dilation, size):
  rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)))
  w = jnp.asarray(rng.normal(size=(k, k, 1, 3)))
  g = jnp.asarray(rng.normal(size=ops.depthwise_conv2d(x, w, stride, padding, dilation, 'grouped').shape))
  results = {}
  for impl in ops.FORMULATIONS:
    f = lambda x, w: jnp.sum(g * ops.depthwise_conv2d(x, w, stride, padding, dilation, impl))
    results[impl] = (f(x, w),) + jax.grad(f, (0, 1))(x, w)
  # The dilated conv as XLA's convolution (the 'grouped' formulation runs a 'same'-padded one undilated).
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                                   rhs_dilation=(dilation, dilation),
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=3)
  f = lambda x, w: jnp.sum(g * conv(x, w))
  results['conv'] = (f(x, w),) + jax.grad(f, (0, 1))(x, w)
  for impl in ('shift', 'autodiff', 'grouped'):
    for a, b in zip(results[impl], results['conv']):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
  tangents = (jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=w.shape)))
  grouped = lambda x, w: ops.depthwise_conv2d(x, w, stride, padding, dilation, 'grouped')
  np.testing.assert_allclose(jax.jvp(grouped, (x, w), tangents)[1], jax.jvp(conv, (x, w), tangents)[1],
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('pool', ['max', 'avg'])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', [8, 7])
def test_pool_vjps_equal_autodiff(x64, pool, stride, size):
  rng = np.random.default_rng(stride + size)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)))
  fn = ops.max_pool if pool == 'max' else ops.avg_pool
  g = jnp.asarray(rng.normal(size=fn(x, 3, stride, 1).shape))
  out = {impl: jax.value_and_grad(lambda x: jnp.sum(g * fn(x, 3, stride, 1, impl)))(x)
         for impl in ('shift', 'autodiff')}
  np.testing.assert_allclose(out['shift'][0], out['autodiff'][0], rtol=1e-12)
  np.testing.assert_allclose(out['shift'][1], out['autodiff'][1], rtol=1e-12, atol=1e-12)


def test_batch_norm_vjp_equals_autodiff(x64):
  """The hand-written train-mode BatchNorm VJP, including cotangents of the batch mean and variance."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(2.0, 3.0, size=(3, 5, 4, 6)))
  g = jnp.asarray(rng.normal(size=x.shape))
  gm, gv = (jnp.asarray(rng.normal(size=6)) for _ in range(2))
  params = {'scale': jnp.asarray(rng.normal(size=6)), 'bias': jnp.asarray(rng.normal(size=6))}
  stats = {'mean': jnp.zeros(6), 'var': jnp.ones(6)}

  def loss(x, params, impl):
    y, new = ops.batch_norm(params, stats, x, True, impl)
    return jnp.sum(g * y), new

  (v_s, new_s), grads_s = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params, 'shift')
  (v_a, new_a), grads_a = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params, 'autodiff')
  np.testing.assert_allclose(v_s, v_a, rtol=1e-12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), new_s, new_a)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), grads_s, grads_a)

  def stats_loss(x, f):
    y, mean, var = f(x)
    return jnp.sum(g * y) + jnp.dot(gm, mean) + jnp.dot(gv, var)

  np.testing.assert_allclose(jax.grad(stats_loss)(x, ops._shift_normalize),
                             jax.grad(stats_loss)(x, ops.batch_normalize), rtol=1e-10, atol=1e-12)


def test_pointwise_conv_vjp_equals_conv(x64):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 4)))
  kernel = jnp.asarray(rng.normal(size=(1, 1, 4, 7)))
  g = jnp.asarray(rng.normal(size=(2, 5, 3, 7)))
  shift = jax.value_and_grad(lambda x, k: jnp.sum(g * ops.pointwise_conv2d(x, k, 'shift')), (0, 1))(x, kernel)
  conv = jax.value_and_grad(lambda x, k: jnp.sum(g * ops.conv2d(x, k)), (0, 1))(x, kernel)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), shift, conv)


@pytest.mark.parametrize('primitive', ['sep_conv_3x3', 'dil_conv_5x5', 'max_pool_3x3', 'avg_pool_3x3'])
@pytest.mark.parametrize('stride', [1, 2])
def test_composite_ops_train_mode_gradients_agree(x64, primitive, stride):
  """A whole train-mode op (ReLU, window ops, 1x1 convs, BatchNorm): value, weight and input gradients of
  'shift' (every hand-written VJP) equal plain autodiff, and so does double backprop through it."""
  op = ops.OPS[primitive]
  params, stats = op.init(np.random.default_rng(7), 4, stride, True, True)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 4)))
  g = jnp.asarray(rng.normal(size=op.apply(params, stats, x, stride, True, 'autodiff')[0].shape))

  def loss(params, x, impl):
    return jnp.sum(g * jnp.tanh(op.apply(params, stats, x, stride, True, impl)[0]))

  def input_grad_norm(params, impl):
    return jnp.sum(jax.grad(loss, 1)(params, x, impl) ** 2)

  first = {impl: jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(params, x, impl)
           for impl in ('shift', 'autodiff')}
  second = {impl: jax.jit(jax.grad(input_grad_norm), static_argnums=1)(params, impl)
            for impl in ('shift', 'autodiff')}
  for out in (first, second):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11), out['shift'],
                 out['autodiff'])


def test_max_pool_ties_follow_pytorch(x64):
  """Plateaus (a max pool of a max pool) create ties: the gradient goes to the first maximal element."""
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 8, 8, 3))
  for stride in (1, 2):
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    pooled = torch.nn.functional.max_pool2d(torch.nn.functional.max_pool2d(xt, 3, 1, 1), 3, stride, 1)
    g = rng.normal(size=pooled.shape)
    (pooled * torch.tensor(g)).sum().backward()
    f = lambda x: jnp.sum(jnp.asarray(g.transpose(0, 2, 3, 1)) *
                          ops.max_pool(ops.max_pool(x, 3, 1, 1, 'shift'), 3, stride, 1, 'shift'))
    np.testing.assert_allclose(jax.grad(f)(jnp.asarray(x)), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-12)


def test_second_order_reverse_mode_through_custom_vjps(x64):
  """Double backprop (AdvRush's curvature term differentiates an input gradient) matches plain autodiff."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)))
  w = jnp.asarray(rng.normal(size=(3, 3, 1, 3)))

  def input_grad_norm(w, impl):
    loss = lambda x: jnp.sum(jnp.tanh(ops.max_pool(ops.depthwise_conv2d(x, w, 1, 2, 2, impl), 3, 1, 1, impl)))
    return jnp.sum(jax.grad(loss)(x) ** 2)

  np.testing.assert_allclose(jax.grad(input_grad_norm)(w, 'shift'), jax.grad(input_grad_norm)(w, 'autodiff'),
                             rtol=1e-10)


def test_against_torch(x64):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, 9, 4))
  xt = torch.tensor(x.transpose(0, 3, 1, 2))
  for stride in (1, 2):
    avg = torch.nn.functional.avg_pool2d(xt, 3, stride, 1, count_include_pad=False).numpy()
    mx = torch.nn.functional.max_pool2d(xt, 3, stride, 1).numpy()
    np.testing.assert_allclose(ops.avg_pool(jnp.asarray(x), 3, stride, 1, 'shift'), avg.transpose(0, 2, 3, 1),
                               rtol=1e-12)
    np.testing.assert_allclose(ops.max_pool(jnp.asarray(x), 3, stride, 1, 'shift'), mx.transpose(0, 2, 3, 1))
  w = rng.normal(size=(5, 5, 1, 4))
  ref = torch.nn.functional.conv2d(xt, torch.tensor(w.transpose(3, 2, 0, 1)), stride=2, padding=4, dilation=2,
                                   groups=4).numpy()
  np.testing.assert_allclose(ops.depthwise_conv2d(jnp.asarray(x), jnp.asarray(w), 2, 4, 2, 'shift'),
                             ref.transpose(0, 2, 3, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('backend,supernet,expected', [
    ('cpu', False, 'shift'), ('cpu', True, 'shift'), ('gpu', False, 'grouped'), ('gpu', True, 'shift'),
    ('tpu', False, 'grouped'), ('tpu', True, 'grouped')])
def test_auto_formulation_by_backend_and_network(monkeypatch, backend, supernet, expected):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert ops.resolve_depthwise('auto', supernet=supernet) == expected
  assert ops.resolve_depthwise('autodiff', supernet=supernet) == 'autodiff'   # an explicit choice stays


def test_unknown_formulation():
  with pytest.raises(ValueError, match="unknown depthwise formulation 'fast'"):
    ops.resolve_depthwise('fast')
