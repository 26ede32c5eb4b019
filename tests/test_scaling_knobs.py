"""Scaling knobs: gradient accumulation (``parallel.grad_accum_steps``) and bfloat16 compute
(``model.compute_dtype`` / ``train.compute_dtype``).

Accumulation is checked through the real jitted steps against an independent reference: with gradient
clipping off, one SGD step is linear in the gradient (the momentum buffer starts at zero), so the step
accumulated over k micro-batches must equal the mean of k one-micro-batch steps from the same state, and the
running BatchNorm statistics must equal those of the micro-batches run one after another. A tiny supernet /
evaluation network on 8x8 inputs keeps the compilations small.
"""
import dataclasses
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import bilevel, data, genotypes, main, networks, parallel, schedules, search_space, train
from jaxnas.objectives import compose

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PRIMITIVES = ('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3')
SHAPE = (8, 8, 1)
K = 2   # micro-batches
N = 8   # examples per batch (strided micro-batches: j, j + K, ...)


def _supernet(primitives=PRIMITIVES, **kwargs):
  space = search_space.make_space('darts', primitives=primitives)
  return search_space.Supernet(space=space, init_channels=2, layers=3, num_classes=3, mean=(0.5,), std=(0.25,),
                               **kwargs)


def _images(seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (N, *SHAPE), dtype=np.uint8), 'label': rng.integers(0, 3, N)}


def _slice(batch, j):
  return {k: (v[j::K] if np.ndim(v) else v) for k, v in batch.items()}


def _mean_of_steps(step, state, batch):
  """The reference: K one-micro-batch steps from the same weights, running statistics threaded in order."""
  outs, stats = [], state.batch_stats
  for j in range(K):
    out, metrics = step(state.replace(batch_stats=stats), _slice(batch, j))
    outs.append((out, metrics))
    stats = out.batch_stats
  mean = lambda get: jax.tree.map(lambda *xs: sum(xs) / K, *[get(o) for o in outs])
  return mean(lambda o: o[0].params), stats, mean(lambda o: o[1]['train/loss'])


def _assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def _max_difference(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


def _check_accumulation(step, accumulated_step, state, batch):
  """The accumulated step equals the mean of K one-micro-batch steps (``_mean_of_steps``), and the check is not
  vacuous: the weights moved, and the running statistics depend on the micro-batches' order. Returns the
  accumulated step's new state."""
  new, metrics = accumulated_step(state, batch)
  params, stats, loss = _mean_of_steps(step, state, batch)
  _assert_trees_close(new.params, params, atol=2e-6)
  _assert_trees_close(new.batch_stats, stats, atol=1e-6)
  np.testing.assert_allclose(metrics['train/loss'], loss, rtol=1e-6)
  assert _max_difference(new.params, state.params) > 1e-2
  unthreaded, _ = step(state, _slice(batch, 1))
  assert _max_difference(unthreaded.batch_stats, stats) > 1e-3
  return new


def test_accumulated_weight_step_is_the_mean_of_micro_batch_steps():
  ce = compose.spec_from_config({'name': 'ce', 'label': 'ce', 'weight': 1.0, 'kwargs': {}}, 'test')
  # No convolutions on the edges (quick to compile); the cells' 1x1 preprocessing convs and BN remain.
  program = bilevel.Program(model=_supernet(PRIMITIVES[:3]), input_shape=SHAPE, lower=(ce,), upper=(ce,),
                            weights=bilevel.WeightOptim(grad_clip=0.0))
  accumulated = dataclasses.replace(program, grad_accum_steps=K)
  phase = schedules.Phase(lower=('ce',), upper=(), arch=False, project=False)
  batch = {**_images(), 'epoch': np.int32(0)}
  state = bilevel.init_state(program, jax.random.key(0), batch['image'])
  hparams = {'w_lr': np.float32(0.5), 'a_lr': np.float32(0.0)}
  step = lambda prog: lambda s, b: bilevel.weight_step(prog, phase, s, b, hparams)

  new = _check_accumulation(step(program), step(accumulated), state, batch)
  assert int(new.step) == 1


def test_accumulated_train_step_is_the_mean_of_micro_batch_steps():
  net = networks.EvalNetwork(genotypes.get('DARTS_V2'), init_channels=4, layers=3, num_classes=3, mean=(0.5,),
                             std=(0.25,))
  recipe = train.Recipe(net=net, optim=bilevel.WeightOptim(grad_clip=0.0))
  batch = _images(1)
  state = train.init_state(net, jax.random.key(1), SHAPE)
  hparams = {'lr': np.float32(0.5), 'drop_path_prob': np.float32(0.0)}
  step = lambda r: lambda s, b: train.train_step(r, s, b, hparams)

  _check_accumulation(step(recipe), step(dataclasses.replace(recipe, grad_accum_steps=K)), state, batch)


def test_batch_that_does_not_split_into_micro_batches_is_refused():
  with pytest.raises(ValueError, match='choose a multiple of 4'):
    parallel.check_batch_size(6, parallel.make_mesh(1), grad_accum_steps=4)
  with pytest.raises(ValueError, match='compute_dtype'):
    _supernet(compute_dtype='float16')


def _assert_close_but_not_equal(logits_bf16, logits):
  """bf16 has an 8-bit mantissa (2^-8 ~ 4e-3 per rounding); these tiny networks normalise small batches, which
  amplifies it: rounding only the weights and inputs of the supernet to bf16 moves its logits by 1.5%, bf16
  compute by 2.8% (measured)."""
  assert logits_bf16.dtype == jnp.float32   # losses are built in float32
  error = float(jnp.linalg.norm(logits_bf16 - logits) / jnp.linalg.norm(logits))
  assert 1e-4 < error < 6e-2, error   # and NOT equal: bf16 was used


def _assert_float32_stats(stats_bf16, stats):
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(stats_bf16))   # running statistics stay float32
  assert _max_difference(stats_bf16, stats) < 5e-2


def test_bfloat16_forward_is_close_to_float32_but_not_equal():
  x = jnp.asarray(_images(2)['image'], jnp.float32) / 255
  # The supernet (search).
  model, model_bf16 = _supernet(), _supernet(compute_dtype='bfloat16')
  variables, alphas = model.init(jax.random.key(2), x), model.init_alphas(jax.random.key(3))
  apply = jax.jit(lambda m, v, x: m.apply(v, alphas, x, train=True), static_argnums=0)
  (logits, stats), (logits_bf16, stats_bf16) = (apply(m, variables, x) for m in (model, model_bf16))
  _assert_close_but_not_equal(logits_bf16, logits)
  _assert_float32_stats(stats_bf16, stats)
  # The evaluation network of a bfloat16 training config (train mode with drop-path).
  config = train.default_config()
  config.train.update(dict(init_channels=4, layers=3, auxiliary=False, compute_dtype='bfloat16'))
  config.data.update(dict(source='digits', name='', num_examples=8))
  dataset = data.load(config.data)
  net_bf16 = train.make_network(genotypes.get('DARTS_V2'), config.train, dataset)
  net = dataclasses.replace(net_bf16, compute_dtype='float32')
  variables = net.init(jax.random.key(4), x)
  apply = jax.jit(lambda m, v, x: m.apply(v, x, train=True, rng=jax.random.key(5), drop_path_prob=jnp.float32(0.2)),
                  static_argnums=0)
  (logits, _, stats), (logits_bf16, _, stats_bf16) = (apply(m, variables, x) for m in (net, net_bf16))
  _assert_close_but_not_equal(logits_bf16, logits)
  _assert_float32_stats(stats_bf16, stats)


def _run_main(args, workdir):
  argv = ['jaxnas.main', *args, f'--workdir={workdir}']
  saved = sys.argv
  try:
    return main.main(main.parse_flags(argv))
  finally:
    sys.argv = saved


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_bfloat16_search_with_gradient_accumulation_through_main(tmp_path):
  args = [f'--config={REPO_ROOT / "configs" / "darts.py"}:smoke', '--config.model.init_channels=2',
          '--config.model.layers=3', f'--config.model.primitives={PRIMITIVES}', '--config.data.num_examples=16',
          '--config.search.batch_size=4', '--config.search.epochs=1', '--config.parallel.grad_accum_steps=2',
          '--config.model.compute_dtype=bfloat16']
  before = dict(bilevel.TRACES)
  assert _run_main(args, tmp_path) == 0
  # Each step traced once: the float32 weights, optimizer state and BN statistics keep their dtypes.
  assert {k: bilevel.TRACES[k] - before.get(k, 0) for k in ('search_step', 'arch_step', 'weight_step')} == {
      'search_step': 1, 'arch_step': 1, 'weight_step': 1}
  records = [r for r in _metrics(tmp_path) if 'train/loss' in r]
  assert [r['step'] for r in records] == [1, 2]
  assert all(np.isfinite(r['train/loss']) and np.isfinite(r['val/loss']) for r in records)
  with np.load(tmp_path / 'alphas.npz') as f:
    assert f['normal'].dtype == np.float32 and np.max(np.abs(f['normal'])) > 1e-3
