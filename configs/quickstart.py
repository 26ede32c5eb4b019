r"""Quick start: the whole pipeline on scikit-learn's embedded 8x8 digits, offline, in minutes on a laptop CPU.

  python -m jaxnas.main --config=configs/quickstart.py --workdir=runs/quickstart

1. search: a small DARTS supernet (C=8, 5 cells: 8x8 -> 4x4 -> 2x2) searched for 6 epochs with the DARTS
   optimizers, except for a 10x larger architecture learning rate (3e-3) so that the alphas move visibly
   within a few epochs; writes genotype.json, the per-epoch genotypes and alphas in history/;
2. train (in train/): the derived network (C=8, 5 cells) trained for 6 epochs with the DARTS optimizer (SGD
   0.025 cosine, drop-path ramped to 0.2), its clean and PGD-10 accuracy on the 297 test digits after every
   epoch;
3. evaluate (in train/): clean, FGSM, PGD-20 and PGD-100 accuracy on the test digits at eps 8/255;
4. report.json, report.md and figures/ (cells, alpha evolution, search and training curves).

Rerunning the command resumes where it stopped. ``--config.train.adversarial.method=pgd`` trains on PGD-7
examples instead (several times the training time). ``:smoke`` is a tiny version for tests.
"""
from jaxnas import evaluate, search, train


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
  config.genotype = ''   # the pipeline trains the search result
  config.train = train.default_config().train
  config.train.update(dict(init_channels=8, layers=5, auxiliary=False, epochs=6, batch_size=64,
                           eval_examples=297, eval_batch_size=99, eval_steps=10))
  config.evaluate = evaluate.default_config()
  config.evaluate.update(dict(attacks=('fgsm', 'pgd20', 'pgd100'), batch_size=99))
  if arg == 'smoke':
    config.data.num_examples = 64
    config.model.update(dict(init_channels=2, layers=3,   # no convolutions on the edges: quick to compile
                             primitives=('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect')))
    config.search.update(dict(epochs=2, batch_size=16))
    config.train.update(dict(init_channels=4, layers=3, epochs=2, batch_size=16, eval_examples=16,
                             eval_batch_size=8, eval_steps=3))
    config.evaluate.update(dict(attacks=('fgsm', 'pgd20'), n_examples=16, batch_size=8))
    config.log_every_steps = 1
  return config
