r"""RNAS (Qian et al.): adversarial search with the network vulnerability constrained by projection.

  python -m jaxnas.main --config=configs/rnas.py --workdir=runs/rnas_h          # RNAS-H (H = 1e-4)
  python -m jaxnas.main --config=configs/rnas.py:low --workdir=runs/rnas_l      # RNAS-L (H = 1e-5)
  python -m jaxnas.main --config=configs/rnas.py:smoke --workdir=/tmp/rnas_smoke  # seconds, offline

Eq. 8: the weights train on PGD examples; the alphas descend ``L_val + L_val^adv`` subject to
``F(alpha) <= H``, F the network vulnerability (Eqs. 3-6: KL between the clean and the adversarial spatial
distribution of every output channel of every cell, averaged; ``jaxnas.objectives.distortion``). Algorithm 1:
15 warm-up epochs train only the weights; then in every epoch the first half of the steps search freely and
the second half project the alphas after each update onto ``{F <= H}`` (Eq. 9, the nearest point, by
bisection on the Lagrange multiplier; ``config.arch.projection``). Search (Sec. 5.1): DARTS space, C=16,
8 cells, 60 epochs, batch 128, SGD lr 0.01 cosine, Adam 6e-4 with weight decay 1e-3, first order. The paper
gives PGD settings only for training (7 steps of 2/255, eps 8/255); the search uses them too.

Arguments: ``low`` (RNAS-L, H = 1e-5), ``smoke`` (a tiny supernet on embedded 8x8 digits: 1 warm-up epoch,
then projected steps).
"""
from jaxnas import search

ARGS = ('smoke', 'low')


def get_config(arg=None):
  args = set(filter(None, (arg or '').split(',')))
  if args - set(ARGS):
    raise ValueError(f'unknown config argument(s) {sorted(args - set(ARGS))}: use any of {ARGS}')
  smoke = 'smoke' in args
  pgd = dict(attack='pgd', eps=8 / 255, step_size=2 / 255, steps=2 if smoke else 7)

  config = search.default_config()
  config.data.update(dict(source='tfds', name='cifar10', val_fraction=0.5, crop_padding=4, flip=True))
  config.search.update(dict(epochs=60, batch_size=128))
  config.search.lower = [search.objective('adv_ce', label='adversarial', **pgd)]
  config.search.upper = [search.objective('ce', label='natural'),
                         search.objective('adv_ce', label='adversarial', **pgd)]
  config.model.depthwise = 'autodiff'  # the projection's Newton step is forward-over-reverse (jax.jvp)
  config.optim.lr = 0.01
  config.arch.update(dict(lr=6e-4, weight_decay=1e-3, start_epoch=15))
  config.arch.projection.update(dict(objective=dict(name='distortion', label='vulnerability',
                                                    kwargs=search.objective('distortion', **pgd).kwargs),
                                     bound=1e-5 if 'low' in args else 1e-4, start_fraction=0.5))
  if smoke:
    config.data.update(dict(source='digits', name='', num_examples=32, crop_padding=1, flip=False))
    config.model.update(dict(init_channels=2, layers=3))
    config.search.update(dict(epochs=2, batch_size=8))
    config.arch.start_epoch = 1
    config.arch.projection.update(dict(bisection_steps=2, inner_steps=2, start_fraction=0.0))  # all projected
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
  return config
