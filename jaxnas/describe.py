"""``jaxnas describe``: parameters and MACs of an evaluation network built from a genotype.

  python -m jaxnas.describe DARTS_V2 --init-channels 36 --layers 20 --num-classes 10 --auxiliary --json
"""
from __future__ import annotations

import argparse
import json
import sys

from jaxnas import analysis, genotypes, networks


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
  parser = parser or argparse.ArgumentParser(prog='jaxnas describe', description=__doc__.splitlines()[0])
  parser.add_argument('genotype', help='zoo name (e.g. DARTS_V2, DSARA), genotype JSON file or search workdir')
  parser.add_argument('--init-channels', type=int, default=36)
  parser.add_argument('--layers', type=int, default=20)
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--auxiliary', action='store_true', help='build the auxiliary head (not counted)')
  parser.add_argument('--input-size', type=int, default=32, help='square input size for MACs')
  parser.add_argument('--in-channels', type=int, default=3)
  parser.add_argument('--json', action='store_true', help='print one JSON object with params and macs')
  return parser


def describe(args: argparse.Namespace) -> dict:
  genotype = genotypes.load(args.genotype)
  net = networks.EvalNetwork(genotype, args.init_channels, args.layers, args.num_classes, args.auxiliary)
  shape = (1, args.input_size, args.input_size, args.in_channels)
  return {'genotype': args.genotype, 'init_channels': args.init_channels, 'layers': args.layers,
          'num_classes': args.num_classes, 'input_shape': list(shape),
          'params': analysis.count_params(net, shape),
          'params_including_aux': analysis.count_params(net, shape, include_aux=True),
          'macs': analysis.count_macs(net, shape)}


def run(args: argparse.Namespace) -> int:
  try:
    info = describe(args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(info))
  else:
    print(f"{info['genotype']}: C={info['init_channels']} layers={info['layers']} classes={info['num_classes']}"
          f" input={'x'.join(map(str, info['input_shape']))}\n"
          f"  params (excluding aux head): {info['params']:,} ({info['params'] / 1e6:.2f}M)\n"
          f"  MACs (conv + linear):         {info['macs']:,} ({info['macs'] / 1e6:.2f}M)")
  return 0


def main(argv=None) -> int:
  return run(build_parser().parse_args(argv))


if __name__ == '__main__':
  sys.exit(main())
