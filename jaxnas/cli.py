"""The ``jaxnas`` console command: thin wrappers around the library (``jaxnas <command> --help``)."""
from __future__ import annotations

import argparse
import sys

from jaxnas import describe
from jaxnas import evaluate
from jaxnas import probe
from jaxnas import report
from jaxnas import viz
from jaxnas import workdir as workdir_lib

# name -> (module with build_parser(parser) and run(args), one-line help)
COMMANDS = {
    'describe': (describe, 'parameters and MACs of a genotype\'s evaluation network'),
    'evaluate': (evaluate, 'clean and robust accuracy of a trained network or a PyTorch state dict'),
    'viz': (viz, 'redraw the pictures of a workdir into WORKDIR/figures (cells, curves, alphas)'),
    'probe': (probe, 'robustness metrics of searched supernets on held-out examples (curvature, Jacobian, ...)'),
    'compare': (report, 'Markdown table comparing several workdirs (params, MACs, accuracies, search cost)'),
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='jaxnas', description='Robust differentiable NAS in JAX.')
  sub = parser.add_subparsers(dest='command', required=True)
  for name, (module, help_text) in COMMANDS.items():
    module.build_parser(sub.add_parser(name, help=help_text, description=help_text))
  args = parser.parse_args(argv)
  try:
    return COMMANDS[args.command][0].run(args)
  except OSError as e:  # the system refused a read or write (the commands report their other errors)
    print(f'error: {workdir_lib.os_error_message(e, "check the paths given")}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
