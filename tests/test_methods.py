"""The methods as configs: every ``configs/*.py:smoke`` search runs through the real ``jaxnas.main`` and writes
genotype.json (the DARTS one is then measured by ``jaxnas probe``; DSRNA-CB's certified-bound objective is
recomputed by ``jaxnas.certify`` at the searched weights), and each method config wires the paper's
objectives, combiner and schedule.

The smoke runs add one shrink to every config (``SHRINK``: C=2, 3 cells of 2 nodes, two cheap primitives,
16 digits in batches of 4, no crop) so that programs compile fast and configs with the same lower level
share the compiled weight step; what they test is the wiring of objectives, phases, combiners and
projection through the real entry point. Pipeline configs run their search stage; the retraining configs
(mode 'train') run in tests/test_train.py.
"""
import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxnas import certify, cli, data, genotypes, main, probe, schedules
from jaxnas.objectives import compose, curvature

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO_ROOT / 'configs').glob('*.py') if not p.stem.startswith('_'))
SEARCH_MODES = ('search', 'pipeline')
SHRINK = ['--config.model.init_channels=2', '--config.model.layers=3', '--config.model.steps=2',
          '--config.model.multiplier=2', "--config.model.primitives=('max_pool_3x3', 'skip_connect')",
          '--config.data.num_examples=16', '--config.data.crop_padding=0', '--config.search.batch_size=4']


def _config_module(name):
  spec = importlib.util.spec_from_file_location(f'config_{name}', REPO_ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run_main(args, workdir):
  argv = ['jaxnas.main', *args, f'--workdir={workdir}']
  saved = sys.argv
  try:
    return main.main(main.parse_flags(argv))
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved


SEARCH_CONFIGS = [n for n in CONFIGS if _config_module(n).get_config('smoke').get('mode', 'search') in SEARCH_MODES]


def test_the_five_methods_have_configs():
  assert {'darts', 'dsara', 'advrush', 'dsrna_jacobian', 'e2rnas', 'rnas'} <= set(SEARCH_CONFIGS)
  assert set(CONFIGS) - set(SEARCH_CONFIGS) == {'train_adv', 'train_std'}   # run by tests/test_train.py


@pytest.mark.parametrize('name', SEARCH_CONFIGS)
def test_smoke_config_searches_through_main_and_writes_the_genotype(name, tmp_path, capsys):
  config = _config_module(name).get_config('smoke')  # every config has a smoke variant
  args = [f'--config={REPO_ROOT / "configs" / name}.py:smoke', '--config.mode=search', *SHRINK]
  assert _run_main(args, tmp_path) == 0, (tmp_path / 'log.txt').read_text()[-2000:]
  genotype = genotypes.load(str(tmp_path))
  assert all(op in ('max_pool_3x3', 'skip_connect') for t in genotype.cell_types for op, _ in genotype[t])
  log = (tmp_path / 'log.txt').read_text()
  assert f'epoch {config.search.epochs}/{config.search.epochs} done' in log and 'search done' in log
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  steps = [r for r in records if 'train/loss' in r]
  assert steps and all(math.isfinite(r['train/loss']) for r in steps)
  # Every upper objective the config schedules was active (and finite) in some step.
  for entry in config.search.upper:
    label = entry.label or entry.name
    assert any(math.isfinite(r.get(f'val/{label}', math.nan)) for r in steps), label
  if config.arch.projection.objective.name:
    assert any('arch/constraint' in r for r in steps)
  if name == 'darts':
    _check_probe(tmp_path, capsys)
  if name == 'dsrna_cb':
    _check_certified_bound(tmp_path, records)


def _check_probe(workdir, capsys):
  """``jaxnas probe`` on a finished search: held-out digits after the 16 searched, every metric finite."""
  split = probe.held_out(ml_collections.ConfigDict({'source': 'digits', 'num_examples': 16}), 8)
  np.testing.assert_array_equal(split.labels, data.load({'source': 'digits'}).train_labels[16:24])
  assert cli.main(['probe', str(workdir), '--examples', '8', '--batch-size', '8', '--steps', '2', '--json']) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(probe.METRICS) <= set(result) and all(math.isfinite(result[k]) for k in probe.METRICS)
  assert 0 <= result['acc'] <= 1 and 0 <= result['pgd_acc'] <= 1 and result['curvature'] > 0 < result['jacobian']
  with pytest.raises(ValueError, match=r'only 1484 held-out training examples after the first 16, 5000 requested'):
    probe.held_out(ml_collections.ConfigDict({'source': 'digits', 'num_examples': 16}), 5000)


def _check_certified_bound(workdir, records):
  """DSRNA-CB's search: the upper loss is ``CE - 0.01 R``, and its objective's value is the certified lower bound
  of the supernet's margins computed by ``jaxnas.certify`` at the searched weights and alphas."""
  steps = [r for r in records if 'val/certified_margin' in r]
  assert len(steps) == 4
  for r in steps:  # the objective reports -R, R and the eps it used
    assert r['val/certified_margin'] == pytest.approx(-r['val/certified_margin_margin'])
    assert r['val/loss'] == pytest.approx(r['val/ce'] + 0.01 * r['val/certified_margin'], rel=1e-5)
    assert 0.003 - 1e-9 <= r['val/certified_margin_eps'] <= 0.3 + 1e-9
    assert 0 <= r['val/certified_margin_certified'] <= 1

  # At the searched weights and alphas, on 4 training digits: the objective is -mean_i min_j LB_ij of the
  # supernet in inference mode, with eps = 0.03 * clip(1 / gap(0.03), 0.1, 10) from the bounds' width.
  config, model, state = probe.load_search(str(workdir))
  spec = compose.specs_from_config(config.search.upper, 'upper')[1]
  objective = compose.build(spec, model, (8, 8, 1))
  digits = data.load(config.data)
  x, y = jnp.asarray(digits.train_images[:4], jnp.float32) / 255, jnp.asarray(digits.train_labels[:4])
  logits_fn = model.logits_fn({'params': state.params, 'batch_stats': state.batch_stats}, state.alphas)

  @jax.jit
  def both(state):
    value, aux = objective(state.params, state.batch_stats, state.alphas, {'image': x, 'label': y}, None)
    C = certify.margin_spec(y, 10)
    lower, upper = certify.bounds(logits_fn, x, 0.03, 'linf', 'crown-ibp', C=C, box=(0.0, 1.0))
    eps = 0.03 * jnp.clip(1.0 / jnp.mean(upper - lower), 0.1, 10.0)
    reference = certify.margin_lower_bounds(logits_fn, x, y, eps, 'linf', 'crown-ibp', box=(0.0, 1.0))
    return value, aux.metrics, eps, reference, logits_fn(x)

  value, metrics, eps, reference, logits = both(state)
  np.testing.assert_allclose(metrics['eps'], eps, rtol=1e-6)
  np.testing.assert_allclose(value, -jnp.mean(jnp.min(reference, axis=1)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['certified'], jnp.mean(jnp.min(reference, axis=1) > 0))
  # A lower bound of the margins: never above the clean margins.
  clean = jnp.min(certify.margin_spec(y, 10) @ logits[:, :, None], axis=(1, 2))
  assert np.all(np.min(reference, axis=1) <= clean + 1e-6) and math.isfinite(float(value))


# ------------------------------------------------------------------------------------------------
# Wiring of each method (no compilation): objectives, combiner, schedules.
# ------------------------------------------------------------------------------------------------
def _phases(config, epoch, steps_per_epoch=10):
  """The phase of every step of an epoch, as the search loop computes it."""
  lower = compose.specs_from_config(config.search.lower, 'lower')
  upper = compose.specs_from_config(config.search.upper, 'upper')
  project_from = config.arch.projection.start_fraction if config.arch.projection.objective.name else None
  return [schedules.phase(lower, upper, epoch=epoch, step_in_epoch=s, steps_per_epoch=steps_per_epoch,
                          arch_start_epoch=config.arch.start_epoch, project_from=project_from)
          for s in range(steps_per_epoch)]


def _arch_lr(config, epoch):
  return schedules.piecewise_lr(config.arch.lr, config.arch.lr_boundaries, config.arch.lr_values, epoch)


def _entries(level):
  return [(e.label or e.name, e.name, e.weight) for e in level]


def test_dsara_two_stages_mgda_and_ablations():
  dsara = _config_module('dsara')
  c = dsara.get_config()
  assert (c.model.space, c.model.init_channels, c.model.layers, c.search.epochs, c.search.batch_size) == (
      'dsara', 24, 8, 30, 32)
  assert (c.arch.order, c.arch.combiner) == (2, 'mgda')
  (label, name, _), = _entries(c.search.lower)
  pgd = c.search.lower[0].kwargs
  assert (name, pgd.attack, pgd.steps, pgd.eps, pgd.step_size) == ('adv_ce', 'pgd', 7, 2 / 255, 1 / 510)
  assert [e.kwargs for e in c.search.upper if e.name == 'adv_ce'] == [pgd]
  # Stage 1 (epochs 0-19): adversarial only at 3e-4; stage 2 (20-29): MGDA of natural, adversarial at 5e-5.
  assert {p.upper for p in _phases(c, 19)} == {('adversarial',)} and _arch_lr(c, 19) == 3e-4
  assert {p.upper for p in _phases(c, 20)} == {('natural', 'adversarial')} and _arch_lr(c, 20) == 5e-5
  assert {p.lower for p in _phases(c, 0) + _phases(c, 29)} == {('adversarial',)}
  assert _entries(c.search.upper)[0][:2] == ('natural', 'ce')  # MGDA's gamma* weights the natural gradient
  single = dsara.get_config('single_stage')
  assert {p.upper for p in _phases(single, 25)} == {('adversarial',)} and _arch_lr(single, 25) == 3e-4
  assert dsara.get_config('sum').arch.combiner == 'sum'
  assert dsara.get_config('darts_space,sum').model.space == 'darts'
  smoke = dsara.get_config('smoke')
  assert [p.upper for p in (_phases(smoke, 0)[0], _phases(smoke, 1)[0])] == [('adversarial',),
                                                                            ('natural', 'adversarial')]
  with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['two_stage'\]"):
    dsara.get_config('two_stage')


def test_advrush_curvature_after_warmup_with_the_effective_weight():
  advrush = _config_module('advrush')
  c = advrush.get_config()
  assert (c.search.epochs, c.search.batch_size, c.arch.order, c.arch.combiner) == (60, 32, 1, 'sum')
  assert _entries(c.search.upper) == [('ce', 'ce', 1.0), ('curvature', 'curvature', advrush.WEIGHT)]
  assert advrush.WEIGHT == pytest.approx(0.01 * 4 * 0.2507 / 32)
  reg = c.search.upper[1]
  assert reg.start_epoch == 50 and reg.kwargs.estimator == 'finite_difference'
  np.testing.assert_allclose(reg.kwargs.h, np.array([0, 0.3, 0.6, 0.9, 1.2, 1.5]) * 0.2507)
  assert len(reg.kwargs.h) <= reg.start_epoch  # indexed by the search epoch: every regularised epoch uses h = 1.5
  assert {p.upper for p in _phases(c, 49)} == {('ce',)} and {p.upper for p in _phases(c, 50)} == {('ce', 'curvature')}
  hvp = advrush.get_config('hvp')
  assert hvp.search.upper[1].kwargs.estimator == 'hvp' and hvp.model.depthwise == 'autodiff'
  assert advrush.get_config('frobenius').search.upper[1].kwargs.estimator == 'frobenius'
  with pytest.raises(ValueError, match='exclude each other'):
    advrush.get_config('hvp,frobenius')


def test_advrush_weight_reproduces_the_original_regulariser(x64):
  # The original: batch-mean CE (B = 32) in normalised input space x_n = (x - mean) / std, ||z_n|| = 1.5,
  # arch loss + 0.04 R_orig. jaxnas: per-example CE on [0, 1] inputs, h = 1.5 std, arch loss + WEIGHT R.
  advrush = _config_module('advrush')
  rng = np.random.default_rng(0)
  std, mean, b = advrush.CIFAR10_STD, 0.45, advrush.BATCH_SIZE
  w1, w2 = rng.standard_normal((12, 8)), rng.standard_normal((8, 10))
  net = lambda x_n: jnp.tanh(x_n.reshape(x_n.shape[0], -1) @ w1) @ w2
  x, y = jnp.asarray(rng.uniform(0, 1, (b, 2, 2, 3))), jnp.asarray(rng.integers(0, 10, b))
  per_example = lambda x_, y_: compose.per_example_ce(net((x_ - mean) / std), y_)
  ours = advrush.WEIGHT * curvature.cure_regularizer(per_example, x, y, 1.5 * std)
  mean_loss = lambda x_n: jnp.mean(compose.per_example_ce(net(x_n), y))
  x_n = (x - mean) / std
  g = jax.grad(mean_loss)(x_n)
  z = 1.5 * jnp.sign(g) / jnp.linalg.norm(jnp.sign(g).reshape(b, -1), axis=1)[:, None, None, None]
  r_orig = jnp.mean(jnp.linalg.norm((jax.grad(mean_loss)(x_n + z) - g).reshape(b, -1), axis=1))
  assert float(ours) == pytest.approx(0.01 * 4 * float(r_orig), rel=1e-10)


def test_dsrna_cb_paper_settings():
  dsrna = _config_module('dsrna_cb')
  c = dsrna.get_config()
  assert (c.model.space, c.model.init_channels, c.model.layers, c.search.epochs, c.search.batch_size) == (
      'darts', 16, 8, 50, 256)
  assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.1, 0.9, 3e-4)
  assert (c.arch.lr, c.arch.b1, c.arch.b2, c.arch.weight_decay, c.arch.order) == (6e-4, 0.5, 0.999, 3e-4, 2)
  ce, cb = c.search.upper
  assert (ce.name, ce.weight, cb.name, cb.weight) == ('ce', 1.0, 'certified_margin', 0.01)
  assert (cb.kwargs.eps, cb.kwargs.norm, cb.kwargs.method, cb.kwargs.adapt_eps) == (0.03, 'linf', 'crown-ibp', True)
  assert cb.kwargs.examples == 8  # what fits an 80 GB accelerator (the config's docstring)
  assert dsrna.get_config('l2').search.upper[1].kwargs.norm == 'l2'
  with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['l1'\]"):
    dsrna.get_config('l1')


def test_dsrna_jacobian_regulariser():
  dsrna = _config_module('dsrna_jacobian')
  c = dsrna.get_config()
  assert (c.search.epochs, c.search.batch_size, c.model.init_channels, c.model.layers, c.arch.order) == (
      50, 128, 16, 8, 2)
  assert _entries(c.search.lower) == [('ce', 'ce', 1.0)]
  assert _entries(c.search.upper) == [('ce', 'ce', 1.0), ('jacobian', 'jacobian', 0.01)]
  assert c.search.upper[1].kwargs.norm == 'linf' and dsrna.get_config('l2').search.upper[1].kwargs.norm == 'l2'
  assert {p.upper for p in _phases(c, 0)} == {('ce', 'jacobian')}


def test_e2rnas_five_objectives_min_norm_and_ood_lower_level():
  e2rnas = _config_module('e2rnas')
  c = e2rnas.get_config()
  assert (c.search.epochs, c.search.batch_size, c.arch.order) == (50, 64, 2)
  assert (c.arch.combiner, c.arch.normalize) == ('min_norm', True)
  assert (c.ood_data.source, c.ood_data.name) == ('tfds', 'svhn_cropped')
  assert [n for _, n, _ in _entries(c.search.lower)] == ['ce', 'ood_kl']
  assert [n for _, n, _ in _entries(c.search.upper)] == ['ce', 'ood_kl', 'adv_ce', 'params', 'flops']
  fgsm = c.search.upper[2].kwargs
  assert (fgsm.attack, fgsm.eps, fgsm.random_start) == ('fgsm', 2 / 255, True)
  params, flops = c.search.upper[3].kwargs, c.search.upper[4].kwargs
  assert (params.lower_bound, params.network, flops.lower_bound, flops.network) == (2.5, (36, 20), 420.0, (36, 20))
  assert len({p.upper for p in _phases(c, 0) + _phases(c, 49)}) == 1
  s2 = e2rnas.get_config('s2').search.upper
  assert (s2[3].kwargs.lower_bound, s2[4].kwargs.lower_bound) == (3.5, 590.0)
  equal = e2rnas.get_config('equal')
  assert equal.arch.combiner == 'sum' and {e.weight for e in equal.search.upper} == {0.2}


def test_rnas_warmup_projection_in_the_second_half_of_each_epoch():
  rnas = _config_module('rnas')
  c = rnas.get_config()
  assert (c.search.epochs, c.search.batch_size, c.optim.lr, c.arch.lr, c.arch.weight_decay) == (
      60, 128, 0.01, 6e-4, 1e-3)
  pgd = c.search.lower[0].kwargs
  assert (c.search.lower[0].name, pgd.eps, pgd.steps, pgd.step_size) == ('adv_ce', 8 / 255, 7, 2 / 255)
  assert [n for _, n, _ in _entries(c.search.upper)] == ['ce', 'adv_ce'] and c.arch.combiner == 'sum'
  projection = c.arch.projection
  assert (projection.objective.name, projection.bound, projection.start_fraction) == ('distortion', 1e-4, 0.5)
  assert projection.objective.kwargs.eps == 8 / 255
  assert rnas.get_config('low').arch.projection.bound == 1e-5
  warm = _phases(c, 14)
  assert not any(p.arch for p in warm) and {p.lower for p in warm} == {('adversarial',)}
  search = _phases(c, 15)
  assert all(p.arch for p in search) and [p.project for p in search] == [False] * 5 + [True] * 5
