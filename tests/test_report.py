"""Reports and comparison tables: the numbers in report.md / report.json and the compare table's cells."""
import json

import numpy as np
import pytest

from jaxnas import analysis, cli, evaluate, genotypes, networks, report


def evaluation(clean, rows, n=200):
  """A robustness report in ``evaluate.evaluate_robustness``'s format with the given accuracies."""
  attacks = {a: dict(label=evaluate.ATTACKS[a][0], robust_accuracy=acc, seconds=1.0) for a, acc in rows.items()}
  return dict(eps=8 / 255, norm='linf', n_examples=n, seed=0, step_size=2 / 255, batch_size=100,
              clean_accuracy=clean, attacks=attacks, worst_case_accuracy=min(rows.values()),
              per_example=dict(label=[0] * n, clean_correct=[True] * n, robust={}))


def make_run(path, genotype_name, network=None, config=None):
  path.mkdir(parents=True)
  (path / 'genotype.json').write_text(genotypes.get(genotype_name).to_json())
  if network is not None:
    (path / 'network.json').write_text(json.dumps(network))
  if config is not None:
    (path / 'config.json').write_text(json.dumps(config))
  return path


def test_report_of_darts_v2_at_paper_size(tmp_path):
  run = make_run(tmp_path / 'darts', 'DARTS_V2', config={'model': {'init_channels': 16, 'layers': 8}})
  evaluate.write_evaluation(evaluation(0.8123, {'fgsm': 0.6, 'pgd20': 0.5012, 'aa': 0.4567}), str(run))
  report.record_timing(str(run), 'search', 1800.0, 4, 'H100')
  report.record_timing(str(run), 'search', 1800.0, 4)   # a resumed run adds its time
  (run / 'certified.json').write_text(json.dumps({'crown_linf': dict(norm='linf', method='crown',
                                                                     radii=[0.01, 0.03, 0.0, 0.0])}))
  paths = report.write_report(str(run))
  assert paths == [str(run / 'report.json'), str(run / 'report.md')]
  md = (run / 'report.md').read_text()
  assert '3,349,342 (3.35M)' in md          # DARTS_V2, C=36, 20 layers: 3.3M in the DARTS paper
  assert 'C=36, 20 layers, 10 classes, input 32x32x3 (from paper default' in md
  for row in ('| Clean | 81.23 |', '| FGSM | 60.00 |', '| PGD-20 | 50.12 |', '| AutoAttack | 45.67 |',
              '| Worst case over all attacks | 45.67 |', '| crown | linf | 0.01 | 4 |',
              '| search | 4.000 | 4 × H100 | 1.000 |', '8/255 (0.0314)'):
    assert row in md, row
  for t in ('normal', 'reduce'):
    assert f'![{t} cell](figures/cell_{t}.png)' in md and (run / 'figures' / f'cell_{t}.png').is_file()
  saved = json.loads((run / 'report.json').read_text())
  net = networks.EvalNetwork(genotypes.get('DARTS_V2'), 36, 20, 10)
  assert saved['network']['params'] == 3349342 == analysis.count_params(net)
  assert saved['network']['macs'] == analysis.count_macs(net)
  assert saved['search_cost'] == dict(seconds=3600.0, num_devices=4, device_kind='H100', device_hours=4.0)
  assert saved['certified']['crown_linf']['mean_radius'] == pytest.approx(0.01)
  assert saved['evaluation']['per_example']['label'] == [0] * 200
  # Rewriting keeps the evaluation, now read back from the combined report.json.
  (run / 'evaluation.json').unlink()
  report.write_report(str(run), render=False)
  assert (run / 'report.md').read_text() == md


def test_network_size_sources(tmp_path):
  run = make_run(tmp_path / 'r', 'DARTS_V2', config={'train': {'init_channels': 8, 'layers': 5},
                                                      'data': {'num_classes': 0}})
  spec = report.network_spec(str(run))
  assert (spec['init_channels'], spec['layers'], spec['num_classes'], spec['source']) == (8, 5, 10, 'config.json')
  (run / 'network.json').write_text(json.dumps({'init_channels': 6, 'num_classes': 7, 'input_shape': [8, 8, 1]}))
  spec = report.network_spec(str(run))
  assert (spec['init_channels'], spec['layers'], spec['num_classes'], spec['input_shape']) == (6, 5, 7, [8, 8, 1])
  spec = report.network_spec(str(run), layers=8, input_shape=None)
  assert (spec['layers'], spec['source']) == (8, 'arguments')
  built = report.build_report(str(run))
  net = networks.EvalNetwork(genotypes.get('DARTS_V2'), 6, 5, 7)
  assert built['network']['params'] == analysis.count_params(net, (1, 8, 8, 1))
  assert built['evaluation'] is None and built['search_cost'] is None
  assert 'Not evaluated yet' in report.format_markdown(built)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='no genotype.json'):
    report.build_report(str(tmp_path / 'empty'))


def test_timing_contract():
  assert report.stage_cost({'search_seconds': 7200, 'num_devices': 8}) == dict(
      seconds=7200.0, num_devices=8, device_kind='', device_hours=16.0)
  assert report.stage_cost({'search': {'seconds': 90.0, 'num_devices': 2}}, 'search')['device_hours'] == 0.05
  assert report.stage_cost({'train': {'seconds': 1, 'num_devices': 1}}, 'search') is None
  with pytest.raises(ValueError, match='num_devices >= 1'):
    report.record_timing('unused', 'search', 1.0, 0)


@pytest.fixture(scope='module')
def three_runs(tmp_path_factory):
  """DARTS, AdvRush and DSARA runs at a small size: one fully evaluated, one without AutoAttack and
  cost, one not evaluated."""
  root = tmp_path_factory.mktemp('compare')
  small = {'init_channels': 8, 'layers': 5}
  darts = make_run(root / 'darts', 'DARTS_V2', small)
  evaluate.write_evaluation(evaluation(0.9, {'fgsm': 0.3, 'pgd20': 0.1, 'aa': 0.05}), str(darts))
  report.record_timing(str(darts), 'search', 3600.0 * 24, 1, 'V100')
  advrush = make_run(root / 'advrush', 'ADVRUSH', small)
  (advrush / 'evaluation.json').write_text(json.dumps(evaluation(0.85, {'pgd20': 0.5})))
  dsara = make_run(root / 'dsara', 'DSARA', small)
  for run in (darts, advrush, dsara):
    report.write_report(str(run), render=False)
  return [darts, advrush, dsara]


def test_compare_table(three_runs):
  table = report.compare_workdirs([str(r) for r in three_runs], names=['DARTS', 'AdvRush', 'DSARA'])
  rows = [[c.strip() for c in line.strip('|').split('|')] for line in table.strip().splitlines()]
  assert rows[0] == ['Method', 'Params (M)', 'MACs (M)', 'Clean (%)', 'FGSM (%)', 'PGD-20 (%)',
                     'AutoAttack (%)', 'Search cost (device-h)']
  assert len(rows) == 5 and all(len(r) == len(rows[0]) for r in rows)
  for row, name, run in zip(rows[2:], ('DARTS_V2', 'ADVRUSH', 'DSARA'), three_runs):
    net = networks.EvalNetwork(genotypes.get(name), 8, 5, 10)
    assert row[1] == f'{analysis.count_params(net) / 1e6:.2f}'
    assert row[2] == f'{analysis.count_macs(net) / 1e6:.1f}'
  assert rows[2][0] == 'DARTS' and rows[2][3:] == ['90.00', '30.00', '10.00', '5.00', '24.00']
  assert rows[3][3:] == ['85.00', '–', '50.00', '–', '–']
  assert rows[4][3:] == ['–'] * 5
  assert np.unique([r[1] for r in rows[2:]]).size == 3
  with pytest.raises(ValueError, match='one name per workdir'):
    report.compare_workdirs([str(three_runs[0])], names=['a', 'b'])


def test_compare_cli(three_runs, tmp_path, capsys):
  out = tmp_path / 'tables' / 'table.md'  # the directory is created
  assert cli.main(['compare', *map(str, three_runs), '--output', str(out)]) == 0
  printed = capsys.readouterr().out
  assert printed == out.read_text() and printed.splitlines()[2].startswith('| darts | ')
  assert cli.main(['compare', str(tmp_path / 'nowhere')]) == 2
  assert capsys.readouterr().err.strip().count('\n') == 0
  assert cli.main(['viz', str(three_runs[1]), '--formats', 'png', '--report']) == 0
  assert 'figures/cell_normal.png' in (three_runs[1] / 'report.md').read_text()
