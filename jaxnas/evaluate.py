"""Robustness evaluation: clean and robust accuracy under a set of attacks, as a report dict, JSON and a
Markdown table (the rows of the robust-NAS papers: clean, FGSM, PGD-20, PGD-100, CW_inf, APGD-CE, AA).

A point counts as robust under an attack when it is classified correctly both clean and on the attack's
adversarial example. ``worst_case`` is the accuracy when every attack run is allowed to break a point.
Each attack draws per-example randomness from ``(seed, attack, example index)``: results do not depend on
``batch_size``. The model must be an inference-mode ``logits_fn`` (``EvalNetwork.logits_fn(variables)``).

Entry points: ``evaluate_robustness`` (the engine), ``evaluate_model`` (the engine plus certified radii, with
the settings of a config's ``evaluate`` section, ``default_config``), the ``evaluate`` mode of
``jaxnas.main`` (``evaluate_run``: the network trained in a workdir on its test split) and the command
``jaxnas evaluate --checkpoint WORKDIR_OR_STATE_DICT`` (``build_parser`` / ``run``). Results are written as
``evaluation.json`` and ``evaluation.md`` (``write_evaluation``); ``report.json`` is the whole run's report.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from fractions import Fraction
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from jaxnas import certify, data, genotypes, interop, networks, train
from jaxnas import workdir as workdir_lib
from jaxnas.attacks import batching
from jaxnas.attacks import cw
from jaxnas.attacks import ensemble
from jaxnas.attacks import inference
from jaxnas.attacks import pgd_attack

# name -> (table label, norms it applies to); the order is the table's row order.
ATTACKS = {
    'fgsm': ('FGSM', ('linf', 'l2')),
    'pgd20': ('PGD-20', ('linf', 'l2')),
    'pgd100': ('PGD-100', ('linf', 'l2')),
    'cw_inf': ('CW∞', ('linf',)),
    'cw_l2': ('C&W-l2', ('l2',)),
    'apgd_ce': ('APGD-CE', ('linf', 'l2')),
    'apgd_t': ('APGD-T', ('linf', 'l2')),
    'fab_t': ('FAB-T', ('linf', 'l2')),
    'square': ('Square', ('linf', 'l2')),
    'aa': ('AutoAttack', ('linf', 'l2')),
}
DEFAULT_ATTACKS = ('fgsm', 'pgd20', 'pgd100', 'cw_inf', 'apgd_ce', 'aa')
_COMPONENT = {'apgd_ce': 'apgd-ce', 'apgd_t': 'apgd-t', 'fab_t': 'fab-t', 'square': 'square'}


_STEPS = {'pgd20': 20, 'pgd100': 100, 'cw_inf': 20}


@functools.lru_cache(maxsize=64)
def _white_box(kind: str, logits_fn, norm: str) -> Callable:
  """The jitted ``(x, y, key, idx, eps, step_size, steps) -> x_adv`` of 'fgsm', 'pgd', 'cw_inf' or 'cw_l2'
  (cached per model; PGD-20 and PGD-100 share one compilation)."""
  if kind == 'fgsm':
    fn = lambda x, y, key, idx, eps, step, steps: pgd_attack.fgsm(logits_fn, x, y, eps=eps, norm=norm)
  elif kind == 'pgd':
    fn = lambda x, y, key, idx, eps, step, steps: pgd_attack.pgd(logits_fn, x, y, key, eps=eps, step_size=step,
                                                                 steps=steps, norm=norm, idx=idx)
  elif kind == 'cw_inf':
    fn = lambda x, y, key, idx, eps, step, steps: cw.cw_linf(logits_fn, x, y, key, eps=eps, step_size=step,
                                                             steps=steps, kappa=50.0, idx=idx)
  else:
    fn = lambda x, y, key, idx, eps, step, steps: cw.cw_l2(logits_fn, x, y)
  return jax.jit(fn)


def evaluate_robustness(logits_fn, images, labels, *, attacks: Sequence[str] = DEFAULT_ATTACKS,
                        eps: float = 8 / 255, norm: str = 'linf', batch_size: int = 256, seed: int = 0,
                        step_size: Optional[float] = None, autoattack_options: Optional[dict] = None) -> dict:
  """Evaluates ``logits_fn`` on ``images [N, H, W, C]`` in [0, 1] with integer ``labels [N]``.

  Args:
    logits_fn: inference-mode ``x -> logits`` (refused if it behaves like a training-mode model).
    attacks: rows to run, from ``ATTACKS``: 'fgsm', 'pgd20', 'pgd100' (random start, step ``step_size``),
      'cw_inf' (PGD-20 on the C&W loss, kappa 50; l_inf), 'cw_l2' (C&W l_2, 9 binary steps x 100 Adam steps,
      broken when its minimum-norm adversarial is within ``eps``; l_2), 'apgd_ce', 'apgd_t', 'fab_t',
      'square' (AutoAttack's components alone, reference settings) and 'aa' (the standard ensemble).
    eps, norm: threat model ('linf' or 'l2'). step_size: PGD/CW_inf step, default ``eps / 4`` (2/255 at 8/255).
    batch_size: examples per jitted chunk (no effect on the results). seed: PRNG seed.
    autoattack_options: overrides of AutoAttack's ``n_iter``, ``n_target_classes``, ``n_queries`` (for quick
      runs; the defaults are the reference's standard settings), used by 'aa' and its components.

  Returns:
    A JSON-serialisable dict: ``eps``, ``norm``, ``n_examples``, ``seed``, ``step_size``,
    ``clean_accuracy``, ``attacks`` (name -> ``label``, ``robust_accuracy``, ``seconds``), ``autoattack``
    (when run: accuracy after each component, ``broken_by`` counts, sanity-check ``warnings``),
    ``worst_case_accuracy`` and ``per_example`` (labels, clean correctness, robustness per attack, the
    AutoAttack component that broke each point).
  """
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown:
    raise ValueError(f'unknown attack(s) {unknown}: choose from {list(ATTACKS)}')
  wrong_norm = [a for a in attacks if norm not in ATTACKS[a][1]]
  if wrong_norm:
    raise ValueError(f'attack(s) {wrong_norm} do not apply to norm {norm!r}: drop them or change the norm')
  x, y = np.asarray(images, np.float32), np.asarray(labels).astype(np.int32)
  if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
    raise ValueError(f'need images [N, H, W, C] and as many labels, got {x.shape} and {y.shape}')
  if x.min() < 0 or x.max() > 1:
    raise ValueError(f'images must lie in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]: divide uint8 by 255')
  inference.check_inference_mode(logits_fn, x)
  step_size = eps / 4 if step_size is None else step_size
  bad = set(autoattack_options or {}) - {'n_iter', 'n_target_classes', 'n_queries'}
  if bad:
    raise ValueError(f'unknown autoattack_options {sorted(bad)}: use n_iter, n_target_classes, n_queries')
  aa_options = dict(n_iter=100, n_target_classes=9, n_queries=5000)
  aa_options.update(autoattack_options or {})
  pred_fn = batching.predictor(logits_fn)
  clean = batching.run_batched(pred_fn, [x], batch_size) == y
  idx = np.arange(len(x))
  base_key = jax.random.PRNGKey(seed)
  rows, robust, report_aa, per_aa = {}, {}, None, None
  order = [a for a in ATTACKS if a in attacks]
  if 'aa' in order:   # first: its APGD-CE stage is exactly the standalone APGD-CE (same keys).
    order = ['aa'] + [a for a in order if a != 'aa']
  for name in order:
    start = time.perf_counter()
    if name == 'aa':
      aa = ensemble.autoattack(logits_fn, x, y, eps=eps, norm=norm, seed=seed, batch_size=batch_size,
                               **aa_options)
      robust[name] = aa['robust']
      per_aa = aa['broken_by'].tolist()
      names, counts = np.unique(aa['broken_by'][aa['broken_by'] != ''], return_counts=True)
      report_aa = dict(robust_accuracy=aa['robust_accuracy'], seconds=aa['seconds'], warnings=aa['warnings'],
                       broken_by={str(k): int(v) for k, v in zip(names, counts)})
    elif name == 'apgd_ce' and per_aa is not None:
      robust[name] = clean & ~np.isin(np.asarray(per_aa), ['apgd-ce'])
    elif name in _COMPONENT:
      todo = np.flatnonzero(clean)
      robust[name] = clean.copy()
      if len(todo):
        fn = ensemble.attack_fn(_COMPONENT[name], logits_fn, norm=norm, **aa_options, n_restarts=1)
        key = jax.random.fold_in(base_key, ensemble.ATTACKS.index(_COMPONENT[name]))
        adv = batching.run_batched(lambda a, b, c: fn(a, b, key, c, eps), [x[todo], y[todo], todo], batch_size)
        robust[name][todo] = batching.run_batched(pred_fn, [adv], batch_size) == y[todo]
    else:
      fn = _white_box('pgd' if name in ('pgd20', 'pgd100') else name, logits_fn, norm)
      key = jax.random.fold_in(base_key, 100 + list(ATTACKS).index(name))
      steps = _STEPS.get(name, 0)
      adv = batching.run_batched(lambda a, b, c: fn(a, b, key, c, eps, step_size, steps), [x, y, idx], batch_size)
      ok = batching.run_batched(pred_fn, [adv], batch_size) == y
      if name == 'cw_l2':
        dist = np.sqrt(np.sum((adv - x).reshape(len(x), -1) ** 2, axis=1))
        ok = ok | (dist > eps)
      robust[name] = clean & ok
    seconds = time.perf_counter() - start
    rows[name] = dict(label=ATTACKS[name][0], robust_accuracy=float(robust[name].mean()), seconds=seconds)

  worst = clean.copy()
  for r in robust.values():
    worst &= r
  report = dict(eps=float(eps), norm=norm, n_examples=int(len(x)), seed=int(seed), step_size=float(step_size),
                batch_size=int(batch_size), clean_accuracy=float(clean.mean()),
                attacks={a: rows[a] for a in ATTACKS if a in rows}, worst_case_accuracy=float(worst.mean()),
                per_example=dict(label=y.tolist(), clean_correct=clean.tolist(),
                                 robust={a: robust[a].tolist() for a in ATTACKS if a in robust}))
  if report_aa is not None:
    report['autoattack'] = dict(report_aa, options=aa_options)
    report['per_example']['autoattack_broken_by'] = per_aa
  return report


def format_eps(eps: float, norm: str) -> str:
  """``8/255 (0.0314)`` for l_inf radii that are multiples of 1/255 (or 1/510), else the number."""
  frac = Fraction(eps * 255).limit_denominator(2)
  if norm == 'linf' and abs(float(frac) - eps * 255) < 1e-6 and frac > 0:
    num = f'{frac.numerator}/{255 * frac.denominator}'
    return f'{num} ({eps:.4f})'
  return f'{eps:g}'


def format_markdown(report: dict) -> str:
  """The report as a Markdown table of accuracies (%), with the threat model stated."""
  lines = ['# Robustness report',
           '',
           f'Threat model: {report["norm"]}, eps = {format_eps(report["eps"], report["norm"])}; '
           f'{report["n_examples"]} examples, seed {report["seed"]}, PGD/CW step {report["step_size"]:.4g}.',
           '',
           '| evaluation | accuracy (%) | time (s) |',
           '| --- | ---: | ---: |',
           f'| Clean | {100 * report["clean_accuracy"]:.2f} | |']
  for row in report['attacks'].values():
    lines.append(f'| {row["label"]} | {100 * row["robust_accuracy"]:.2f} | {row["seconds"]:.1f} |')
  if len(report['attacks']) > 1:
    lines.append(f'| Worst case over all attacks | {100 * report["worst_case_accuracy"]:.2f} | |')
  aa = report.get('autoattack')
  if aa:
    lines += ['', '## AutoAttack (standard)', '', '| after | robust accuracy (%) |', '| --- | ---: |']
    lines += [f'| {k} | {100 * v:.2f} |' for k, v in aa['robust_accuracy'].items()]
    broken = ', '.join(f'{k}: {v}' for k, v in aa['broken_by'].items())
    lines += ['', f'Points broken by each component (clean = misclassified without attack): {broken or "none"}.']
    for warning in aa['warnings']:
      lines += ['', f'> Warning: {warning}']
  if report.get('certified'):
    lines += ['', '## Certified robustness', '',
              '| bound | norm | mean certified radius | certified at eps0 (%) | time (s) |',
              '| --- | --- | ---: | ---: | ---: |']
    lines += [f'| {c["method"]} | {c["norm"]} | {c["mean_radius"]:.4g} | {100 * c["certified_at_eps0_fraction"]:.2f} '
              f'(eps0 {c["eps0"]:g}) | {c["seconds"]:.1f} |' for c in report['certified'].values()]
  return '\n'.join(lines) + '\n'


def write_evaluation(report: dict, directory: str) -> tuple[str, str]:
  """Writes ``evaluation.json`` and ``evaluation.md`` into ``directory`` (created if needed); returns both
  paths. An earlier evaluation there with another result is kept as ``evaluation.<k>.json`` / ``.md`` (the
  first free k), never overwritten."""
  os.makedirs(directory, exist_ok=True)
  json_path, md_path = os.path.join(directory, EVALUATION_JSON), os.path.join(directory, 'evaluation.md')
  text = json.dumps(report, indent=1)
  if os.path.isfile(json_path):
    with open(json_path) as f:
      previous = f.read()
    if previous != text:
      k = 1
      while os.path.exists(os.path.join(directory, f'evaluation.{k}.json')):
        k += 1
      for path in (json_path, md_path):
        if os.path.isfile(path):
          os.replace(path, os.path.join(directory, f'evaluation.{k}{os.path.splitext(path)[1]}'))
  with open(json_path, 'w') as f:
    f.write(text)
  with open(md_path, 'w') as f:
    f.write(format_markdown(report))
  return json_path, md_path


# ------------------------------------------------------------------------------------------------
# Evaluating trained networks: settings, the evaluate mode and ``jaxnas evaluate``.
# ------------------------------------------------------------------------------------------------
EVALUATION_JSON = 'evaluation.json'


def default_config() -> ml_collections.ConfigDict:
  """The ``evaluate`` section of a config: what ``evaluate_model`` runs (the papers' table by default)."""
  return ml_collections.ConfigDict(dict(
      attacks=DEFAULT_ATTACKS,    # rows, from ATTACKS
      eps=8 / 255, norm='linf',   # the threat model
      step_size=0.0,              # PGD / CW_inf step; 0 = eps / 4 (2/255 at 8/255; AdvRush uses 0.01)
      n_examples=0,               # the first N test images (0 = all)
      batch_size=256, seed=0,
      autoattack=dict(n_iter=100, n_target_classes=9, n_queries=5000),  # the reference's standard settings
      certify=(),                 # norms whose certified radii to compute, e.g. ('linf', 'l2'); () = none
      certify_method='crown',     # crown (small networks) | crown-ibp | ibp (jaxnas.certify)
      certify_eps0=0.05, certify_steps=15))  # CNN-Cert's bisection from eps0, as DSRNA reports


def _as_dict(settings) -> dict:
  """Settings as plain JSON values (tuples as lists), as they are stored in evaluation.json."""
  return json.loads(json.dumps(settings.to_dict() if hasattr(settings, 'to_dict') else dict(settings)))


def evaluate_model(logits_fn, images, labels, settings, log: Callable[[str], None] | None = None) -> dict:
  """``evaluate_robustness`` of an inference-mode ``logits_fn`` on the first ``settings.n_examples`` images
  (uint8, or float in [0, 1]) with the settings of an ``evaluate`` config section, plus certified radii
  (``certify.certified_radii_report``, whose progress goes to ``log``) under ``certified`` when
  ``settings.certify`` names norms; the settings are recorded under ``settings``."""
  n = settings.n_examples or len(labels)
  x = np.asarray(images[:n])
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  y = np.asarray(labels[:n]).astype(np.int32)
  result = evaluate_robustness(logits_fn, x, y, attacks=tuple(settings.attacks), eps=settings.eps,
                               norm=settings.norm, batch_size=settings.batch_size, seed=settings.seed,
                               step_size=settings.step_size or None, autoattack_options=dict(settings.autoattack))
  if settings.certify:
    radii = certify.certified_radii_report(logits_fn, x, y, norms=tuple(settings.certify),
                                           method=settings.certify_method, eps0=settings.certify_eps0,
                                           steps=settings.certify_steps, batch_size=settings.batch_size,
                                           progress=log)
    result['certified'] = {
        f'{r["method"]}_{norm}': dict(norm=norm, method=r['method'], mean_radius=float(r['mean_radius']),
                                      radii=np.asarray(r['radii'], np.float64).tolist(), n_examples=int(n),
                                      eps0=float(settings.certify_eps0),
                                      certified_at_eps0_fraction=float(r['certified_at_eps0_fraction']),
                                      seconds=float(r['seconds']))
        for norm, r in radii.items()}
  result['settings'] = _as_dict(settings)
  return result


def _summary(result: dict) -> str:
  rows = [f'clean {100 * result["clean_accuracy"]:.2f}%'] + [
      f'{row["label"]} {100 * row["robust_accuracy"]:.2f}%' for row in result['attacks'].values()]
  rows += [f'{c["method"]} {c["norm"]} mean radius {c["mean_radius"]:.4g}'
           for c in (result.get('certified') or {}).values()]
  return ', '.join(rows)


def evaluate_run(config, workdir: str) -> dict:
  """The ``evaluate`` mode: robustness of the network trained in ``workdir`` (``train.load_trained``, inference
  mode) on the test split of ``config.data`` (``train.splits``) with the settings of ``config.evaluate``;
  writes evaluation.json / evaluation.md there and returns the result. Skipped (the stored result returned)
  when evaluation.json already holds this checkpoint, test set and settings."""
  if 'evaluate' not in config or 'train' not in config:
    raise ValueError('the config has no evaluate / train section: start from configs/train_std.py, '
                     'configs/train_adv.py or configs/quickstart.py')
  net, variables, step = train.load_trained(workdir)
  dataset = data.load(config.data)
  _, test = train.splits(dataset, config.train.holdout_fraction, config.seed)
  _check_input_shape(workdir, test.images)
  source = dict(checkpoint_step=step, data=dataset.name, holdout_fraction=config.train.holdout_fraction,
                data_seed=config.seed)
  path = os.path.join(workdir, EVALUATION_JSON)
  console = workdir_lib.Console(workdir)
  try:
    if os.path.isfile(path):
      previous = workdir_lib.read_json(path, 'delete it to evaluate again')
      if previous.get('source') == source and previous.get('settings') == _as_dict(config.evaluate):
        console.log(f'evaluation of step {step} already in {path}: {_summary(previous)}')
        return previous
    n = config.evaluate.n_examples or len(test.labels)
    console.log(f'evaluating the step {step} checkpoint of {workdir} on {n} test images of {dataset.name}: '
                f'{", ".join(config.evaluate.attacks)} at {config.evaluate.norm} eps '
                f'{format_eps(config.evaluate.eps, config.evaluate.norm)} (inference mode)')
    result = evaluate_model(net.logits_fn(variables), test.images, test.labels, config.evaluate, log=console.log)
    result['source'] = source
    paths = write_evaluation(result, workdir)
    console.log(f'{_summary(result)} -> {paths[1]}')
  finally:
    console.close()
  return result


def _number(text: str) -> float:
  """A float or a fraction such as ``8/255``."""
  try:
    return float(Fraction(text))
  except (ValueError, ZeroDivisionError):
    raise argparse.ArgumentTypeError(f'{text!r} is not a number or a fraction like 8/255') from None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
  parser = parser or argparse.ArgumentParser(prog='jaxnas evaluate', description='robustness of a trained network')
  parser.add_argument('--checkpoint', required=True,
                      help='a training workdir (config.mode=train, or a pipeline workdir\'s train/), or a PyTorch '
                           'state dict (.npz or .pt) of an evaluation network')
  parser.add_argument('--genotype', help='zoo name, genotype JSON file or search workdir (required for a state '
                                         'dict; checked against a training workdir)')
  parser.add_argument('--attacks', default=','.join(DEFAULT_ATTACKS),
                      help=f'comma-separated, from {",".join(ATTACKS)}')
  parser.add_argument('--n-examples', type=int, default=0, help='the first N test images (0 = all)')
  parser.add_argument('--batch-size', type=int, default=256, help='examples per jitted chunk')
  parser.add_argument('--eps', type=_number, default=8 / 255, help='radius, e.g. 8/255 (default) or 0.5')
  parser.add_argument('--norm', choices=('linf', 'l2'), default='linf')
  parser.add_argument('--step-size', type=_number, default=0.0, help='PGD / CW_inf step (default eps/4)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--certify', default='', help='norms whose certified radii to compute, e.g. linf,l2')
  parser.add_argument('--certify-method', choices=certify.METHODS, default='crown',
                      help="bound of the certified radii: full CROWN (default) suits small networks (the quick "
                           "start's takes ~1.5 s per example and bisection step on 2 CPU cores); 'crown-ibp' and "
                           "'ibp' are fast but loose on networks not trained for them")
  parser.add_argument('--data', help="test images: 'digits', an .npz file (uint8 'image', integer 'label') or a "
                                     "TFDS name; default: the training workdir's test split")
  parser.add_argument('--output', help='directory for evaluation.json / .md (default: the training workdir, or '
                                       'the directory of the state dict)')
  net = parser.add_argument_group('network of a state dict')
  net.add_argument('--init-channels', type=int, default=36)
  net.add_argument('--layers', type=int, default=20)
  net.add_argument('--num-classes', type=int, default=10)
  net.add_argument('--auxiliary', action='store_true', help='the state dict has the auxiliary head')
  net.add_argument('--mean', type=float, nargs='+', help='per-channel input mean in [0, 1] (default: none)')
  net.add_argument('--std', type=float, nargs='+', help='per-channel input std in [0, 1]')
  return parser


def _test_images(spec: str) -> data.Split:
  """The test images named by ``--data``."""
  if spec == 'digits':
    return data.load({'source': 'digits'}).test
  if spec.endswith('.npz'):
    return data.read_npz(spec)
  return data.load({'source': 'tfds', 'name': spec}).test


def _check_input_shape(workdir: str, images) -> None:
  """A one-line error when the test images' shape is not the one the network of ``workdir`` was trained on
  (its ``network.json``): a fully convolutional network would otherwise run on them."""
  shape = tuple(workdir_lib.read_json(workdir_lib.path(workdir, train.NETWORK), train.NETWORK_FIX)['input_shape'])
  if tuple(images.shape[1:]) != shape:
    raise ValueError(f'the test images have shape {tuple(images.shape[1:])}, the network in {workdir} was trained '
                     f'on images of shape {shape}: evaluate it on data of that shape')


def _load(args) -> tuple[Callable, data.Split, str, dict]:
  """``(logits_fn, test images, output directory, source)`` of the command line."""
  path = os.path.normpath(args.checkpoint)
  if os.path.basename(path) == workdir_lib.CHECKPOINTS:
    path = os.path.dirname(path)
  if os.path.isdir(path):
    net, variables, step = train.load_trained(path)
    if args.genotype and genotypes.load(args.genotype) != net.genotype:
      raise ValueError(f'--genotype {args.genotype} differs from the genotype {path} was trained with: drop '
                       '--genotype or point --checkpoint to its training workdir')
    config = workdir_lib.read_json(workdir_lib.path(path, workdir_lib.CONFIG),
                                   'pass the workdir of a training run, which holds its config.json')
    if args.data:
      test = _test_images(args.data)
    else:
      _, test = train.splits(data.load(config['data']), config['train']['holdout_fraction'], config['seed'])
    _check_input_shape(path, test.images)
    source = dict(checkpoint=os.path.abspath(path), checkpoint_step=step, data=args.data or config['data'])
    return net.logits_fn(variables), test, args.output or path, source
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--checkpoint {args.checkpoint!r} does not exist: pass a training workdir or a '
                            'PyTorch state dict file (.npz or .pt)')
  if not args.genotype or not args.data:
    raise ValueError('a state dict needs --genotype (the architecture) and --data (the test images), plus the '
                     'network size (--init-channels, --layers, --num-classes, --auxiliary)')
  test = _test_images(args.data)
  net = networks.EvalNetwork(genotypes.load(args.genotype), init_channels=args.init_channels, layers=args.layers,
                             num_classes=args.num_classes, auxiliary=args.auxiliary,
                             mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None)
  variables = interop.from_torch_state_dict(path, net, input_shape=(1, *test.images.shape[1:]))
  source = dict(checkpoint=os.path.abspath(path), data=args.data)
  return net.logits_fn(variables), test, args.output or os.path.dirname(os.path.abspath(path)), source


def run(args: argparse.Namespace) -> int:
  """``jaxnas evaluate``: prints the Markdown table and writes evaluation.json / evaluation.md."""
  settings = default_config()
  settings.update(dict(attacks=tuple(a for a in args.attacks.split(',') if a), eps=args.eps, norm=args.norm,
                       step_size=args.step_size, n_examples=args.n_examples, batch_size=args.batch_size,
                       seed=args.seed, certify=tuple(n for n in args.certify.split(',') if n),
                       certify_method=args.certify_method))
  try:
    logits_fn, test, output, source = _load(args)
    result = evaluate_model(logits_fn, test.images, test.labels, settings,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  result['source'] = source
  print(format_markdown(result), end='')
  print('\n'.join(write_evaluation(result, output)))
  return 0
