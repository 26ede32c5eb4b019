"""Tests of jaxnas.evaluate: the robustness report, its JSON/Markdown writers and argument checking."""
import functools
import json

import jax
import numpy as np
import pytest

from jaxnas import attacks
from jaxnas import evaluate

QUICK_AA = dict(n_iter=8, n_target_classes=2, n_queries=40)


@functools.lru_cache(maxsize=None)
def model():
  """A fixed random ReLU network on 6x6x3 inputs."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  w1, w2 = jax.random.normal(k1, (108, 24)) * 0.3, jax.random.normal(k2, (24, 10)) * 0.3
  return lambda x: jax.nn.relu(x.reshape(x.shape[0], -1) @ w1) @ w2


def data(n=16):
  x = np.random.RandomState(0).rand(n, 6, 6, 3).astype(np.float32)
  y = np.asarray(model()(x)).argmax(1)
  y[:2] = (y[:2] + 1) % 10   # two clean errors
  return x, y


def test_report_rows_files_and_markdown(tmp_path):
  x, y = data()
  report = evaluate.evaluate_robustness(model(), x, y, eps=8 / 255, batch_size=8, seed=3,
                                        autoattack_options=QUICK_AA)
  assert report['eps'] == 8 / 255 and report['norm'] == 'linf' and report['n_examples'] == 16
  assert report['step_size'] == pytest.approx(2 / 255)
  clean = np.asarray(model()(x)).argmax(1) == y
  assert report['clean_accuracy'] == clean.mean() == 14 / 16
  assert list(report['attacks']) == list(evaluate.DEFAULT_ATTACKS)
  per = report['per_example']
  assert per['clean_correct'] == clean.tolist() and per['label'] == y.tolist()
  for name, row in report['attacks'].items():
    robust = np.asarray(per['robust'][name])
    assert row['robust_accuracy'] == robust.mean() <= report['clean_accuracy']
    assert not np.any(robust & ~clean), name            # a clean error is never robust
    assert report['worst_case_accuracy'] <= row['robust_accuracy']
  worst = np.logical_and.reduce([np.asarray(r) for r in per['robust'].values()])
  assert report['worst_case_accuracy'] == worst.mean()
  # AutoAttack: the breakdown, the breaker of each point, and APGD-CE alone = the ensemble's first stage.
  aa = report['autoattack']
  assert list(aa['robust_accuracy']) == ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  assert report['attacks']['apgd_ce']['robust_accuracy'] == aa['robust_accuracy']['apgd-ce']
  assert report['attacks']['aa']['robust_accuracy'] == aa['robust_accuracy']['square']
  broken_by = per['autoattack_broken_by']
  assert broken_by[:2] == ['clean', 'clean'] and aa['broken_by']['clean'] == 2
  assert sum(aa['broken_by'].values()) == 16 - sum(per['robust']['aa'])
  assert aa['options'] == {'n_iter': 8, 'n_target_classes': 2, 'n_queries': 40}
  assert report['attacks']['pgd20']['robust_accuracy'] < report['clean_accuracy']   # the attacks bite

  json_path, md_path = evaluate.write_report(report, str(tmp_path / 'eval'))
  assert json.loads(open(json_path).read()) == json.loads(json.dumps(report))
  md = open(md_path).read()
  assert 'eps = 8/255 (0.0314)' in md and 'linf' in md
  for label in ('Clean', 'FGSM', 'PGD-20', 'PGD-100', 'CW∞', 'APGD-CE', 'AutoAttack', 'Worst case over all attacks'):
    assert f'| {label} |' in md, label
  assert f'| PGD-20 | {100 * report["attacks"]["pgd20"]["robust_accuracy"]:.2f} |' in md


def test_results_do_not_depend_on_batch_size():
  x, y = data(20)
  runs = [evaluate.evaluate_robustness(model(), x, y, attacks=['pgd20'], eps=0.05, batch_size=bs) for bs in (8, 32)]
  assert runs[0]['per_example'] == runs[1]['per_example']


def test_l2_rows_and_cw_l2_distance_rule():
  x, y = data(8)
  report = evaluate.evaluate_robustness(model(), x, y, attacks=['cw_l2', 'pgd20'], eps=0.5, norm='l2')
  assert evaluate.format_eps(0.5, 'l2') == '0.5'
  assert 'eps = 0.5;' in evaluate.format_markdown(report)
  # C&W returns minimum-norm adversarials: a point is broken iff one was found within eps.
  x_cw = np.asarray(jax.jit(lambda a, b: attacks.cw_l2(model(), a, b))(x, y))
  dist = np.sqrt(((x_cw - x) ** 2).reshape(8, -1).sum(1))
  fooled = np.asarray(model()(x_cw)).argmax(1) != y
  clean = np.asarray(model()(x)).argmax(1) == y
  assert report['per_example']['robust']['cw_l2'] == (clean & ~(fooled & (dist <= 0.5))).tolist()


def test_bad_requests_raise_clear_errors():
  x, y = data(4)
  with pytest.raises(ValueError, match='unknown attack'):
    evaluate.evaluate_robustness(model(), x, y, attacks=['deepfool'])
  with pytest.raises(ValueError, match="do not apply to norm 'l2'"):
    evaluate.evaluate_robustness(model(), x, y, attacks=['cw_inf'], norm='l2')
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    evaluate.evaluate_robustness(model(), x * 255, y, attacks=['fgsm'])
  with pytest.raises(ValueError, match='autoattack_options'):
    evaluate.evaluate_robustness(model(), x, y, attacks=['aa'], autoattack_options={'restarts': 2})

  def train_mode(z):   # BatchNorm with batch statistics
    h = model()(z)
    return (h - h.mean(0)) / (h.std(0) + 1e-5)

  with pytest.raises(ValueError, match='training mode'):
    evaluate.evaluate_robustness(train_mode, x, y, attacks=['fgsm'])
  assert evaluate.format_eps(1 / 510, 'linf') == '1/510 (0.0020)'
