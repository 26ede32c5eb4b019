r"""DSARA (Ou et al.): two-stage adversarial search on the DSARA space, with the paper's settings.

  python -m jaxnas.main --config=configs/dsara.py --workdir=runs/dsara
  python -m jaxnas.main --config=configs/dsara.py:single_stage --workdir=runs/dsara_single   # Table 5 ablations
  python -m jaxnas.main --config=configs/dsara.py:smoke --workdir=/tmp/dsara_smoke            # seconds, offline

DSARA search space (Accurate / Reduction / Robust cells placed A-A-R, widths 1-2-2, 7 primitives without
'none'), C=24, 8 cells, batch 32, 30 epochs, DARTS' second-order step and optimizers otherwise (Sec. 5.3).
The weights always train on PGD examples (7 steps of 1/510, eps 2/255; Madry et al.'s loss). Stage 1, the
first 20 epochs: the alphas minimise the adversarial validation loss (Eq. 5). Stage 2, the last 10: they
descend MGDA's combination of the natural and the adversarial validation loss gradients with gamma* in closed
form (Eqs. 7-9: the natural gradient gets gamma*, the adversarial one 1 - gamma*), at arch lr 5e-5 instead of
3e-4. The published code has the stage switch disabled; this follows the paper.

Arguments (comma-separated), the ablations of Table 5: ``single_stage`` (only stage 1's adversarial objective,
all 30 epochs), ``sum`` (stage 2 adds the two losses instead of MGDA), ``darts_space`` (the DARTS/NASNet
space); ``smoke`` (a tiny supernet on embedded 8x8 digits, both stages in 2 epochs, first order, for tests).
"""
from jaxnas import search

ARGS = ('smoke', 'single_stage', 'sum', 'darts_space')
STAGE_ONE_EPOCHS = 20


def get_config(arg=None):
  args = set(filter(None, (arg or '').split(',')))
  if args - set(ARGS):
    raise ValueError(f'unknown config argument(s) {sorted(args - set(ARGS))}: use any of {ARGS}')
  smoke = 'smoke' in args
  stage_one = 1 if smoke else STAGE_ONE_EPOCHS
  pgd = dict(attack='pgd', eps=2 / 255, step_size=1 / 510, steps=2 if smoke else 7)

  config = search.default_config()
  config.data.update(dict(source='tfds', name='cifar10', val_fraction=0.5, crop_padding=4, flip=True))
  config.model.update(dict(space='darts' if 'darts_space' in args else 'dsara', init_channels=24, layers=8))
  config.search.update(dict(epochs=30, batch_size=32))
  config.search.lower = [search.objective('adv_ce', label='adversarial', **pgd)]
  adversarial = search.objective('adv_ce', label='adversarial', **pgd)
  if 'single_stage' in args:
    config.search.upper = [adversarial]
  else:
    config.search.upper = [search.objective('ce', label='natural', start_epoch=stage_one), adversarial]
    config.arch.update(dict(lr_boundaries=(stage_one,), lr_values=(5e-5,)))
  config.arch.update(dict(lr=3e-4, order=2, combiner='sum' if 'sum' in args else 'mgda'))
  if smoke:
    config.data.update(dict(source='digits', name='', num_examples=32, crop_padding=1, flip=False))
    config.model.update(dict(init_channels=2, layers=5))  # 5 cells: accurate, reduce, accurate, reduce, robust
    config.search.update(dict(epochs=2, batch_size=8))
    config.arch.order = 1  # one gradient per objective: compiles in CI time (the unroll: tests/test_bilevel.py)
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
  return config
