"""Retraining through the real entry point ``jaxnas.main`` with the smoke configs: standard training learns the
digits with the DARTS schedules, adversarial training trains on loss-increasing PGD examples, resume equals an
uninterrupted run, one-line errors; two train steps against PyTorch (auxiliary head, gradient clipping, weight
decay, momentum, BatchNorm statistics); the PGD and TRADES losses against references written out on a toy model.

The runs share one compiled standard step and one adversarial step (same network: DARTS_V2, C=4, 3 cells,
8x8 digits); ``tests/test_evaluate.py`` trains the same standard program.
"""
import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import bilevel, checkpoint, genotypes, interop, main, networks, train
from jaxnas.attacks import pgd_attack

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# 640 digits in batches of 32: 20 steps per epoch. The adversarial run starts from the same weights, batches and
# augmentation.
DATA = ['--config.data.num_examples=640', '--config.train.batch_size=32', '--config.train.eval_examples=96']
STD = [f'--config={REPO_ROOT / "configs" / "train_std.py"}:smoke', *DATA, '--config.train.epochs=4',
       '--config.train.lr=0.05']
ADV = [f'--config={REPO_ROOT / "configs" / "train_adv.py"}:smoke', *DATA, '--config.train.epochs=2',
       '--config.data.cutout=4']


def run_main(args, workdir):
  """``python -m jaxnas.main`` in this process: absl flag parsing, then ``main.main``; the exit status."""
  saved = sys.argv
  try:
    return main.main(main.parse_flags(['jaxnas.main', *args, f'--workdir={workdir}']))
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved


def metrics(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def epochs(workdir):
  return [r for r in metrics(workdir) if 'epoch/train/loss' in r]


def last_error_line(capsys):
  lines = capsys.readouterr().err.strip().splitlines()
  return lines[-1] if lines else ''


@pytest.fixture(scope='module')
def std_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('std')
  assert run_main(STD, workdir) == 0
  return workdir


@pytest.fixture(scope='module')
def adv_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('adv')
  assert run_main(ADV, workdir) == 0
  return workdir


def test_standard_training_learns_with_the_darts_schedules(std_run):
  config = json.loads((std_run / 'config.json').read_text())
  assert config['mode'] == 'train' and config['train']['adversarial']['method'] == 'none'
  assert genotypes.load(str(std_run)) == genotypes.get('DARTS_V2')
  network = json.loads((std_run / 'network.json').read_text())
  assert {k: network[k] for k in ('init_channels', 'layers', 'num_classes', 'input_shape', 'auxiliary')} == dict(
      init_channels=4, layers=3, num_classes=10, input_shape=[8, 8, 1], auxiliary=False)
  assert checkpoint.all_steps(str(std_run / 'checkpoints')) == [40, 60, 80]   # every epoch, keep 3
  steps = [r for r in metrics(std_run) if 'train/lr' in r]
  assert [r['step'] for r in steps] == list(range(1, 81))
  for r in steps:   # DARTS: cosine annealing to 0, stepped per epoch; drop-path ramped to 0.2
    assert r['train/lr'] == pytest.approx(0.05 * (1 + math.cos(math.pi * r['epoch'] / 4)) / 2, rel=1e-6)
  per_epoch = epochs(std_run)
  assert [r['epoch/drop_path_prob'] for r in per_epoch] == pytest.approx([0.0, 0.05, 0.1, 0.15])
  assert all(r['epoch/test/pgd3_acc'] <= r['epoch/test/clean_acc'] for r in per_epoch)
  assert per_epoch[-1]['epoch/test/clean_acc'] >= 0.35   # 10 classes: chance is 0.1
  assert per_epoch[-1]['epoch/train/loss'] < per_epoch[0]['epoch/train/loss'] - 0.3
  md = (std_run / 'report.md').read_text()
  assert 'standard training, 4 epochs.' in md and 'Held-out accuracy after epoch 4: clean ' in md
  for figure in ('curves_metrics.png', 'cell_normal.png', 'cell_reduce.svg'):
    assert (std_run / 'figures' / figure).is_file(), figure
  timing = json.loads((std_run / 'timing.json').read_text())
  assert set(timing) == {'train'} and timing['train']['seconds'] > 0
  assert 'training done' in (std_run / 'log.txt').read_text()


def test_resume_reproduces_the_uninterrupted_run(std_run, tmp_path):
  workdir = tmp_path / 'resumed'
  traced = dict(train.TRACES)
  assert run_main(STD + ['--config.train.max_steps=25'], workdir) == 0
  assert checkpoint.all_steps(str(workdir / 'checkpoints')) == [20, 25]   # stopped mid-epoch 2
  assert not (workdir / 'report.json').exists()
  assert run_main(STD, workdir) == 0
  assert 'resuming at step 25/80' in (workdir / 'log.txt').read_text()
  assert train.TRACES == traced   # the restored state runs the steps compiled for the first run
  _, resumed, step = train.load_trained(str(workdir))
  _, straight, _ = train.load_trained(str(std_run))
  assert step == 80
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), resumed, straight)
  a, b = metrics(workdir), metrics(std_run)
  assert [r['step'] for r in a] == [r['step'] for r in b]   # no duplicated lines after the resume
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    np.testing.assert_allclose([ra[k] for k in sorted(ra)], [rb[k] for k in sorted(rb)], rtol=1e-6)


def test_adversarial_training_trains_on_pgd_examples(adv_run, std_run):
  config = json.loads((adv_run / 'config.json').read_text())
  assert config['train']['adversarial'] == dict(
      method='pgd', eps=8 / 255, step_size=0.01, steps=2, norm='linf', random_start='uniform', attack_mode='eval',
      trades_beta=6.0)
  steps = [r for r in metrics(adv_run) if 'train/lr' in r]
  assert [r['train/lr'] for r in steps] == pytest.approx([0.05] * 20 + [0.005] * 20)   # piecewise (step decay)
  # Same initial weights, batch and augmentation as the standard run: the first loss is on PGD examples of it.
  assert steps[0]['train/loss'] > metrics(std_run)[0]['train/loss'] + 0.01
  assert all(r['epoch/test/pgd3_acc'] <= r['epoch/test/clean_acc'] for r in epochs(adv_run))
  assert 'pgd adversarial (linf eps 8/255 (0.0314), 2 steps) training, 2 epochs.' in (adv_run / 'report.md').read_text()


def test_train_steps_match_pytorch():
  """Two steps on one batch (momentum at work) with the auxiliary head and gradient clipping active, no
  augmentation or drop-path, against the PyTorch NetworkCIFAR trained with torch.optim.SGD."""
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top (needs torch)
  genotype = genotypes.get('DARTS_V2')
  net = networks.EvalNetwork(genotype, init_channels=2, layers=3, num_classes=10, auxiliary=True)
  recipe = train.Recipe(net, optim=bilevel.WeightOptim(momentum=0.9, weight_decay=3e-4, grad_clip=0.5),
                        auxiliary_weight=0.4)
  state = train.init_state(net, jax.random.key(3), (32, 32, 3))
  model = torch_reference.EvalNetwork(genotype.to_dict(), C=2, num_classes=10, layers=3, auxiliary=True).train()
  start = interop.to_torch_state_dict({'params': state.params, 'batch_stats': state.batch_stats}, net)
  missing, unexpected = model.load_state_dict({k: torch.tensor(v) for k, v in start.items()}, strict=False)
  assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing)
  sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)

  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), 'label': np.array([0, 3, 3, 7], np.int32)}
  x = torch.tensor(batch['image'].transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)
  y = torch.tensor(batch['label'], dtype=torch.int64)
  for _ in range(2):
    state, out = train.train_step(recipe, state, batch, {'lr': np.float32(0.1), 'drop_path_prob': np.float32(0.0)})
    sgd.zero_grad()
    logits, logits_aux = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y) + 0.4 * torch.nn.functional.cross_entropy(logits_aux, y)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
    sgd.step()
    assert norm > 0.5   # clipping is active
    assert float(out['train/loss']) == pytest.approx(float(loss), rel=1e-5)
    assert float(out['train/grad_norm']) == pytest.approx(norm, rel=1e-4)
  trained = interop.to_torch_state_dict({'params': state.params, 'batch_stats': state.batch_stats}, net)
  reference = model.state_dict()
  for name, value in trained.items():
    np.testing.assert_allclose(value, reference[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
  assert int(state.step) == 2


@dataclasses.dataclass(frozen=True)
class ToyNet:
  """``EvalNetwork``'s calling convention on a linear model with one BatchNorm-like centring: train mode
  centres by the batch mean (and updates the running mean), inference mode by the running mean."""
  auxiliary: bool = False

  def apply(self, variables, x, train=False, rng=None, drop_path_prob=0.0):
    del rng, drop_path_prob
    h = x.reshape(len(x), -1)
    running = variables['batch_stats']['mean']
    if not train:
      return (h - running) @ variables['params']['w']
    mean = h.mean(0)
    return (h - mean) @ variables['params']['w'], None, {'mean': 0.9 * running + 0.1 * mean}


@pytest.mark.parametrize('method, start', [('pgd', 'uniform'), ('trades', 'normal')])
def test_adversarial_losses_match_a_reference(method, start):
  """PGD (Madry: CE on the attack's examples) and TRADES (CE + beta KL(f(x) || f(x'))) steps against the
  losses written out here, with the attack made against the network in inference mode from the step's
  random start (TRADES' KL has a zero gradient at x itself; its code starts at x + 0.001 N(0, 1))."""
  net = ToyNet()
  rng = np.random.default_rng(1)
  params = {'w': rng.normal(size=(12, 5)).astype(np.float32)}
  stats = {'mean': rng.uniform(0.2, 0.8, 12).astype(np.float32)}
  state = train.TrainState(params=params, batch_stats=stats, opt_state=bilevel.weight_optimizer(
      bilevel.WeightOptim(), 0.0).init(params), step=np.int32(0), rng=jax.random.key(0))
  adversary = train.Adversary(method=method, eps=0.1, step_size=0.04, steps=3, trades_beta=3.0, random_start=start)
  recipe = train.Recipe(net, optim=bilevel.WeightOptim(momentum=0.9, weight_decay=0.0, grad_clip=0.0),
                        adversary=adversary)
  batch = {'image': rng.integers(0, 256, (6, 2, 2, 3), dtype=np.uint8), 'label': np.arange(6) % 5}
  new, out = train.train_step(recipe, state, batch, {'lr': np.float32(0.5), 'drop_path_prob': np.float32(0.0)})

  x, y = batch['image'] / np.float32(255), batch['label']
  inference = lambda z: net.apply({'params': params, 'batch_stats': stats}, z)
  log_softmax = lambda logits: logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
  p_clean = np.exp(log_softmax(inference(x)))
  kl = lambda logits, _: jnp.sum(p_clean * (np.log(p_clean) - log_softmax(logits)), axis=1)
  key = train._key(state, train._ATTACK)  # pylint: disable=protected-access (the step's attack stream)
  x_adv = pgd_attack.pgd(inference, x, y, key, eps=0.1, step_size=0.04, steps=3,
                         loss='ce' if method == 'pgd' else kl, random_start=start)
  assert 0.09 < np.max(np.abs(x_adv - x)) <= 0.1 + 1e-6

  def loss_fn(w):
    train_mode = lambda z: net.apply({'params': {'w': w}, 'batch_stats': stats}, z, train=True)[0]
    ce = lambda logits: -jnp.mean(jnp.take_along_axis(log_softmax(logits), y[:, None], axis=1))
    if method == 'pgd':
      return ce(train_mode(x_adv))
    clean = train_mode(x)
    p = jnp.exp(log_softmax(clean))
    return ce(clean) + 3.0 * jnp.mean(jnp.sum(p * (log_softmax(clean) - log_softmax(train_mode(x_adv))), axis=1))

  loss, grad = jax.value_and_grad(loss_fn)(params['w'])
  assert float(out['train/loss']) == pytest.approx(float(loss), rel=1e-5)
  np.testing.assert_allclose(new.params['w'], params['w'] - 0.5 * grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('args, match', [
    (['--config.genotype=NOPE'], r"error: unknown genotype 'NOPE': give a zoo name .*"),
    (['--config.train.adversarial.method=fgsm'],
     r"error: config.train.adversarial.method='fgsm': use one of \('none', 'pgd', 'trades'\)"),
    (['--config.train.adversarial.method=pgd', '--config.train.adversarial.random_start=gauss'],
     r"error: unknown config.train.adversarial.random_start 'gauss': use one of \['uniform', 'normal', 'none'\]"),
    (['--config.data.source=npz', '--config.data.path={npz}'],
     r"error: the dataset 'tiny' has no test split: set config.train.holdout_fraction .*"),
    (['--config.train.lr=1e30', '--config.checkpoint_every_steps=1'],
     r"error: NaN in the weight step's objective 'loss' at step \d+ \(epoch 1\); last good checkpoint kept at "
     r".*checkpoints/\d+; "
     r'lower config.train.lr or check the data'),
])
def test_errors_are_one_line(tmp_path, args, match, capsys):
  npz = tmp_path / 'tiny.npz'
  np.savez(npz, image=np.zeros((4, 8, 8, 1), np.uint8), label=np.arange(4))
  assert run_main(STD + [a.format(npz=npz) for a in args], tmp_path / 'run') == 1
  assert re.fullmatch(match, last_error_line(capsys))


def test_resuming_with_another_genotype_or_config_is_refused(tmp_path, capsys):
  workdir = tmp_path / 'copy'
  assert run_main(STD + ['--config.train.max_steps=2'], workdir) == 0
  assert run_main(STD + ['--config.genotype=DARTS_V1'], workdir) == 1
  assert re.fullmatch(r'error: .* holds a training run of another genotype .*: use a new workdir for this one',
                      last_error_line(capsys))
  assert run_main(STD + ['--config.train.lr=0.1', '--config.train.max_steps=3'], workdir) == 1
  assert re.fullmatch(r'error: .* holds a run of another config \(train.lr: [0-9.]+ -> 0.1\): rerun with its config '
                      r'\(.*config.json\) to resume it, or use a new workdir', last_error_line(capsys))
  # Monitoring settings may change.
  assert run_main(STD + ['--config.train.eval_every_epochs=0', '--config.train.max_steps=3'], workdir) == 0
  assert 'resuming at step 2/' in (workdir / 'log.txt').read_text()


def test_adversarial_config_has_advrush_schedule():
  """configs/train_adv.py: AdvRush's adv_train.py (0-based epochs; lr / 10 from epoch 99, / 100 from 149)."""
  spec = importlib.util.spec_from_file_location('train_adv', REPO_ROOT / 'configs' / 'train_adv.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  t = module.get_config().train
  assert (t.epochs, t.batch_size, t.weight_decay, t.grad_clip, t.auxiliary, t.drop_path_prob) == (
      200, 64, 1e-4, 5.0, False, 0.0)
  lrs = [train.learning_rate(t, e) for e in (0, 98, 99, 148, 149, 199)]
  assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  assert (t.adversarial.method, t.adversarial.steps, t.adversarial.step_size, t.adversarial.random_start) == (
      'pgd', 7, 0.01, 'uniform')
  a = module.get_config('trades').train.adversarial   # TRADES' trades.py: beta 6, 10 steps of 0.007 from x + 0.001 N
  assert (a.method, a.trades_beta, a.steps, a.step_size, a.random_start) == ('trades', 6.0, 10, 0.007, 'normal')
