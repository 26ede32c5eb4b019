"""Reports of a run (``report.json`` + ``report.md``) and comparison tables across runs (``jaxnas compare``).

``write_report(workdir)`` gathers, from the workdir and its immediate stage sub-directories:

- the genotype (``genotype.json``) and the parameters and MACs of its evaluation network
  (``analysis.count_params`` without the auxiliary head, ``analysis.count_macs``); the network size comes from
  the arguments, else ``network.json`` (written by training: ``{"init_channels", "layers", "num_classes",
  "input_shape": [H, W, C]}``, any subset), else ``config.json`` (``train.init_channels``, ``train.layers``,
  ``data.num_classes``), else the papers' CIFAR-10 evaluation network (C=36, 20 layers, 10 classes, 32x32x3);
- clean and robust accuracies per attack: the dict of ``evaluate.evaluate_robustness``, from the argument,
  else ``evaluation.json`` (``evaluate.write_evaluation``), else the ``evaluation`` entry of an earlier
  combined report (so rewriting a report keeps its numbers);
- the training run (``jaxnas.train``): its recipe from the ``config.json`` next to ``network.json`` and the
  last held-out accuracies of its ``metrics.jsonl``;
- certified radii: ``certified.json`` or the evaluation's ``certified`` entry, a mapping ``name -> {"norm",
  "method", "mean_radius" (or "radii": per-example list), "n_examples"}``;
- search cost in device-hours from ``timing.json`` (see ``record_timing``): ``{"search": {"seconds",
  "num_devices", "device_kind"}, "train": {...}, ...}``; the flat form ``{"search_seconds", "num_devices"}`` is
  read too. Device-hours are ``seconds * num_devices / 3600``;
- links to the pictures of ``jaxnas.viz.render_workdir`` (redrawn first into ``figures/``).

The combined report is written as ``report.json`` and ``report.md`` in the workdir.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Mapping, Sequence

import numpy as np

from jaxnas import analysis, evaluate, genotypes, networks, viz

TIMING = 'timing.json'
NETWORK = 'network.json'
PAPER_NETWORK = dict(init_channels=36, layers=20, num_classes=10, input_shape=[32, 32, 3])


def _read_json(path: str):
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e}): fix or delete it') from None


def _find(workdir: str, name: str) -> str | None:
  """``name`` in the workdir, else in its first stage sub-directory holding it."""
  return next((os.path.join(p, name) for _, p in viz.stage_dirs(workdir)
               if os.path.isfile(os.path.join(p, name))), None)


def record_timing(workdir: str, stage: str, seconds: float, num_devices: int, device_kind: str = '') -> dict:
  """Adds ``seconds`` of ``stage`` ('search', 'train', 'evaluate') on ``num_devices`` devices to
  ``workdir/timing.json`` (a resumed run adds its own time); returns the file's contents."""
  if seconds < 0 or num_devices < 1:
    raise ValueError(f'record_timing needs seconds >= 0 and num_devices >= 1, got {seconds}, {num_devices}')
  path = os.path.join(workdir, TIMING)
  timing = _read_json(path) if os.path.isfile(path) else {}
  entry = timing.get(stage, {})
  timing[stage] = dict(seconds=float(entry.get('seconds', 0.0)) + float(seconds), num_devices=int(num_devices),
                       device_kind=device_kind or entry.get('device_kind', ''))
  os.makedirs(workdir, exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(timing, f, indent=1)
  os.replace(path + '.tmp', path)
  return timing


def stage_cost(timing: Mapping, stage: str = 'search') -> dict | None:
  """``{seconds, num_devices, device_kind, device_hours}`` of one stage from a ``timing.json`` dict."""
  entry = timing.get(stage)
  if not isinstance(entry, Mapping):
    if f'{stage}_seconds' not in timing:
      return None
    entry = dict(seconds=timing[f'{stage}_seconds'], num_devices=timing.get('num_devices', 1),
                 device_kind=timing.get('device_kind', ''))
  seconds, devices = float(entry['seconds']), int(entry.get('num_devices', 1))
  return dict(seconds=seconds, num_devices=devices, device_kind=entry.get('device_kind', ''),
              device_hours=seconds * devices / 3600.0)


def find_evaluation(workdir: str) -> dict | None:
  """The robustness evaluation of a workdir (see the module docstring), or None."""
  path = _find(workdir, evaluate.EVALUATION_JSON)
  if path:
    return _read_json(path)
  path = _find(workdir, 'report.json')
  previous = _read_json(path) if path else None
  return previous.get('evaluation') if isinstance(previous, Mapping) else None


def training_summary(workdir: str) -> dict | None:
  """The training run of a workdir: ``method`` (standard / pgd / trades), ``epochs``, the adversary's ``eps``
  and ``steps``, and the last epoch's held-out ``test/*`` metrics; None without a training run."""
  path = _find(workdir, NETWORK)
  config_path = os.path.join(os.path.dirname(path), 'config.json') if path else ''
  if not os.path.isfile(config_path):
    return None
  t = _read_json(config_path).get('train', {})
  if 'epochs' not in t:
    return None
  adversarial = t.get('adversarial', {})
  method = adversarial.get('method', 'none')
  summary = dict(method='standard' if method == 'none' else method, epochs=t.get('epochs'))
  if method != 'none':
    summary.update(eps=adversarial.get('eps'), norm=adversarial.get('norm', 'linf'), steps=adversarial.get('steps'))
  metrics_path = os.path.join(os.path.dirname(path), 'metrics.jsonl')
  records = viz.read_jsonl(metrics_path) if os.path.isfile(metrics_path) else []
  tested = [r for r in records if any(k.startswith('epoch/test/') for k in r)]
  if tested:
    summary['epoch'] = tested[-1].get('epoch')
    summary['test'] = {k[len('epoch/test/'):]: v for k, v in tested[-1].items() if k.startswith('epoch/test/')}
  return summary


def _certified(workdir: str, evaluation: Mapping | None) -> dict | None:
  path = _find(workdir, 'certified.json')
  entries = _read_json(path) if path else (evaluation or {}).get('certified')
  if not entries:
    return None
  out = {}
  for name, e in entries.items():
    mean = e['mean_radius'] if 'mean_radius' in e else float(np.mean(e['radii']))
    out[name] = dict(norm=e.get('norm', ''), method=e.get('method', name), mean_radius=float(mean),
                     n_examples=int(e.get('n_examples', len(e.get('radii', ())))))
  return out


def network_spec(workdir: str, **overrides) -> dict:
  """The evaluation network's size (see the module docstring) and where it came from."""
  spec, source = dict(PAPER_NETWORK), 'paper default (CIFAR-10 evaluation network)'
  config_path = _find(workdir, 'config.json')
  config = _read_json(config_path) if config_path else {}
  section = lambda name: config.get(name) if isinstance(config.get(name), Mapping) else {}
  from_config = {k: v for k, v in dict(init_channels=section('train').get('init_channels'),
                                       layers=section('train').get('layers'),
                                       num_classes=section('data').get('num_classes')).items() if v}
  if from_config:
    spec.update(from_config)
    source = 'config.json'
  path = _find(workdir, NETWORK)
  if path:
    spec.update({k: v for k, v in _read_json(path).items() if k in PAPER_NETWORK})
    source = NETWORK
  given = {k: v for k, v in overrides.items() if v is not None}
  if given:
    spec.update(given)
    source = 'arguments'
  spec['input_shape'] = [int(s) for s in spec['input_shape']]
  if len(spec['input_shape']) != 3:
    raise ValueError(f'input_shape must be [height, width, channels], got {spec["input_shape"]}')
  return dict(spec, source=source)


def build_report(workdir: str, evaluation: Mapping | None = None, **network) -> dict:
  """The combined report of ``workdir`` as a JSON-serialisable dict (nothing is written).

  ``network``: ``init_channels``, ``layers``, ``num_classes``, ``input_shape`` overrides.
  """
  workdir = os.fspath(workdir)
  genotype_path = _find(workdir, 'genotype.json')
  if genotype_path is None:
    raise FileNotFoundError(f'no genotype.json in {workdir!r} or its stage sub-directories: run the search '
                            '(or derive) in this workdir first')
  genotype = genotypes.load(genotype_path)
  spec = network_spec(workdir, **network)
  net = networks.EvalNetwork(genotype, spec['init_channels'], spec['layers'], spec['num_classes'])
  shape = (1, *spec['input_shape'])
  evaluation = dict(evaluation) if evaluation is not None else find_evaluation(workdir)
  timing_path = _find(workdir, TIMING)
  timing = _read_json(timing_path) if timing_path else {}
  figures_dir = os.path.join(workdir, 'figures')
  figures = sorted(f'figures/{f}' for f in os.listdir(figures_dir) if f.endswith('.png')) \
      if os.path.isdir(figures_dir) else []
  return dict(workdir=os.path.basename(os.path.normpath(workdir)), genotype=genotype.to_dict(),
              network=dict(spec, params=analysis.count_params(net, shape), macs=analysis.count_macs(net, shape)),
              training=training_summary(workdir), evaluation=evaluation, certified=_certified(workdir, evaluation),
              timing=timing, search_cost=stage_cost(timing, 'search'), figures=figures)


def _pct(x) -> str:
  return '–' if x is None else f'{100 * x:.2f}'


def format_markdown(report: Mapping) -> str:
  """``report.md``: architecture, size, robustness, certified radii, search cost and figures."""
  net = report['network']
  lines = [f'# Report: {report["workdir"]}', '', '## Architecture', '']
  genotype = genotypes.Genotype.from_dict(report['genotype'])
  for cell_type in genotype.cell_types:
    edges = genotype[cell_type]
    nodes = '; '.join(f'node {i}: ' + ', '.join(f'{op}({viz.state_name(j)})' for op, j in edges[2 * i:2 * i + 2])
                      for i in range(len(edges) // 2))
    lines.append(f'- **{cell_type}** cell: {nodes}; output concatenates states '
                 f'{list(genotype.concat_of(cell_type))}.')
    if f'figures/cell_{cell_type}.png' in report['figures']:
      lines += ['', f'  ![{cell_type} cell](figures/cell_{cell_type}.png)']
  shape = 'x'.join(map(str, net['input_shape']))
  lines += ['', f'Evaluation network: C={net["init_channels"]}, {net["layers"]} layers, {net["num_classes"]} '
            f'classes, input {shape} (from {net["source"]}).', '',
            '| params (auxiliary head excluded) | MACs (conv + linear) |', '| ---: | ---: |',
            f'| {net["params"]:,} ({net["params"] / 1e6:.2f}M) | {net["macs"]:,} ({net["macs"] / 1e6:.2f}M) |']
  training = report.get('training')
  if training:
    recipe = training['method'] + (f' adversarial ({training["norm"]} eps '
                                   f'{evaluate.format_eps(training["eps"], training["norm"])}, {training["steps"]} '
                                   'steps)' if 'eps' in training else '')
    lines += ['', '## Training', '', f'{recipe} training, {training["epochs"]} epochs.']
    if training.get('test'):
      accuracies = ', '.join(f'{k[:-4]} {_pct(v)}%' for k, v in training['test'].items() if k.endswith('_acc'))
      lines.append(f'Held-out accuracy after epoch {training["epoch"] + 1}: {accuracies}.')
  ev = report.get('evaluation')
  lines += ['', '## Robustness', '']
  if ev:
    lines += [f'Threat model: {ev["norm"]}, eps = {evaluate.format_eps(ev["eps"], ev["norm"])}; '
              f'{ev["n_examples"]} test examples.', '',
              '| evaluation | accuracy (%) |', '| --- | ---: |', f'| Clean | {_pct(ev["clean_accuracy"])} |']
    lines += [f'| {row["label"]} | {_pct(row["robust_accuracy"])} |' for row in ev['attacks'].values()]
    if len(ev['attacks']) > 1 and 'worst_case_accuracy' in ev:
      lines.append(f'| Worst case over all attacks | {_pct(ev["worst_case_accuracy"])} |')
  else:
    lines.append('Not evaluated yet (no evaluation.json in the workdir).')
  if report.get('certified'):
    lines += ['', '## Certified robustness', '', '| bound | norm | mean certified radius | examples |',
              '| --- | --- | ---: | ---: |']
    lines += [f'| {c["method"]} | {c["norm"]} | {c["mean_radius"]:.4g} | {c["n_examples"]} |'
              for c in report['certified'].values()]
  lines += ['', '## Cost', '']
  stages = [(s, stage_cost(report['timing'], s)) for s in ('search', 'train', 'evaluate')]
  stages = [(s, c) for s, c in stages if c]
  if stages:
    lines += ['| stage | device-hours | devices | wall clock (h) |', '| --- | ---: | --- | ---: |']
    lines += [f'| {s} | {c["device_hours"]:.3f} | {c["num_devices"]} × {c["device_kind"] or "device"} | '
              f'{c["seconds"] / 3600:.3f} |' for s, c in stages]
  else:
    lines.append(f'No {TIMING} in the workdir: search cost unknown.')
  others = [f for f in report['figures'] if not os.path.basename(f).startswith('cell_')]
  if others:
    lines += ['', '## Figures', '']
    for f in others:
      lines += [f'![{os.path.basename(f)[:-4]}]({f})', '']
  return '\n'.join(lines).rstrip() + '\n'


def write_report(workdir: str, evaluation: Mapping | None = None, render: bool = True, **network) -> list[str]:
  """Redraws the figures (unless ``render`` is False) and writes ``report.json`` and ``report.md`` into
  ``workdir``; returns the paths of the two reports."""
  workdir = os.fspath(workdir)
  if render:
    viz.render_workdir(workdir)
  report = build_report(workdir, evaluation, **network)
  json_path, md_path = os.path.join(workdir, 'report.json'), os.path.join(workdir, 'report.md')
  with open(json_path, 'w') as f:
    json.dump(report, f, indent=1)
  with open(md_path, 'w') as f:
    f.write(format_markdown(report))
  return [json_path, md_path]


def load_report(workdir: str) -> dict:
  """The combined report of ``workdir``: its ``report.json`` when written by ``write_report``, else built."""
  path = os.path.join(os.fspath(workdir), 'report.json')
  if os.path.isfile(path):
    d = _read_json(path)
    if isinstance(d, Mapping) and 'network' in d and 'genotype' in d:
      return d
  return build_report(workdir)


def compare_workdirs(workdirs: Sequence[str], names: Sequence[str] | None = None) -> str:
  """A Markdown table across runs, as in the papers: params, MACs, clean and robust accuracy per attack (the
  union of the attacks run, in ``evaluate.ATTACKS`` order), mean certified radii and search cost."""
  if not workdirs:
    raise ValueError('compare needs at least one workdir')
  if names is not None and len(names) != len(workdirs):
    raise ValueError(f'got {len(names)} names for {len(workdirs)} workdirs: give one name per workdir')
  reports = [load_report(w) for w in workdirs]
  names = names or [r['workdir'] for r in reports]
  attacks = [a for a in evaluate.ATTACKS if any(a in ((r.get('evaluation') or {}).get('attacks', {}))
                                                for r in reports)]
  certified = list(dict.fromkeys(k for r in reports for k in (r.get('certified') or {})))
  header = (['Method', 'Params (M)', 'MACs (M)', 'Clean (%)'] + [f'{evaluate.ATTACKS[a][0]} (%)' for a in attacks]
            + [f'Certified radius ({k})' for k in certified] + ['Search cost (device-h)'])
  lines = ['| ' + ' | '.join(header) + ' |', '| --- |' + ' ---: |' * (len(header) - 1)]
  for name, r in zip(names, reports):
    ev, cert, cost = r.get('evaluation') or {}, r.get('certified') or {}, r.get('search_cost')
    cells = [name, f'{r["network"]["params"] / 1e6:.2f}', f'{r["network"]["macs"] / 1e6:.1f}',
             _pct(ev.get('clean_accuracy'))]
    cells += [_pct(ev['attacks'][a]['robust_accuracy']) if a in ev.get('attacks', {}) else '–' for a in attacks]
    cells += [f'{cert[k]["mean_radius"]:.4g}' if k in cert else '–' for k in certified]
    cells.append(f'{cost["device_hours"]:.2f}' if cost else '–')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------------------
# ``jaxnas compare``.
# ------------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
  parser = parser or argparse.ArgumentParser(prog='jaxnas compare', description=compare_workdirs.__doc__)
  parser.add_argument('workdirs', nargs='+', help='run workdirs (their report.json, or built on the fly)')
  parser.add_argument('--names', nargs='+', help='row names, one per workdir (default: directory names)')
  parser.add_argument('--output', help='also write the table to this Markdown file')
  return parser


def run(args: argparse.Namespace) -> int:
  try:
    table = compare_workdirs(args.workdirs, args.names)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, 'w') as f:
      f.write(table)
  print(table, end='')
  return 0
