"""Runs every benchmark script in its ``--quick`` form (tiny sizes, no timing thresholds) so they never rot.

Each run must print one JSON object per configuration with the timing fields; with PyTorch installed the
jaxnas and PyTorch steps start from the same weights and batch, so their losses must agree.
"""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec('torch') is not None
TIMING_KEYS = {'compile_s', 'lower_s', 'step_s', 'examples_per_s', 'flops_per_step', 'peak_memory_bytes',
               'machine'}


def _run(module, *flags):
  proc = subprocess.run([sys.executable, '-m', module, '--quick', *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  assert results, proc.stdout[-2000:]
  for r in results:
    assert TIMING_KEYS <= set(r), sorted(TIMING_KEYS - set(r))
    assert r['compile_s'] > 0 and r['step_s'] > 0 and r['flops_per_step'] > 0
    if HAS_TORCH:
      assert r['torch_step_s'] > 0
      assert r['ratio'] == pytest.approx(r['step_s'] / r['torch_step_s'])
      assert r['loss_abs_diff'] < 1e-4  # same weights, same batch, same function
  assert 'step_s' in proc.stderr  # the table
  return results


def test_supernet_step_quick():
  (r,) = _run('benchmarks.supernet_step')
  assert r['cells'] == 3 and r['batch'] == 2


def test_eval_train_step_quick(tmp_path):
  out = tmp_path / 'results.jsonl'
  (r,) = _run('benchmarks.eval_train_step', '--json-out', str(out))
  assert r['genotype'] == 'DARTS_V2' and r['layers'] == 5
  assert json.loads(out.read_text())['step_s'] == r['step_s']
