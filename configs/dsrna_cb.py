r"""DSRNA-CB (Hosseini et al. 2021): DARTS whose alphas also maximise the certified lower bound of the margins.

  python -m jaxnas.main --config=configs/dsrna_cb.py --workdir=runs/dsrna_cb
  python -m jaxnas.main --config=configs/dsrna_cb.py:l2 --workdir=runs/dsrna_cb_l2
  python -m jaxnas.main --config=configs/dsrna_cb.py:smoke --workdir=/tmp/dsrna_cb_smoke  # offline, tiny

Upper level (Eq. 16): ``min_alpha L_val - gamma R`` with ``gamma = 0.01`` and ``R`` the certified lower bound of
the supernet's classification margins (Sec. 3.1.1): ``R = mean_i min_{j != y_i} LB_ij``, linear (CROWN-IBP)
bounds of ``f_y - f_j`` over the l_inf ball (``:l2`` the l_2 ball) of radius eps around each validation image,
composed through the mixed operations with their softmax(alpha) weights (``objectives.certified``). So the
effective upper objective is ``CE - 0.01 * R`` (the ``certified_margin`` objective returns ``-R``, weight
0.01). eps starts at 0.03 and is rescaled linearly by the width of the bounds at every step (the paper adapts
it "based on the global difference between the certified upper and lower bound"; see
``objectives/certified.py``). Search (Sec. 4.2.2): C=16, 8 cells, 50 epochs; weights SGD lr 0.1 (cosine),
batch 256, momentum 0.9, weight decay 3e-4; alphas Adam, fixed lr 6e-4, betas (0.5, 0.999), weight decay
3e-4; DARTS' second-order step. The space is PC-DARTS' (= DARTS' 8 primitives) with 4 intermediate nodes as
in ``configs/dsrna_jacobian.py``.

Memory (the bounds hold per example the intervals of every supernet activation and, in the backward pass, 9
coefficient rows per activation; the architecture gradient keeps them all): XLA's buffer assignment of the
first-order architecture step (CE + CROWN-IBP gradient, float32, XLA:CPU) with the paper's supernet (C=16, 8
cells) on 32x32 images grows by 6.1 GB per bounded example (6.25 GB with one and 12.37 GB with two bounded
examples of a batch of 8; the CE-only step takes 0.11 GB, about 13 MB per example; ``compiled.memory_analysis()``,
benchmarks/RESULTS.md). The second-order step (the default) takes 8.06 GB with one bounded example and 0.42 GB
CE-only (about 52 MB per example), so about 7.6 GB per bounded example. With the CE batch of 256, an 80 GB
accelerator fits about 8 bounded examples in the second-order step (about 12 in the first-order one); a 16 GB one
fits none in the second-order step (CE alone ~13 GB) and 2 in the first-order one. The paper's batch 256 cannot be
bounded in one step. Compiling these programs on XLA:CPU took 8 min (first order) and 14 min (second order).
``EXAMPLES`` bounds the first 8 images of each 256 validation batch (``R`` is a mean over examples of a shuffled
batch, so this is an unbiased estimate of the same metric; ``--config.arch.order=1
--config.search.upper[1].kwargs.examples=2`` for a 16 GB accelerator, ``=0`` bounds all).

Arguments (comma-separated): ``l2`` (the l_2 ball), ``smoke`` (a tiny supernet on 16 embedded 8x8 digits: C=2,
3 cells of 2 nodes, max-pool and skip only, first order; compiles in CI time, for tests).
"""
from jaxnas import search

ARGS = ('smoke', 'l2')
GAMMA = 0.01
EXAMPLES = 8
SMOKE_PRIMITIVES = ('max_pool_3x3', 'skip_connect')


def get_config(arg=None):
  args = set(filter(None, (arg or '').split(',')))
  if args - set(ARGS):
    raise ValueError(f'unknown config argument(s) {sorted(args - set(ARGS))}: use any of {ARGS}')
  smoke = 'smoke' in args
  config = search.default_config()
  config.data.update(dict(source='tfds', name='cifar10', val_fraction=0.5, crop_padding=4, flip=True))
  config.search.update(dict(epochs=50, batch_size=256))
  config.search.upper = [
      search.objective('ce'),
      search.objective('certified_margin', weight=GAMMA, eps=0.03, norm='l2' if 'l2' in args else 'linf',
                       method='crown-ibp', examples=0 if smoke else EXAMPLES)]
  config.optim.lr = 0.1
  config.arch.update(dict(lr=6e-4, weight_decay=3e-4, order=2))
  if smoke:
    config.data.update(dict(source='digits', name='', num_examples=16, crop_padding=0, flip=False))
    config.model.update(dict(init_channels=2, layers=3, steps=2, multiplier=2, primitives=SMOKE_PRIMITIVES))
    config.search.update(dict(epochs=2, batch_size=4))
    config.arch.order = 1  # one gradient per step: compiles in CI time (the unroll: tests/test_bilevel.py)
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
  return config
