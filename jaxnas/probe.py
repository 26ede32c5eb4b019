"""``jaxnas probe WORKDIR``: the robustness metrics of a searched supernet on held-out examples.

  jaxnas probe runs/advrush --examples 512
  jaxnas probe runs/darts runs/advrush runs/rnas --json

Loads the final search state of each workdir (its latest checkpoint: weights, BN statistics, alphas) and
measures, in inference mode (running BN statistics) on examples the search did not see:

  acc, ce        clean accuracy and cross-entropy
  curvature      AdvRush's regulariser (Eq. 10): ``mean_i ||grad_x l(x_i + z_i) - grad_x l(x_i)||_2`` along the
                 CURE direction of length ``--h`` (per-example losses, [0, 1] inputs)
  jacobian       DSRNA's Jacobian norm bound (Eq. 15), exact: ``mean_i (1/K) sum_k ||J_k(x_i)||_1`` (l_inf)
  vulnerability  RNAS' network vulnerability (Eq. 6) between clean and PGD features
  pgd_acc        accuracy on those PGD examples

The same definitions for every workdir, whatever its search objectives, so runs compare. Held-out examples:
a search with ``data.num_examples = N`` saw the first N training examples, and the probe takes the next
``--examples``; a search on the whole training set is probed on the test split.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxnas import bilevel, checkpoint, data, search
from jaxnas import workdir as workdir_lib
from jaxnas.attacks import pgd_attack
from jaxnas.objectives import compose, curvature, distortion, jacobian

METRICS = ('acc', 'ce', 'curvature', 'jacobian', 'vulnerability', 'pgd_acc')


def load_search(workdir: str):
  """``(config, model, state)`` of a search workdir, the state restored from its latest checkpoint."""
  config = ml_collections.ConfigDict(workdir_lib.read_json(
      workdir_lib.path(workdir, workdir_lib.CONFIG), 'pass the workdir of a search run, which holds its config.json'))
  dataset = data.load(config.data)  # the search's data: the model normalises with its statistics
  model = search.make_model(config.model, dataset)
  program = search.make_program(config, model, dataset)
  template = bilevel.init_state(program, jax.random.key(0), dataset.train_images[:1])
  payload = {'state': template, 'epoch': 0, 'step_in_epoch': 0, 'steps_per_epoch': 0}
  ckpt_dir = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)
  state = checkpoint.restore_checkpoint(ckpt_dir, payload)['state']
  return config, model, state


def held_out(data_config, count: int) -> data.Split:
  """``count`` examples the search did not use: training examples after its first ``num_examples``, else the
  test split."""
  used = int(data_config.num_examples)
  full = data.load({**data_config.to_dict(), 'num_examples': 0})
  split = full.train if used else full.test
  split = data.Split(split.images[used:used + count], split.labels[used:used + count])
  if len(split.labels) < count:
    where = f'training examples after the first {used}' if used else 'test examples'
    raise ValueError(f'only {len(split.labels)} held-out {where}, {count} requested: lower --examples')
  return split


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=('h', 'eps', 'step_size', 'steps'))
def batch_metrics(model, variables, alphas, images, labels, key, *, h: float, eps: float, step_size: float,
                  steps: int) -> dict:
  """Sums over one batch of every metric of ``METRICS`` (uint8 images)."""
  x = data.to_float(images)
  logits_fn = model.logits_fn(variables, alphas)
  loss_x = lambda x_, y_: compose.per_example_ce(logits_fn(x_), y_)
  logits = logits_fn(x)
  x_adv = pgd_attack.pgd(logits_fn, x, labels, key, eps=eps, step_size=step_size, steps=steps)
  _, clean_features = model.apply(variables, alphas, x, return_features=True)
  adv_logits, adv_features = model.apply(variables, alphas, x_adv, return_features=True)
  n = labels.shape[0]
  correct = lambda z: jnp.sum(jnp.argmax(z, -1) == labels)
  return {'acc': correct(logits), 'ce': jnp.sum(loss_x(x, labels)),
          'curvature': n * curvature.cure_regularizer(loss_x, x, labels, h),
          'jacobian': n * jacobian.jacobian_norm_bound(logits_fn, x, q=1),
          'vulnerability': n * distortion.feature_distortion(clean_features, adv_features),
          'pgd_acc': correct(adv_logits)}


def probe(workdir: str, examples: int = 512, batch_size: int = 64, h: float = 1.5 * 0.2507,
          eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 7, seed: int = 0) -> dict:
  """The means of ``METRICS`` over ``examples`` held-out examples of a search workdir."""
  config, model, state = load_search(workdir)
  split = held_out(config.data, examples)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  totals = dict.fromkeys(METRICS, 0.0)
  for start in range(0, examples, batch_size):
    sums = batch_metrics(model, variables, state.alphas, split.images[start:start + batch_size],
                         split.labels[start:start + batch_size], jax.random.fold_in(jax.random.key(seed), start),
                         h=h, eps=eps, step_size=step_size, steps=steps)
    totals = {k: totals[k] + float(v) for k, v in sums.items()}
  return {'workdir': workdir, 'examples': examples, 'h': h, 'eps': eps,
          **{k: v / examples for k, v in totals.items()}}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
  parser = parser or argparse.ArgumentParser(prog='jaxnas probe', description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+', help='search workdirs (with checkpoints/)')
  parser.add_argument('--examples', type=int, default=512, help='held-out examples to measure on')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--h', type=float, default=1.5 * 0.2507,
                      help="curvature step length in [0, 1] units (default: AdvRush's 1.5 x CIFAR-10's std)")
  parser.add_argument('--eps', type=float, default=8 / 255, help='PGD radius (l_inf) for the vulnerability')
  parser.add_argument('--step-size', type=float, default=2 / 255)
  parser.add_argument('--steps', type=int, default=7)
  parser.add_argument('--seed', type=int, default=0, help='PGD random starts')
  parser.add_argument('--json', action='store_true', help='print one JSON object per workdir')
  return parser


def run(args: argparse.Namespace) -> int:
  try:
    results = [probe(w, args.examples, args.batch_size, args.h, args.eps, args.step_size, args.steps, args.seed)
               for w in args.workdirs]
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    print('\n'.join(json.dumps(r) for r in results))
    return 0
  print('| workdir | ' + ' | '.join(METRICS) + ' |\n|' + ' --- |' * (len(METRICS) + 1))
  for r in results:
    print(f'| {r["workdir"]} | ' + ' | '.join(f'{r[k]:.4g}' for k in METRICS) + ' |')
  return 0


def main(argv=None) -> int:
  return run(build_parser().parse_args(argv))


if __name__ == '__main__':
  sys.exit(main())
