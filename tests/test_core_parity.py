"""Parity of ops, supernet and evaluation networks with the original PyTorch code (../shared/fixtures)."""
import functools
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import genotypes, interop, networks, search_space

# fixtures/README.md: 1e-5 relative in float32, 1e-9 in float64, relative to the scale of the reference
# (element-wise relative error is meaningless for outputs near zero: PyTorch's own float32 run of the
# DARTS_V2 auxiliary head differs from the float64 fixture by 5e-5 relative on its smallest logit).
RTOL = {jnp.float32: 1e-5, jnp.float64: 1e-9}


def assert_close(actual, expected, dtype):
  expected = np.asarray(expected)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=RTOL[dtype],
                             atol=RTOL[dtype] * scale)
DTYPES = [pytest.param(jnp.float64, id='f64'), pytest.param(jnp.float32, id='f32')]


@pytest.fixture(params=DTYPES)
def dtype(request):
  if request.param == jnp.float64:
    jax.config.update('jax_enable_x64', True)
  yield request.param
  jax.config.update('jax_enable_x64', False)


def _load(shared_dir, name):
  return dict(np.load(shared_dir / 'fixtures' / f'{name}.npz'))


def _nhwc(a, dtype):
  return jnp.asarray(a.transpose(0, 2, 3, 1), dtype)


def _undo_one_train_update(saved, new):
  """The fixture's state_dict was saved after the train-mode forward that produced ``logits_train``, so its
  running statistics include one PyTorch update r' = 0.9 r + 0.1 b (unbiased var); ``new`` = 0.9 r' + 0.1 b
  is our own update from r', hence r = (1.9 r' - new) / 0.9."""
  return jax.tree.map(lambda s, n: (1.9 * s - n) / 0.9, saved, new)


def test_darts_v2_eval_network(shared_dir, dtype):
  d = _load(shared_dir, 'darts_v2_eval_network')
  net = networks.EvalNetwork(genotypes.get('DARTS_V2'), init_channels=8, layers=5, num_classes=10,
                             auxiliary=True)
  v = interop.from_torch_state_dict(shared_dir / 'fixtures' / 'darts_v2_eval_network.npz', net, dtype=dtype)
  x = _nhwc(d['input_nchw'], dtype)
  logits, aux, new_stats = jax.jit(lambda v, x: net.apply(v, x, train=True))(v, x)
  assert_close(logits, d['logits_train'], dtype)
  assert_close(aux, d['logits_aux_train'], dtype)
  v_eval = {'params': v['params'], 'batch_stats': _undo_one_train_update(v['batch_stats'], new_stats)}
  assert_close(jax.jit(net.apply)(v_eval, x), d['logits_eval'], dtype)
  # The saved statistics are exactly our running-statistics update from the recovered ones.
  _, _, again = jax.jit(lambda v, x: net.apply(v, x, train=True))(v_eval, x)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(v['batch_stats'])):
    assert_close(a, b, dtype)


def test_dsara_eval_network(shared_dir, dtype):
  d = _load(shared_dir, 'dsara_arnas_eval_network')
  net = networks.EvalNetwork(genotypes.get('DSARA'), init_channels=8, layers=5, num_classes=10, auxiliary=True)
  assert [s.c for s in net.plan] == [8, 16, 16, 16, 16]  # 1-2-2 widths
  assert [s.cell_type for s in net.plan] == ['accurate', 'reduce', 'accurate', 'reduce', 'robust']
  v = interop.from_torch_state_dict(shared_dir / 'fixtures' / 'dsara_arnas_eval_network.npz', net,
                                    dtype=dtype)
  assert_close(jax.jit(net.apply)(v, _nhwc(d['input_nchw'], dtype)), d['logits_eval'], dtype)


def test_darts_search_supernet(shared_dir, dtype):
  d = _load(shared_dir, 'darts_search_supernet')
  net = search_space.Supernet(init_channels=4, layers=5, num_classes=10)
  v = interop.from_torch_state_dict(shared_dir / 'fixtures' / 'darts_search_supernet.npz', net, dtype=dtype)
  x = _nhwc(d['input_nchw'], dtype)
  alphas = {'normal': jnp.asarray(d['alphas_normal'], dtype), 'reduce': jnp.asarray(d['alphas_reduce'], dtype)}

  def loss(alphas, x):
    logits, _ = net.apply(v, alphas, x, train=True)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), d['labels'][:, None], 1)), logits

  (value, logits), (g_alpha, g_x) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(alphas, x)
  assert_close(logits, d['logits_train'], dtype)
  assert_close(value, d['loss'], dtype)
  assert_close(g_alpha['normal'], d['grad_alphas_normal'], dtype)
  assert_close(g_alpha['reduce'], d['grad_alphas_reduce'], dtype)
  assert_close(g_x, _nhwc(d['grad_input_nchw'], dtype), dtype)
  derived = net.derive(alphas)
  assert derived == genotypes.Genotype.from_json(str(d['derived_genotype_json']))
  assert derived.to_dict() == json.loads(str(d['derived_genotype_json']))


@pytest.mark.parametrize('space,layers,multiplier', [('darts', 8, 4), ('dsara', 7, 4), ('darts', 6, 2),
                                                     ('darts', 4, 4)])
def test_deep_supernets_match_the_pytorch_reference(space, layers, multiplier, x64):
  """Stages of several normal cells (one ``lax.scan`` per stage: zero-padded stem, look-ahead preprocessing)
  against the reference supernet of ``benchmarks/torch_reference.py`` (itself checked against the original
  code's fixture): train-mode logits, gradients of alphas and input, and the updated running statistics.
  ``multiplier=2`` (2 nodes per cell): cell outputs narrower than the stem, zero-padded in the scan."""
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference as tr  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  layout = tr.DSARA_LAYOUT if space == 'dsara' else tr.DARTS_LAYOUT
  primitives = ('max_pool_3x3', 'skip_connect', 'dil_conv_3x3') + (() if space == 'dsara' else ('none',))
  model = tr.SearchNetwork(C=4, num_classes=10, layers=layers, primitives=primitives, layout=layout,
                           steps=multiplier, multiplier=multiplier).double()
  t_alphas = {t: a.detach().double().requires_grad_() for t, a in
              model.new_alphas(torch.Generator().manual_seed(0)).items()}
  x = np.random.default_rng(0).random((3, 3, 16, 16))
  t_x = torch.from_numpy(x).requires_grad_()
  net = search_space.Supernet(space=search_space.make_space(space, primitives=primitives), init_channels=4,
                              layers=layers, steps=multiplier, multiplier=multiplier)
  v = interop.from_torch_state_dict(model.state_dict(), net, input_shape=(3, 16, 16, 3), dtype=jnp.float64)
  alphas = {t: jnp.asarray(a.detach().numpy()) for t, a in t_alphas.items()}

  def loss(alphas, x):
    logits, new_stats = net.apply(v, alphas, x, train=True)
    return jnp.sum(jnp.sin(logits)), (logits, new_stats)

  (_, (logits, new_stats)), (g_alphas, g_x) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
      alphas, jnp.asarray(x.transpose(0, 2, 3, 1)))
  t_logits = model.train()(t_x, t_alphas)
  torch.sin(t_logits).sum().backward()
  assert_close(logits, t_logits.detach().numpy(), jnp.float64)
  for t in alphas:
    assert_close(g_alphas[t], t_alphas[t].grad.numpy(), jnp.float64)
  assert_close(g_x, t_x.grad.numpy().transpose(0, 2, 3, 1), jnp.float64)
  with torch.no_grad():   # inference with the running statistics both updated
    expected = model.eval()(t_x, t_alphas).numpy()
  assert_close(net.apply({'params': v['params'], 'batch_stats': new_stats}, alphas, jnp.asarray(
      x.transpose(0, 2, 3, 1))), expected, jnp.float64)


def _mixed_op_scans(jaxpr) -> int:
  """The ``lax.scan``s whose own body calls the mixed op: each is one mixed-op body in the compiled program."""
  count = 0
  for eqn in jaxpr.eqns:
    subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
    if eqn.primitive.name == 'scan':
      count += any(_calls_mixed_op(sub) for sub in subs)
    count += sum(_mixed_op_scans(sub) for sub in subs)
  return count


def _calls_mixed_op(jaxpr) -> bool:
  return any(eqn.params.get('name') == '_traced_mixed_op'
             or (eqn.primitive.name != 'scan'
                 and any(map(_calls_mixed_op, jax.extend.core.jaxprs_in_params(eqn.params))))
             for eqn in jaxpr.eqns)


@pytest.mark.parametrize('layers', [3, 4, 8, 20])
def test_supernet_holds_five_mixed_op_bodies_at_any_depth(layers):
  """Three stages and the stride-2 edges of two reduction cells: a reduction cell's stride-1 edges run in the
  next stage's scan, or on their own where no normal cell follows (3 and 4 cells), in place of a stage."""
  net = search_space.Supernet(init_channels=4, layers=layers)
  x = jnp.zeros((2, 16, 16, 3))
  v, alphas = net.init(jax.random.PRNGKey(0), x), net.init_alphas(jax.random.PRNGKey(1))
  jaxpr = jax.make_jaxpr(lambda v, a, x: net.apply(v, a, x, train=True))(v, alphas, x).jaxpr
  assert _mixed_op_scans(jaxpr) == 5


def test_shift_supernet_gradients_equal_plain_autodiff(x64):
  """The 'shift' supernet (hand-written VJPs; each edge a custom VJP whose backward conditional recomputes
  the active edge or returns zeros) against plain autodiff of the same sums under ``jax.checkpoint``:
  gradients w.r.t. weights, alphas and input. Four cells (N R R N), four primitives (one of each kind):
  inactive edges run in the last stage's first iteration, and the first reduction's stride-1 edges on
  their own."""
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 8, 3), jnp.float64)
  space = search_space.make_space('darts', primitives=('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3'))
  nets = {d: search_space.Supernet(space, init_channels=2, layers=4, depthwise=d) for d in ('shift', 'autodiff')}
  v = nets['shift'].init(jax.random.PRNGKey(0), x)
  alphas = jax.tree.map(lambda a: 300.0 * a, nets['shift'].init_alphas(jax.random.PRNGKey(1)))
  grads = {}
  for name, net in nets.items():
    def loss(params, alphas, x, net=net):
      logits, _ = net.apply({'params': params, 'batch_stats': v['batch_stats']}, alphas, x, train=True)
      return jnp.sum(jnp.sin(logits))
    grads[name] = jax.jit(jax.grad(loss, (0, 1, 2)))(v['params'], alphas, x)
  flat = {name: jax.tree.leaves(g) for name, g in grads.items()}
  assert len(flat['shift']) == len(flat['autodiff']) > 20
  for a, b in zip(flat['shift'], flat['autodiff']):
    assert_close(a, b, jnp.float64)


@pytest.mark.parametrize('active', [True, False])
def test_rematerialised_edge_has_the_derivatives_of_the_checkpointed_edge(active, x64):
  """One edge of the 'shift' supernet: its custom VJP against ``jax.checkpoint`` of the same conditional, in
  first order and through double backprop (gradient of the squared input-gradient norm), active or not."""
  primitives = ('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3', 'dil_conv_3x3')
  run = functools.partial(search_space._traced_mixed_op, primitives=primitives, stride=1, train=True,
                          depthwise='shift')
  params, stats = search_space._mixed_op_init(primitives, np.random.default_rng(0), 3, 1)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
  stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), stats)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3), jnp.float64)
  w = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (len(primitives),), jnp.float64))
  g = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 6, 3), jnp.float64)
  edges = {'custom': search_space._rematerialised(run), 'checkpoint': jax.checkpoint(search_space._skippable(run))}
  out = {}
  for name, edge in edges.items():
    loss = lambda p, x, w, edge=edge: jnp.sum(jnp.sin(edge(p, stats, x, w, jnp.asarray(active))[0]) * g)
    input_grad_norm = lambda p, x, w, loss=loss: jnp.sum(jax.grad(loss, 1)(p, x, w)**2)
    out[name] = jax.jit(lambda p, x, w, loss=loss, ign=input_grad_norm: (
        jax.grad(loss, (0, 1, 2))(p, x, w), jax.grad(ign, (0, 1, 2))(p, x, w)))(params, x, w)
  for a, b in zip(jax.tree.leaves(out['custom']), jax.tree.leaves(out['checkpoint'])):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  assert all(bool(np.any(a != 0)) == active for a in jax.tree.leaves(out['custom']))
