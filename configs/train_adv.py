r"""Adversarial retraining of a genotype (Madry et al. 2018) with AdvRush's settings, on CIFAR-10.

  python -m jaxnas.main --config=configs/train_adv.py --workdir=runs/darts_v2_adv                 # DARTS_V2
  python -m jaxnas.main --config=configs/train_adv.py --config.genotype=ADVRUSH --workdir=runs/advrush_adv
  python -m jaxnas.main --config=configs/train_adv.py:trades --workdir=runs/darts_v2_trades        # TRADES
  python -m jaxnas.main --config=configs/train_adv.py:smoke --workdir=/tmp/adv_smoke              # offline

PGD-7 training examples (l_inf eps 8/255, step 0.01, uniform random start) generated against the network in
inference mode, as the robust-NAS training code does; NetworkCIFAR with C=36, 20 cells, no auxiliary head
and no drop-path; 200 epochs of batch 64; SGD lr 0.1 divided by 10 from the 100th and again from the 150th
epoch (epochs count from 0: boundaries 99 and 149, as AdvRush's ``adjust_learning_rate``), momentum 0.9, weight
decay 1e-4, gradient norm clipped to 5; random crop (padding 4) and flip. Where AdvRush's code differs: it starts
PGD at ``x + 0.001 N(0, 1)`` rather than uniformly in the ball (``--config.train.adversarial.random_start=normal``
gives that start), and every step it also runs the network on the clean batch in training mode, so its BatchNorm
running statistics mix clean and adversarial batches; here only the adversarial batch updates them (Madry's
objective). Arguments (comma-separated): ``trades`` (TRADES, Zhang et al. 2019, as its ``trades.py``: beta 6, 10
steps of 0.007 from ``x + 0.001 N(0, 1)``), ``smoke`` (a tiny network on a few embedded digits).
"""
from jaxnas import evaluate, train

ARGS = ('smoke', 'trades')


def get_config(arg=None):
  args = set(filter(None, (arg or '').split(',')))
  if args - set(ARGS):
    raise ValueError(f'unknown config argument(s) {sorted(args - set(ARGS))}: use any of {ARGS}')
  config = train.default_config()
  config.evaluate = evaluate.default_config()
  config.data.update(dict(source='tfds', name='cifar10', crop_padding=4, flip=True))
  config.train.update(dict(auxiliary=False, drop_path_prob=0.0, epochs=200, batch_size=64, lr=0.1,
                           lr_schedule='piecewise', lr_boundaries=(99, 149), lr_values=(0.01, 0.001),
                           weight_decay=1e-4))
  config.train.adversarial.update(dict(method='pgd', eps=8 / 255, step_size=0.01, steps=7))
  if 'trades' in args:
    config.train.adversarial.update(dict(method='trades', step_size=0.007, steps=10, trades_beta=6.0,
                                         random_start='normal'))
  if 'smoke' in args:  # 64 embedded digits (8x8), 2 attack steps, evaluated on 16 test digits
    config.data.update(dict(source='digits', name='', num_examples=64, crop_padding=1, flip=False))
    config.train.update(dict(init_channels=4, layers=3, epochs=2, batch_size=16, lr=0.05, lr_boundaries=(1,),
                             lr_values=(0.005,), eval_examples=16, eval_batch_size=8, eval_steps=3))
    config.train.adversarial.steps = 2
    config.evaluate.update(dict(attacks=('fgsm', 'pgd20'), n_examples=16, batch_size=8))
    config.log_every_steps = 1
  return config
