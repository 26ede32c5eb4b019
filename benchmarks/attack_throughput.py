"""Attack throughput: PGD-20 and APGD-CE (AutoAttack's first attack, 100 iterations) in examples per second,
jaxnas against PyTorch on the same DARTS_V2 network, weights, batch and machine.

The network is DARTS_V2 ``NetworkCIFAR`` (C=8, 5 cells by default; ``--fixture`` loads trained weights from
``../shared/fixtures``), built in PyTorch (``benchmarks/torch_reference.py``) and imported into jaxnas with
``jaxnas.interop``. PGD-20: l_inf, eps 8/255, step 2/255, from the clean input on both sides (no random start,
so both compute the same iterates; ``adv_agreement`` is the fraction of examples whose adversarial prediction
agrees). The PyTorch PGD is the usual loop (forward, cross-entropy, ``autograd.grad``, sign step, projection);
its APGD-CE is the reference AutoAttack's ``APGDAttack`` (PyPI ``pyautoattack``). jaxnas' compile time is
reported separately (``compile_s``); ``step_s`` is the median of the compiled attack on one batch.

Both sides use the same number of CPU threads (``--threads``, default 1: the process is pinned to one core,
XLA's Eigen pool and PyTorch's intra-op pool are single-threaded); ``--threads 0`` leaves jax at its default
and times PyTorch with ``os.cpu_count()`` and 1 threads, reporting the faster.

  python -m benchmarks.attack_throughput
  python -m benchmarks.attack_throughput --fixture trained_darts_v2_c8l5 --batch 64
  python -m benchmarks.attack_throughput --quick          # CI smoke run: PGD-20, batch 2, C=4, 3 cells, 16x16
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import autoattack_parity
from benchmarks import common
from jaxnas import attacks

COLUMNS = ('attack', 'batch', 'C', 'layers', 'threads', 'compile_s', 'step_s', 'examples_per_s', 'torch_step_s',
           'torch_examples_per_s', 'ratio', 'adv_agreement')
EPS, STEP = 8 / 255, 2 / 255


def limit_threads(n: int) -> None:
  """Pins this process to ``n`` cores and makes XLA's CPU backend single-threaded when ``n == 1``; call before
  jax runs anything."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
  if n == 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')


def torch_pgd(torch, model, x, y, steps: int):
  """PGD on the cross-entropy from the clean input: ``x + STEP * sign(grad)``, projected on the eps ball and
  [0, 1] (Madry et al. 2018)."""
  x_adv = x.clone()
  for _ in range(steps):
    x_adv.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x_adv), y, reduction='sum')
    grad, = torch.autograd.grad(loss, x_adv)
    x_adv = torch.min(torch.max(x_adv.detach() + STEP * grad.sign(), x - EPS), x + EPS).clamp(0.0, 1.0)
  return x_adv


def jax_attack(name: str, logits_fn, n_iter: int):
  """The jitted jaxnas attack ``(x, y, key) -> x_adv``."""
  if name == 'pgd20':
    return jax.jit(lambda x, y, key: attacks.pgd(logits_fn, x, y, key, eps=EPS, step_size=STEP, steps=20,
                                                 random_start=False))
  return jax.jit(lambda x, y, key: attacks.apgd(logits_fn, x, y, key, eps=EPS, n_iter=n_iter))


def torch_attack(name: str, torch, model, x, y, n_iter: int):
  """The PyTorch attack as a no-argument step returning the adversarial batch."""
  if name == 'pgd20':
    return lambda: torch_pgd(torch, model, x, y, 20)
  from pyautoattack.autopgd_base import APGDAttack  # pylint: disable=g-import-not-at-top
  apgd = APGDAttack(model, n_iter=n_iter, norm='Linf', eps=EPS, seed=0, loss='ce', rho=.75)
  return lambda: apgd.perturb(x, y)


def run(args, torch, name, logits_fn, model, x, y) -> dict:
  result = {'benchmark': 'attack_throughput', 'attack': name, 'batch': len(x), 'C': args.channels,
            'layers': args.layers, 'size': args.size, 'fixture': args.fixture, 'threads': args.threads,
            'n_iter': 20 if name == 'pgd20' else args.apgd_iters}
  common.log(f'{name}: jaxnas')
  timing = common.time_jax(jax_attack(name, logits_fn, args.apgd_iters),
                           (jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0)), args.repeats, args.warmup,
                           trace_dir=args.trace)
  x_adv = np.asarray(timing.pop('outputs'))
  result.update(timing, examples_per_s=len(x) / timing['step_s'])
  if torch is None:
    return result
  x_t, y_t = autoattack_parity.to_torch(torch, x), torch.from_numpy(y.astype(np.int64))
  step = torch_attack(name, torch, model, x_t, y_t, args.apgd_iters)
  threads = [1] if args.threads == 1 else args.torch_threads
  result.update(common.time_torch(torch, step, args.repeats, args.warmup, threads))
  result['torch_examples_per_s'] = len(x) / result['torch_step_s']
  result['ratio'] = result['step_s'] / result['torch_step_s']
  x_adv_t = step()
  with torch.no_grad():
    pred_torch = model(x_adv_t).argmax(1).numpy()
    loss_t = float(torch.nn.functional.cross_entropy(model(x_t), y_t))
  logits_j = logits_fn(jnp.asarray(x))
  loss_j = float(attacks.cross_entropy(logits_j, jnp.asarray(y)).mean())
  pred_jax = np.asarray(jax.jit(logits_fn)(x_adv)).argmax(1)
  result.update(loss_abs_diff=abs(loss_j - loss_t), adv_agreement=float(np.mean(pred_jax == pred_torch)),
                robust_accuracy=float(np.mean(pred_jax == y)), torch_robust_accuracy=float(np.mean(pred_torch == y)))
  return result


def main(argv=None):
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--attacks', nargs='+', default=['pgd20', 'apgd-ce'], choices=('pgd20', 'apgd-ce'))
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--channels', type=int, default=8, help='init channels C (ignored with --fixture)')
  p.add_argument('--layers', type=int, default=5, help='cells (ignored with --fixture)')
  p.add_argument('--size', type=int, default=32, help='input height and width')
  p.add_argument('--fixture', default=None, help='load trained weights: a fixture name in ../shared/fixtures')
  p.add_argument('--apgd-iters', type=int, default=100)
  p.add_argument('--threads', type=int, default=1, help='CPU threads for both sides (0: each side default)')
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.channels, args.layers, args.size, args.attacks = 2, 4, 3, 16, ['pgd20']
    args.repeats, args.warmup, args.fixture = 1, 0, None
  if args.threads:
    limit_threads(args.threads)
  torch = common.torch_or_none(args)
  if torch is None:
    raise SystemExit('attack_throughput compares with PyTorch: install torch (and pyautoattack for APGD-CE)')
  if args.fixture:
    logits_fn, model, (args.channels, args.layers) = autoattack_parity.load_models(
        autoattack_parity.SHARED / 'fixtures' / f'{args.fixture}.npz', torch)
    data = np.load(autoattack_parity.SHARED / 'data' / 'cifar10_subset_train.npz')
    x, y = data['image'][:args.batch].astype(np.float32) / 255.0, data['label'][:args.batch].astype(np.int32)
  else:
    logits_fn, model = autoattack_parity.darts_v2_models(torch, args.channels, args.layers,
                                                         input_shape=(1, args.size, args.size, 3))
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, args.size, args.size, 3), dtype=np.float32)
    y = np.asarray(jax.jit(logits_fn)(x)).argmax(1).astype(np.int32)   # attack the model's own predictions
  info = common.machine_info()
  results = [dict(run(args, torch, name, logits_fn, model, x, y), machine=info) for name in args.attacks]
  common.finish(results, args, COLUMNS)
  return results


if __name__ == '__main__':
  main()
