"""The quick start's pipeline through the real entry point ``jaxnas.main`` (``configs/quickstart.py:smoke``):
search -> derive -> training of the derived genotype -> evaluation -> report and figures in one
workdir; a rerun resumes or skips every stage and redraws the figures."""
import json
import pathlib
import shutil
import sys

import numpy as np
from sklearn import datasets as sk_datasets

from jaxnas import analysis, genotypes, main, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = f'--config={REPO_ROOT / "configs" / "quickstart.py"}:smoke'


def run_main(args, workdir):
  saved = sys.argv
  try:
    return main.main(main.parse_flags(['jaxnas.main', *args, f'--workdir={workdir}']))
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved


def test_quickstart_pipeline_runs_every_stage_resumes_and_redraws(tmp_path):
  workdir = tmp_path / 'quickstart'
  assert run_main([QUICKSTART], workdir) == 0

  # search + derive in the workdir, training of the derived genotype and its evaluation in train/.
  genotype = genotypes.load(str(workdir))
  assert genotypes.load(str(workdir / 'train')) == genotype
  assert (workdir / 'alphas.npz').is_file() and (workdir / 'history' / 'epoch_001_alphas.npz').is_file()
  train_config = json.loads((workdir / 'train' / 'config.json').read_text())
  assert train_config['genotype'] == str(workdir) and train_config['train']['adversarial']['method'] == 'none'
  net, variables, step = train.load_trained(str(workdir / 'train'))
  assert step == 8 and (net.init_channels, net.layers) == (4, 3)   # 64 digits, batch 16, 2 epochs
  evaluation = json.loads((workdir / 'train' / 'evaluation.json').read_text())
  assert list(evaluation['attacks']) == ['fgsm', 'pgd20'] and evaluation['n_examples'] == 16
  digits = sk_datasets.load_digits()   # the first 16 test digits, read independently of jaxnas.data
  x = (np.round(digits.images[1500:1516] * 255 / 16)[..., None] / 255).astype(np.float32)
  clean = np.asarray(net.apply(variables, x)).argmax(1) == digits.target[1500:1516]
  assert evaluation['clean_accuracy'] == clean.mean()

  # The combined report: network size from train/network.json, evaluation, training, cost of every stage.
  report = json.loads((workdir / 'report.json').read_text())
  assert report['evaluation'] == evaluation
  assert report['network']['params'] == analysis.count_params(net, (1, 8, 8, 1))
  assert report['network']['source'] == 'network.json' and report['network']['input_shape'] == [8, 8, 1]
  assert set(report['timing']) == {'search', 'train', 'evaluate'} and report['search_cost']['device_hours'] > 0
  md = (workdir / 'report.md').read_text()
  for text in ('| PGD-20 | ', '## Training', 'standard training, 2 epochs.',
               '| search | ', '| train | ', '| evaluate | ', '![normal cell](figures/cell_normal.png)'):
    assert text in md, text
  figures = {p.name for p in (workdir / 'figures').iterdir()}
  for name in ('cell_normal.png', 'cell_reduce.svg', 'alphas_final.png', 'alphas_evolution_normal.png',
               'curves_metrics.png', 'train_curves_metrics.png'):
    assert name in figures, name
  assert not any(name.startswith('train_cell_') for name in figures)   # the search result is drawn once

  # A rerun finds every stage done: nothing is trained or evaluated again; the pictures are redrawn.
  evaluation_text = (workdir / 'train' / 'evaluation.json').read_text()
  shutil.rmtree(workdir / 'figures')
  assert run_main([QUICKSTART], workdir) == 0
  assert (workdir / 'train' / 'evaluation.json').read_text() == evaluation_text
  log = (workdir / 'train' / 'log.txt').read_text()
  assert 'resuming at step 8/8' in log and 'evaluation of step 8 already in' in log
  assert {p.name for p in (workdir / 'figures').iterdir()} == figures
