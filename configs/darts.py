r"""DARTS (Liu et al. 2019): the search on CIFAR-10 with the paper's settings.

  python -m jaxnas.main --config=configs/darts.py --workdir=runs/darts
  python -m jaxnas.main --config=configs/darts.py:second_order --workdir=runs/darts2   # DARTS (2nd order)
  python -m jaxnas.main --config=configs/darts.py:smoke --workdir=/tmp/darts_smoke     # seconds, offline

Supernet C=16, 8 cells; batch 64, 50 epochs; weights SGD lr 0.025 cosine to 0.001, momentum 0.9, weight
decay 3e-4, gradient norm clipped to 5; alphas Adam 3e-4, betas (0.5, 0.999), weight decay 1e-3; half of
the CIFAR-10 training set is the validation split; crop + flip augmentation. Arguments (comma-separated):
``second_order`` (the unrolled gradient; ``--config.arch.hvp=exact`` for the exact Hessian-vector product),
``smoke`` (a tiny supernet on a few embedded digits, for tests).
"""
from jaxnas import search

ARGS = ('smoke', 'second_order')


def get_config(arg=None):
  args = set(filter(None, (arg or '').split(',')))
  if args - set(ARGS):
    raise ValueError(f'unknown config argument(s) {sorted(args - set(ARGS))}: use any of {ARGS}')
  config = search.default_config()
  config.data.update(dict(source='tfds', name='cifar10', val_fraction=0.5, crop_padding=4, flip=True))
  if 'second_order' in args:
    config.arch.order = 2
  if 'smoke' in args:
    config.data.update(dict(source='digits', name='', num_examples=32, crop_padding=1, flip=False))
    config.model.update(dict(init_channels=4, layers=5))
    config.search.update(dict(epochs=2, batch_size=8))
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
  return config
