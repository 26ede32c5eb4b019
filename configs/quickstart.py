r"""Quick start: a DARTS search on scikit-learn's embedded 8x8 digits, offline, in minutes on a laptop CPU.

  python -m jaxnas.main --config=configs/quickstart.py --workdir=runs/quickstart

A small supernet (C=8, 5 cells: 8x8 -> 4x4 -> 2x2) searched for 6 epochs with the DARTS optimizers, except
for a 10x larger architecture learning rate (3e-3) so that the alphas move visibly within a few epochs;
writes genotype.json, the per-epoch genotypes in history/ and log.txt. ``:smoke`` is a tiny version for
tests.
"""
from jaxnas import search


def get_config(arg=None):
  if arg not in (None, '', 'smoke'):
    raise ValueError(f"unknown config argument {arg!r}: use 'smoke' or nothing")
  config = search.default_config()
  config.mode = 'pipeline'
  config.data.source = 'digits'
  config.model.update(dict(init_channels=8, layers=5))
  config.search.update(dict(epochs=6, batch_size=64))
  config.arch.lr = 3e-3
  config.log_every_steps = 5
  if arg == 'smoke':
    config.data.num_examples = 64
    config.model.update(dict(init_channels=4, layers=5))
    config.search.update(dict(epochs=2, batch_size=16))
    config.log_every_steps = 1
  return config
