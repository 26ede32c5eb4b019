r"""AdvRush (Mok et al. 2021): DARTS plus a curvature regulariser of the input loss landscape, paper settings.

  python -m jaxnas.main --config=configs/advrush.py --workdir=runs/advrush
  python -m jaxnas.main --config=configs/advrush.py:hvp --workdir=runs/advrush_hvp     # exact H z, no FD
  python -m jaxnas.main --config=configs/advrush.py:smoke --workdir=/tmp/advrush_smoke  # seconds, offline

First-order DARTS on CIFAR-10 (C=16, 8 cells, half of the training set for the alphas), batch 32, 60 epochs,
DARTS' optimizers. From epoch 50 (after 50 warm-up epochs) the architecture loss is
``L_val + gamma * lambda * R`` (Eq. 10), ``R = mean_i ||grad_x l(x_i + z_i) - grad_x l(x_i)||_2`` along
``z = h sign(grad_x l) / ||sign(grad_x l)||_2`` (CURE), both gradients of the supernet in inference mode (the
original's ``net.eval()``); ``h`` is the original's per-epoch ramp 0, 0.3, ..., 1.5 indexed by the search epoch,
so every regularised epoch uses 1.5 (the paper's value); ``gamma = 0.01`` and the original's ``lambda = 4`` (an
effective 0.04).

The effective weight, explicitly: the original computes R with a batch-mean cross-entropy (every input
gradient 1/B of the per-example one) in mean/std-normalised input space (gradients ``std`` times the [0, 1]
ones, ``h`` a length there). jaxnas' ``curvature`` objective uses per-example losses on [0, 1] inputs, so the
original's ``0.04 * R_orig`` is ``WEIGHT * R`` with ``WEIGHT = gamma * lambda * std / B`` and ``h`` scaled by
``std`` (CIFAR-10's mean channel std), at the original's B = 32 (kept when the batch size is overridden: R
itself does not depend on B here). The three bugs of the original are absent by construction: val batches
are shuffled, the direction ``z`` is a constant (no stray eval-mode gradient on alpha) and every objective
names its BN mode.

Arguments: ``hvp`` (the exact ``||H z||`` by ``jax.jvp`` of ``jax.grad`` instead of the finite difference),
``frobenius`` (Hutchinson's estimate of ``||H||_F^2``, Eq. 8's ideal term; small inputs only), ``smoke``.
"""
from jaxnas import search

ARGS = ('smoke', 'hvp', 'frobenius')
GAMMA, LAMBDA = 0.01, 4.0
CIFAR10_STD = 0.2507  # mean of the per-channel stds of CIFAR-10's training images, in [0, 1] units
BATCH_SIZE = 32
WEIGHT = GAMMA * LAMBDA * CIFAR10_STD / BATCH_SIZE  # 3.1e-4 on the per-example, [0, 1]-input R
WARMUP_EPOCHS = 50
H_RAMP = (0.0, 0.3, 0.6, 0.9, 1.2, 1.5)  # in the original's normalised input space


def get_config(arg=None):
  args = set(filter(None, (arg or '').split(',')))
  if args - set(ARGS):
    raise ValueError(f'unknown config argument(s) {sorted(args - set(ARGS))}: use any of {ARGS}')
  if {'hvp', 'frobenius'} <= args:
    raise ValueError("config arguments 'hvp' and 'frobenius' exclude each other: pick one estimator")
  estimator = 'hvp' if 'hvp' in args else 'frobenius' if 'frobenius' in args else 'finite_difference'
  smoke = 'smoke' in args

  config = search.default_config()
  config.data.update(dict(source='tfds', name='cifar10', val_fraction=0.5, crop_padding=4, flip=True))
  config.search.update(dict(epochs=60, batch_size=BATCH_SIZE))
  if estimator != 'finite_difference':
    config.model.depthwise = 'autodiff'  # forward-mode AD (jax.jvp) through the window ops
  config.search.upper = [
      search.objective('ce'),
      search.objective('curvature', weight=WEIGHT,
                       start_epoch=1 if smoke else WARMUP_EPOCHS, estimator=estimator,
                       h=tuple(h * CIFAR10_STD for h in H_RAMP))]
  if smoke:
    config.data.update(dict(source='digits', name='', num_examples=32, crop_padding=1, flip=False))
    config.model.update(dict(init_channels=2, layers=3))
    config.search.update(dict(epochs=2, batch_size=8))
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
  return config
