r"""DSRNA-Jacobian (Hosseini et al. 2021): DARTS whose alphas also maximise a Jacobian-norm robustness metric.

  python -m jaxnas.main --config=configs/dsrna_jacobian.py --workdir=runs/dsrna_jacobian
  python -m jaxnas.main --config=configs/dsrna_jacobian.py:l2 --workdir=runs/dsrna_jacobian_l2
  python -m jaxnas.main --config=configs/dsrna_jacobian.py:smoke --workdir=/tmp/dsrna_smoke  # seconds, offline

Upper level (Eq. 16): ``min_alpha L_val - gamma R`` with ``R = -mean_i (1/K) sum_k ||J_k(x_i)||_q`` (Eq. 15,
``delta`` absorbed), i.e. ``L_val + gamma * bound``, ``gamma = 0.01``. The bound is estimated at one VJP
per step by random projection (Hoffman et al. 2019): for l_inf attacks (the default) ``q = 1``, the l1 norm
of a uniformly drawn Jacobian row per example (unbiased for the mean l1 row norm); for l_2 attacks
(``:l2``) the Frobenius norm, as ``K ||v^T J||^2`` with ``v`` uniform on the sphere (unbiased for
``||J||_F^2``). Search (Sec. 4): C=16, 8 cells, 50 epochs, batch 128, SGD 0.025, Adam 3e-4 with betas
(0.5, 0.999), DARTS' second-order step. The paper's cell has 3 intermediate nodes in one sentence and "the
PC-DARTS space" (4) in the next; this uses 4, which the evaluation networks build. DSRNA-CB (the certified
bound) is a separate config.

Arguments: ``l2`` (the l_2 / Frobenius variant), ``smoke`` (a tiny first-order search on embedded 8x8 digits).
"""
from jaxnas import search

ARGS = ('smoke', 'l2')
GAMMA = 0.01


def get_config(arg=None):
  args = set(filter(None, (arg or '').split(',')))
  if args - set(ARGS):
    raise ValueError(f'unknown config argument(s) {sorted(args - set(ARGS))}: use any of {ARGS}')
  config = search.default_config()
  config.data.update(dict(source='tfds', name='cifar10', val_fraction=0.5, crop_padding=4, flip=True))
  config.search.update(dict(epochs=50, batch_size=128))
  config.search.upper = [search.objective('ce'),
                         search.objective('jacobian', weight=GAMMA, norm='l2' if 'l2' in args else 'linf')]
  config.arch.order = 2
  if 'smoke' in args:
    config.data.update(dict(source='digits', name='', num_examples=32, crop_padding=1, flip=False))
    config.model.update(dict(init_channels=2, layers=3))
    config.search.update(dict(epochs=2, batch_size=8))
    config.arch.order = 1  # one gradient per objective: compiles in CI time (the unroll: tests/test_bilevel.py)
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
  return config
