"""DARTS search-supernet step: forward + backward w.r.t. weights and alphas, train-mode BatchNorm.

The workload of ``../shared/reference/baselines.md`` (batch 32, 32x32x3, C=16, 8 cells, 8 primitives),
timed for jaxnas and, when PyTorch is installed, for the PyTorch reference in the same run (``ratio`` =
jaxnas / PyTorch step time). Both start from the same weights (PyTorch's, imported with
``jaxnas.interop``) and the same batch, and ``loss_abs_diff`` checks they compute the same loss.

  python -m benchmarks.supernet_step                 # 8 cells
  python -m benchmarks.supernet_step --cells 8 20    # compile time vs depth
  python -m benchmarks.supernet_step --quick         # CI smoke run
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from jaxnas import interop, ops, search_space

COLUMNS = ('cells', 'batch', 'C', 'compile_s', 'step_s', 'examples_per_s', 'torch_step_s', 'ratio',
           'loss_abs_diff', 'peak_memory_bytes')


def loss_fn(net, params, alphas, batch_stats, x, y):
  """Mean cross-entropy of the supernet in train mode (batch statistics)."""
  logits, new_stats = net.apply({'params': params, 'batch_stats': batch_stats}, alphas, x, train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats


def make_step(net):
  """(params, alphas, batch_stats, x, y) -> ((loss, new_batch_stats), (grad_params, grad_alphas))."""
  grad = jax.value_and_grad(lambda *a: loss_fn(net, *a), argnums=(0, 1), has_aux=True)
  return jax.jit(grad)


def torch_setup(torch, C, cells, x_nchw, y, device):
  """The reference supernet (on ``device``), its alphas and a step closure (forward, CE, backward)."""
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_reference.SearchNetwork(C=C, num_classes=10, layers=cells).train().to(device)
  alphas = model.new_alphas(torch.Generator().manual_seed(0))
  alphas = {t: a.detach().to(device).requires_grad_() for t, a in alphas.items()}
  x, y = torch.from_numpy(x_nchw).to(device), torch.from_numpy(y).to(device)

  def step():
    model.zero_grad(set_to_none=True)
    for a in alphas.values():
      a.grad = None
    loss = torch.nn.functional.cross_entropy(model(x, alphas), y)
    loss.backward()
    return loss.detach()

  return model, alphas, step


def run(args, cells, torch) -> dict:
  B, C, size = args.batch, args.channels, args.size
  rng = np.random.default_rng(0)
  x = rng.random((B, size, size, 3), dtype=np.float32)
  y = rng.integers(0, 10, B).astype(np.int32)
  net = search_space.Supernet(init_channels=C, layers=cells, num_classes=10, depthwise=args.depthwise)
  result = {'benchmark': 'supernet_step', 'cells': cells, 'batch': B, 'C': C, 'size': size,
            'depthwise': ops.resolve_depthwise(args.depthwise, supernet=True)}
  if torch is not None:
    device = common.torch_device(torch)
    model, t_alphas, t_step = torch_setup(torch, C, cells, x.transpose(0, 3, 1, 2).copy(), y.astype(np.int64),
                                          device)
    variables = interop.from_torch_state_dict(model.state_dict(), net, input_shape=x.shape)
    alphas = {t: jnp.asarray(a.detach().cpu().numpy()) for t, a in t_alphas.items()}
  else:
    variables = net.init(jax.random.PRNGKey(0), jnp.asarray(x))
    alphas = net.init_alphas(jax.random.PRNGKey(1))
  step_args = (variables['params'], alphas, variables['batch_stats'], jnp.asarray(x), jnp.asarray(y))
  timing = common.time_jax(make_step(net), step_args, args.repeats, args.warmup, trace_dir=args.trace)
  (loss, _), _ = timing.pop('outputs')
  result.update(timing, examples_per_s=B / timing['step_s'])
  if torch is not None:
    result['loss_abs_diff'] = abs(float(loss) - float(t_step()))
    result.update(common.time_torch(torch, t_step, args.repeats, args.warmup, args.torch_threads, device))
    result['ratio'] = result['step_s'] / result['torch_step_s']
  return result


def main(argv=None):
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--cells', type=int, nargs='+', default=[8], help='number of cells (several: one run each)')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--channels', type=int, default=16, help='init channels C')
  p.add_argument('--size', type=int, default=32, help='input height and width')
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.channels, args.size, args.repeats, args.warmup = 2, 4, 16, 1, 0
    args.cells = sorted({min(c, 3) for c in args.cells})
  torch = common.torch_or_none(args)
  info = common.machine_info()
  results = [dict(run(args, cells, torch), machine=info) for cells in args.cells]
  common.finish(results, args, COLUMNS)
  return results


if __name__ == '__main__':
  main()
