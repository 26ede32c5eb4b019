"""Pictures of a workdir: cell graphs against their genotypes, metric series, alpha history, rendered files."""
import collections
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib import image as mimage
from PIL import Image
from scipy import special

from jaxnas import cli, genotypes, ops, viz
from jaxnas import workdir as workdir_lib

N_EPOCHS = 3


def make_search_workdir(path, genotype_name='DARTS_V2', space='darts', seed=0):
  """A workdir in the search driver's layout: config, genotype, final alphas, per-epoch history, metrics."""
  rng = np.random.default_rng(seed)
  genotype = genotypes.get(genotype_name)
  n_ops = 8 if space == 'darts' else 7
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps({'model': {'space': space, 'primitives': []}}))
  (path / 'genotype.json').write_text(genotype.to_json())
  history = []
  for epoch in range(N_EPOCHS):
    alphas = {t: rng.normal(size=(14, n_ops)) for t in genotype.cell_types}
    workdir_lib.save_alphas(workdir_lib.history_path(str(path), epoch, 'alphas'), alphas)
    workdir_lib.save_genotype(workdir_lib.history_path(str(path), epoch, 'genotype'), genotype)
    history.append(alphas)
  workdir_lib.save_alphas(str(path / 'alphas.npz'), history[-1])
  lines = []
  for step in range(1, 3 * N_EPOCHS + 1):
    epoch = (step - 1) // 3
    lines.append({'step': step, 'epoch': epoch, 'train/loss': 2.3 / step, 'train/ce_acc': 0.1 * step,
                  'val/ce': 2.0 - 0.1 * step, 'val/pgd_acc': 0.05 * step, 'arch/gamma_ce': 0.3,
                  'arch/gamma_pgd': 0.7, 'train/lr': 0.025, 'arch/grad_norm': 1.0 / step})
    if step % 3 == 0:
      lines.append({'step': step, 'epoch': epoch, 'epoch/train/loss': 1.0 / (epoch + 1),
                    'epoch/val/pgd_acc': 0.2 * epoch, 'epoch/alpha_entropy_normal': 2.0 - 0.1 * epoch})
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  return history


@pytest.fixture(scope='module')
def rendered(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run') / 'darts'
  history = make_search_workdir(workdir)
  return workdir, history, viz.render_workdir(workdir)


@pytest.mark.parametrize('name', list(genotypes.ZOO))
def test_cell_graph_has_the_genotypes_edges(name):
  genotype = genotypes.get(name)
  for cell_type in genotype.cell_types:
    graph = viz.cell_graph(genotype, cell_type)
    assert graph.nodes == ('c_{k-2}', 'c_{k-1}', '0', '1', '2', '3', 'c_{k}')
    op_edges = [e for e in graph.edges if e[1] != 'c_{k}']
    expected = [(('c_{k-2}', 'c_{k-1}')[j] if j < 2 else str(j - 2), str(k // 2), op)
                for k, (op, j) in enumerate(genotype[cell_type])]
    assert sorted(op_edges) == sorted(expected) and len(op_edges) == 8
    assert collections.Counter(dst for _, dst, _ in op_edges) == {str(i): 2 for i in range(4)}
    concat = [src for src, dst, label in graph.edges if dst == 'c_{k}']
    assert concat == [graph.nodes[i] for i in genotype.concat_of(cell_type)] and not any(
        label for _, dst, label in graph.edges if dst == 'c_{k}')
    dot = viz.cell_dot(graph)
    assert dot.count('->') == len(graph.edges) == 12
    # Layout: every edge points right (sources ranked before targets), no two nodes share a position.
    pos = viz._layout(graph)  # pylint: disable=protected-access
    assert all(pos[src][0] < pos[dst][0] for src, dst, _ in graph.edges)
    assert len({tuple(p) for p in pos.values()}) == len(graph.nodes)


def test_arc_midpoint_matches_matplotlib_arc3():
  """The label positions assume matplotlib's arc3 control point: compare with its path."""
  from matplotlib import patches
  p0, p1, rad = np.array([0.0, 1.0]), np.array([5.0, -1.0]), 0.3
  path = patches.ConnectionStyle.Arc3(rad=rad).connect(tuple(p0), tuple(p1))
  middle = viz._arc(p0, p1, rad, np.array([0.5]))[0]  # pylint: disable=protected-access
  np.testing.assert_allclose(path.vertices[1], 2 * middle - (p0 + p1) / 2, atol=1e-12)  # Bezier control point


def test_softmax_and_edge_labels():
  a = np.random.default_rng(1).normal(size=(3, 14, 8)) * 5
  np.testing.assert_allclose(viz.softmax(a), special.softmax(a, axis=-1), rtol=1e-12)
  labels = viz.edge_labels(14)
  assert len(labels) == 14 and labels[0] == '$c_{k-2}$ → 0' and labels[4] == '0 → 1' and labels[-1] == '2 → 3'
  with pytest.raises(ValueError, match='13 alpha rows do not make a DARTS cell'):
    viz.edge_labels(13)


def test_primitives_from_config_or_count():
  assert viz.primitives_for(8, {'model': {'space': 'darts', 'primitives': []}}) == ops.DARTS_PRIMITIVES
  assert viz.primitives_for(7, {'model': {'space': 'dsara'}}) == ops.DSARA_PRIMITIVES
  subset = ['sep_conv_3x3', 'skip_connect', 'max_pool_3x3']
  assert viz.primitives_for(3, {'model': {'primitives': subset}}) == tuple(subset)
  assert viz.primitives_for(7) == ops.DSARA_PRIMITIVES and viz.primitives_for(2) == ('op0', 'op1')


def test_metric_series_prefers_epoch_means_then_averages_steps():
  steps = [{'step': s, 'epoch': s // 2, 'loss': float(s), 'nested': {'gamma': [s, 1 - s]}} for s in range(6)]
  xlabel, series = viz.metric_series(steps)
  assert xlabel == 'epoch'
  np.testing.assert_array_equal(series['loss'][0], [0, 1, 2])
  np.testing.assert_allclose(series['loss'][1], [np.mean([0, 1]), np.mean([2, 3]), np.mean([4, 5])])
  np.testing.assert_allclose(series['nested/gamma[1]'][1], [0.5, -1.5, -3.5])
  with_epochs = steps + [{'step': 6, 'epoch': 0, 'epoch/loss': 9.0, 'label': 'text'}]
  _, series = viz.metric_series(with_epochs)
  assert set(series) == {'loss'} and list(series['loss'][1]) == [9.0]
  assert viz.metric_series([{'step': 3, 'a': 1.0}, {'step': 7, 'a': 2.0}])[0] == 'step'
  assert [viz.panel_of(k) for k in ('arch/gamma_ce', 'val/pgd_acc', 'train/loss', 'val/ce', 'train/lr',
                                    'alpha_entropy_normal', 'arch/grad_norm', 'seconds')] == [
      'gamma', 'accuracy', 'loss', 'objectives', 'learning rate', 'architecture', 'other', None]


def test_read_jsonl_ignores_a_truncated_last_line(tmp_path):
  path = tmp_path / 'm.jsonl'
  path.write_text('{"step": 1, "a": 1}\n\n{"step": 2, "a": 2}\n{"step": 3, "a"')
  assert [r['step'] for r in viz.read_jsonl(path)] == [1, 2]
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match='line 2 is not JSON'):
    viz.read_jsonl(path)
  with pytest.raises(ValueError, match='no numeric metrics to plot'):
    viz.draw_curves([{'step': 1, 'genotype': 'x'}])


def test_history_is_read_in_epoch_order(rendered, tmp_path):
  workdir, history, _ = rendered
  epochs, stacked = viz.load_history(workdir / 'history')
  assert epochs == list(range(N_EPOCHS)) and set(stacked) == {'normal', 'reduce'}
  for t in stacked:
    np.testing.assert_allclose(stacked[t], np.stack([h[t] for h in history]), rtol=1e-6)
  # Another layout: one directory per epoch (numbers of more than one digit sort numerically).
  for epoch in (10, 2):
    (tmp_path / f'epoch_{epoch}').mkdir()
    np.savez(tmp_path / f'epoch_{epoch}' / 'alphas.npz', normal=np.full((14, 8), epoch))
  epochs, stacked = viz.load_history(tmp_path)
  assert epochs == [2, 10] and stacked['normal'][:, 0, 0].tolist() == [2, 10]


def _check_png(path, min_size=200):
  with Image.open(path) as im:
    im.verify()
  pixels = mimage.imread(path)
  assert pixels.ndim == 3 and min(pixels.shape[:2]) >= min_size, (path, pixels.shape)
  rgb = np.round(pixels[..., :3].reshape(-1, 3) * 255).astype(np.int64)
  colors = np.unique(rgb @ np.array([1 << 16, 1 << 8, 1]))
  assert rgb.std() > 10 and len(colors) > 20, f'{path} looks blank'


def test_render_workdir_writes_every_figure(rendered):
  workdir, _, written = rendered
  figures = workdir / 'figures'
  stems = ['cell_normal', 'cell_reduce', 'alphas_final', 'alphas_evolution_normal', 'alphas_evolution_reduce',
           'curves_metrics']
  assert sorted(written) == sorted([str(figures / f'{s}.{ext}') for s in stems for ext in ('png', 'svg')]
                                   + [str(figures / f'cell_{t}.dot') for t in ('normal', 'reduce')])
  for stem in stems:
    _check_png(figures / f'{stem}.png')
    svg = ET.parse(figures / f'{stem}.svg').getroot()
    assert svg.tag.endswith('svg') and len(list(svg.iter())) > 50
  # The cell drawing carries every operation label of the genotype (as SVG text, via the glyph comments).
  text = (figures / 'cell_normal.svg').read_text()
  for op, _ in genotypes.get('DARTS_V2').normal:
    assert op in text


def test_stage_subdirectories_and_cli(tmp_path, capsys):
  make_search_workdir(tmp_path / 'run' / 'search', 'DSARA', space='dsara')
  (tmp_path / 'run' / 'search' / 'alphas.npz').unlink()
  (tmp_path / 'run' / 'search' / 'history').rename(tmp_path / 'run' / 'search' / 'old')  # not an alpha history
  assert cli.main(['viz', str(tmp_path / 'run'), '--formats', 'png']) == 0
  names = sorted(p.name for p in (tmp_path / 'run' / 'figures').iterdir())
  assert names == sorted(['search_curves_metrics.png'] + [f'search_cell_{t}.{ext}' for t in
                                                          ('accurate', 'reduce', 'robust') for ext in ('png', 'dot')])
  assert capsys.readouterr().out.count('\n') == len(names)
  assert cli.main(['viz', str(tmp_path / 'missing')]) == 2
  assert cli.main(['viz', str(tmp_path / 'run' / 'search' / 'old')]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "does not exist" in err[0] and 'nothing to draw' in err[1]
