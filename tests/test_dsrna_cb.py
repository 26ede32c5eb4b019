"""DSRNA-CB through the real entry point: ``configs/dsrna_cb.py:smoke`` searches with ``CE - 0.01 R`` in the
upper level and writes genotype.json; the objective's value is the certified lower bound of the supernet's
margins computed by ``jaxnas.certify`` at the searched weights and alphas; the paper's settings are wired."""
import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import certify, data, genotypes, main, probe
from jaxnas.objectives import compose

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / 'configs' / 'dsrna_cb.py'


def _config_module():
  spec = importlib.util.spec_from_file_location('config_dsrna_cb', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run_main(args, workdir):
  saved = sys.argv
  try:
    return main.main(main.parse_flags(['jaxnas.main', *args, f'--workdir={workdir}']))
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved


def test_paper_settings():
  dsrna = _config_module()
  c = dsrna.get_config()
  assert (c.model.space, c.model.init_channels, c.model.layers, c.search.epochs, c.search.batch_size) == (
      'darts', 16, 8, 50, 256)
  assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.1, 0.9, 3e-4)
  assert (c.arch.lr, c.arch.b1, c.arch.b2, c.arch.weight_decay, c.arch.order) == (6e-4, 0.5, 0.999, 3e-4, 2)
  ce, cb = c.search.upper
  assert (ce.name, ce.weight, cb.name, cb.weight) == ('ce', 1.0, 'certified_margin', 0.01)
  assert (cb.kwargs.eps, cb.kwargs.norm, cb.kwargs.method, cb.kwargs.adapt_eps) == (0.03, 'linf', 'crown-ibp', True)
  assert dsrna.get_config('l2').search.upper[1].kwargs.norm == 'l2'
  with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['l1'\]"):
    dsrna.get_config('l1')


def test_smoke_search_and_the_objective_is_the_certified_bound(tmp_path):
  assert _run_main([f'--config={CONFIG}:smoke'], tmp_path) == 0, (tmp_path / 'log.txt').read_text()[-2000:]
  genotype = genotypes.load(str(tmp_path))
  assert all(op in ('max_pool_3x3', 'skip_connect') for t in genotype.cell_types for op, _ in genotype[t])
  steps = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  steps = [r for r in steps if 'val/certified_margin' in r]
  assert len(steps) == 4
  for r in steps:  # the upper loss is CE - 0.01 R; the objective reports -R, R and the eps it used
    assert r['val/certified_margin'] == pytest.approx(-r['val/certified_margin_margin'])
    assert r['val/loss'] == pytest.approx(r['val/ce'] + 0.01 * r['val/certified_margin'], rel=1e-5)
    assert 0.003 - 1e-9 <= r['val/certified_margin_eps'] <= 0.3 + 1e-9 and 0 <= r['val/certified_margin_certified'] <= 1

  # At the searched weights and alphas, on 4 training digits: the objective is -mean_i min_j LB_ij of the
  # supernet in inference mode, with eps = 0.03 * clip(1 / gap(0.03), 0.1, 10) from the bounds' width.
  config, model, state = probe.load_search(str(tmp_path))
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
