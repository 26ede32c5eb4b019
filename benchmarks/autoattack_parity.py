"""AutoAttack parity: ``jaxnas.attacks.autoattack`` against the reference AutoAttack (PyPI ``pyautoattack``,
PyTorch) on identical weights, inputs and labels.

Both sides load the same DARTS_V2 ``NetworkCIFAR`` weights from ``../shared/fixtures`` (by default
``trained_darts_v2_c8l5``, trained on the CIFAR-10 subset; ``darts_v2_eval_network`` has random weights and
predicts one class everywhere, so use ``--labels predicted`` with it) and attack the first ``--n`` images of
``../shared/data/cifar10_subset_train.npz`` with the standard ensemble (APGD-CE, APGD-T, FAB-T, Square), each
attack on the points still robust. The reference runs one attack at a time on the points still robust,
exactly the computation of its ``run_standard_evaluation`` (same points, order, batches and seed), so that
the robust accuracy after each attack can be read on both sides; the accuracy after APGD-CE is APGD-CE
alone. The two sides draw different random numbers, so results agree statistically, not bitwise.

One JSON object per eps on stdout (``jaxnas`` and ``reference``: accuracy after each attack and seconds per
attack; jaxnas' seconds include compilation), a table on stderr.

  python -m benchmarks.autoattack_parity                          # 256 points, eps 1/255 and 2/255
  python -m benchmarks.autoattack_parity --attacks apgd-ce        # APGD-CE alone
  python -m benchmarks.autoattack_parity --fixture darts_v2_eval_network --labels predicted
  python -m benchmarks.autoattack_parity --side jaxnas --json-out a.jsonl &   # the two sides in parallel,
  python -m benchmarks.autoattack_parity --side reference --json-out b.jsonl  # then:
  python -m benchmarks.autoattack_parity --merge a.jsonl b.jsonl
  python -m benchmarks.autoattack_parity --quick                  # CI smoke run: 4 points, APGD-CE, 10 iterations
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

from benchmarks import common
from jaxnas import attacks, genotypes, interop, networks
from jaxnas.attacks import ensemble

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('JAXNAS_SHARED', REPO.parent / 'shared'))
TORCH_NORM = {'linf': 'Linf', 'l2': 'L2'}
DEFAULT_BUDGET = dict(n_iter=100, n_target_classes=9, n_queries=5000)   # the reference's standard settings
COLUMNS = ('eps', 'attack', 'jaxnas', 'reference', 'diff', 'jaxnas_s', 'reference_s')


def load_models(fixture: pathlib.Path, torch):
  """The fixture's DARTS_V2 network as a jaxnas ``logits_fn`` and as the PyTorch reference module (eval mode,
  logits only), both from the same float32 ``state_dict``; also returns ``(channels, layers)``."""
  data = np.load(fixture)
  state_dict = {k[len('state_dict/'):]: data[k].astype(np.float32) for k in data.files
                if k.startswith('state_dict/')}
  channels = int(state_dict['classifier.weight'].shape[1]) // 16   # 4 nodes x 4C after two reductions
  layers = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('cells.'))
  return (*darts_v2_models(torch, channels, layers, state_dict), (channels, layers))


def darts_v2_models(torch, channels: int, layers: int, state_dict=None, input_shape=(1, 32, 32, 3)):
  """DARTS_V2 ``NetworkCIFAR`` as ``(jaxnas logits_fn, PyTorch module)`` with the same weights: ``state_dict``
  (numpy, PyTorch names) or, when None, PyTorch's initialisation under ``torch.manual_seed(0)``."""
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  genotype = genotypes.get('DARTS_V2')
  auxiliary = state_dict is not None and any(k.startswith('auxiliary_head.') for k in state_dict)

  class LogitsOnly(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.net = torch_reference.EvalNetwork(genotype.to_dict(), C=channels, num_classes=10, layers=layers,
                                             auxiliary=auxiliary)

    def forward(self, x):
      return self.net(x)[0]

  torch.manual_seed(0)
  model = LogitsOnly()
  if state_dict is None:
    state_dict = {k: v.numpy() for k, v in model.net.state_dict().items()}
  else:
    model.net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False)
  net = networks.EvalNetwork(genotype, init_channels=channels, layers=layers, num_classes=10, auxiliary=auxiliary)
  logits_fn = net.logits_fn(interop.from_torch_state_dict(state_dict, net, input_shape=input_shape))
  return logits_fn, model.eval()


def to_torch(torch, x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def reference_autoattack(torch, model, x, y, *, eps, norm, attack_names, seed, batch_size, n_iter,
                         n_target_classes, n_queries):
  """The reference's standard AutoAttack, one attack at a time on the points still robust.

  Returns ``(robust accuracy after each attack, seconds per attack)``. With budgets other than the standard
  ones, its four attacks are rebuilt with the standard settings and the given budgets (rebuilt, not edited:
  APGD derives its checkpoints from ``n_iter`` at construction).
  """
  import pyautoattack  # pylint: disable=g-import-not-at-top
  from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # pylint: disable=g-import-not-at-top
  from pyautoattack.fab_pt import FABAttack_PT  # pylint: disable=g-import-not-at-top
  from pyautoattack.square import SquareAttack  # pylint: disable=g-import-not-at-top
  adversary = pyautoattack.AutoAttack(model, norm=TORCH_NORM[norm], eps=eps, version='standard', seed=seed)
  if (n_iter, n_target_classes, n_queries) != tuple(DEFAULT_BUDGET.values()):
    kw = dict(eps=eps, norm=TORCH_NORM[norm], seed=seed, device='cpu')
    adversary.apgd = APGDAttack(model, n_iter=n_iter, n_restarts=1, rho=.75, logger=adversary.logger, **kw)
    adversary.apgd_targeted = APGDAttack_targeted(model, n_iter=n_iter, n_restarts=1, rho=.75,
                                                  n_target_classes=n_target_classes, logger=adversary.logger, **kw)
    adversary.fab = FABAttack_PT(model, n_iter=n_iter, n_restarts=1, n_target_classes=n_target_classes, **kw)
    adversary.square = SquareAttack(model, p_init=.8, n_queries=n_queries, n_restarts=1, resc_schedule=False,
                                    **kw)
  with torch.no_grad():
    robust = model(to_torch(torch, x)).argmax(1).numpy() == y
  accuracy, seconds = {'clean': float(robust.mean())}, {}
  for name in attack_names:
    start = time.perf_counter()
    todo = np.flatnonzero(robust)
    if len(todo):
      adversary.attacks_to_run = [name]
      _, y_adv = adversary.run_standard_evaluation(to_torch(torch, x[todo]), torch.from_numpy(y[todo]).long(),
                                                   batch_size=batch_size)
      robust[todo] = y_adv.numpy() == y[todo]
    accuracy[name] = float(robust.mean())
    seconds[name] = time.perf_counter() - start
  return accuracy, seconds


def run(args, torch, logits_fn, model, x, y, eps) -> dict:
  """One eps on the requested side(s): accuracy after each attack and seconds per attack."""
  budget = dict(n_iter=args.n_iter, n_target_classes=args.n_target_classes, n_queries=args.n_queries)
  out = dict(benchmark='autoattack_parity', fixture=args.fixture, labels=args.labels, n=len(x), eps=eps,
             norm=args.norm, attacks=list(args.attacks), seed=args.seed,
             batch_size=args.batch_size, **budget)
  if args.side in ('both', 'jaxnas'):
    common.log(f'eps {eps:.5f}: jaxnas')
    ours = attacks.autoattack(logits_fn, x, y, eps=eps, norm=args.norm, attacks=args.attacks, seed=args.seed,
                              batch_size=args.batch_size, n_restarts=1, run_checks=not args.no_checks, **budget)
    out.update(jaxnas=ours['robust_accuracy'], jaxnas_seconds=ours['seconds'], jaxnas_warnings=ours['warnings'])
    common.log(f'eps {eps:.5f}: jaxnas {ours["robust_accuracy"]}')
  if args.side in ('both', 'reference'):
    common.log(f'eps {eps:.5f}: reference, {args.torch_threads} torch thread(s)')
    torch.set_num_threads(args.torch_threads)
    ref, ref_seconds = reference_autoattack(torch, model, x, y, eps=eps, norm=args.norm, attack_names=args.attacks,
                                            seed=args.seed, batch_size=args.batch_size, **budget)
    out.update(reference=ref, reference_seconds=ref_seconds, torch_threads=args.torch_threads)
    common.log(f'eps {eps:.5f}: reference {ref}')
  return with_diff(out)


def with_diff(result: dict) -> dict:
  """Adds ``diff`` (jaxnas - reference, after each attack) and ``max_abs_diff`` when both sides are present."""
  if 'jaxnas' in result and 'reference' in result:
    diff = {k: result['jaxnas'][k] - result['reference'][k] for k in result['reference']}
    result.update(diff=diff, max_abs_diff=max(map(abs, diff.values())))
  return result


def merge(paths) -> list[dict]:
  """Joins one-sided results (``--side jaxnas`` and ``--side reference`` run in parallel) of the same setting."""
  key_fields = ('fixture', 'labels', 'n', 'eps', 'norm', 'attacks', 'seed', 'n_iter', 'n_target_classes',
                'n_queries')
  merged = {}
  for path in paths:
    for line in open(path):
      r = json.loads(line)
      merged.setdefault(json.dumps([r[k] for k in key_fields]), {}).update(r)
  return [with_diff(r) for r in merged.values()]


def scale_of(norm: str) -> float:
  """``--eps`` is in units of 1/255 for l_inf, absolute for l_2."""
  return 1 / 255 if norm == 'linf' else 1.0


def rows(result: dict) -> list[dict]:
  """Table rows: one per attack (accuracy after it), for the stderr table."""
  out = []
  unit = '/255' if result['norm'] == 'linf' else ''
  eps = f'{result["eps"] / scale_of(result["norm"]):.4g}{unit}'
  for name in ['clean'] + result['attacks']:
    out.append(dict(eps=eps, attack=name, jaxnas=result.get('jaxnas', {}).get(name),
                    reference=result.get('reference', {}).get(name), diff=result.get('diff', {}).get(name),
                    jaxnas_s=result.get('jaxnas_seconds', {}).get(name),
                    reference_s=result.get('reference_seconds', {}).get(name)))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true', help='CI smoke run: 4 points, eps 8/255, APGD-CE, 10 iterations')
  p.add_argument('--fixture', default='trained_darts_v2_c8l5', help='fixture name in ../shared/fixtures')
  p.add_argument('--data', default='cifar10_subset_train', help='image set in ../shared/data')
  p.add_argument('--labels', choices=('true', 'predicted'), default='true',
                 help="'predicted': the model's clean predictions (for untrained weights)")
  p.add_argument('--n', type=int, default=256, help='number of images (the first n)')
  p.add_argument('--eps', type=float, nargs='+', default=[1.0, 2.0], help='radii, in units of 1/255 for linf')
  p.add_argument('--norm', choices=('linf', 'l2'), default='linf')
  p.add_argument('--attacks', nargs='+', default=list(ensemble.STANDARD), choices=ensemble.STANDARD,
                 help='a prefix of the standard ensemble (default: all four)')
  p.add_argument('--n-iter', type=int, default=DEFAULT_BUDGET['n_iter'])
  p.add_argument('--n-target-classes', type=int, default=DEFAULT_BUDGET['n_target_classes'])
  p.add_argument('--n-queries', type=int, default=DEFAULT_BUDGET['n_queries'])
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--batch-size', type=int, default=256, help='points per batch, on both sides')
  p.add_argument('--torch-threads', type=int, default=1, help='PyTorch intra-op threads')
  p.add_argument('--no-checks', action='store_true', help="skip jaxnas' sanity checks (the reference runs its own)")
  p.add_argument('--side', choices=('both', 'jaxnas', 'reference'), default='both',
                 help='run one side only (two processes in parallel; join them with --merge)')
  p.add_argument('--merge', nargs='+', default=None, metavar='JSONL', help='join one-sided results and print them')
  p.add_argument('--json-out', default=None, help='also append the JSON lines to this file')
  args = p.parse_args(argv)
  if args.merge:
    results = merge(args.merge)
    print('\n'.join(json.dumps(r, sort_keys=True) for r in results), flush=True)
    print(common.table([row for r in results for row in rows(r)], COLUMNS), file=sys.stderr)
    return results
  if args.quick:
    args.n, args.eps, args.attacks, args.no_checks = 4, [8.0], ['apgd-ce'], True
    args.n_iter, args.n_target_classes, args.n_queries = 10, 2, 50
  if list(args.attacks) != list(ensemble.STANDARD[:len(args.attacks)]):
    p.error(f'--attacks must be a prefix of {list(ensemble.STANDARD)} (each attack runs on what the previous left)')
  import torch  # pylint: disable=g-import-not-at-top
  logits_fn, model, _ = load_models(SHARED / 'fixtures' / f'{args.fixture}.npz', torch)
  data = np.load(SHARED / 'data' / f'{args.data}.npz')
  x = data['image'][:args.n].astype(np.float32) / 255.0
  y = (np.asarray(jax.jit(logits_fn)(x)).argmax(1) if args.labels == 'predicted' else data['label'][:args.n])
  y = y.astype(np.int32)
  info = common.machine_info()
  results = []
  for e in args.eps:   # each eps is printed (and appended) as soon as it is done: long runs report as they go
    results.append(dict(run(args, torch, logits_fn, model, x, y, e * scale_of(args.norm)), machine=info))
    line = json.dumps(results[-1], sort_keys=True)
    print(line, flush=True)
    if args.json_out:
      with open(args.json_out, 'a') as f:
        f.write(line + '\n')
  print(common.table([row for r in results for row in rows(r)], COLUMNS), file=sys.stderr)
  return results


if __name__ == '__main__':
  main()
