r"""E2RNAS (Yue et al.): five upper-level objectives weighted by the min-norm point of their gradients.

  python -m jaxnas.main --config=configs/e2rnas.py --workdir=runs/e2rnas            # E2RNAS-S1 (L = 2.5M)
  python -m jaxnas.main --config=configs/e2rnas.py:s2 --workdir=runs/e2rnas_s2      # E2RNAS-S2 (L = 3.5M)
  python -m jaxnas.main --config=configs/e2rnas.py:smoke --workdir=/tmp/e2rnas_smoke  # seconds, offline

Upper level (Eq. 7): validation CE; OoD KL-to-uniform of the predictions on SVHN (Eq. 3; ``config.ood_data``
takes any data source of the same image shape); CE on FGSM examples from a uniform random start (eps 2/255,
step 1.25 eps, after Wong et al. 2020); ``|N_hat - L|`` and ``|F_hat - F|`` (Eqs. 5-6) with the
softmax-expected parameters and MACs, in millions, of the derived C=36, 20-cell evaluation network (the
network the paper's L = 2.5M and its reported FLOPs refer to). The alpha gradients of the five are
l2-normalised, their min-norm convex combination solved by Frank-Wolfe (Eq. 1, with a convergence test and an
iteration cap) and its weights applied to the unnormalised gradients (Eq. 10). Lower level (Eq. 8): CE + OoD
KL. Search (Sec. IV-A): C=16, 8 cells, 50 epochs, batch 64, DARTS' optimizers and second-order step. The
paper does not give F; 420M is the FLOPs/params ratio of its E2RNAS-S1 (425M at 2.55M) at L = 2.5M.

Arguments: ``s2`` (L = 3.5M, F = 590M, as E2RNAS-S2's 586M at 3.53M), ``equal`` (Table VI's "w/o MGDA":
fixed weights 0.2), ``smoke`` (a tiny first-order search on embedded 8x8 digits, the digits also standing in
as OoD images, costs of the supernet's own ops: for wiring tests only).
"""
from jaxnas import search

ARGS = ('smoke', 's2', 'equal')
EVAL_NETWORK = (36, 20)  # (init_channels, layers) whose resources L and F bound


def get_config(arg=None):
  args = set(filter(None, (arg or '').split(',')))
  if args - set(ARGS):
    raise ValueError(f'unknown config argument(s) {sorted(args - set(ARGS))}: use any of {ARGS}')
  smoke = 'smoke' in args
  params_bound, flops_bound = (3.5, 590.0) if 's2' in args else (2.5, 420.0)
  network = () if smoke else EVAL_NETWORK  # smoke: the supernet's own op costs
  weight = 0.2 if 'equal' in args else 1.0

  config = search.default_config()
  config.data.update(dict(source='tfds', name='cifar10', val_fraction=0.5, crop_padding=4, flip=True))
  config.ood_data.update(dict(source='tfds', name='svhn_cropped'))
  config.search.update(dict(epochs=50, batch_size=64))
  config.search.lower = [search.objective('ce'), search.objective('ood_kl', label='ood')]
  config.search.upper = [
      search.objective('ce', weight=weight),
      search.objective('ood_kl', label='ood', weight=weight),
      search.objective('adv_ce', label='fgsm', weight=weight, attack='fgsm', eps=2 / 255, random_start=True),
      search.objective('params', weight=weight, lower_bound=params_bound, network=network),
      search.objective('flops', weight=weight, lower_bound=flops_bound, network=network)]
  config.arch.update(dict(order=2, combiner='sum' if 'equal' in args else 'min_norm', normalize=True))
  if smoke:
    config.data.update(dict(source='digits', name='', num_examples=32, crop_padding=1, flip=False))
    config.ood_data.update(dict(source='digits', name='', num_examples=32))
    config.model.update(dict(init_channels=2, layers=3))
    config.search.update(dict(epochs=2, batch_size=8))
    config.arch.order = 1  # one gradient per objective: compiles in CI time (the unroll: tests/test_bilevel.py)
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
  return config
