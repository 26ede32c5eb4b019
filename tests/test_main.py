"""The real entry point ``jaxnas.main`` end to end: search on mock TFDS data and on an .npz file, the workdir
layout, resume == uninterrupted, one-line errors (unknown dataset, missing npz, unknown config key, NaN).

All runs use ``configs/darts.py:smoke`` shrunk to one tiny supernet program (C=2, 3 cells, 4 primitives,
32x32x3 inputs, batch 4, fixed normalisation), so the jitted steps compile once per test session and every
later run reuses them (which the trace counter checks).
"""
import errno
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxnas import bilevel, checkpoint, cli, genotypes, main, report
from jaxnas import workdir as workdir_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PRIMITIVES = ('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3')
TINY = [f'--config={REPO_ROOT / "configs" / "darts.py"}:smoke', '--config.model.init_channels=2',
        '--config.model.layers=3', f'--config.model.primitives={PRIMITIVES}',
        '--config.data.mean=(0.5, 0.5, 0.5)', '--config.data.std=(0.25, 0.25, 0.25)',
        '--config.data.num_examples=16', '--config.search.batch_size=4']


def run_main(args, workdir, tiny=True):
  """``python -m jaxnas.main`` in this process: absl flag parsing, then ``main.main``; the exit status."""
  argv = ['jaxnas.main', *(TINY if tiny else []), *args, f'--workdir={workdir}']
  saved = sys.argv
  try:
    return main.main(main.parse_flags(argv))
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved


@pytest.fixture(scope='module')
def npz_path(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp('data') / 'tiny.npz'
  np.savez(path, image=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), label=np.arange(16) % 10)
  return str(path)


def _compiled():
  """Number of compiled variants of the jitted steps."""
  return bilevel.search_step._cache_size(), bilevel.weight_step._cache_size()  # pylint: disable=protected-access


def _alphas(workdir):
  with np.load(os.path.join(workdir, 'alphas.npz')) as f:
    return {k: f[k] for k in f.files}


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _last_error_line(capsys):
  lines = capsys.readouterr().err.strip().splitlines()
  return lines[-1] if lines else ''


def test_search_on_mock_tfds_and_npz_writes_the_workdir_without_retracing(tmp_path, npz_path):
  before = dict(bilevel.TRACES)
  with tfds.testing.mock_data(num_examples=16):
    assert run_main(['--config.data.source=tfds', '--config.data.name=cifar10'], tmp_path / 'tfds') == 0
  traced = {k: bilevel.TRACES[k] - before.get(k, 0) for k in ('search_step', 'weight_step')}
  assert traced['search_step'] <= 1 and traced['weight_step'] <= 1  # 4 steps over 2 epochs: at most one trace
  after_first = dict(bilevel.TRACES), _compiled()
  assert run_main(['--config.data.source=npz', f'--config.data.path={npz_path}'], tmp_path / 'npz') == 0
  assert (dict(bilevel.TRACES), _compiled()) == after_first  # the same program reuses the compiled steps

  for workdir in (tmp_path / 'tfds', tmp_path / 'npz'):
    config = json.loads((workdir / 'config.json').read_text())
    assert config['mode'] == 'search' and config['model']['init_channels'] == 2
    genotype = genotypes.load(str(workdir))
    assert genotype.cell_types == ('normal', 'reduce')
    assert all(op in PRIMITIVES for t in genotype.cell_types for op, _ in genotype[t])
    alphas = _alphas(workdir)
    assert {k: v.shape for k, v in alphas.items()} == {'normal': (14, 4), 'reduce': (14, 4)}
    for epoch in (0, 1):
      assert (workdir / 'history' / f'epoch_{epoch:03d}_genotype.json').is_file()
    with np.load(workdir / 'history' / 'epoch_001_alphas.npz') as last:
      np.testing.assert_array_equal(last['normal'], alphas['normal'])
    assert genotypes.load(str(workdir / 'history' / 'epoch_001_genotype.json')) == genotype
    assert checkpoint.all_steps(str(workdir / 'checkpoints')) == [2, 4]
    log = (workdir / 'log.txt').read_text()
    assert 'epoch 2/2 done' in log and 'alpha entropy normal' in log and 'search done' in log
    records = _metrics(workdir)
    assert [r['step'] for r in records if 'train/loss' in r] == [1, 2, 3, 4]
    epochs = [r for r in records if 'epoch/alpha_entropy_normal' in r]
    assert len(epochs) == 2 and 0 < epochs[0]['epoch/alpha_entropy_normal'] <= np.log(4) + 1e-6
    assert all(np.isfinite(r['train/loss']) and 'val/ce' in r for r in records if 'train/loss' in r)
  assert json.loads((tmp_path / 'tfds' / 'config.json').read_text())['data']['name'] == 'cifar10'


def test_resume_gives_the_alphas_of_an_uninterrupted_run(tmp_path, npz_path, capsys):
  # 8 train / 8 val images, batch 4: 2 steps per epoch, 3 epochs. Stop after 3 steps (mid-epoch), resume.
  args = ['--config.data.source=npz', f'--config.data.path={npz_path}', '--config.search.epochs=3',
          '--config.checkpoint_every_steps=100']
  resumed, straight = tmp_path / 'resumed', tmp_path / 'straight'
  assert run_main(args + ['--config.max_steps=3'], resumed) == 0
  assert checkpoint.latest_step(str(resumed / 'checkpoints')) == 3
  assert not (resumed / 'genotype.json').exists()
  # Another config in the same workdir is refused, naming what differs (nothing is overwritten); where to stop,
  # how often to log and the devices may change.
  config_json = (resumed / 'config.json').read_text()
  assert run_main(args + ['--config.optim.lr=0.1', '--config.max_steps=3'], resumed) == 1
  assert re.fullmatch(rf"error: {resumed} holds a run of another config \(optim.lr: 0.025 -> 0.1\): rerun with its "
                      rf"config \({resumed}/config.json\) to resume it, or use a new workdir", _last_error_line(capsys))
  assert (resumed / 'config.json').read_text() == config_json
  compiled = _compiled()
  assert run_main(args + ['--config.log_every_steps=1'], resumed) == 0  # continues from step 3
  assert _compiled() == compiled  # the restored state runs the already compiled steps
  assert run_main(args, straight) == 0
  assert 'resuming at step 3/6' in (resumed / 'log.txt').read_text()
  a, b = _alphas(resumed), _alphas(straight)
  for t in a:
    np.testing.assert_allclose(a[t], b[t], rtol=1e-6, atol=1e-8)
    assert np.max(np.abs(a[t])) > 1e-3  # the alphas moved from their 1e-3 N(0, 1) start
  assert genotypes.load(str(resumed)) == genotypes.load(str(straight))
  ra, rb = _metrics(resumed), _metrics(straight)
  assert [r['step'] for r in ra] == [r['step'] for r in rb]  # no duplicated lines after the resume
  np.testing.assert_allclose([r['train/loss'] for r in ra if 'train/loss' in r],
                             [r['train/loss'] for r in rb if 'train/loss' in r], rtol=1e-5)


def test_nan_loss_gives_a_one_line_error_and_keeps_the_last_good_checkpoint(tmp_path, npz_path, capsys):
  # Epoch 0 trains at lr 0.025; epoch 1's cosine lr is ~5e29: its first update leaves finite but huge weights,
  # whose forward pass overflows in the next step.
  args = ['--config.data.source=npz', f'--config.data.path={npz_path}', '--config.optim.lr_min=1e30',
          '--config.checkpoint_every_steps=100']
  assert run_main(args, tmp_path) == 1
  error = _last_error_line(capsys)
  # Numbered as the log numbers them: the 4th step, in the 2nd epoch.
  assert re.fullmatch(r"error: NaN in the weight step's objective 'ce' at step 4 \(epoch 2\); last good checkpoint "
                      r"kept at "
                      r'.*checkpoints/2; lower the learning rates .*', error), error
  assert checkpoint.all_steps(str(tmp_path / 'checkpoints')) == [2]
  assert not (tmp_path / 'genotype.json').exists()
  assert 'FloatingPointError' in (tmp_path / 'log.txt').read_text()  # the traceback goes to the log


@pytest.mark.parametrize('args, match', [
    (['--config.data.source=tfds', '--config.data.name=no_such_dataset_xyz'],
     r"error: unknown TFDS dataset 'no_such_dataset_xyz': check the name with .*"),
    (['--config.data.source=npz', '--config.data.path=nowhere/x.npz'],
     r"error: npz file 'nowhere/x.npz' not found .*"),
    (['--config.data.source=npz', '--config.data.path={npz}', '--config.search.upper[0].name=cee'],
     r"error: config.search.upper\[0\]: unknown objective 'cee': choose one of .*"),
])
def test_data_and_objective_errors_are_one_line(tmp_path, args, match, capsys, npz_path):
  assert run_main([a.format(npz=npz_path) for a in args], tmp_path) == 1
  assert re.fullmatch(match, _last_error_line(capsys))


@pytest.mark.parametrize('args, match', [
    (['--config.serach.epochs=3'], r"error: unknown config key 'serach' in --config.serach.epochs: config has the "
                                   r"fields \['arch', .*\]"),
    (['--config.search.epoch=3'], r"error: unknown config key 'epoch' in --config.search.epoch: config.search has "
                                  r"the fields \['batch_size', 'epochs', 'lower', 'upper'\]"),
    (['--config.search.epochs=many'], r'error: flag --config.search.epochs=many: .*'),
    (['--config.mode=retrain'], r"error: unknown mode 'retrain': set config.mode to one of \['derive', 'evaluate', "
                                r"'pipeline', 'search', 'train'\]"),
])
def test_config_errors_are_one_line(tmp_path, args, match, capsys):
  assert run_main(args, tmp_path) == 2
  assert re.fullmatch(match, _last_error_line(capsys))


def test_config_file_and_workdir_errors_are_one_line(tmp_path, capsys):
  assert run_main([f'--config={tmp_path}/nope.py'], tmp_path / 'w', tiny=False) == 2
  assert re.fullmatch(rf"error: cannot load --config: OSError: .*No such file or directory: '{tmp_path}/nope.py'",
                      _last_error_line(capsys))
  (tmp_path / 'file').write_text('')
  assert run_main([], tmp_path / 'file') == 2
  assert _last_error_line(capsys) == (f'error: --workdir={tmp_path}/file is a file: name a directory (new, or a '
                                      'run to resume)')
  (tmp_path / 'broken.py').write_text('def get_config(:\n')
  assert run_main([f'--config={tmp_path}/broken.py'], tmp_path / 'w', tiny=False) == 2
  assert re.fullmatch(r"error: cannot load --config: SyntaxError: .*\(broken.py, line 1\)", _last_error_line(capsys))


def test_system_errors_on_the_workdir_are_one_line(tmp_path, capsys, monkeypatch):
  (tmp_path / 'file').write_text('')
  assert run_main([], tmp_path / 'file' / 'run') == 1
  assert _last_error_line(capsys) == (f"error: Not a directory: '{tmp_path}/file/run': check --workdir and the data "
                                      'paths')

  def refuse(workdir, config):
    raise PermissionError(errno.EACCES, 'Permission denied', f'{workdir}/config.json')
  monkeypatch.setattr(workdir_lib, 'write_config', refuse)  # tests run as root, whom chmod does not stop
  assert run_main([], tmp_path / 'run') == 1
  assert _last_error_line(capsys) == (f"error: Permission denied: '{tmp_path}/run/config.json': use a workdir and "
                                      'data files this user may write and read')
  assert 'PermissionError' in (tmp_path / 'run' / 'log.txt').read_text()  # the traceback goes to the log


def test_system_errors_of_the_jaxnas_commands_are_one_line(tmp_path, capsys, monkeypatch):
  def full(workdirs, names):
    raise OSError(errno.ENOSPC, 'No space left on device', f'{workdirs[0]}/report.md')
  monkeypatch.setattr(report, 'compare_workdirs', full)
  assert cli.main(['compare', str(tmp_path)]) == 2
  assert _last_error_line(capsys) == (f"error: No space left on device: '{tmp_path}/report.md': free disk space or "
                                      'use a workdir on another disk')


def test_module_entry_point_reports_a_missing_npz_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnas.main', '--config=configs/darts.py:smoke', '--config.data.source=npz',
       '--config.data.path=missing.npz', f'--workdir={tmp_path}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: npz file 'missing.npz' not found")
