"""Evaluation-network train step: DARTS_V2 NetworkCIFAR forward + backward with the auxiliary head.

Loss = CE(logits) + 0.4 * CE(aux logits) (DARTS' auxiliary weight), train-mode BatchNorm, gradient w.r.t.
the weights; C=36, 20 cells, batch 64, 32x32x3 by default. Timed for jaxnas and, when PyTorch is installed,
for the PyTorch reference NetworkCIFAR in the same run (``ratio`` = jaxnas / PyTorch). Both start from the
same weights and batch; ``loss_abs_diff`` checks they compute the same loss (only without drop-path,
whose random masks differ between the two).

  python -m benchmarks.eval_train_step
  python -m benchmarks.eval_train_step --genotype DSARA --channels 64
  python -m benchmarks.eval_train_step --quick
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from jaxnas import genotypes, interop, networks

AUX_WEIGHT = 0.4
COLUMNS = ('genotype', 'layers', 'batch', 'C', 'compile_s', 'step_s', 'examples_per_s', 'torch_step_s',
           'ratio', 'loss_abs_diff', 'peak_memory_bytes')


def loss_fn(net, drop_path_prob, params, batch_stats, x, y, rng):
  logits, logits_aux, new_stats = net.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                            rng=rng, drop_path_prob=drop_path_prob)
  ce = optax.softmax_cross_entropy_with_integer_labels
  return ce(logits, y).mean() + AUX_WEIGHT * ce(logits_aux, y).mean(), new_stats


def make_step(net, drop_path_prob):
  """(params, batch_stats, x, y, rng) -> ((loss, new_batch_stats), grad_params)."""
  return jax.jit(jax.value_and_grad(lambda *a: loss_fn(net, drop_path_prob, *a), has_aux=True))


def torch_setup(torch, genotype, C, layers, drop_path_prob, x_nchw, y):
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_reference.EvalNetwork(genotype.to_dict(), C=C, num_classes=10, layers=layers,
                                      auxiliary=True).train()
  model.drop_path_prob = drop_path_prob
  x, y = torch.from_numpy(x_nchw), torch.from_numpy(y)

  def step():
    model.zero_grad(set_to_none=True)
    logits, logits_aux = model(x)
    ce = torch.nn.functional.cross_entropy
    loss = ce(logits, y) + AUX_WEIGHT * ce(logits_aux, y)
    loss.backward()
    return loss.detach()

  return model, step


def run(args, torch) -> dict:
  B, C, L = args.batch, args.channels, args.layers
  genotype = genotypes.get(args.genotype)
  rng = np.random.default_rng(0)
  x = rng.random((B, 32, 32, 3), dtype=np.float32)
  y = rng.integers(0, 10, B).astype(np.int32)
  net = networks.EvalNetwork(genotype, init_channels=C, layers=L, num_classes=10, auxiliary=True)
  result = {'benchmark': 'eval_train_step', 'genotype': args.genotype, 'layers': L, 'batch': B, 'C': C,
            'drop_path_prob': args.drop_path}
  if torch is not None:
    model, t_step = torch_setup(torch, genotype, C, L, args.drop_path, x.transpose(0, 3, 1, 2).copy(),
                                y.astype(np.int64))
    variables = interop.from_torch_state_dict(model.state_dict(), net, input_shape=x.shape)
  else:
    variables = net.init(jax.random.PRNGKey(0), jnp.asarray(x))
  step_args = (variables['params'], variables['batch_stats'], jnp.asarray(x), jnp.asarray(y),
               jax.random.PRNGKey(2))
  timing = common.time_jax(make_step(net, args.drop_path), step_args, args.repeats, args.warmup)
  (loss, _), _ = timing.pop('outputs')
  result.update(timing, examples_per_s=B / timing['step_s'])
  if torch is not None:
    torch_loss = float(t_step())
    result['loss_abs_diff'] = abs(float(loss) - torch_loss) if args.drop_path == 0 else None
    result.update(common.time_torch(torch, t_step, args.repeats, args.warmup, args.torch_threads))
    result['ratio'] = result['step_s'] / result['torch_step_s']
  return result


def main(argv=None):
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--genotype', default='DARTS_V2', help='zoo genotype name')
  p.add_argument('--layers', type=int, default=20)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--channels', type=int, default=36, help='init channels C')
  p.add_argument('--drop-path', type=float, default=0.0, help='drop-path probability (DARTS ramps to 0.2)')
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.channels, args.layers, args.repeats, args.warmup = 2, 8, 5, 1, 0
  torch = common.torch_or_none(args)
  info = common.machine_info()
  result = dict(run(args, torch), machine=info)
  common.finish([result], args, COLUMNS)
  return [result]


if __name__ == '__main__':
  main()
