r"""Standard retraining of a genotype with the DARTS recipe (Liu et al. 2019, Sec. 3.3) on CIFAR-10.

  python -m jaxnas.main --config=configs/train_std.py --workdir=runs/darts_v2_std              # DARTS_V2
  python -m jaxnas.main --config=configs/train_std.py --config.genotype=runs/darts --workdir=runs/darts_std
  python -m jaxnas.main --config=configs/train_std.py:smoke --workdir=/tmp/std_smoke           # seconds, offline
  python -m jaxnas.main --config=configs/train_std.py --config.mode=evaluate --workdir=runs/darts_v2_std

``config.genotype`` is a zoo name, a genotype JSON file or a search workdir. NetworkCIFAR with C=36, 20
cells and the auxiliary head (weight 0.4); 600 epochs of batch 96; SGD lr 0.025 with per-epoch cosine
annealing to 0, momentum 0.9, weight decay 3e-4, gradient norm clipped to 5; drop-path ramped from 0 to 0.2;
random crop (padding 4), flip and cutout 16. Evaluated on the CIFAR-10 test set with the papers' attacks
(``evaluate`` mode, or the ``jaxnas evaluate`` command). ``smoke``: a tiny network on a few embedded digits.
"""
from jaxnas import evaluate, train


def get_config(arg=None):
  if arg not in (None, '', 'smoke'):
    raise ValueError(f"unknown config argument {arg!r}: use 'smoke' or nothing")
  config = train.default_config()
  config.evaluate = evaluate.default_config()
  config.data.update(dict(source='tfds', name='cifar10', crop_padding=4, flip=True, cutout=16))
  if arg == 'smoke':  # 64 embedded digits (8x8: no auxiliary head), evaluated on 16 test digits
    config.data.update(dict(source='digits', name='', num_examples=64, crop_padding=1, flip=False, cutout=4))
    config.train.update(dict(init_channels=4, layers=3, auxiliary=False, epochs=2, batch_size=16,
                             eval_examples=16, eval_batch_size=8, eval_steps=3))
    config.evaluate.update(dict(attacks=('fgsm', 'pgd20'), n_examples=16, batch_size=8))
    config.log_every_steps = 1
  return config
