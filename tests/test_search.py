"""The search driver's pieces: schedules, phases, data streams, NaN reports, per-epoch records, configs,
derive mode, resource cost tables, console and metric files (no compilation of the supernet)."""
import importlib.util
import io
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import analysis, data, genotypes, schedules, search, search_space
from jaxnas import workdir as workdir_lib
from jaxnas.objectives import compose

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_module(name):
  spec = importlib.util.spec_from_file_location(f'config_{name}', REPO_ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------------------------------------------
# Schedules and phases.
# ------------------------------------------------------------------------------------------------
def test_cosine_lr_is_torch_cosine_annealing_per_epoch():
  # torch.optim.lr_scheduler.CosineAnnealingLR recursion, stepped once per epoch (T_max=50, eta_min=0.001).
  lr, expected = 0.025, [0.025]
  for e in range(1, 51):
    prev = expected[-1]
    expected.append(0.001 + (prev - 0.001) * (1 + math.cos(math.pi * e / 50)) / (1 + math.cos(math.pi * (e - 1) / 50)))
  got = [schedules.cosine_lr(lr, 0.001, 50, e) for e in range(51)]
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  assert got[0] == 0.025 and abs(got[50] - 0.001) < 1e-15


def test_piecewise_lr_and_errors():
  assert [schedules.piecewise_lr(3e-4, (20,), (5e-5,), e) for e in (0, 19, 20, 29)] == [3e-4, 3e-4, 5e-5, 5e-5]
  with pytest.raises(ValueError, match='differ in length'):
    schedules.piecewise_lr(1.0, (1, 2), (0.5,), 0)


def test_phase_stage_switch_warmup_and_projection():
  spec = lambda label, start=0, end=-1: compose.ObjectiveSpec('ce', label, start_epoch=start, end_epoch=end)
  lower = (spec('ce'),)
  upper = (spec('nat', start=20), spec('adv'))  # DSARA: adversarial only, both from epoch 20 (MGDA)
  kw = dict(step_in_epoch=0, steps_per_epoch=10)
  assert schedules.phase(lower, upper, epoch=19, **kw).upper == ('adv',)
  assert schedules.phase(lower, upper, epoch=20, **kw).upper == ('nat', 'adv')
  # RNAS: weights only for 15 epochs, then projection in the second half of each epoch.
  warm = schedules.phase(lower, upper, epoch=14, arch_start_epoch=15, project_from=0.5, **kw)
  assert not warm.arch and warm.upper == () and not warm.project
  kw_half = dict(steps_per_epoch=10, arch_start_epoch=15, project_from=0.5)
  assert not schedules.phase(lower, upper, epoch=15, step_in_epoch=4, **kw_half).project
  assert schedules.phase(lower, upper, epoch=15, step_in_epoch=5, **kw_half).project
  with pytest.raises(ValueError, match='no lower-level objective is active at epoch 3'):
    schedules.phase((spec('ce', end=3),), upper, epoch=3, **kw)


# ------------------------------------------------------------------------------------------------
# Data streams, NaN reports, per-epoch records.
# ------------------------------------------------------------------------------------------------
def test_cycle_is_a_function_of_the_position():
  images = np.arange(10)[:, None, None, None].astype(np.uint8)
  labels = np.arange(10)
  stream = search._cycle(images, labels, 3, seed=5, start=0)
  first = [next(stream).labels for _ in range(7)]  # 3 batches per pass: crosses two passes
  resumed = search._cycle(images, labels, 3, seed=5, start=4)
  np.testing.assert_array_equal(np.concatenate([next(resumed).labels for _ in range(3)]),
                                np.concatenate(first[4:7]))
  # Each pass visits distinct examples in the order drawn from (seed, pass).
  np.testing.assert_array_equal(np.concatenate(first[:3]), data.epoch_order(10, 5, 0)[:9])
  np.testing.assert_array_equal(np.concatenate(first[3:6]), data.epoch_order(10, 5, 1)[:9])


def test_check_finite_names_the_objective_step_and_checkpoint():
  phase = schedules.Phase(('ce',), ('ce', 'adv_ce'), True, False)
  ok = {'train/ce': 1.0, 'val/ce': 2.0, 'val/adv_ce': 3.0, 'train/weights_finite': True}
  search.check_finite(ok, 5, 0, phase, '')
  with pytest.raises(FloatingPointError, match=r"^NaN in the architecture step's objective 'adv_ce' at step 123 "
                                               r"\(epoch 2\); last good checkpoint kept at runs/x/checkpoints/100; "
                                               r"lower the learning"):
    search.check_finite({**ok, 'val/adv_ce': float('nan')}, 123, 2, phase, 'runs/x/checkpoints/100')
  with pytest.raises(FloatingPointError, match=r"^inf in the weight step's objective 'ce' at step 1 \(epoch 1\); no "):
    search.check_finite({**ok, 'train/ce': float('inf')}, 1, 1, phase, '')
  with pytest.raises(FloatingPointError, match=r'^NaN or inf in the weights after the update at step 7'):
    search.check_finite({**ok, 'train/weights_finite': False}, 7, 1, phase, '')


def test_alpha_entropy_and_op_counts():
  uniform = {'normal': np.zeros((14, 8)), 'reduce': np.zeros((14, 8))}
  np.testing.assert_allclose(list(search.alpha_entropy(uniform).values()), [np.log(8)] * 2, rtol=1e-12)
  peaked = {'normal': np.where(np.arange(8) == 3, 50.0, 0.0) * np.ones((14, 1))}
  assert search.alpha_entropy(peaked)['normal'] < 1e-15
  counts = search.op_counts(genotypes.get('DARTS_V2'))
  assert counts['normal'] == {'sep_conv_3x3': 5, 'skip_connect': 2, 'dil_conv_3x3': 1}
  assert sum(counts['reduce'].values()) == 8


# ------------------------------------------------------------------------------------------------
# Configs and modes.
# ------------------------------------------------------------------------------------------------
def test_darts_config_has_the_paper_settings():
  darts = _config_module('darts')
  c = darts.get_config()
  assert (c.model.init_channels, c.model.layers, c.search.batch_size, c.search.epochs) == (16, 8, 64, 50)
  assert (c.optim.lr, c.optim.lr_min, c.optim.momentum, c.optim.weight_decay, c.optim.grad_clip) == (
      0.025, 0.001, 0.9, 3e-4, 5.0)
  assert (c.arch.lr, c.arch.b1, c.arch.b2, c.arch.weight_decay, c.arch.order) == (3e-4, 0.5, 0.999, 1e-3, 1)
  assert (c.data.source, c.data.name, c.data.val_fraction, c.data.crop_padding, c.data.flip) == (
      'tfds', 'cifar10', 0.5, 4, True)
  assert [e.name for e in c.search.lower] == ['ce'] and [e.name for e in c.search.upper] == ['ce']
  assert darts.get_config('second_order').arch.order == 2
  smoke = darts.get_config('smoke,second_order')
  assert smoke.data.source == 'digits' and smoke.model.init_channels == 4 and smoke.arch.order == 2
  with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['fast'\]"):
    darts.get_config('fast')
  quick = _config_module('quickstart')
  assert quick.get_config().data.source == 'digits' and quick.get_config().mode == 'pipeline'
  assert quick.get_config('smoke').search.epochs <= 2


def test_objective_entries_list_every_argument():
  entry = search.objective('adv_ce', weight=0.5, eps=0.1)
  assert entry.kwargs.eps == 0.1 and entry.kwargs.steps == 7 and entry.kwargs.attack_mode == 'train'
  assert compose.spec_from_config(entry, 'x').weight == 0.5
  with pytest.raises(ValueError, match="objective 'adv_ce' has no argument 'epsilon'"):
    search.objective('adv_ce', epsilon=0.1)


def test_derive_mode_writes_the_genotype_of_the_final_alphas(tmp_path):
  alphas = {t: np.random.default_rng(k).normal(size=(14, 8)) for k, t in enumerate(('normal', 'reduce'))}
  workdir_lib.save_alphas(str(tmp_path / 'alphas.npz'), alphas)
  genotype = search.derive(search.default_config(), str(tmp_path))
  stored = {t: np.asarray(a, np.float32) for t, a in alphas.items()}
  assert genotype == genotypes.derive(stored, search_space.DARTS.primitives)
  assert genotypes.load(str(tmp_path)) == genotype
  with pytest.raises(FileNotFoundError, match='run the search first'):
    search.derive(search.default_config(), str(tmp_path / 'empty'))


# ------------------------------------------------------------------------------------------------
# E2RNAS resource tables.
# ------------------------------------------------------------------------------------------------
def test_op_cost_tables_add_up_to_the_supernet_counts():
  net = search_space.Supernet(init_channels=2, layers=3, num_classes=10)
  shape = (1, 8, 8, 3)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros(shape))['params']
  edges = [params['stages']] + [cell.get('edges') for cell in params['cells']]  # reduction cells' own edges
  edge_params = sum(int(np.size(x)) for x in jax.tree.leaves(edges))
  costs = compose.op_costs(net, shape[1:], 'params')
  assert sum(c.sum() for c in costs.values()) == edge_params
  # MACs: the full supernet minus one whose edges hold only MAC-free ops (stem, preprocessing, head).
  flops = compose.op_costs(net, shape[1:], 'flops')
  pools = search_space.Supernet(space=search_space.make_space(primitives=('none', 'max_pool_3x3')),
                                init_channels=2, layers=3, num_classes=10)
  assert sum(c.sum() for c in flops.values()) == analysis.count_macs(net, shape) - analysis.count_macs(pools, shape)
  # The objective is |sum_edges softmax(alpha) . cost - L| (here in raw units).
  objective = compose.build(compose.spec_from_config(
      {'name': 'params', 'kwargs': {'lower_bound': 10.0, 'scale': 1.0}}, 'x'), net, shape[1:])
  one_hot = {t: jnp.where(jnp.arange(8) == 4, 60.0, -60.0) * jnp.ones((14, 1)) for t in costs}  # sep_conv_3x3
  value, aux = objective(None, {}, one_hot, {}, None)
  expected = sum(c[:, 4].sum() for c in costs.values())
  np.testing.assert_allclose(aux.metrics['expected'], expected, rtol=1e-5)
  np.testing.assert_allclose(value, expected - 10.0, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Console and metric files.
# ------------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_console_progress_bar_on_terminals_and_log_lines_otherwise(tmp_path):
  terminal = _Terminal()
  console = workdir_lib.Console(str(tmp_path), stream=terminal)
  console.progress(1, 10, 'epoch 1/2')
  console.progress(2, 10, 'epoch 1/2')
  console.log('epoch 1/2 done')
  console.close()
  out = terminal.getvalue()
  assert out.startswith('\r[##') and 'steps/s, ETA' in out and out.endswith('epoch 1/2 done\n')
  plain = io.StringIO()
  console = workdir_lib.Console(str(tmp_path), stream=plain)
  console.progress(3, 10, 'epoch 1/2')
  console.log('step line', terminal=True)
  console.close()
  assert plain.getvalue() == 'step line\n'
  assert (tmp_path / 'log.txt').read_text().count('epoch 1/2 done') == 1


def test_metric_writer_drops_records_after_the_resumed_checkpoint(tmp_path):
  writer = workdir_lib.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    writer.write(step, {'train/loss': 1.0 / step}, epoch=0)
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 6, "train/lo')  # a line cut short by a killed process
  writer = workdir_lib.MetricWriter(str(tmp_path), resume_step=3)
  writer.write(4, {'train/loss': 0.5}, epoch=0)
  writer.close()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4] and records[-1]['train/loss'] == 0.5


# ------------------------------------------------------------------------------------------------
# The objectives and the second-order step on the real supernet (shapes only: tracing, no compilation).
# ------------------------------------------------------------------------------------------------
def test_objectives_and_the_second_order_step_trace_on_the_supernet():
  from jaxnas import bilevel  # pylint: disable=g-import-not-at-top
  space = search_space.make_space(primitives=('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3'))
  net = search_space.Supernet(space=space, init_channels=2, layers=3, num_classes=10, mean=(0.5,) * 3,
                              std=(0.25,) * 3)
  x = np.zeros((4, 8, 8, 3), np.uint8)
  batch = {'image': jnp.zeros((4, 8, 8, 3)), 'label': jnp.zeros((4,), jnp.int32), 'epoch': jnp.int32(0),
           'ood_image': jnp.zeros((4, 8, 8, 3))}
  # (curvature and distortion, whose traces take longer, are exercised with the methods' configs.)
  specs = compose.specs_from_config([search.objective(n) for n in ('ce', 'jacobian', 'ood_kl', 'params', 'flops')],
                                    'config.search.upper')
  program = bilevel.Program(model=net, input_shape=(8, 8, 3), lower=specs[:1], upper=specs[:1],
                            arch=bilevel.ArchOptim(order=2))
  state = bilevel.init_state(program, jax.random.key(0), x)
  for spec in specs:
    fn = compose.build(spec, net, (8, 8, 3))
    grad = jax.eval_shape(jax.grad(lambda a: fn(state.params, state.batch_stats, a, batch, jax.random.key(1))[0]),
                          state.alphas)
    assert jax.tree.map(lambda g: g.shape, grad) == {'normal': (14, 4), 'reduce': (14, 4)}, spec.name
  phase = schedules.Phase(('ce',), ('ce',), True, False)
  u8 = {'image': x, 'label': np.zeros((4,), np.int32), 'epoch': np.int32(0)}
  hparams = {'w_lr': np.float32(0.025), 'a_lr': np.float32(3e-4)}
  new_state, metrics = jax.eval_shape(lambda s: bilevel.arch_step(program, phase, s, u8, u8, hparams), state)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert {'val/ce', 'val/loss', 'arch/grad_norm'} <= set(metrics)
