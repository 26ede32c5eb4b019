"""Certified-bound throughput: IBP / CROWN-IBP / CROWN margin lower bounds of a small DARTS evaluation network.

The workload of ``jaxnas evaluate``'s certified radii and of DSRNA-CB: ``certify.margin_lower_bounds`` of a
DARTS_V2 ``NetworkCIFAR`` in inference mode (C=8, 5 cells, 32x32x3, random weights and BatchNorm statistics)
on a batch of 16 images, l_inf ball of radius 1/255 clipped to [0, 1]. Per method: compile time (trace + XLA
compile, timed ahead of time), median time per batch, examples/s, XLA's FLOP count and peak memory; the
fraction of certified images and the mean worst-case margin bound (below the clean margin) tell that the
methods bound the same network. There is no reference implementation in JAX or PyTorch to time against (auto_LiRPA is not a
dependency; its values are checked in tests/test_certify.py).

  python -m benchmarks.crown_throughput
  python -m benchmarks.crown_throughput --methods crown-ibp --batch 64 --norm l2 --eps 0.1
  python -m benchmarks.crown_throughput --quick      # CI smoke run (C=4, 3 cells, 16x16, batch 2)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxnas import certify, genotypes, networks

COLUMNS = ('method', 'norm', 'batch', 'C', 'compile_s', 'step_s', 'examples_per_s', 'certified_fraction',
           'mean_worst_margin', 'peak_memory_bytes')


def make_network(C: int, layers: int, size: int, depthwise: str, seed: int = 0):
  """DARTS_V2 NetworkCIFAR with PyTorch's initialisation and random BN statistics; its ``x -> logits``."""
  net = networks.EvalNetwork(genotypes.get('DARTS_V2'), init_channels=C, layers=layers, num_classes=10,
                             mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), depthwise=depthwise)
  variables = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if s.ndim else s, s.dtype),
                       variables['batch_stats'])
  return net.logits_fn({'params': variables['params'], 'batch_stats': stats})


def run(args, method: str) -> dict:
  B, size = args.batch, args.size
  logits_fn = make_network(args.channels, args.layers, size, args.depthwise)
  x = jnp.asarray(np.random.default_rng(1).random((B, size, size, 3), dtype=np.float32))
  logits = logits_fn(x)
  y = jnp.argmax(logits, axis=-1)  # bound the predicted class' margins
  clean = np.min(np.asarray(certify.margin_spec(y, 10) @ logits[:, :, None])[..., 0], axis=1)
  bound = lambda x: certify.margin_lower_bounds(logits_fn, x, y, args.eps, args.norm, method, box=(0.0, 1.0),
                                                chunk_rows=args.chunk_rows)
  common.log(f'{method}: batch {B}, C={args.channels}, {args.layers} cells, {size}x{size}')
  timing = common.time_jax(bound, (x,), args.repeats, args.warmup, trace_dir=args.trace)
  worst = np.min(np.asarray(timing.pop('outputs')), axis=1)
  if method == 'crown':  # every chunk's backward pass counted, also those no example needs (skipped at run time)
    timing = {k: v for k, v in timing.items() if k not in ('achieved_flops_per_s', 'fraction_of_peak_flops')}
    timing['flops_per_step_upper_bound'] = timing.pop('flops_per_step')
  return {'benchmark': 'crown_throughput', 'method': method, 'norm': args.norm, 'eps': args.eps, 'batch': B,
          'C': args.channels, 'layers': args.layers, 'size': size, 'depthwise': args.depthwise, **timing,
          'examples_per_s': B / timing['step_s'], 'certified_fraction': float(np.mean(worst > 0)),
          'mean_worst_margin': float(np.mean(worst)), 'mean_clean_margin': float(np.mean(clean))}


def main(argv=None):
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--methods', nargs='+', default=['ibp', 'crown-ibp', 'crown'], choices=certify.METHODS)
  p.add_argument('--norm', default='linf', choices=certify.NORMS)
  p.add_argument('--eps', type=float, default=1 / 255)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--channels', type=int, default=8, help='init channels C')
  p.add_argument('--layers', type=int, default=5, help='number of cells')
  p.add_argument('--size', type=int, default=32, help='input height and width (divisible by 4)')
  p.add_argument('--chunk-rows', type=int, default=256,
                 help='CROWN: neurons of the whole batch per intermediate backward pass')
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.channels, args.layers, args.size, args.repeats, args.warmup = 2, 4, 3, 16, 1, 0
    args.methods = [m for m in args.methods if m != 'crown']  # full CROWN compiles for minutes on CPU
  info = common.machine_info()
  results = [dict(run(args, method), machine=info) for method in args.methods]
  common.finish(results, args, COLUMNS)
  return results


if __name__ == '__main__':
  main()
