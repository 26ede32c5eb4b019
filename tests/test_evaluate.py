"""Tests of jaxnas.evaluate: the robustness report, its JSON/Markdown writers and argument checking; the
``jaxnas evaluate`` command on a trained workdir and on a PyTorch state dict, and its one-line errors."""
import functools
import json
import os
import pathlib
import re
import sys

import jax
import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from jaxnas import attacks, cli, evaluate, interop, main, train

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

  json_path, md_path = evaluate.write_evaluation(report, str(tmp_path / 'eval'))
  assert (json_path, md_path) == (str(tmp_path / 'eval' / 'evaluation.json'), str(tmp_path / 'eval' / 'evaluation.md'))
  assert json.loads(open(json_path).read()) == json.loads(json.dumps(report))
  md = open(md_path).read()
  assert 'eps = 8/255 (0.0314)' in md and 'linf' in md
  for label in ('Clean', 'FGSM', 'PGD-20', 'PGD-100', 'CW∞', 'APGD-CE', 'AutoAttack', 'Worst case over all attacks'):
    assert f'| {label} |' in md, label
  assert f'| PGD-20 | {100 * report["attacks"]["pgd20"]["robust_accuracy"]:.2f} |' in md
  # Writing it again changes nothing; another result keeps this one as evaluation.1.json / .md.
  evaluate.write_evaluation(report, str(tmp_path / 'eval'))
  assert sorted(os.listdir(tmp_path / 'eval')) == ['evaluation.json', 'evaluation.md']
  evaluate.write_evaluation({**report, 'n_examples': 8}, str(tmp_path / 'eval'))
  assert sorted(os.listdir(tmp_path / 'eval')) == ['evaluation.1.json', 'evaluation.1.md', 'evaluation.json',
                                                   'evaluation.md']
  assert json.loads((tmp_path / 'eval' / 'evaluation.1.json').read_text()) == json.loads(json.dumps(report))
  assert json.loads(open(json_path).read())['n_examples'] == 8


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


# ------------------------------------------------------------------------------------------------
# ``jaxnas evaluate`` on trained networks.
# ------------------------------------------------------------------------------------------------
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The compiled standard step of tests/test_train.py (DARTS_V2, C=4, 3 cells, 8x8 digits, batch 32), one epoch.
TRAIN = [f'--config={REPO_ROOT / "configs" / "train_std.py"}:smoke', '--config.data.num_examples=640',
         '--config.train.batch_size=32', '--config.train.epochs=1', '--config.train.eval_examples=96']
EVAL = ['--attacks', 'fgsm,pgd20', '--n-examples', '8', '--batch-size', '8']


def digits_test(n):
  """The first ``n`` test digits (scikit-learn's images 1500 on), read independently of jaxnas.data."""
  digits = sk_datasets.load_digits()
  return np.round(digits.images[1500:1500 + n] * 255 / 16)[..., None] / 255, digits.target[1500:1500 + n]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained')
  saved = sys.argv
  try:
    assert main.main(main.parse_flags(['jaxnas.main', *TRAIN, f'--workdir={workdir}'])) == 0
  finally:
    sys.argv = saved
  return workdir


def test_evaluate_command_on_a_checkpoint_and_on_its_torch_state_dict(trained, tmp_path, capsys):
  certified = ['--certify', 'linf', '--certify-method', 'ibp']
  assert cli.main(['evaluate', '--checkpoint', str(trained / 'checkpoints'), *EVAL, *certified]) == 0
  printed, progress = capsys.readouterr()
  result = json.loads((trained / 'evaluation.json').read_text())
  # The bisection's progress on stderr: a line per step (8 examples in one batch, 15 steps).
  assert [line for line in progress.splitlines() if line.startswith('certify ')][-1].startswith(
      'certify ibp linf: examples 1-8 of 8, bisection step 15/15, ')
  assert '| PGD-20 |' in printed and '## Certified robustness' in printed
  assert printed.startswith((trained / 'evaluation.md').read_text())
  assert list(result['attacks']) == ['fgsm', 'pgd20'] and result['n_examples'] == 8
  assert result['source']['checkpoint_step'] == 20
  # The clean accuracy of the restored network (inference mode) on the first 8 test digits.
  net, variables, _ = train.load_trained(str(trained))
  x, y = digits_test(8)
  clean = np.asarray(net.apply(variables, x.astype(np.float32))).argmax(1) == y
  assert result['per_example']['clean_correct'] == clean.tolist()
  for name in ('fgsm', 'pgd20'):
    assert not np.any(np.asarray(result['per_example']['robust'][name]) & ~clean)
  # Certified radii (IBP, l_inf): none for a misclassified point, and no attack at eps breaks a point certified
  # beyond eps.
  entry = result['certified']['ibp_linf']
  radii = np.asarray(entry['radii'])
  assert entry['norm'] == 'linf' and len(radii) == 8 and entry['mean_radius'] == pytest.approx(radii.mean())
  assert np.all(radii[~clean] == 0)
  for name in ('fgsm', 'pgd20'):
    assert np.all(np.asarray(result['per_example']['robust'][name])[radii > result['eps']])

  # The same weights as a PyTorch state dict (.npz, PyTorch names and layouts) give the same evaluation.
  state_dict = interop.to_torch_state_dict(variables, net)
  np.savez(tmp_path / 'model.npz', **{f'state_dict/{k}': v for k, v in state_dict.items()})
  network = ['--genotype', 'DARTS_V2', '--init-channels', '4', '--layers', '3', '--mean', *map(str, net.mean),
             '--std', *map(str, net.std), '--data', 'digits']
  assert cli.main(['evaluate', '--checkpoint', str(tmp_path / 'model.npz'), *network, *EVAL]) == 0
  imported = json.loads((tmp_path / 'evaluation.json').read_text())
  assert imported['per_example'] == result['per_example']
  assert imported['clean_accuracy'] == result['clean_accuracy']


@pytest.mark.parametrize('args, match', [
    (['--checkpoint', '{trained}', '--genotype', 'NOPE'], r"error: unknown genotype 'NOPE': give a zoo name .*"),
    (['--checkpoint', '{tmp}/missing'], r"error: --checkpoint '.*/missing' does not exist: pass a training .*"),
    (['--checkpoint', '{tmp}'], r"error: no network.json in '.*': pass the workdir of a training run .*"),
    (['--checkpoint', '{bare}'], r'error: no checkpoint in .*/checkpoints: save one first .*'),
    (['--checkpoint', '{damaged}'], r'error: .*/damaged/network.json is damaged \(JSONDecodeError: .*\): training '
                                    r'writes it; .*'),
    (['--checkpoint', '{tmp}/model.npz'], r'error: a state dict needs --genotype \(the architecture\) and --data .*'),
    (['--checkpoint', '{trained}', '--attacks', 'deepfool'], r"error: unknown attack\(s\) \['deepfool'\]: .*"),
    (['--checkpoint', '{trained}', '--data', '{tmp}/rgb.npz'], r'error: the test images have shape \(8, 8, 3\), the '
     r'network in .* was trained on images of shape \(8, 8, 1\): evaluate it on data of that shape'),
])
def test_evaluate_command_errors_are_one_line(trained, tmp_path, args, match, capsys):
  np.savez(tmp_path / 'model.npz', x=np.zeros(1))
  np.savez(tmp_path / 'rgb.npz', image=np.zeros((4, 8, 8, 3), np.uint8), label=np.zeros(4, int))
  bare = tmp_path / 'bare'
  bare.mkdir()
  for name in ('network.json', 'genotype.json'):
    (bare / name).write_text((trained / name).read_text())
  damaged = tmp_path / 'damaged'
  damaged.mkdir()
  (damaged / 'genotype.json').write_text((trained / 'genotype.json').read_text())
  (damaged / 'network.json').write_text('{"layers": ')
  args = [a.format(trained=trained, tmp=tmp_path, bare=bare, damaged=damaged) for a in args]
  assert cli.main(['evaluate', *args]) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and re.fullmatch(match, err), err


def test_training_mode_models_are_refused(trained):
  net, variables, _ = train.load_trained(str(trained))
  x, y = digits_test(4)
  with pytest.raises(ValueError, match='train=True'):
    evaluate.evaluate_model(functools.partial(net.apply, variables, train=True), x, y, evaluate.default_config())

